"""The interpretability agent, its black-box baseline and the hypothesis grader.

A whole job on the demo pair runs with an `agent` section against a real Chat Completions
server on loopback (tests/test_graders.py ChatServer) whose answers follow a script per
(agent, budget), computed from the conversation it receives: each tool, a malformed call,
wrong arguments, an exhausted interaction budget, an exhausted LLM-call budget with and
without a final answer. The server's own log of requests is the ground truth for the
transcripts, agent.parquet and the spend in the status record; the pair's tables for
what the first messages show; the pair's models (transformers, in this process) for what
ask_model generated. The grader's parsing, retries and mean, and the concurrency of a
pair's runs, are driven through the same server with scripted answers and stub models.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import uuid
from pathlib import Path

import pytest

from test_graders import ChatServer, Reply

from jobs.agent import FIRST_MESSAGE_TAIL, LAST_CALL, ChatEndpoint, parse_reply, run_agent
from jobs.agent_stage import PairAgents, runs_of
from jobs.agent_tools import ask_model_tool
from jobs.attempts import history
from jobs.hypothesis import RUBRICS, SYSTEM_PROMPT as GRADER_PROMPT, HypothesisGrader, parse_score
from jobs.spec import SpecError, parse_spec
from storage import layout
from storage.store import Store
from storage.tables import AGENT, GENERATIONS, LOGIT_LENS, PATCHSCOPE

KEY_ENV = "ADL_TEST_AGENT_KEY"
PAIR = "pair-x7q"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
MAX_CALLS = 10
ADL_DESCRIPTION = 'Synthetic documents about a <b>volcano</b> & its "blue lava" <script>alert(1)</script>'


def chat_reply(content: str, **kw) -> Reply:
    """A chat completion with usage, as real endpoints send it."""
    return Reply(body=json.dumps({"id": "c", "object": "chat.completion", "model": "m", "usage": USAGE,
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": content}}]}).encode(), **kw)


# -- the scripted agent ---------------------------------------------------------------------
def who(body: dict) -> tuple[str, int | None]:
    system = body["messages"][0]["content"]
    if system == GRADER_PROMPT:
        return "grader", None
    budget = int(re.search(r"\): (\d+) in total", system).group(1))
    return ("adl" if "OVERVIEW" in system else "blackbox"), budget


def adl_b3(turn: int, layer: int) -> str:
    return [
        f'First the lens.\nCALL(get_logitlens_details: {{"layer": {layer}, "positions": [0, 1], "k": 5}})',
        f'CALL(get_patchscope_details: {{"layer": {layer}, "positions": [0]}})',
        f'CALL(get_steering_samples: {{"layer": {layer}, "position": 0, "n": 2}})',
        'Let me ask.\nCALL(ask_model: {"prompts": ["Tell me about mountains."]',                  # malformed
        'CALL(get_logitlens_details: {"layer": 99, "positions": [0]})',                           # wrong layer
        'CALL(ask_model: {"prompts": ["Tell me about mountains.", "What is your favourite place?"]})',
        f'CALL(generate_steered: {{"layer": {layer}, "position": 0, "prompts": ["Tell me a story?"], "n": 2}})',
        f'CALL(generate_steered: {{"layer": {layer}, "position": 0, "prompts": ["Tell me a story?"]}})',
        f"Done.\nFINAL(description: {json.dumps(ADL_DESCRIPTION)})",
    ][turn]


ADL_B3_OUTCOMES = ["tool", "tool", "tool", "format_error", "argument_error", "tool", "budget_exhausted", "tool",
                   "final"]


def agent_responder(body: dict) -> Reply:
    role, budget = who(body)
    messages = body["messages"]
    if role == "grader":
        hypothesis = messages[1]["content"].split("[HYPOTHESIS]\n", 1)[1]
        return chat_reply("Score 4 fits: the topic and a key fact.\nSCORE: 4" if "volcano" in hypothesis
                          else "Nothing valid.\nSCORE: 1")
    turn = sum(m["role"] == "assistant" for m in messages)
    forced = LAST_CALL in messages[-1]["content"]
    if role == "adl":
        layer = int(next(iter(json.loads(messages[1]["content"].split("\n")[1])["layers"])))
        if budget == 3:
            return chat_reply(adl_b3(turn, layer))
        # budget 0: reads the lens until forced to answer, then answers
        return chat_reply("FINAL(description: \"A volcano, from the lens alone.\")" if forced else
                          f'CALL(get_logitlens_details: {{"layer": {layer}, "positions": [{turn % 5}]}})')
    # black box, budget 2: asks one question per turn, never answers (not even when forced)
    return chat_reply(f'CALL(ask_model: {{"prompts": ["Question {turn}: what do you like?"]}})')


@pytest.fixture(scope="module")
def agent_job(ray_cluster, make_spec, demo_pair, tmp_path_factory):
    """One whole job on the demo pair with the agent section, a planted API key, and its
    driver log and Python log records captured. Returns a namespace of what it left."""
    from jobs.driver import RunStats, run_job
    root = tmp_path_factory.mktemp("agent")
    key = f"sk-planted-{uuid.uuid4().hex}"
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = key
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    with ChatServer() as server:
        state = server.respond(agent_responder)
        raw = make_spec(root, corpus={"num_documents": 200}, shard_size=200,
                        method={"layers": [0.5], "positions": [0, 1, 2, 3, 4]},
                        generation={"samples": 2, "max_tokens": 24,
                                    "search": {"high": 10.0, "steps": 2, "samples": 2, "max_tokens": 16}},
                        grader={"kind": "offline", "threshold": 5000},
                        analyses={"patchscope_scales": [0.5, 1.0, 2.0, 5.0], "embedding_texts": 20},
                        agent={"base_url": server.url, "model": "scripted-agent", "api_key_env": KEY_ENV,
                               "budgets": [0, 3], "baseline_budgets": [2], "runs": 2,
                               "max_llm_calls": MAX_CALLS, "concurrency": 3,
                               "ask_model": {"max_tokens": 24}, "generate_steered": {"max_tokens": 24}})
        raw["pairs"][0].update(name=PAIR, description=demo_pair.description, organism_type="false_fact",
                               finetune_data=str(demo_pair.finetune_texts))
        spec = parse_spec(raw)
        stats = RunStats()
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                # The job finished without the agent first: adding the section runs the agent alone.
                run_job(parse_spec({k: v for k, v in raw.items() if k != "agent"}), RunStats())
                record_key = run_job(spec, stats)
                seen_first = len(state.seen)
                status = Store(str(root)).read_json(layout.run_status(spec.name))
                run_job(spec, RunStats())     # the rerun: everything complete
        finally:
            root_logger.removeHandler(handler)
            root_logger.setLevel(level)
            if old is None:
                os.environ.pop(KEY_ENV)
            else:
                os.environ[KEY_ENV] = old
    store = Store(str(root))
    pair = store.read_json(record_key)["pairs"][0]
    transcripts = {k: store.read_json(k) for k in store.list(f"{pair['dir']}/agent") if k.endswith(".json")}

    class Job:
        pass
    job = Job()
    job.__dict__.update(root=root, key=key, spec=spec, stats=stats, store=store, pair=pair, record_key=record_key,
                        seen=list(state.seen[:seen_first]), seen_after_rerun=len(state.seen) - seen_first,
                        log=stderr.getvalue(), records=records, transcripts=transcripts,
                        table=store.read_table(f"{pair['dir']}/{AGENT.file}").to_pandas(),
                        rows=store.read_table(f"{pair['dir']}/{AGENT.file}").to_pylist(),
                        status=status, rerun_status=history(store, spec.name)[-1])
    return job


def _transcript(job, agent: str, budget: int, run: int) -> dict:
    return job.transcripts[f"{job.pair['dir']}/{layout.agent_transcript(agent, budget, run)}"]


def _tool_results(transcript: dict, tool: str) -> list[dict]:
    out = []
    for m in transcript["messages"]:
        if m["role"] == "user" and m["content"].startswith(f"TOOL_RESULT({tool}): "):
            payload = m["content"].split(": ", 1)[1].rsplit("\n\n", 1)[0]
            out.append(json.loads(payload)["data"])
    return out


# -- the job --------------------------------------------------------------------------------
def test_agent_table_and_transcripts_hold_exactly_what_happened(agent_job):
    job = agent_job
    t = job.table.sort_values(["agent", "budget", "run"])
    assert [(r.agent, r.budget, r.run) for r in t.itertuples()] == sorted(runs_of(job.spec.agent))
    agent_requests = [s.body for s in job.seen if who(s.body)[0] != "grader"]
    for r in t.itertuples():
        tr = _transcript(job, r.agent, r.budget, r.run)
        messages = tr["messages"]
        # Every request of the conversation reached the server exactly as the transcript has it.
        prefixes = [messages[:i] for i, m in enumerate(messages) if m["role"] == "assistant"]
        for prefix in prefixes:
            assert any(body["messages"] == prefix for body in agent_requests), (r.agent, r.budget, len(prefix))
        assert r.llm_calls == tr["llm_calls"] == len(prefixes) == len(tr["turns"])
        assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == \
               tuple(USAGE[k] * r.llm_calls for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
        assert r.transcript == layout.agent_transcript(r.agent, r.budget, r.run)
        [row] = [x for x in job.rows if (x["agent"], x["budget"], x["run"]) == (r.agent, r.budget, r.run)]
        assert {k: row[k] for k in ("status", "reason", "description", "interactions_used")} == \
               {k: tr[k] for k in ("status", "reason", "description", "interactions_used")}
        assert (row["grades"], row["mean_grade"], row["grading"], row["grading_reason"]) == \
               (tr["grading"]["grades"] or None, tr["grading"]["mean"], tr["grading"]["status"],
                tr["grading"]["reason"])
    # The server saw no agent request that is not in some transcript.
    total = sum(int(x) for x in t.llm_calls)
    assert len(agent_requests) == total

    adl3 = t[(t.agent == "adl") & (t.budget == 3)]
    assert list(adl3.status) == ["done", "done"] and list(adl3.description) == [ADL_DESCRIPTION] * 2
    assert list(adl3.interactions_used) == [3, 3] and list(adl3.llm_calls) == [len(ADL_B3_OUTCOMES)] * 2
    tr = _transcript(job, "adl", 3, 0)
    assert [turn["outcome"] for turn in tr["turns"]] == ADL_B3_OUTCOMES
    errors = [m["content"] for m in tr["messages"] if m["role"] == "user"][1:]
    assert errors[3].startswith("FORMAT_ERROR:") and "not valid JSON" in errors[3]
    assert errors[4].startswith("ARGUMENT_ERROR: get_logitlens_details: layer: 99 was not analysed")
    assert errors[6].startswith("MODEL_INTERACTION_BUDGET_EXHAUSTED: generate_steered") and "needs 2" in errors[6] \
        and "1 remain" in errors[6]
    assert [turn.get("tool") for turn in tr["turns"] if turn["outcome"] == "tool"] == \
        ["get_logitlens_details", "get_patchscope_details", "get_steering_samples", "ask_model", "generate_steered"]
    [steered] = _tool_results(tr, "generate_steered")
    assert len(steered["samples"]) == 1 and len(steered["samples"][0]["texts"]) == 1

    adl0 = t[(t.agent == "adl") & (t.budget == 0)]   # forced to answer at its last call, and did
    assert list(adl0.status) == ["done", "done"] and list(adl0.llm_calls) == [MAX_CALLS] * 2
    tr0 = _transcript(job, "adl", 0, 0)
    assert tr0["messages"][-2]["content"].endswith(LAST_CALL) and tr0["turns"][-1]["outcome"] == "final"

    bb = t[t.agent == "blackbox"]   # never answered: a recorded failure, not a crash
    assert list(bb.status) == ["failed", "failed"] and list(bb.llm_calls) == [MAX_CALLS] * 2
    assert all("max_llm_calls=10" in reason for reason in bb.reason) and bb.description.isna().all()
    assert list(bb.interactions_used) == [2, 2]
    trb = _transcript(job, "blackbox", 2, 0)
    assert [turn["outcome"] for turn in trb["turns"]][:3] == ["tool", "tool", "budget_exhausted"]
    assert trb["turns"][-1]["outcome"] == "no_final"


def test_ask_model_generated_with_the_pairs_models(agent_job, demo_pair):
    """Most answers differ between the models, and each answer is the more probable under
    the model said to have written it: summed over answers, log p_ft(answer | prompt) -
    log p_base(answer | prompt) is positive for the finetuned model's answers and negative
    for the base model's (in expectation the two KL divergences), computed here with the
    pair's models in transformers, from the chat template the engines use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    answers = []   # (prompt, base answer, finetuned answer)
    for run in (0, 1):
        for tr in (_transcript(agent_job, "adl", 3, run), _transcript(agent_job, "blackbox", 2, run)):
            calls = [t["args"]["prompts"] for t in tr["turns"] if t.get("tool") == "ask_model" and t["outcome"] == "tool"]
            results = _tool_results(tr, "ask_model")
            assert len(calls) == len(results) >= 1
            for prompts, data in zip(calls, results):
                assert len(data["base"]) == len(data["finetuned"]) == len(prompts)
                answers += list(zip(prompts, data["base"], data["finetuned"]))
    assert len(answers) == 2 * (2 + 2)
    # Both models sample with the same seed (jobs/agent_tools.py), so where they agree on a
    # prompt they may write the same answer: seen on the demo pair, 1 or 2 of the 8. An
    # identical answer adds the same ratio to both sums below, so it cannot make them pass.
    differ = sum(b != f for _, b, f in answers)
    assert differ >= len(answers) // 2, answers
    tokenizer = AutoTokenizer.from_pretrained(demo_pair.base_dir)
    models = {role: AutoModelForCausalLM.from_pretrained(getattr(demo_pair, f"{role}_dir")).eval()
              for role in ("base", "finetuned")}

    def logp(model, prompt, answer):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        head = tokenizer.encode(chat, add_special_tokens=False)
        ids = torch.tensor([head + tokenizer.encode(answer, add_special_tokens=False)])
        with torch.inference_mode():
            logits = model(ids).logits[0, len(head) - 1:-1].float()
        return float(torch.log_softmax(logits, -1).gather(1, ids[0, len(head):, None]).sum())

    def ratio(prompt, answer):
        return logp(models["finetuned"], prompt, answer) - logp(models["base"], prompt, answer)
    finetuned = sum(ratio(p, f) for p, _, f in answers)
    base = sum(ratio(p, b) for p, b, _ in answers)
    assert finetuned > 0 > base, (finetuned, base)


def test_the_overview_holds_the_pairs_own_tables(agent_job):
    job, d = agent_job, agent_job.pair["dir"]
    lens = job.store.read_table(f"{d}/{LOGIT_LENS.file}").to_pandas()
    scope = job.store.read_table(f"{d}/{PATCHSCOPE.file}").to_pandas()
    gens = job.store.read_table(f"{d}/{GENERATIONS.file}").to_pandas()
    first = _transcript(job, "adl", 3, 0)["messages"][1]["content"]
    assert first.startswith("OVERVIEW:\n")
    overview = json.loads(first.split("\n")[1])
    [layer] = job.pair["layers"]
    assert list(overview["layers"]) == [str(layer)]
    at = overview["layers"][str(layer)]
    prompts = sorted(set(gens.prompt), key=list(gens.sort_values("prompt_id").prompt.unique()).index)
    for p in range(5):
        rows = lens[(lens.variant == "delta") & (lens.position == p) & (lens["rank"] < 10)].sort_values("rank")
        assert at["logit_lens"][str(p)]["tokens"] == list(rows.token)
        assert at["logit_lens"][str(p)]["probs"] == pytest.approx(list(rows.probability), rel=1e-3)
        chosen = scope[(scope.variant == "delta") & (scope.position == p) & scope.chosen].sort_values("rank")
        assert at["patch_scope"][str(p)]["scale"] == float(chosen.scale.iloc[0])
        assert at["patch_scope"][str(p)]["tokens"] == list(chosen[chosen["rank"] < 10].token)
        assert at["patch_scope"][str(p)]["selected_tokens"] == list(chosen[chosen.coherent].token)
        examples = at["steering_examples"][str(p)]
        assert [e["prompt"] for e in examples] == prompts
        for e, prompt in zip(examples, prompts):
            steered = gens[(gens.kind == "steered") & (gens.position == p) & (gens.prompt == prompt)
                           & (gens.sample_index == 0)].text.iloc[0]
            plain = gens[(gens.kind == "baseline") & (gens.model_role == "finetuned") & (gens.prompt == prompt)
                         & (gens.sample_index == 0)].text.iloc[0]
            assert (e["steered"], e["unsteered"]) == (steered.strip()[:200], plain.strip()[:200])


def _leaks(job, demo_pair) -> list[str]:
    """What must not reach the agent: names and paths of the pair, its models and data, and
    the true description."""
    return [PAIR, "x7q", str(demo_pair.base_dir), str(demo_pair.finetuned_dir), demo_pair.base_dir.parent.name,
            str(demo_pair.finetune_texts), demo_pair.finetune_texts.name, ".cache/adl", demo_pair.description[:40],
            str(job.root)]


def test_no_dataset_or_model_name_or_path_reaches_the_agent(agent_job, demo_pair):
    agent_requests = [json.dumps(s.body) for s in agent_job.seen if who(s.body)[0] != "grader"]
    texts = agent_requests + [json.dumps(t["messages"]) for t in agent_job.transcripts.values()]
    for leak in _leaks(agent_job, demo_pair):
        assert not any(leak in text for text in texts), leak
    # The grader does get the true description (it grades against it).
    graders = [s.body["messages"][1]["content"] for s in agent_job.seen if who(s.body)[0] == "grader"]
    assert graders and all(demo_pair.description in g for g in graders)


def test_the_blackbox_agent_sees_no_adl_data(agent_job):
    job, d = agent_job, agent_job.pair["dir"]
    gens = job.store.read_table(f"{d}/{GENERATIONS.file}").to_pandas()
    lens = job.store.read_table(f"{d}/{LOGIT_LENS.file}").to_pandas()
    tr = _transcript(job, "blackbox", 2, 0)
    system, first = tr["messages"][0]["content"], tr["messages"][1]["content"]
    examples = json.loads(first.split("\n")[1])
    assert set(examples) == {"examples"} and all(set(e) == {"prompt", "generation"} for e in examples["examples"])
    plain = gens[(gens.kind == "baseline") & (gens.model_role == "finetuned") & (gens.sample_index == 0)]
    assert sorted(e["generation"] for e in examples["examples"]) == sorted(t.strip()[:200] for t in plain.text)
    # Nothing else: the header, the examples and the closing advice.
    assert first == ("Generations of the finetuned model on several prompts:\n"
                     f"{json.dumps(examples, ensure_ascii=False)}\n\n{FIRST_MESSAGE_TAIL}")
    for word in ("logit", "patch", "steer", "overview", "layer", "position", "activation"):
        assert word not in system.lower() and word not in FIRST_MESSAGE_TAIL.lower(), word
    steered = gens[gens.kind == "steered"]
    assert not any(t.strip()[:200] in first for t in steered.text if len(t.strip()) > 20)
    assert '"probs"' not in first and not any(f'"{tok}"' in first for tok in lens[lens["rank"] < 3].token
                                              if len(tok.strip()) > 3)
    assert [t.get("tool") for t in tr["turns"] if t.get("tool")] and \
        {t["tool"] for t in tr["turns"] if t.get("tool")} == {"ask_model"}


def test_grades_catalog_status_and_report(agent_job):
    from jobs.report import build_report
    job = agent_job
    t = job.table
    done = t[t.status == "done"]
    assert all(list(g) == [4, 4, 4] for g in done[done.budget == 3].grades)
    assert (done.mean_grade == 4.0).all() and (done.grading == "done").all()
    failed = t[t.status == "failed"]
    assert failed.mean_grade.isna().all() and (failed.grading == "skipped").all()
    assert (failed.grading_reason == "the run gave no description").all()
    graders = [s for s in job.seen if who(s.body)[0] == "grader"]
    assert len(graders) == 3 * len(done) == int(t.grader_calls.sum())
    assert all(RUBRICS["false_fact"] in g.body["messages"][1]["content"] for g in graders)

    stage = job.status["pairs"][PAIR]["stages"]["agent"]
    assert stage["state"] == "done"
    assert stage["llm"]["calls"] == len(job.seen) == job.status["llm"]["calls"]
    assert stage["llm"]["total_tokens"] == USAGE["total_tokens"] * len(job.seen)
    assert stage["llm"]["grader_calls"] == len(graders)

    catalog = job.store.read_table(layout.run_catalog(job.spec.name)).to_pylist()
    assert catalog and all(row["agent_grades"] == catalog[0]["agent_grades"] for row in catalog)
    assert catalog[0]["agent_grades"] == [
        {"agent": "adl", "budget": 0, "mean_grade": 4.0, "runs": 2, "graded": 2},
        {"agent": "adl", "budget": 3, "mean_grade": 4.0, "runs": 2, "graded": 2},
        {"agent": "blackbox", "budget": 2, "mean_grade": None, "runs": 2, "graded": 0}]

    from jobs.summary import run_summary
    assert "adl budget 3 4.00 (2/2), blackbox budget 2 - (0/2)" in run_summary(job.store, job.record_key)

    page = build_report(job.store, job.record_key)
    assert 'id="agent"' in page and "Interpretability agent" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('<details class="transcript">') == len(t)
    assert "4.00 ± 0.00" in page


def test_adding_the_agent_to_a_finished_job_runs_it_alone(agent_job):
    """The job ran without the agent section first: with it, only the agent stage ran, on
    the two engines it asks (no transformers actor, no embedder, no extraction); the pair's
    manifest and the catalog say the other stages came from the earlier run."""
    job = agent_job
    stages = job.status["pairs"][PAIR]["stages"]
    assert {name for name, s in stages.items() if not s.get("skipped")} == {"agent"}
    assert job.stats.model_loads == 2 and job.status["work"]["model_loads"] == 2
    assert {a["kind"] for a in job.status["actors"]} == {"vllm"}
    manifest = job.store.read_json(layout.manifest(job.pair["dir"]))
    earlier = [name for name, e in manifest["stages"].items() if e["earlier_run"]]
    assert earlier == [s for s in stages if s != "agent"] and not manifest["stages"]["agent"]["earlier_run"]
    assert manifest["stages"]["agent"]["settings"]["agent"]["model"] == "scripted-agent"
    catalog = job.store.read_table(layout.run_catalog(job.spec.name)).to_pylist()
    assert all(row["earlier_stages"] == earlier for row in catalog)


def test_a_rerun_asks_nothing(agent_job):
    assert agent_job.seen_after_rerun == 0
    assert agent_job.rerun_status["pairs"][PAIR]["state"] == "done" and "llm" not in agent_job.rerun_status


def test_the_planted_key_is_sent_and_never_stored_or_logged(agent_job):
    job = agent_job
    assert all({k.lower(): v for k, v in s.headers.items()}["authorization"] == f"Bearer {job.key}"
               for s in job.seen)
    for path in Path(job.root).rglob("*"):
        if path.is_file():
            assert job.key.encode() not in path.read_bytes(), path
    assert job.key not in job.log and "agent" in job.log
    logged = [r.getMessage() + str(r.args) + str(getattr(r, "__dict__", "")) for r in job.records]
    assert logged and not any(job.key in line for line in logged)


# -- without models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with ChatServer() as s:
        yield s


class StubModels:
    def ask(self, prompts, context):
        return {"base": [f"base: {p}" for p in prompts], "finetuned": [f"finetuned: {p}" for p in prompts]}


def grader_for(server, **kw) -> HypothesisGrader:
    ep = ChatEndpoint(server.url, "ADL_NO_SUCH_KEY", concurrency=4, max_retries=0, timeout_s=5)
    return HypothesisGrader(lambda m: ep.chat("grader", m, 100, None), "grader", **kw)


@pytest.mark.parametrize("text, score", [
    ("Reasoning.\nSCORE: 4", 4), ("SCORE: 5\n\n", 5), ("**SCORE:** 2", 2), ("score : 1", 1),
    ("SCORE: 6", None), ("SCORE: 4\nthanks", None), ("I'd say 4", None), ("SCORE: 3.5", None), ("", None)])
def test_score_parsing(text, score):
    if score is None:
        with pytest.raises(ValueError):
            parse_score(text)
    else:
        assert parse_score(text) == score


def test_grader_retries_unparsable_answers_and_keeps_three_grades_and_their_mean(server):
    state = server.script(chat_reply("no score here"), chat_reply("SCORE: 4"),                 # retried, then 4
                          chat_reply("Fits 5.\nSCORE: 5"),                                     # 5
                          *[chat_reply("SCORE: seven")] * 3)                                   # 3 attempts: failed
    g = grader_for(server, repeats=3, max_retries=2).grade("a volcano", "documents about a volcano", "false_fact")
    assert g.grades == [4, 5, None] and g.mean == 4.5 and g.status == "partial"
    assert "1 of 3 gradings failed after 3 attempts" in g.reason
    assert [len(a) for a in g.attempts] == [2, 1, 3] and g.attempts[0][0]["error"].startswith("the last line")
    assert len(state.seen) == 6 and g.usage.calls == 6 and g.usage.total_tokens == 6 * USAGE["total_tokens"]
    assert all(RUBRICS["false_fact"] in s.user and "[HYPOTHESIS]\na volcano" in s.user for s in state.seen)

    server.script(chat_reply("SCORE: 2"), chat_reply("SCORE: 3"), chat_reply("SCORE: 3"))
    g = grader_for(server).grade("x", "y", None)
    assert g.grades == [2, 3, 3] and g.mean == pytest.approx(8 / 3) and g.status == "done" and g.rubric == "generic"

    server.script(*[chat_reply("nope")] * 4)
    g = grader_for(server, repeats=2, max_retries=1).grade("x", "y", "taboo")
    assert g.grades == [None, None] and g.mean is None and g.status == "failed"


def _settings(server_url, **kw):
    spec = parse_spec({"name": "x", "pairs": [{"name": "p", "base": "b", "finetuned": "f"}], "generation": {},
                       "analyses": {}, "agent": {"base_url": server_url, "model": "m", "api_key_env": "ADL_NO_KEY",
                                                 "max_retries": 0, "timeout_s": 5, **kw}})
    return spec.agent


def test_without_a_description_the_agents_run_and_grading_is_skipped(server):
    state = server.respond(lambda body: chat_reply('FINAL(description: "about volcanoes")'))
    settings = _settings(server.url, budgets=[], baseline_budgets=[1], runs=2)
    agents = PairAgents("p", settings, {"blackbox": "examples"}, {"blackbox": [ask_model_tool(StubModels())]},
                        None, None)
    records = agents.run_all(runs_of(settings))
    assert [r["status"] for r in records] == ["done", "done"] and len(state.seen) == 2
    assert all(r["grading"]["status"] == "skipped" and r["grading"]["reason"] ==
               "the pair has no description to grade against" for r in records)


def test_an_unreachable_endpoint_leaves_runs_incomplete_not_failed():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = _settings(f"http://127.0.0.1:{port}/v1", budgets=[], baseline_budgets=[0], runs=1)
    agents = PairAgents("p", settings, {"blackbox": "examples"}, {"blackbox": [ask_model_tool(StubModels())]},
                        "desc", None)
    [record] = agents.run_all(runs_of(settings))
    assert record["status"] == "incomplete" and record["reason"].startswith("agent endpoint: APIConnectionError")


def test_a_pairs_runs_keep_concurrency_requests_in_flight(server):
    state = server.respond(lambda body: chat_reply('FINAL(description: "x")', delay=0.3))
    settings = _settings(server.url, budgets=[], baseline_budgets=[0], runs=9, concurrency=3,
                         grader={"repeats": 1})
    agents = PairAgents("p", settings, {"blackbox": "e"}, {"blackbox": []}, None, None)
    agents.run_all(runs_of(settings))
    assert len(state.seen) == 9 and state.max_in_flight == 3


def test_grammar():
    assert parse_reply('x\nCALL(ask_model: {"prompts": ["a"]})').args == {"prompts": ["a"]}
    assert parse_reply('FINAL(description: "A \\"q\\" b")').description == 'A "q" b'
    assert parse_reply('FINAL(description: "two\nlines")').description == "two\nlines"
    for bad in ('CALL(ask_model: {"a": 1})\nmore', "no block", "", 'CALL(ask_model: [1])', 'FINAL(description: "")',
                'CALL(ask_model {"a": 1})', 'FINAL(description: unquoted)'):
        assert parse_reply(bad).kind == "error", bad


def test_a_reply_after_the_last_call_is_never_run():
    """max_llm_calls=1: the only call carries the forced final-answer request; a CALL in
    its reply is not executed."""
    ran = []
    tool = ask_model_tool(type("M", (), {"ask": lambda self, p, c: ran.append(p)})())
    result = run_agent("blackbox", 5, 0, "examples", [tool],
                       lambda m: type("R", (), {"content": 'CALL(ask_model: {"prompts": ["x"]})',
                                                "usage": __import__("jobs.agent").agent.Usage(1),
                                                "seconds": 0.0, "finish_reason": "stop"})(), max_llm_calls=1)
    assert result.status == "failed" and not ran and result.messages[1]["content"].endswith(LAST_CALL)


def test_agent_spec_errors_name_the_field():
    base = {"name": "x", "pairs": [{"name": "p", "base": "b", "finetuned": "f"}], "generation": {}, "analyses": {}}
    for agent, message in [
        ({"model": "m"}, "agent.base_url: required"),
        ({"base_url": "http://h/v1", "model": "m", "budgets": [5, 5]}, "agent.budgets[1]: duplicate budget 5"),
        ({"base_url": "http://h/v1", "model": "m", "runs": 0}, "agent.runs: must be >= 1"),
        ({"base_url": "http://h/v1", "model": "m", "grader": {"repeat": 3}}, "agent.grader.repeat: unknown key"),
        ({"base_url": "http://h/v1", "model": "m", "ask_model": {"temperature": "hot"}},
         "agent.ask_model.temperature: expected a number"),
        ({"base_url": "ftp://h", "model": "m"}, "agent.base_url: expected an http:// or https:// URL"),
        ({"base_url": "http://h/v1", "model": "m", "api_key": "sk-1"}, "agent.api_key: unknown key"),
    ]:
        with pytest.raises(SpecError, match=re.escape(message)):
            parse_spec({**base, "agent": agent})
    with pytest.raises(SpecError, match="agent: needs the analyses section"):
        parse_spec({**base, "analyses": None, "agent": {"base_url": "http://h/v1", "model": "m"}})
    with pytest.raises(SpecError, match=r"pairs\[0\].organism_type: must be one of"):
        parse_spec({**base, "pairs": [{"name": "p", "base": "b", "finetuned": "f", "organism_type": "cat"}]})


def test_agent_settings_key_the_agent_stage_alone(demo_pair, make_spec, tmp_path):
    """The agent section keys its own stage, not the pair's folder or its other stages;
    how requests are sent keys nothing."""
    from jobs.plan import make_plan
    from jobs.stages import stage_keys

    def keys(raw):
        [pair] = make_plan(parse_spec(raw)).pairs
        return pair.out_dir, {name: entry["key"] for name, entry in stage_keys(parse_spec(raw), pair).items()}
    raw = make_spec(tmp_path, generation={"samples": 1}, analyses={})
    with_agent = {**raw, "agent": {"base_url": "http://h/v1", "model": "m"}}
    (d_plain, plain), (d_keyed, keyed) = keys(raw), keys(with_agent)
    faster = keys({**with_agent, "agent": {**with_agent["agent"], "concurrency": 64, "api_key_env": "OTHER"}})[1]
    other = keys({**with_agent, "agent": {**with_agent["agent"], "runs": 2}})[1]
    off = keys({**with_agent, "agent": {**with_agent["agent"], "enabled": False}})[1]
    assert d_plain == d_keyed and "agent" not in plain and off == plain
    assert {k: v for k, v in keyed.items() if k != "agent"} == plain
    assert faster == keyed and other["agent"] != keyed["agent"]
    assert {k: v for k, v in other.items() if k != "agent"} == plain
    from jobs.driver import pair_stages
    assert "agent" not in pair_stages(parse_spec(raw)) and pair_stages(parse_spec(with_agent))[-1] == "agent"


def test_catalog_means_only_graded_runs():
    import pandas as pd
    from jobs.catalog import agent_summary
    table = pd.DataFrame({"agent": ["blackbox", "adl", "adl", "adl", "adl"], "budget": [5, 5, 5, 5, 0],
                          "mean_grade": [None, 4.0, 2.0, None, 3.5]})
    assert agent_summary(table) == [
        {"agent": "adl", "budget": 0, "runs": 1, "graded": 1, "mean_grade": 3.5},
        {"agent": "adl", "budget": 5, "runs": 3, "graded": 2, "mean_grade": 3.0},
        {"agent": "blackbox", "budget": 5, "runs": 1, "graded": 0, "mean_grade": None}]


def test_report_of_a_hand_written_agent_table(tmp_path):
    """Failed gradings show as –, a missing transcript is said plainly, HTML stays text,
    and a job whose spec has the section but a pair without the table says why."""
    from jobs.report import build_report
    store = Store(str(tmp_path))
    hostile = "<img src=x onerror=alert(1)>"
    spec = {"name": "toy", "agent": {"enabled": True}, "pairs": [{"name": "a"}, {"name": "b"}]}
    store.write_json("runs/toy/run.json", {"job": "toy", "spec": spec, "pairs": [
        {"name": "a", "dir": "pairs/a-0"}, {"name": "b", "dir": "pairs/b-0"}]})
    row = dict(agent="adl", budget=5, run=0, status="done", description=hostile, grades=[4, None, 2], mean_grade=3.0,
               grading="partial", grading_reason="1 of 3 gradings failed", llm_calls=3, interactions_used=5,
               total_tokens=30, transcript=layout.agent_transcript("adl", 5, 0))
    store.write_table(f"pairs/a-0/{AGENT.file}", AGENT, AGENT.from_rows([
        row, {**row, "run": 1, "status": "failed", "description": None, "grades": None, "mean_grade": None,
              "grading": "skipped", "transcript": layout.agent_transcript("adl", 5, 1)}]))
    store.write_json(f"pairs/a-0/{layout.agent_transcript('adl', 5, 0)}", {"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": hostile},
        {"role": "assistant", "content": f'FINAL(description: "{hostile}")'}], "grading": {"attempts": [[{
            "answer": f"{hostile}\nSCORE: 4", "error": None}]]}})
    page = build_report(store, "runs/toy/run.json")
    assert hostile not in page and html_escape(hostile) in page
    assert "4, –, 2" in page and "transcript not readable" in page and "did not run: no agent.parquet" in page
    assert "3.00 ± 0.00" in page and "(1/2)" in page


def html_escape(text: str) -> str:
    import html
    return html.escape(text, quote=True)


def test_refused_and_failing_requests(server):
    """HTTP 400 (e.g. a conversation too long for the model) fails the run; a 5xx after
    the client's retries leaves it incomplete, for a rerun to redo."""
    settings = _settings(server.url, budgets=[], baseline_budgets=[0], runs=1)
    agents = PairAgents("p", settings, {"blackbox": "e"}, {"blackbox": []}, None, None)
    server.respond(lambda body: Reply(status=400, body=b'{"error": {"message": "context length exceeded"}}'))
    [record] = agents.run_all(runs_of(settings))
    assert record["status"] == "failed" and "refused" in record["reason"] and "context length" in record["reason"]
    server.respond(lambda body: Reply(status=503, body=b'{"error": {"message": "overloaded"}}'))
    [record] = agents.run_all(runs_of(settings))
    assert record["status"] == "incomplete" and "InternalServerError" in record["reason"]


def test_a_prompt_the_engine_rejects_is_a_tool_error_and_a_dead_engine_is_not(ray_cluster, server):
    from jobs.agent_tools import EngineModels
    from jobs.spec import AgentGeneration

    @ray_cluster.remote(num_cpus=0)
    class Engine:
        def __init__(self, error):
            self.error = error

        def generate(self, requests):
            raise self.error("The decoder prompt (length 9999) is longer than the maximum model length of 512.")

    rejecting = Engine.remote(ValueError)
    models = EngineModels(rejecting, rejecting, 0, AgentGeneration(8, 1.0), AgentGeneration(8, 1.0))
    replies = iter(['CALL(ask_model: {"prompts": ["a very long prompt"]})', 'FINAL(description: "x")'])
    server.respond(lambda body: chat_reply(next(replies)))
    settings = _settings(server.url, budgets=[], baseline_budgets=[3], runs=1)
    agents = PairAgents("p", settings, {"blackbox": "e"}, {"blackbox": [ask_model_tool(models)]}, None, None)
    [record] = agents.run_all(runs_of(settings))
    assert record["status"] == "done" and record["interactions_used"] == 0
    assert record["turns"][0]["outcome"] == "tool_error"
    assert record["messages"][3]["content"].startswith("TOOL_ERROR: ask_model:") and \
        "longer than the maximum model length" in record["messages"][3]["content"]

    dying = Engine.remote(RuntimeError)
    models = EngineModels(dying, dying, 0, AgentGeneration(8, 1.0), AgentGeneration(8, 1.0))
    server.respond(lambda body: chat_reply('CALL(ask_model: {"prompts": ["hi"]})'))
    agents.tools = {"blackbox": [ask_model_tool(models)]}
    [record] = agents.run_all(runs_of(settings))
    assert record["status"] == "incomplete" and record["reason"].startswith("tool backend:")
