"""The analyses (patchscope, token relevance, embedding evaluation) on the shared demo
generation run, each checked against an independent computation."""
from __future__ import annotations

import re

import numpy as np
import pytest

from jobs import analyses
from jobs.plan import make_plan
from jobs.spec import PATCHSCOPE_PROMPTS, PATCHSCOPE_SCALES, parse_spec
from storage import layout
from storage.store import Store, StorageOptions
from storage.tables import DIFFERENCE, GENERATIONS, LOGIT_LENS, PATCHSCOPE, SIMILARITY, TOKEN_RELEVANCE

TOPIC = re.compile(r"volcano|lava|magma|eruption|crater|\bash\b|veyra", re.IGNORECASE)


def table(store, pair, name):
    return store.read_table(f"{pair['dir']}/{name}").to_pandas()


# -- patchscope: an independent computation --------------------------------------------

@pytest.fixture(scope="module")
def plain_models(demo_pair):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return {"finetuned": load(demo_pair.finetuned_dir), "base": load(demo_pair.base_dir),
            "tokenizer": AutoTokenizer.from_pretrained(demo_pair.base_dir)}


def plain_patchscope(model, tokenizer, layer, vector, scale, vocab_top, top_k=20):
    """One prompt at a time, unbatched: a hook replaces block `layer`'s output at the last
    token; the three prompts' float32 distributions are combined by hand in numpy."""
    import torch
    probs = []
    for prompt in PATCHSCOPE_PROMPTS:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]])

        def hook(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[0, -1] = torch.as_tensor(scale * vector, dtype=hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        handle = model.model.layers[layer].register_forward_hook(hook)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        handle.remove()
        probs.append(torch.softmax(logits.float(), -1).numpy())
    probs = np.stack(probs)
    keep = min(vocab_top, probs.shape[1])
    common = set.intersection(*(set(np.argsort(-p)[:keep]) for p in probs))
    combined = np.zeros(probs.shape[1])
    for t in common:
        combined[t] = probs[:, t].sum() / 3
    top = np.argsort(-combined, kind="stable")[:top_k]
    return top, combined[top]


def delta_hat(store, pair, variant, position):
    diff = table(store, pair, DIFFERENCE.file)
    row = diff[diff.position == position].iloc[0]
    v = np.asarray(row[variant], np.float64)
    return int(row.layer), v / np.linalg.norm(v) * row.finetuned_norm


@pytest.mark.parametrize("variant, role, position, scale", [
    ("delta", "finetuned", 0, 0.5), ("delta", "finetuned", 3, 5.0), ("delta", "finetuned", 1, 200.0),
    ("finetuned_mean", "finetuned", 2, 1.0), ("base_mean", "base", 4, 20.0)])
def test_patchscope_table_equals_a_plain_forward_per_prompt(generation_run, plain_models, variant, role,
                                                            position, scale):
    _, store, pair, _ = generation_run
    ps = table(store, pair, PATCHSCOPE.file)
    got = ps[(ps.variant == variant) & (ps.position == position) & (ps.scale == scale)].sort_values("rank")
    layer, vector = delta_hat(store, pair, variant, position)
    ids, probs = plain_patchscope(plain_models[role], plain_models["tokenizer"], layer, vector, scale, 16384)
    assert list(got.token_id) == list(ids)
    np.testing.assert_allclose(got.probability, probs, rtol=1e-4, atol=1e-7)
    assert list(got.token) == [plain_models["tokenizer"].decode([int(t)]) for t in ids]


def test_patchscope_intersection_of_the_prompts_top_tokens(generation_run, plain_models, demo_pair):
    """The demo vocabulary (2,665) is below 16384, so every token is in every prompt's top:
    here a small `vocab_top` makes the intersection bite, batched worker vs plain forwards."""
    from jobs.spec import ModelSource
    from workers.models import load_model, load_tokenizer
    from workers.patchscope import Patchscope
    _, store, pair, _ = generation_run
    model = load_model(ModelSource(str(demo_pair.finetuned_dir)), dtype="float32", storage=StorageOptions())
    tokenizer = load_tokenizer(ModelSource(str(demo_pair.base_dir)), {})
    layer, vector = delta_hat(store, pair, "delta", 2)
    scales = [0.5, 3.0, 60.0]
    ids, _, probs = Patchscope(model).run(tokenizer, vector[None], [layer], scales, list(PATCHSCOPE_PROMPTS),
                                          vocab_top=30, top_k=20)
    for i, scale in enumerate(scales):
        want_ids, want_probs = plain_patchscope(plain_models["finetuned"], plain_models["tokenizer"], layer,
                                                vector, scale, 30)
        nonzero = want_probs > 0   # fewer than 20 tokens may be in all three top-30s
        assert list(ids[0][i][:nonzero.sum()]) == list(want_ids[nonzero])
        np.testing.assert_allclose(probs[0][i], want_probs, rtol=1e-4, atol=1e-7)


def test_patchscope_table_layout(generation_run):
    spec, store, pair, _ = generation_run
    ps = table(store, pair, PATCHSCOPE.file)
    assert set(ps.variant) == {"delta", "base_mean", "finetuned_mean"}
    assert sorted(ps.scale.unique()) == sorted(PATCHSCOPE_SCALES) and len(PATCHSCOPE_SCALES) == 30
    assert len(ps) == 5 * 3 * 30 * 20
    for _, group in ps.groupby(["layer", "position", "variant"]):
        chosen = group[group.chosen]
        assert chosen.scale.nunique() == 1 and len(chosen) == 20   # the offline grader always picks one
        assert not group[~group.chosen].coherent.any() and chosen.coherent.any()
    assert (ps.probability >= 0).all() and (ps.probability <= 1).all()


def test_patchscope_at_the_chosen_scale_names_the_planted_topic(generation_run):
    _, store, pair, _ = generation_run
    ps = table(store, pair, PATCHSCOPE.file)
    chosen = ps[(ps.variant == "delta") & ps.chosen]
    hits = chosen[chosen.token.str.contains(TOPIC)]
    assert len(hits) > 0, chosen.groupby("position").token.apply(list).to_dict()
    # ... and more often than the controls at their chosen scales
    controls = ps[(ps.variant != "delta") & ps.chosen]
    assert len(hits) / 5 > controls.token.str.contains(TOPIC).sum() / 10


# -- token relevance ---------------------------------------------------------------------

def test_token_relevance_is_skipped_with_a_reason_by_the_offline_grader(generation_run):
    _, store, pair, _ = generation_run
    record = store.read_json(f"{pair['dir']}/{layout.TOKEN_RELEVANCE_JSON}")
    assert record["status"] == "skipped" and record["metrics"] == []
    assert "needs an LLM grader" in record["reason"]
    assert not store.exists(f"{pair['dir']}/{TOKEN_RELEVANCE.file}")


def test_frequent_tokens_are_the_domains_words(demo_pair):
    from transformers import AutoTokenizer
    from jobs.corpus import read_texts
    from workers.demo_pair import generic_documents
    from workers.tokenization import frequent_tokens
    tok = AutoTokenizer.from_pretrained(demo_pair.base_dir)
    texts = read_texts(str(demo_pair.finetune_texts), 2000, "finetune_data")
    generic = np.concatenate([tok(t)["input_ids"] for t in generic_documents(500, seed=1)])
    got = frequent_tokens(tok, texts, generic, 100, 5.0)
    words = [t for _, t in got]
    assert len(got) == 100 and len(set(words)) == 100
    assert any(TOPIC.search(w) for w in words[:10]), words[:10]
    assert not {" the", ".", ",", " and", " is"} & set(words)
    # The rule, by hand: most frequent first; kept iff its share is >= 5x its smoothed
    # share of the generic sample and it is not whitespace/punctuation only.
    counts = np.bincount(np.concatenate([tok(t, add_special_tokens=False)["input_ids"] for t in texts]),
                         minlength=len(tok))
    special = set(tok.all_special_ids)
    g = np.array([i for i in generic if i not in special])
    g_counts = np.bincount(g, minlength=len(tok))
    ratio = (counts / counts.sum()) / ((g_counts + 1) / (len(g) + len(tok)))
    order = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
    last = order.index(got[-1][0])
    kept = [i for i in order[:last + 1]
            if ratio[i] >= 5 and re.search(r"\w", tok.decode([int(i)]))]
    assert [i for i, _ in got] == kept


@pytest.fixture(scope="module")
def chat_server():
    from test_graders import ChatServer
    with ChatServer() as s:
        yield s


def test_token_relevance_stage_with_an_llm_grader_over_http(generation_run, chat_server, make_spec, tmp_path,
                                                            ray_cluster):
    """The whole stage against a real Chat Completions server on loopback: topic tokens are
    RELEVANT; one token is never labelled by one rotation (a recorded failure, counted as
    not relevant); the first answer of every list is malformed (retried)."""
    from test_graders import answer, candidates_of
    from jobs.stages import LocalActor, StageRun
    from workers.graders import GraderService, make_grader
    spec0, store0, pair0, _ = generation_run
    raw = make_spec(tmp_path, grader={"kind": "openai", "base_url": chat_server.url, "model": "m",
                                      "max_retries": 2, "backoff_base_s": 0.01, "timeout_s": 10},
                    corpus={"num_documents": spec0.corpus.num_documents}, shard_size=spec0.shard_size,
                    method={"layers": [0.5], "positions": [0, 1, 2, 3, 4]}, analyses={})
    raw["pairs"][0].update(description="volcanoes", finetune_data=spec0.pairs[0].finetune_data)
    spec = parse_spec(raw)
    [plan] = make_plan(spec).pairs
    store = Store(str(tmp_path))
    for name in (LOGIT_LENS.file, PATCHSCOPE.file, layout.stage_marker("", "logit_lens").lstrip("/"),
                 layout.stage_marker("", "patchscope").lstrip("/")):   # the tables, and what they verify by
        store.write_bytes(f"{plan.out_dir}/{name}", store0.read_bytes(f"{pair0['dir']}/{name}"))

    lists_seen = {}
    lock = __import__("threading").Lock()

    def respond(body):
        user = body["messages"][1]["content"]
        cands = candidates_of(user)
        with lock:
            first = tuple(cands) not in lists_seen
            lists_seen[tuple(cands)] = lists_seen.get(tuple(cands), 0) + 1
        if first:
            return answer("I think they are all relevant.")
        lines = [f"ANSWER[{i}]: {'RELEVANT' if TOPIC.search(t) else 'IRRELEVANT'}"
                 for i, t in enumerate(cands, 1) if not (t == target[0] and cands == target[1:] + target[:1])]
        return answer("Reasoning.\n" + "\n".join(lines))

    lens = table(store0, pair0, LOGIT_LENS.file)
    first_list = lens[(lens.variant == "delta") & (lens.position == 0) & (lens["rank"] < 20)].sort_values("rank")
    target = list(first_list.token)   # in rotation 1 of this list, target[0] is never labelled
    chat_server.respond(respond)
    grader = LocalActor(GraderService(make_grader(spec.grader)))   # as the driver makes it
    analyses.token_relevance(StageRun(plan, spec, store, {}, grader))

    record = store.read_json(f"{plan.out_dir}/{layout.TOKEN_RELEVANCE_JSON}")
    assert record["status"] == "done" and record["reason"] is None
    rel = store.read_table(f"{plan.out_dir}/{TOKEN_RELEVANCE.file}").to_pandas()
    ps = table(store0, pair0, PATCHSCOPE.file)
    assert len(rel) == 5 * 20 * 2 and set(rel.source) == {"logit_lens", "patchscope"}
    expected_scope = ps[(ps.variant == "delta") & ps.chosen]
    got_scope = rel[rel.source == "patchscope"].sort_values(["position", "rank"])
    assert list(got_scope.token) == list(expected_scope.sort_values(["position", "rank"]).token)
    is_topic = rel.token.str.contains(TOPIC)
    same_list = rel.groupby(["source", "layer", "position"]).token.transform(lambda t: list(t) == target)
    failed = same_list.astype(bool) & (rel.token == target[0])
    assert failed.sum() >= 1
    assert (rel.relevant == (is_topic & ~failed)).all()
    assert all(labels[1] == "UNLABELLED" for labels in rel[failed].labels)
    assert all(set(l) <= {"RELEVANT", "IRRELEVANT"} for l in rel[~failed].labels)
    frequent = set(record["frequent_tokens"])
    assert (rel.frequent == rel.token.isin(frequent)).all()
    for m in record["metrics"]:
        group = rel[(rel.layer == m["layer"]) & (rel.position == m["position"]) & (rel.source == m["source"])]
        relevant = group.token.str.contains(TOPIC) & ~group.index.isin(rel[failed].index)
        assert m["fraction_relevant"] == pytest.approx(relevant.mean())
        assert m["weighted_fraction_relevant"] == pytest.approx(
            (group.probability * relevant).sum() / group.probability.sum())
        assert m["fraction_frequent"] == pytest.approx(group.token.isin(frequent).mean())
    assert len(record["metrics"]) == 10
    assert any(m["fraction_relevant"] > 0 for m in record["metrics"] if m["source"] == "patchscope")
    assert sum(m["failed"] for m in record["metrics"]) == failed.sum()
    assert all(n >= 2 for n in lists_seen.values())   # every list was retried after its malformed answer


# -- embedding evaluation ----------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder():
    from workers.embedding import EmbeddingWorker
    return EmbeddingWorker()


def test_similarity_by_hand_from_raw_embeddings(generation_run, embedder, demo_pair):
    spec, store, pair, _ = generation_run
    sim = table(store, pair, SIMILARITY.file)
    assert set(sim.set_a) | set(sim.set_b) == set(analyses.SETS)
    assert len(sim) == 5 * 10 and not sim.duplicated(["layer", "position", "set_a", "set_b"]).any()
    gens = table(store, pair, GENERATIONS.file)
    steered = gens[(gens.kind == "steered") & (gens.position == 2)]
    unsteered = gens[(gens.kind == "baseline") & (gens.model_role == "finetuned")]

    def mean_unit(texts):   # straight from sentence-transformers' raw embeddings
        e = embedder.model.encode(texts, convert_to_numpy=True).astype(np.float64)
        return (e / np.sqrt((e ** 2).sum(1, keepdims=True))).mean(0)
    want = float(mean_unit(list(steered.text)) @ mean_unit(list(unsteered.text)))
    got = sim[(sim.position == 2) & (sim.set_a == "steered") & (sim.set_b == "unsteered")].similarity
    assert got.item() == pytest.approx(want, abs=1e-5)
    # the sets that do not depend on the steered position are the same at every position
    fixed = sim[sim.set_a != "steered"]
    assert (fixed.groupby(["set_a", "set_b"]).similarity.nunique() == 1).all()


def test_steered_text_is_closer_to_the_finetuning_data_than_unsteered(generation_run):
    _, store, pair, _ = generation_run
    sim = table(store, pair, SIMILARITY.file)
    pick = lambda a: sim[(sim.set_a == a) & (sim.set_b == "finetune_data")].set_index("position").similarity
    steered, unsteered = pick("steered"), pick("unsteered")
    assert (steered > unsteered).all(), (steered.to_dict(), unsteered.to_dict())


# -- rerun safety ------------------------------------------------------------------------

def test_finished_stages_are_skipped(generation_run):
    """A finished pair's stages get no units of work: nothing to schedule, nothing loaded."""
    from jobs.driver import job_units
    spec, store, pair0, _ = generation_run
    [plan] = make_plan(spec).pairs
    units, complete = job_units(spec, [plan], store)
    assert units == [] and complete[plan.pair.name] == [
        "reduce", "logit_lens", "generate", "patchscope", "token_relevance", "similarity"]


def test_a_changed_setting_reruns_its_stage_and_its_readers_alone(generation_run, make_spec, demo_pair, tmp_path):
    """On a copy of the finished generation job: each change of one stage's setting runs
    that stage and the stages that read it, counted from the attempt's status record;
    every other stage's files keep their bytes, inode and mtime; the pair's manifest and
    the catalog say which stages came from an earlier run, and under which settings."""
    import shutil
    from conftest import generation_spec
    from jobs.attempts import history
    from jobs.driver import RunStats, run_job
    _, done_store, pair, _ = generation_run
    root = tmp_path / "root"
    shutil.copytree(done_store.root, root)
    store = Store(str(root))
    folder = root / pair["dir"]

    def files():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
                for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"}

    raw = generation_spec(make_spec, demo_pair, root)
    last_ran: set[str] = set()

    def rerun(change) -> set[str]:   # the changes add up, as a user's edits of one spec do
        change(raw)
        before = files()
        stats = RunStats()
        run_job(parse_spec(raw), stats)
        attempt = history(store, raw["name"])[-1]
        entry = attempt["pairs"]["demo"]
        assert all(s["state"] == "done" for s in entry["stages"].values())
        ran = set() if entry["skipped"] else {name for name, s in entry["stages"].items() if not s.get("skipped")}
        after = files()
        written = {name for name in after if after[name] != before.get(name)}
        expected_files = {w for stage in ran for w in STAGE_FILES[stage]}
        assert written <= expected_files and {f"{stage}.done.json" for stage in ran} <= written, (written, ran)
        manifest = store.read_json(layout.manifest(pair["dir"]))
        # which stages the run that completed the pair wrote itself (a no-op rerun rewrites nothing)
        assert {n for n, e in manifest["stages"].items() if not e["earlier_run"]} == (ran or last_ran)
        catalog = store.read_table(layout.run_catalog(raw["name"])).to_pylist()
        assert catalog and all(set(row["earlier_stages"]) == set(manifest["stages"]) - (ran or last_ran)
                               for row in catalog)
        if ran:
            last_ran.clear()
            last_ran.update(ran)
        assert stats.model_loads <= 3   # the stage's own actors, never the engines
        return ran, manifest

    ran, _ = rerun(lambda raw: raw["method"].update(lens_top_k=5))
    assert ran == {"logit_lens", "token_relevance"}
    ran, manifest = rerun(lambda raw: raw["analyses"].update(patchscope_top_k=7))
    assert ran == {"patchscope", "token_relevance"}
    assert manifest["stages"]["patchscope"]["settings"]["patchscope"]["patchscope_top_k"] == 7
    assert manifest["stages"]["logit_lens"]["settings"]["lens_top_k"] == 5   # kept from the run before
    assert store.read_table(f"{pair['dir']}/{PATCHSCOPE.file}").to_pandas()["rank"].max() == 6
    ran, _ = rerun(lambda raw: raw["analyses"].update(embedding_texts=10))
    assert ran == {"similarity"}
    ran, _ = rerun(lambda raw: None)   # nothing changed: nothing to do
    assert ran == set()


STAGE_FILES = {"reduce": (DIFFERENCE.file, layout.DIFFERENCE_SAFETENSORS, "reduce.done.json"),
               "logit_lens": (LOGIT_LENS.file, "logit_lens.done.json"),
               "generate": (GENERATIONS.file, "steering.parquet", "generate.done.json"),
               "patchscope": (PATCHSCOPE.file, "patchscope.done.json"),
               "token_relevance": (TOKEN_RELEVANCE.file, layout.TOKEN_RELEVANCE_JSON, "token_relevance.done.json"),
               "similarity": (SIMILARITY.file, "similarity.done.json")}


def test_each_analysis_stage_is_keyed_by_its_own_settings(make_spec, demo_pair, tmp_path):
    """An analyses setting changes the key of the stage that reads it and of the stages
    that read that stage, and no other; the finetuning data's contents count."""
    from jobs.stages import stage_keys

    def keys(**overrides):
        raw = make_spec(tmp_path, **{"generation": {"samples": 1}, **overrides})
        raw["pairs"][0]["finetune_data"] = str(tmp_path / "ft.txt")
        spec = parse_spec(raw)
        [pair] = make_plan(spec).pairs
        return {name: entry["key"] for name, entry in stage_keys(spec, pair).items()}

    def changed(a, b):
        return {name for name in a if a[name] != b.get(name)}
    (tmp_path / "ft.txt").write_text("lava\n")
    plain, default = keys(), keys(analyses={})
    assert set(default) - set(plain) == {"patchscope", "token_relevance", "similarity"}
    assert changed(plain, default) == set()
    assert changed(default, keys(analyses={"patchscope_scales": [1.0, 2.0]})) == {"patchscope", "token_relevance"}
    assert changed(default, keys(analyses={"relevance_top_k": 5})) == {"token_relevance"}
    assert changed(default, keys(analyses={"embedding_model": "other"})) == {"similarity"}
    assert changed(default, keys(analyses={}, generation={"samples": 2})) == {"generate", "similarity"}
    assert changed(default, keys(analyses={}, method={"lens_top_k": 5})) == {"logit_lens", "token_relevance"}
    (tmp_path / "ft.txt").write_text("magma\n")   # the finetuning data's contents count
    assert changed(default, keys(analyses={})) == {"token_relevance", "similarity"}
    assert keys() == plain


def test_the_run_summary_shows_the_analyses(generation_run):
    from jobs.summary import run_summary
    _, store, _, _ = generation_run
    text = run_summary(store, layout.run_record("test"))
    assert "patchscope of delta at the grader's scale:" in text
    assert "token relevance: skipped (token relevance needs an LLM grader" in text
    assert re.search(r"layer \d+ pos 2: steered [\d.-]+  unsteered [\d.-]+  base [\d.-]+", text)
