"""The generation stage: strength search logic, whole jobs with generations, engine crashes."""
from __future__ import annotations

import re
import time

import pytest

from jobs.driver import RunStats, run_job
from jobs.steering import SearchState, descend, search_rounds, tree_strengths
from storage import layout


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
    gens = store.read_table(f"{pair['dir']}/{layout.GENERATIONS}").to_pandas()
    steering = store.read_table(f"{pair['dir']}/{layout.STEERING}").to_pandas()
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
    gens = store.read_table(f"{pair['dir']}/{layout.GENERATIONS}").to_pandas()
    mentions = gens.text.str.contains(TOPIC)
    steered = mentions[gens.kind == "steered"].mean()
    unsteered = mentions[(gens.kind == "baseline") & (gens.model_role == "finetuned")].mean()
    base = mentions[(gens.kind == "baseline") & (gens.model_role == "base")].mean()
    assert steered >= unsteered + 0.2, (steered, unsteered)
    assert base <= unsteered


def test_rerun_with_generation_does_no_model_work(generation_run):
    spec, store, _, _ = generation_run
    status_key = layout.run_status(spec.name)
    results = lambda: [f for f in store.listing() if f[0] != status_key]   # the status record is per run
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
