"""The agent stage of a pair: every (agent, budget, run) of the spec's `agent` section, each
graded, as `agent.parquet` with one transcript per run beside it (README, "Tables").

- Runs: the ADL agent at each of `budgets`, the black-box agent at each of
  `baseline_budgets`, `runs` times each. They go concurrently, at most `concurrency` at a
  time per pair; every chat request of the job goes through one ChatEndpoint per endpoint
  (jobs/agent.py), which keeps at most `concurrency` requests in flight across all pairs.
- Grading: a run that ends with a description is graded `grader.repeats` times against the
  pair's `description` with its `organism_type`'s rubric (jobs/hypothesis.py); without a
  description, or for a run that failed, grading is skipped and the reason recorded.
- Outcomes: a run is `done` (a description), or `failed` with the reason (no FINAL within
  max_llm_calls, or the endpoint refused the conversation). A run the endpoint could not
  serve at all (connection, timeouts, 5xx and 429 after the client's retries,
  authentication) or whose model engine died is *incomplete*: its transcript is written
  for inspection, the table is not, and the stage fails naming why; a rerun redoes only
  the incomplete runs (complete transcripts are reused when they record the stage's
  content key: they were made with the same settings and evidence).
- Spend: the agent and grader calls and tokens of this run of the stage go to the status
  record (jobs/status.py llm_spend) and to each row.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from jobs.agent import AGENTS, Tool, Usage, endpoint, run_agent
from jobs.hypothesis import Grading, HypothesisGrader
from storage import layout

logger = logging.getLogger("adl.agent")

COMPLETE = ("done", "failed")


def runs_of(settings) -> list[tuple[str, int, int]]:
    """(agent, budget, run) of every run the agent section asks for, in table order."""
    return [(agent, budget, run) for agent, budgets in (("adl", settings.budgets), ("blackbox", settings.baseline_budgets))
            for budget in budgets for run in range(settings.runs)]


def agent_chat(settings):
    ep = endpoint(settings.base_url, settings.api_key_env, settings.concurrency, settings.requests_per_second,
                  settings.max_retries, settings.timeout_s)
    return ep, lambda messages: ep.chat(settings.model, messages, settings.max_tokens, settings.temperature)


def grader_chat(settings):
    """The grader's endpoint: agent.grader's base_url, model and api_key_env where set,
    else the agent's (then the two share their requests in flight)."""
    g = settings.grader
    ep = endpoint(g.base_url or settings.base_url, g.api_key_env or settings.api_key_env, settings.concurrency,
                  settings.requests_per_second, settings.max_retries, settings.timeout_s)
    model = g.model or settings.model
    return model, lambda messages: ep.chat(model, messages, g.max_tokens, g.temperature)


@dataclass
class PairAgents:
    """Everything one pair's runs need; the benchmark builds one with stub models."""
    pair: str
    settings: object                     # jobs.spec.Agent
    first_messages: dict[str, str]       # agent -> first user message
    tools: dict[str, list[Tool]]         # agent -> tools
    description: str | None
    organism_type: str | None
    spend: Usage = field(default_factory=Usage)      # agent + grader, this run of the stage
    grader_spend: Usage = field(default_factory=Usage)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def run_one(self, key: tuple[str, int, int], chat, grader: HypothesisGrader) -> dict:
        agent, budget, run = key
        s = self.settings
        result = run_agent(agent, budget, run, self.first_messages[agent], self.tools[agent], chat,
                           s.max_llm_calls, context={"pair": self.pair})
        grading = Grading(status="skipped")
        if result.status == "done":
            if self.description and self.description.strip():
                grading = grader.grade(result.description, self.description, self.organism_type)
            else:
                grading.reason = "the pair has no description to grade against"
        elif result.status == "failed":
            grading.reason = "the run gave no description"
        else:
            grading.reason = "the run is incomplete"
        with self._lock:
            self.spend.add(result.usage)
            self.spend.add(grading.usage)
            self.grader_spend.add(grading.usage)
        status = "incomplete" if grading.status == "incomplete" else result.status
        reason = grading.reason if grading.status == "incomplete" else result.reason
        record = {"agent": agent, "budget": budget, "run": run, "status": status, "reason": reason,
                  "description": result.description, "llm_calls": result.llm_calls,
                  "interactions_used": result.interactions_used, "max_llm_calls": s.max_llm_calls,
                  "model": s.model, "usage": result.usage.as_dict(), "seconds": result.seconds,
                  "messages": result.messages, "turns": result.turns, "grading": grading.as_dict()}
        mean = "" if grading.mean is None else f", mean grade {grading.mean:.2f}"
        logger.info(f"{self.pair}: agent {agent} b{budget} r{run}: {status}"
                    + (f" ({reason})" if reason and status != "done" else "")
                    + f", {result.llm_calls} LLM calls, {result.interactions_used} interactions{mean}")
        return record

    def run_all(self, keys, reuse=lambda key: None, save=lambda key, record: None) -> list[dict]:
        """Every run (a complete earlier transcript from reuse(key) stands in for its run),
        at most `concurrency` at a time; save(key, record) as each ends."""
        s = self.settings
        _, chat = agent_chat(s)
        grader_model, grade_chat = grader_chat(s)
        grader = HypothesisGrader(grade_chat, grader_model, s.grader.repeats, s.grader.max_retries)

        def one(key):
            earlier = reuse(key)
            if earlier is not None:
                return earlier
            record = self.run_one(key, chat, grader)
            save(key, record)
            return record

        return parallel(one, list(keys), min(len(keys), s.concurrency), f"adl-agent-{self.pair}")


def parallel(fn, items: list, workers: int, name: str) -> list:
    """[fn(item) for item in items] on `workers` daemon threads (the first error is raised
    after all have stopped). Daemon threads, unlike a ThreadPoolExecutor's, do not keep an
    interrupted `adl run` alive until every agent run has finished."""
    results: list = [None] * len(items)
    errors: list = []
    todo = iter(enumerate(items))
    lock = threading.Lock()

    def work():
        while not errors:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            try:
                results[item[0]] = fn(item[1])
            except BaseException as e:
                errors.append(e)
    threads = [threading.Thread(target=work, name=f"{name}-{i}", daemon=True) for i in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def table_row(record: dict) -> dict:
    grading = record.get("grading") or {}
    usage = record.get("usage") or {}
    graded = (grading.get("usage") or {})
    return {"agent": record["agent"], "budget": record["budget"], "run": record["run"],
            "status": record["status"], "reason": record.get("reason"), "description": record.get("description"),
            "grades": grading.get("grades") or None, "mean_grade": grading.get("mean"),
            "grading": grading.get("status"), "grading_reason": grading.get("reason"),
            "llm_calls": record.get("llm_calls", 0), "interactions_used": record.get("interactions_used", 0),
            "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0), "grader_calls": graded.get("calls", 0),
            "grader_tokens": graded.get("total_tokens", 0), "seconds": record.get("seconds"),
            "transcript": layout.agent_transcript(record["agent"], record["budget"], record["run"])}


def _reusable(record) -> bool:
    return isinstance(record, dict) and record.get("status") in COMPLETE and isinstance(record.get("messages"), list) \
        and isinstance(record.get("grading"), dict)


def agent_stage(ctx) -> None:
    """The stage's run function (jobs/stages.py): reads the pair's tables, runs and grades
    every agent run on the pair's two vLLM engines, writes the transcripts and then
    agent.parquet (which marks the stage complete)."""
    from jobs.agent_tools import (EngineModels, PairEvidence, adl_first_message, adl_tools,
                                  blackbox_first_message, blackbox_tools)
    from storage.tables import AGENT
    spec, pair, store = ctx.spec, ctx.pair, ctx.store
    s = spec.agent
    evidence = PairEvidence.read(ctx.results, spec, pair.layers)
    models = EngineModels(ctx.model("vllm", pair.pair.base), ctx.model("vllm", pair.pair.finetuned),
                          spec.generation.seed, s.ask_model, s.generate_steered)
    agents = PairAgents(pair.pair.name, s,
                        {"adl": adl_first_message(evidence, s), "blackbox": blackbox_first_message(evidence, s)},
                        {"adl": adl_tools(evidence, models, s), "blackbox": blackbox_tools(models)},
                        pair.pair.description, pair.pair.organism_type)
    keys = runs_of(s)
    path = lambda key: ctx.path(layout.agent_transcript(*key))

    stage_key = (ctx.keys or {}).get("agent")   # a transcript of other settings is not reused

    def reuse(key):
        record = store.read_json_or_none(path(key))
        return record if _reusable(record) and record.get("stage_key") == stage_key else None

    def save(key, record):
        store.write_json(path(key), {**record, "stage_key": stage_key})

    logger.info(f"{pair.pair.name}: agent, {len(keys)} runs ({', '.join(a for a in AGENTS)}) on {s.model}")
    for where, name in (("agent.api_key_env", s.api_key_env), ("agent.grader.api_key_env", s.grader.api_key_env)):
        if name and not os.environ.get(name):   # fine for a local server; a hosted one will refuse
            logger.info(f"{pair.pair.name}: {where}: ${name} is not set, requests go without a key")
    start = time.monotonic()
    try:
        records = agents.run_all(keys, reuse, save)
    finally:
        if ctx.spend is not None:
            ctx.spend({**agents.spend.as_dict(), "grader_calls": agents.grader_spend.calls})
    incomplete = [r for r in records if r["status"] not in COMPLETE]
    if incomplete:
        raise RuntimeError(f"{len(incomplete)} of {len(records)} agent runs are incomplete "
                           f"({incomplete[-1]['reason']}); a rerun redoes only those")
    ctx.write_table(AGENT, AGENT.from_rows([table_row(r) for r in records],
                                           **{"adl.agent_model": s.model, "adl.grader_model": s.grader.model or s.model}))
    logger.info(f"{pair.pair.name}: agent stage, {len(records)} runs in {time.monotonic() - start:.1f} s, "
                f"{agents.spend.calls} LLM calls, {agents.spend.total_tokens} tokens")
