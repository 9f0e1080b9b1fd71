"""Scheduler simulation: the scheduler `adl run` uses (jobs/scheduler.py, fed the units
that jobs/driver.job_units makes from a plan, with placement by memory from
jobs/actors' requests), on simulated actors and times (jobs/simulation.py).

Cases (8 x 80 GB GPUs, bfloat16, generation and analyses on, the offline grader):
  even:     100 pairs, 10 bases of 1-32B, ten finetunes each
  uneven:   100 pairs, one base shared by 50 pairs, the rest by 1-10 each
  crowded:  40 pairs of 32B models: more models than fit at once
  lora:     100 pairs, 10 bases of 1-32B, ten LoRA adapters each: an adapter rides on its
            base's actors (one per runtime), so only the bases are loaded; adapter loads
            are counted apart (their time, about a second each, is not simulated)

For each: total time, GPU utilisation (GPU-seconds computing / GPU-seconds available),
loads per (model, runtime), against
  naive:  one pair at a time, one unit at a time, each stage loading its own models (what
          the executor did before: 9 loads per pair for the demo), one whole GPU each;
  bound:  (all compute + one load of every distinct model and runtime) / GPUs, a lower
          bound on any schedule's time.

The table below is an assumption, not a measurement (GPU-seconds on one whole GPU):
  load:      10 s + weights at 2 GB/s from local disk (0.5 GB/s from object storage:
             --object-storage); a vLLM engine 20 s more
  extract:   10,000 documents x 10 tokens through half the model at 40% of 990 TFLOP/s, + 5 s
  lens 2 s; patchscope 5 s + 1 s per 8B; reduce, token relevance and the embedder (10 s
  of wall time per pair) on CPUs
  generate:  0.7 M tokens at 60,000 / size(B) tokens/s; baselines 0.1 M tokens
An actor holding a fraction f of a GPU computes at f of its speed (GPUs are shared,
not multiplied); one on d whole GPUs at d times. An actor does one call at a time; a
unit's calls on several actors run at once, each in its own actor's queue (patchscope:
2/3 of its work on the finetuned model, 1/3 on the base, as jobs/analyses.patchscope
splits its variants), and every other unit holds all its actors while it runs.

    .venv/bin/python benchmarks/bench_scheduler.py [--gpus 8] [--gpu-memory 80] [--object-storage] [--case even]
"""
from __future__ import annotations

import argparse
import random
from collections import Counter

import numpy as np

import harness  # noqa: F401  (puts the repository root on sys.path)

from jobs.driver import job_units
from jobs.executor import ActorRequests
from jobs.plan import ActivationSet, Documents, PairPlan, Plan
from jobs.scheduler import ModelKey, NodeResources, Scheduler
from jobs.simulation import SimulatedBackend
from jobs.spec import Analyses, Compute, Generation, JobSpec, ModelSource, Pair
from jobs.stages import actor_source

SIZES_B = (1.0, 3.0, 8.0, 14.0, 32.0)
CASES = ("even", "uneven", "crowded", "lora")


class Costs:
    def __init__(self, sizes: dict[str, float], object_storage: bool):
        self.sizes, self.bandwidth = sizes, 0.5 if object_storage else 2.0

    def load_s(self, key) -> float:
        size = self.sizes.get(getattr(key.source, "model", None), 0.1)
        return 10.0 + 2 * size / self.bandwidth + (20.0 if key.runtime == "vllm" else 0.0)

    def cost(self, unit) -> float:
        """Whole-GPU seconds of the unit's work."""
        source = {"extract": lambda: unit.subject.source, "baselines": lambda: unit.subject}.get(
            unit.kind, lambda: unit.subject.pair.finetuned)()
        size = self.sizes[source.model]
        return {"extract": 5.0 + 2 * size * 1e9 * 1e5 / 2 / (0.4 * 990e12),
                "baselines": 100_000 * size / 60_000, "generate": 700_000 * size / 60_000,
                "logit_lens": 2.0, "patchscope": 5.0 + size / 8, "similarity": 0.0,
                "reduce": 0.0, "token_relevance": 0.0}[unit.kind]

    def work_s(self, unit, actors) -> float:
        if unit.kind == "reduce":
            return 5.0
        if unit.kind == "token_relevance":
            return 1.0
        if unit.kind == "similarity":   # the embedder, on CPUs
            return 10.0
        if unit.kind == "patchscope":
            # Two calls at once, as jobs/analyses.patchscope makes them: the finetuned
            # model's (two of the three variants, then the grading) and the base model's
            # (the third), each on its own actor at that actor's speed.
            # An adapter pair's two calls go to one actor, its base's.
            pair, parts = unit.subject.pair, Counter()
            parts[ModelKey("transformers", actor_source(pair.finetuned))] += 2 / 3
            parts[ModelKey("transformers", actor_source(pair.base))] += 1 / 3
            return {key: self.cost(unit) * part / _speed(actors[key]) for key, part in parts.items()}
        return self.cost(unit) / _speed(next(iter(actors.values())))


def _speed(actor) -> float:
    """An actor's speed in whole GPUs (one CPU-only actor counts as one)."""
    gpus = actor.slot.request.gpus
    return gpus if gpus > 0 else 1.0


def workload(case: str, seed: int = 0):
    rng = random.Random(seed)
    if case == "crowded":
        shares = [4] * 10
        sizes = [32.0] * 10
    elif case == "uneven":
        shares = [50] + [rng.randint(1, 10) for _ in range(20)]
        while sum(shares) > 100:
            shares.pop()
        shares.append(100 - sum(shares))
        sizes = [rng.choice(SIZES_B) for _ in shares]
    else:
        shares, sizes = [10] * 10, [rng.choice(SIZES_B) for _ in range(10)]
    model_sizes, pairs, sets = {}, [], {}
    documents = Documents(np.arange(10_000), np.zeros((10_000, 1), dtype=np.int64), 10_000, 10_000)   # 1 shard
    for b, (share, size) in enumerate(zip(shares, sizes)):
        base = ModelSource(f"sim/base{b}")
        model_sizes[base.model] = size
        for j in range(share):
            ft = ModelSource(base.model, adapter=f"sim/adapter{b}-{j}") if case == "lora" \
                else ModelSource(f"sim/ft{b}-{j}")
            model_sizes[ft.model] = size
            aset = lambda s: sets.setdefault(s, ActivationSet(f"activations/{s.adapter or s.model}", s, (1,), {},
                                                              documents, s.adapter or s.model, int(size * 1e9)))
            pairs.append(PairPlan(Pair(f"pair{b}-{j}", base, ft), (1,), aset(base), aset(ft), f"pairs/{b}-{j}"))
    return model_sizes, pairs, list(sets.values())


class _NothingStored:
    def exists(self, key: str) -> bool:
        return False

    def sizes(self, prefix: str) -> dict:
        return {}

    def uri(self, key: str) -> str:
        return key


def simulate(case: str, gpus: int, gpu_memory: float, object_storage: bool):
    sizes, pairs, sets = workload(case)
    spec = JobSpec(name="sim", pairs=(), dtype="bfloat16", compute=Compute(gpu_memory_gb=gpu_memory),
                   generation=Generation(enabled=True), analyses=Analyses(enabled=True))
    plan = Plan(spec, tuple(sets), tuple(pairs))
    costs = Costs(sizes, object_storage)
    units, _ = job_units(spec, pairs, _NothingStored())
    backend = SimulatedBackend([NodeResources("node0", 1000.0, gpus)], costs.load_s, costs.work_s)
    requests = ActorRequests(plan)
    scheduler = Scheduler(units, requests, backend)
    scheduler.run()
    total = max([backend.now] + [a.busy_until for a in backend.actors])
    compute = sum(costs.cost(u) for u in units)
    distinct = set(scheduler.loads)
    loads = sum(scheduler.loads.values())
    unavoidable = sum(costs.load_s(k) * requests(k).gpus for k in distinct)
    bound = (compute + unavoidable) / gpus
    naive = sum(costs.cost(u) + sum(costs.load_s(k) for k in set(u.needs)) + (5.0 if not u.needs else 0.0)
                for u in units)
    return {"pairs": len(pairs), "models": len({s.source for s in sets}), "total": total, "bound": bound,
            "naive": naive, "util": backend.work_gpu_seconds / (gpus * total),
            "bound_util": compute / (gpus * bound), "naive_util": compute / (gpus * naive),
            "loads": loads, "distinct": len(distinct), "max_alive": scheduler.max_alive,
            "by_runtime": Counter(k.runtime for k in scheduler.loads.elements()),
            "reloads": len(scheduler.reloads), "adapter_loads": sum(scheduler.adapter_loads.values()),
            "bases": len({p.pair.base for p in pairs})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-memory", type=float, default=80.0)
    ap.add_argument("--object-storage", action="store_true", help="load weights at 0.5 GB/s, not 2 GB/s")
    ap.add_argument("--case", choices=CASES, action="append", help="only this case (repeatable)")
    args = ap.parse_args()
    print(f"{args.gpus} x {args.gpu_memory:g} GB GPUs, bfloat16, loads from "
          f"{'object storage' if args.object_storage else 'local disk'}")
    for case in args.case or CASES:
        r = simulate(case, args.gpus, args.gpu_memory, args.object_storage)
        print(f"{case}: {r['pairs']} pairs over {r['models']} models")
        print(f"  ours   {r['total'] / 3600:7.2f} h  GPU utilisation {r['util']:6.1%}  loads {r['loads']} "
              f"for {r['distinct']} (model, runtime): {r['loads'] / r['distinct']:.3f} per model "
              f"({dict(r['by_runtime'])}; {r['reloads']} reloads), at most {r['max_alive']} actors alive")
        if r["adapter_loads"]:
            per_base = {k: n / r["bases"] for k, n in r["by_runtime"].items() if k != "embedder"}
            print(f"  loads per base and runtime {per_base}; {r['adapter_loads']} adapter loads")
        print(f"  bound  {r['bound'] / 3600:7.2f} h  GPU utilisation {r['bound_util']:6.1%}")
        print(f"  naive  {r['naive'] / 3600:7.2f} h  GPU utilisation {r['naive_util']:6.1%}")
        print(f"  ratio: ours reaches {r['bound'] / r['total']:.3f} of the bound's utilisation; "
              f"{r['naive'] / r['total']:.1f}x faster than naive")


if __name__ == "__main__":
    main()
