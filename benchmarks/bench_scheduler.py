"""Scheduler simulation: 100 pairs of 1-8B models on 8 x 80 GB GPUs.

The simulated job is what the driver runs: one extraction per distinct model (a base
shared by its pairs is extracted once), then per pair a logit lens and generations
(a vLLM engine per finetuned model for the strength search and steered samples, and one
baseline run per base model). Each unit asks for the GPUs that jobs/placement.py gives
it (the same `placement()` the driver turns into Ray requests) and is packed onto GPUs by
placement.GpuPool (Ray's treatment of GPU resources: fractions share a GPU, whole
requests take free GPUs); activation sets are handed over in placement.set_order, pairs
as their sets finish, and every unit that fits starts (Ray places any pending request
that fits). A unit first loads (I/O: not slowed by neighbours), then computes; units
computing on the same GPU share its throughput equally.

Ours:  placement by memory (compute.gpu_memory_gb=80), everything concurrent.
Also:  whole GPUs per model (compute.gpus_per_worker=1), everything concurrent.
Naive: one pair at a time, one unit at a time, one whole GPU each (bases still
       extracted once: resume by content key is not the scheduler's merit).

The table below is an assumption, not a measurement: load = 20 s (process, imports, CUDA
context) + weights at 1.5 GB/s; extraction of 10,000 documents x 10 tokens through half
the model at 30% of 990 TFLOP/s, plus 3 s of Parquet writing; engine start = load + 30 s;
decode at 60,000 / params(B) tokens/s on a whole GPU; per pair 0.7 M generated tokens
(search and steered samples), per base model 0.1 M (baselines).

    .venv/bin/python benchmarks/bench_scheduler.py [--pairs 100] [--gpus 8] [--gpu-memory 80]
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field

import common  # noqa: F401  (puts the repository root on sys.path)

from jobs.placement import GpuPool, Placement, placement, set_order
from jobs.spec import Compute

SIZES_B = (1.0, 1.5, 3.0, 7.0, 8.0)       # parameters (billions) of the simulated models
DTYPE = "bfloat16"
PAIR_TOKENS, BASELINE_TOKENS = 700_000, 100_000
DT = 0.5                                   # simulation step (s)


def load_s(size_b: float) -> float:
    return 20.0 + 2 * size_b / 1.5


def extract_s(size_b: float) -> float:
    return 3.0 + (size_b * 1e9) * 1e5 / (0.3 * 990e12)


def decode_s(size_b: float, tokens: int) -> float:
    return tokens / (60_000 / size_b)


@dataclass(frozen=True)
class Model:
    name: str
    size_b: float

    @property
    def parameters(self) -> int:
        return int(self.size_b * 1e9)


# The driver's plan objects, as much of them as set_order reads.
@dataclass(frozen=True)
class SimSet:
    prefix: str
    model: Model


@dataclass(frozen=True)
class SimPair:
    name: str
    base: SimSet
    finetuned: SimSet


@dataclass
class Unit:
    name: str
    placed: Placement
    load: float
    compute: float
    deps: list = field(default_factory=list)
    gpus: list | None = None
    start: float | None = None
    end: float | None = None
    loaded: float = 0.0
    done: float = 0.0


def workload(num_pairs: int, seed: int = 0) -> list[SimPair]:
    """num_pairs pairs over num_pairs/10 base models of random sizes, ten finetunes each."""
    rng = random.Random(seed)
    bases = [Model(f"base{i}", rng.choice(SIZES_B)) for i in range(max(1, num_pairs // 10))]
    pairs = []
    for i in range(num_pairs):
        base = bases[i % len(bases)]
        pairs.append(SimPair(f"pair{i}", SimSet(f"act/{base.name}", base),
                             SimSet(f"act/ft{i}", Model(f"ft{i}", base.size_b))))
    return pairs


def units_for(pairs: list[SimPair], compute: Compute) -> list[Unit]:
    """Units in the order the driver hands them over: sets (set_order), base baselines,
    then each pair's lens and generations."""
    def place(model: Model, engine: bool = False) -> Placement:
        return placement(compute, model.parameters, DTYPE, engine=engine)

    units: dict[str, Unit] = {}
    for aset in set_order(pairs):
        m = aset.model
        units[aset.prefix] = Unit(f"extract {m.name}", place(m), load_s(m.size_b), extract_s(m.size_b))
    for base in {p.base.model for p in pairs}:
        units[f"baseline {base.name}"] = Unit(f"baseline {base.name}", place(base, engine=True),
                                              load_s(base.size_b) + 30, decode_s(base.size_b, BASELINE_TOKENS))
    for p in pairs:
        ft = p.finetuned.model
        lens = Unit(f"lens {p.name}", place(ft), load_s(ft.size_b), 1.0,
                    deps=[units[p.base.prefix], units[p.finetuned.prefix]])
        gen = Unit(f"generate {p.name}", place(ft, engine=True), load_s(ft.size_b) + 30,
                   decode_s(ft.size_b, PAIR_TOKENS), deps=[lens, units[f"baseline {p.base.model.name}"]])
        units[lens.name], units[gen.name] = lens, gen
    return list(units.values())


def simulate(units: list[Unit], num_gpus: int, one_at_a_time: bool = False) -> tuple[float, float]:
    """Runs the units to the end; returns (total seconds, GPU compute utilisation)."""
    pool = GpuPool(num_gpus)
    waiting, running = list(units), []
    t, busy = 0.0, 0.0
    while waiting or running:
        for u in list(waiting):   # every unit that is ready and fits starts, in order
            if one_at_a_time and running:
                break
            if all(d.end is not None for d in u.deps):
                gpus = pool.take(u.placed)
                if gpus is not None:
                    u.gpus, u.start = gpus, t
                    waiting.remove(u)
                    running.append(u)
        computing: dict[int, int] = {}
        for u in running:
            if u.loaded >= u.load:
                for g in u.gpus:
                    computing[g] = computing.get(g, 0) + 1
        busy += len(computing) * DT
        for u in list(running):
            if u.loaded < u.load:
                u.loaded += DT
                continue
            u.done += DT / max(computing[g] for g in u.gpus)
            if u.done >= u.compute:
                u.end = t + DT
                pool.give(u.placed, u.gpus)
                running.remove(u)
        t += DT
        if t > 10_000_000:
            raise RuntimeError("simulation did not finish")
    return t, busy / (num_gpus * t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-memory", type=float, default=80.0)
    args = ap.parse_args()
    pairs = workload(args.pairs)
    sizes = sorted({p.finetuned.model.size_b for p in pairs})
    print(f"{args.pairs} pairs ({len({p.base.prefix for p in pairs})} base models, sizes {sizes} B) "
          f"on {args.gpus} x {args.gpu_memory:g} GB GPUs, {DTYPE}")
    by_memory = Compute(gpu_memory_gb=args.gpu_memory)
    whole = Compute(gpus_per_worker=1)
    for m in SIZES_B:
        p = placement(by_memory, int(m * 1e9), DTYPE)
        e = placement(by_memory, int(m * 1e9), DTYPE, engine=True)
        print(f"  {m:4g}B: transformers actor {p.memory_gb:5.1f} GB -> {p.num_gpus:.3g} GPU, "
              f"vLLM engine {e.memory_gb:5.1f} GB -> {e.num_gpus:.3g} GPU")
    rows = {
        "ours (placement by memory, concurrent)": simulate(units_for(pairs, by_memory), args.gpus),
        "whole GPU per model, concurrent": simulate(units_for(pairs, whole), args.gpus),
        "naive: one pair at a time": simulate(units_for(pairs, whole), args.gpus, one_at_a_time=True),
    }
    naive = rows["naive: one pair at a time"][0]
    for name, (total, util) in rows.items():
        print(f"  {name:42s} {total / 3600:7.2f} h   GPU utilisation {util:6.1%}   "
              f"{naive / total:5.2f}x faster than naive")
    ours = rows["ours (placement by memory, concurrent)"]
    print(f"ratio: ours / naive total time = {ours[0] / naive:.3f} ({naive / ours[0]:.1f}x faster), "
          f"utilisation {ours[1]:.1%} vs {rows['naive: one pair at a time'][1]:.1%}")


if __name__ == "__main__":
    main()
