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


def test_the_pair_key_covers_the_analyses_settings(make_spec, demo_pair, tmp_path):
    def out_dir(**overrides):
        raw = make_spec(tmp_path, **overrides)
        raw["pairs"][0]["finetune_data"] = str(tmp_path / "ft.txt")
        return make_plan(parse_spec(raw)).pairs[0].out_dir
    (tmp_path / "ft.txt").write_text("lava\n")
    plain, default = out_dir(), out_dir(analyses={})
    assert len({plain, default, out_dir(analyses={"patchscope_top_k": 10}),
                out_dir(analyses={"embedding_model": "other"})}) == 4
    (tmp_path / "ft.txt").write_text("magma\n")   # the finetuning data's contents count
    assert out_dir(analyses={}) != default and out_dir() == plain


def test_the_run_summary_shows_the_analyses(generation_run):
    from jobs.summary import run_summary
    _, store, _, _ = generation_run
    text = run_summary(store, layout.run_record("test"))
    assert "patchscope of delta at the grader's scale:" in text
    assert "token relevance: skipped (token relevance needs an LLM grader" in text
    assert re.search(r"layer \d+ pos 2: steered [\d.-]+  unsteered [\d.-]+  base [\d.-]+", text)
