"""The generation stage: strength search logic, whole jobs with generations, engine crashes."""
from __future__ import annotations

import hashlib
import json
import re
import time

import numpy as np
import pytest

from jobs.attempts import attempts_dir
from jobs.driver import RunStats, run_job
from jobs.spec import Generation, ModelSource, parse_spec
from jobs.steering import (SearchState, baseline_requests, baseline_rows, descend, search_rounds, steer,
                           steering_prompts, tree_strengths)
from storage import layout
from storage.store import Store
from storage.tables import DIFFERENCE, GENERATIONS, STEERING


def expected_seed(job_seed: int, **identity) -> int:
    """A sample's seed as README "Seeds" defines it, computed here from the identity."""
    blob = json.dumps({"job_seed": job_seed, **identity}, sort_keys=True, separators=(",", ":")).encode()
    return int(hashlib.sha256(blob).hexdigest()[:16], 16) >> 1


def steered_seed(job_seed, pair, layer, position, prompt_id, sample_index):
    return expected_seed(job_seed, kind="steered", pair=pair, model_role="finetuned", layer=int(layer),
                         position=int(position), prompt_id=int(prompt_id), sample_index=int(sample_index))


def search_seed(job_seed, pair, layer, position, prompt_id, strength, sample_index):
    return expected_seed(job_seed, kind="search", pair=pair, model_role="finetuned", layer=int(layer),
                         position=int(position), prompt_id=int(prompt_id), strength=float(strength),
                         sample_index=int(sample_index))


def baseline_seed(job_seed, source, prompt_id, sample_index):
    model = None if source is None else {"model": source.model, "revision": source.revision,
                                         "adapter": source.adapter}
    return expected_seed(job_seed, kind="baseline", model=model, prompt_id=int(prompt_id),
                         sample_index=int(sample_index))


def sequential_bisection(low, high, steps, passes):
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if passes(mid) else (low, mid)
    return low


@pytest.mark.parametrize("lookahead", [1, 2, 3, 5])
@pytest.mark.parametrize("threshold", [0.0, 3.3, 49.9, 50.0, 77.7, 100.0])
def test_batched_lookahead_search_equals_plain_bisection(lookahead, threshold):
    passes = lambda a: a <= threshold
    states = [SearchState(0, p, 0, 0.0, 100.0, 12) for p in range(2)]
    batches = []

    def evaluate(batch):
        batches.append(len(batch))
        return [(1.0 if passes(a) else 0.0, passes(a), 10) for _, a in batch]

    search_rounds(states, lookahead, evaluate)
    expected = sequential_bisection(0.0, 100.0, 12, passes)
    assert all(s.low == expected for s in states)
    assert len(batches) == -(-12 // lookahead)            # one batch per round, all targets in it
    assert all(len(s.trials) == sum(2 ** min(lookahead, 12 - k) - 1 for k in range(0, 12, lookahead))
               for s in states)


def test_tree_strengths_cover_every_path():
    assert tree_strengths(0, 100, 2) == [50, 25, 75]
    assert descend(0, 100, 2, {50: True, 25: False, 75: False}) == (50, 75)


TOPIC = re.compile(r"volcano|lava|magma|eruption|crater|veyra", re.IGNORECASE)


def test_generation_tables(generation_run):
    spec, store, pair, stats = generation_run
    # One actor per model and runtime: each model's transformers actor (extraction, lens,
    # patchscope, and the finetuned one grades), each model's vLLM engine, one embedder.
    assert stats.model_loads == 2 + 2 + 1
    assert stats.loads_by_runtime() == {"embedder": 1, "transformers": 2, "vllm": 2}
    assert all(n == 1 for n in stats.loads.values()) and stats.reloads == []
    gens = store.read_table(f"{pair['dir']}/{GENERATIONS.file}").to_pandas()
    steering = store.read_table(f"{pair['dir']}/{STEERING.file}").to_pandas()
    prompts = 20
    baseline = gens[gens.kind == "baseline"]
    assert sorted(baseline.model_role.unique()) == ["base", "finetuned"]
    assert len(baseline) == 2 * prompts * 2
    assert not baseline.duplicated(["model_role", "prompt_id", "sample_index"]).any()
    steered = gens[gens.kind == "steered"]
    assert len(steered) == 5 * prompts * 2
    assert set(steered.position) == {0, 1, 2, 3, 4} and steered.alpha.notna().all()
    assert (gens.token_count > 0).all() and gens.finish_reason.isin(["stop", "length"]).all()
    # three threshold prompts per position; 6 bisection steps in 3 rounds of 3 strengths
    assert len(steering) == 5 * 3 and (steering.trials.map(len) == 3 * 3).all()
    for _, group in steering.groupby("position"):
        assert group.alpha.iloc[0] == pytest.approx(group.threshold.mean())
    assert ((steering.threshold >= 0) & (steering.threshold < 10)).all()


def test_steering_brings_out_the_planted_topic(generation_run):
    """Counted over all samples: steered text names the topic far more often than the
    finetuned model's own unsteered text on the same prompts."""
    spec, store, pair, _ = generation_run
    gens = store.read_table(f"{pair['dir']}/{GENERATIONS.file}").to_pandas()
    mentions = gens.text.str.contains(TOPIC)
    steered = mentions[gens.kind == "steered"].mean()
    unsteered = mentions[(gens.kind == "baseline") & (gens.model_role == "finetuned")].mean()
    base = mentions[(gens.kind == "baseline") & (gens.model_role == "base")].mean()
    assert steered >= unsteered + 0.2, (steered, unsteered)
    assert base <= unsteered


def test_rerun_with_generation_does_no_model_work(generation_run):
    spec, store, _, _ = generation_run
    attempts = attempts_dir(spec.name) + "/"
    results = lambda: [f for f in store.listing() if not f[0].startswith(attempts)]   # each attempt adds its own
    before = results()
    stats = RunStats()
    run_job(spec, stats)
    assert stats.model_loads == 0 and stats.pairs_reduced == 0
    assert results() == before


def test_generation_actor_killed_mid_batch_is_replaced(ray_cluster, demo_pair):
    import ray
    from jobs.spec import ModelSource
    from workers.generation import GenerationRequest, GenerationWorker
    actor = ray.remote(GenerationWorker).options(num_cpus=0.5, max_restarts=1, max_task_retries=1).remote(
        ModelSource(str(demo_pair.finetuned_dir)), {}, dtype="float32", seed=0)
    requests = [GenerationRequest(f"Question {i}: tell me a story?", n=3, temperature=1.0, max_tokens=64, seed=i)
                for i in range(16)]
    ray.get(actor.__ray_ready__.remote())
    pending = actor.generate.remote(requests)
    time.sleep(2)                                   # mid-batch
    ray.kill(actor, no_restart=False)               # the process dies; Ray restarts the actor
    results = ray.get(pending, timeout=600)
    keys = [(r.request_index, r.sample_index) for r in results]
    assert keys == [(i, s) for i in range(16) for s in range(3)]
    assert all(r.token_ids for r in results)
    ray.kill(actor, no_restart=True)


# -- seeds: one stream per sample -----------------------------------------------------
def fake_results(requests, order=None):
    """What an engine returns for single-sample requests: sample 0 of each, with the
    request's seed as its text, so that rows show which request they came from."""
    from workers.generation import GenerationResult
    order = range(len(requests)) if order is None else order
    return [GenerationResult(j, 0, f"seed {requests[j].seed}", (1, 2, 3), "length") for j in order]


def test_baseline_requests_give_each_sample_of_each_model_its_own_seed():
    gen = Generation(enabled=True, samples=3, seed=7)
    prompts = steering_prompts(gen)
    base, finetuned = ModelSource("org/base"), ModelSource("org/base", adapter="s3://b/adapter")
    seeds = {}
    for source in (base, finetuned):
        got_prompts, requests = baseline_requests(gen, source=source)
        assert got_prompts == prompts and all(r.n == 1 and r.steering is None for r in requests)
        assert [(r.prompt, r.seed) for r in requests] == [
            (prompts[i], baseline_seed(7, source, i, k)) for i in range(len(prompts)) for k in range(3)]
        seeds[source] = {r.seed for r in requests}
        assert len(seeds[source]) == len(prompts) * 3
        # rows map every result back to its prompt and sample, whatever order results come in
        order = np.random.default_rng(0).permutation(len(requests))
        rows = baseline_rows("p", "base", gen, fake_results(requests, order), source=source)
        assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [divmod(int(j), 3) for j in order]
        assert all(r["text"] == f"seed {r['seed']}" and r["prompt"] == prompts[r["prompt_id"]] for r in rows)
    assert not seeds[base] & seeds[finetuned]
    # the seeds fit what vLLM and the int64 seed column take, and do not depend on the pair
    assert all(0 <= s < 2 ** 63 for s in seeds[base])
    assert {r.seed for r in baseline_requests(Generation(enabled=True, samples=3, seed=8), source=base)[1]} \
        .isdisjoint(seeds[base])


def test_baseline_rows_reject_results_of_other_requests():
    from workers.generation import GenerationResult
    gen = Generation(enabled=True, samples=2)
    with pytest.raises(RuntimeError, match="does not belong to these 40 single-sample requests"):
        baseline_rows("p", "base", gen, [GenerationResult(0, 1, "x", (1,), "stop")], ModelSource("/m"))


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        import ray
        return ray.put(self.fn(*args))


class FakeEngine:
    """Answers every request with its seed; records the batches."""

    def __init__(self):
        self.batches = []
        self.generate = _Remote(self._generate)

    def _generate(self, requests):
        self.batches.append(requests)
        return fake_results(requests)


class FakeGrader:
    """Coherent below strength 2.5 (the text carries only the seed, so the strength is read
    from the request the seed belongs to)."""

    def __init__(self, engine):
        self.engine = engine
        self.coherence = _Remote(self._coherence)

    def _coherence(self, texts):
        from workers.graders import Judgement
        strength = {f"seed {r.seed}": np.linalg.norm(r.steering.vector) for r in self.engine.batches[-1]}
        return [Judgement(value=bool(strength[t] < 2.5), ok=True, error=None, raw=None) for t in texts]


def test_steer_gives_every_search_and_steered_sample_its_own_seed(ray_cluster, make_spec, tmp_path):
    spec = parse_spec(make_spec(tmp_path, method={"layers": [0], "positions": [0, 1]},
                                generation={"samples": 2, "seed": 3,
                                            "search": {"low": 0.0, "high": 8.0, "steps": 3, "lookahead": 2,
                                                       "samples": 3}}))
    import pandas as pd
    rng = np.random.default_rng(0)
    difference = pd.DataFrame([{"layer": 0, "position": p, "delta": rng.standard_normal(8), "finetuned_norm": 1.0}
                               for p in range(3)])   # position 2 is not analysed
    engine = FakeEngine()
    out = steer("demo", spec, difference, engine, FakeGrader(engine))
    requests = [r for batch in engine.batches for r in batch]
    assert all(r.n == 1 for r in requests)
    assert len({r.seed for r in requests}) == len(requests)             # no two samples share a stream
    search, steered = [r for b in engine.batches[:-1] for r in b], engine.batches[-1]
    # every trial's samples: seeds from (pair, layer, position, prompt, strength, sample)
    trial_seeds = []
    for row in out.steering:
        assert [t["strength"] for t in row["trials"]] == [4.0, 2.0, 6.0, 3.0]   # 2 levels, then 1
        assert row["threshold"] == 2.0   # 2 passes, 4, 6 and 3 fail
        for t in row["trials"]:
            assert t["seeds"] == [search_seed(3, "demo", 0, row["position"], row["prompt_id"], t["strength"], k)
                                  for k in range(3)]
            trial_seeds += t["seeds"]
    assert sorted(trial_seeds) == sorted(r.seed for r in search)
    # the final samples: one row per (position, prompt, sample), each with its own seed
    prompts = steering_prompts(spec.generation)
    assert [(r["position"], r["prompt_id"], r["sample_index"]) for r in out.rows] == \
        [(p, i, k) for p in (0, 1) for i in range(len(prompts)) for k in range(2)]
    for row in out.rows:
        assert row["seed"] == steered_seed(3, "demo", 0, row["position"], row["prompt_id"], row["sample_index"])
        assert row["text"] == f"seed {row['seed']}" and row["alpha"] == 2.0
    assert [r["seed"] for r in out.rows] == [r.seed for r in steered]


def test_generated_samples_draw_their_own_streams(generation_run):
    spec, store, pair, _ = generation_run
    gen, name = spec.generation, spec.pairs[0].name
    gens = store.read_table(f"{pair['dir']}/{GENERATIONS.file}").to_pandas()
    steering = store.read_table(f"{pair['dir']}/{STEERING.file}").to_pandas()
    prompts = len(steering_prompts(gen))
    steered = gens[gens.kind == "steered"]
    for r in steered.itertuples():
        assert r.seed == steered_seed(gen.seed, name, r.layer, r.position, r.prompt_id, r.sample_index)
    for _, group in steered.groupby(["position", "prompt_id"]):
        assert sorted(group.sample_index) == list(range(gen.samples))
    search = []
    for r in steering.itertuples():
        for t in r.trials:
            assert list(t["seeds"]) == [search_seed(gen.seed, name, r.layer, r.position, r.prompt_id, t["strength"], k)
                                        for k in range(gen.search.samples)]
            search += list(t["seeds"])
    seeds = list(steered.seed) + search
    assert len(set(seeds)) == len(seeds)
    for role, group in gens[gens.kind == "baseline"].groupby("model_role"):
        assert sorted(zip(group.prompt_id, group.sample_index)) == \
            [(i, k) for i in range(prompts) for k in range(gen.samples)]
        # distinct within one model's baselines and from the steered ones (across models: below)
        assert len(set(seeds) | set(group.seed)) == len(seeds) + len(group)
    # the issue this fixes: 10 of the 40 steered samples at position 0 repeated another's text
    assert gen.temperature > 0 and not steered.text.duplicated().any()


def test_the_two_models_baselines_draw_different_streams(generation_run):
    spec, store, pair, _ = generation_run
    gens = store.read_table(f"{pair['dir']}/{GENERATIONS.file}").to_pandas()
    for r in gens[gens.kind == "baseline"].itertuples():
        assert r.seed == baseline_seed(spec.generation.seed, getattr(spec.pairs[0], r.model_role),
                                       r.prompt_id, r.sample_index)
    assert not gens.seed.duplicated().any()


def test_a_rerun_draws_the_same_samples(generation_run, ray_cluster):
    """A fresh engine, given each stored row's prompt, seed and steering (alpha times the
    stored delta_hat), writes the row's text again, token for token. The batches are the
    stage's: the finetuned model's baselines, then every steered sample."""
    import ray
    from workers.vectors import unit_scaled
    from workers.generation import GenerationRequest, GenerationWorker, Steering
    spec, store, pair, _ = generation_run
    gen = spec.generation
    gens = store.read_table(f"{pair['dir']}/{GENERATIONS.file}").to_pylist()
    difference = store.read_table(f"{pair['dir']}/{DIFFERENCE.file}").to_pandas()
    delta_hat = {(r.layer, r.position): unit_scaled(np.asarray(r.delta), r.finetuned_norm)
                 for r in difference.itertuples()}
    baseline = [r for r in gens if r["kind"] == "baseline" and r["model_role"] == "finetuned"]
    steered = [r for r in gens if r["kind"] == "steered"]
    request = lambda r, steering=None: GenerationRequest(r["prompt"], n=1, temperature=gen.temperature,
                                                         max_tokens=gen.max_tokens, seed=r["seed"], steering=steering)
    worker = ray.remote(GenerationWorker).options(num_cpus=0.5).remote(
        spec.pairs[0].finetuned, {}, dtype=spec.dtype, max_model_len=gen.max_model_len, seed=gen.seed)
    try:
        again = ray.get(worker.generate.remote([request(r) for r in baseline]))
        again += ray.get(worker.generate.remote([
            request(r, Steering(r["layer"], r["alpha"] * delta_hat[(r["layer"], r["position"])])) for r in steered]))
    finally:
        ray.kill(worker)
    assert [(r.text, len(r.token_ids), r.finish_reason) for r in again] == \
        [(r["text"], r["token_count"], r["finish_reason"]) for r in baseline + steered]


class HalfGrader(FakeGrader):
    """Coherent below strength 2.5 at position 0 and never at position 1 (a request's
    position is its vector's direction: deltas[position])."""

    def __init__(self, engine, deltas):
        super().__init__(engine)
        self.deltas = deltas

    def _coherence(self, texts):
        from workers.graders import Judgement
        request = {f"seed {r.seed}": r for r in self.engine.batches[-1]}

        def coherent(vector):
            cosines = [abs(vector @ d) / np.linalg.norm(vector) / np.linalg.norm(d) for d in self.deltas]
            return int(np.argmax(cosines)) == 0 and np.linalg.norm(vector) < 2.5
        return [Judgement(value=bool(coherent(request[t].steering.vector)), ok=True, error=None, raw=None)
                for t in texts]


def test_a_vector_without_a_coherent_strength_gets_no_alpha_and_no_samples(ray_cluster, make_spec, tmp_path,
                                                                           caplog):
    import logging
    import pandas as pd
    spec = parse_spec(make_spec(tmp_path, method={"layers": [0], "positions": [0, 1]},
                                generation={"samples": 2, "search": {"low": 0.0, "high": 8.0, "steps": 3,
                                                                     "lookahead": 2, "samples": 3}}))
    rng = np.random.default_rng(0)
    deltas = [rng.standard_normal(8) for _ in range(2)]
    difference = pd.DataFrame([{"layer": 0, "position": p, "delta": deltas[p], "finetuned_norm": 1.0}
                               for p in range(2)])
    engine = FakeEngine()
    with caplog.at_level(logging.INFO, logger="adl"):
        out = steer("demo", spec, difference, engine, HalfGrader(engine, deltas))
    by_position = {p: [r for r in out.steering if r["position"] == p] for p in (0, 1)}
    assert len(by_position[0]) == len(by_position[1]) == 3
    assert all(r["strength_found"] and r["alpha"] == 2.0 for r in by_position[0])
    assert all(not r["strength_found"] and r["alpha"] is None and r["threshold"] == 0.0 for r in by_position[1])
    assert all([t["strength"] for t in r["trials"]] == [4.0, 2.0, 6.0, 1.0] for r in by_position[1])
    # the final samples: position 0's only, at its alpha
    assert {r["position"] for r in out.rows} == {0} and len(out.rows) == 20 * 2
    assert len(engine.batches[-1]) == 20 * 2
    assert all(np.linalg.norm(r.steering.vector) == pytest.approx(2.0) for r in engine.batches[-1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "demo: steering layer 0 position 1: no coherent strength found" in warnings[0]
    assert "1 (0.00), 2 (0.00), 4 (0.00), 6 (0.00)" in warnings[0]


def test_a_job_whose_search_finds_no_coherent_strength_says_so(ray_cluster, make_spec, demo_pair, tmp_path, caplog):
    """An offline grader no text can pass (perplexity <= 0.5): every vector's search finds
    nothing. No steered samples, no uplift, the catalog's column, a WARNING per vector,
    and the report's markers."""
    import logging
    from jobs.report import build_report
    from storage.tables import CATALOG, SIMILARITY
    from test_report import Page
    spec = make_spec(tmp_path, method={"layers": [0.5], "positions": [1, 2]},
                     generation={"samples": 1, "max_tokens": 16,
                                 "search": {"high": 10.0, "steps": 2, "lookahead": 2, "samples": 2, "max_tokens": 16}},
                     grader={"kind": "offline", "threshold": 0.5}, analyses={})
    spec["pairs"][0].update(finetune_data=str(demo_pair.finetune_texts))
    spec = parse_spec(spec)
    store = Store(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="adl"):
        key = run_job(spec, RunStats())
    record = store.read_json(key)
    pair = record["pairs"][0]
    layer = pair["layers"][0]
    steering = store.read_table(f"{pair['dir']}/{STEERING.file}").to_pandas()
    assert len(steering) == 2 * 3 and not steering.strength_found.any() and steering.alpha.isna().all()
    assert (steering.trials.map(len) == 3).all()   # two levels in one round: 5, 2.5 and 7.5
    gens = store.read_table(f"{pair['dir']}/{GENERATIONS.file}").to_pandas()
    assert (gens.kind == "baseline").sum() == 2 * 20 and not (gens.kind == "steered").any()
    similarity = store.read_table(f"{pair['dir']}/{SIMILARITY.file}").to_pandas()
    assert not (similarity.set_a == "steered").any() and not (similarity.set_b == "steered").any()
    catalog = store.read_table(layout.run_catalog(spec.name), CATALOG).to_pandas()
    assert len(catalog) == 2 and (catalog.strength_found == False).all()   # noqa: E712
    assert catalog.alpha.isna().all() and catalog.steering_uplift.isna().all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for position in (1, 2):
        assert sum(f"demo: steering layer {layer} position {position}: no coherent strength found" in w
                   for w in warnings) == 1
    page = Page(build_report(store, key)).text
    for position in (1, 2):
        assert f"layer {layer}, position {position}: no result: steering: no coherent strength found (tried 2.5, 5, 7.5)" \
            in page
    assert f"no coherent strength at positions 1, 2" in page   # the index's marker
    assert "no steered samples: the steering search found no coherent strength here" in page
    assert "steered (alpha" not in page
