"""The reducer against a raw pyarrow read of the same shards, and the cost of verifying
every shard against its recorded digest.

Ours: workers.reduce.shard_sums for every shard of a base and a finetuned activation set
      (read both shards, check each against the digest its write returned, decode bf16
      bits, check rows line up, float64 sums, norms), summed, then finish().
Unverified: the same with digests=None (no CRC-32 over the bytes): ours / unverified
      throughput is what verification costs. Target: >= 0.95x (at most 5%).
Raw:  pyarrow.parquet.read_table of every shard file of both sets, nothing else.

Data: synthetic bf16 activations (stored as uint16 bits) written with
storage.tables.activation_table through Store.write_table (the ACTIVATIONS kind)
under storage.layout's shard keys. Files were just written, so both sides read from the
page cache. Target: ours / raw throughput >= 0.7x.

    .venv/bin/python benchmarks/bench_reducer.py [--docs 4096] [--shard-size 1024] [--hidden 2048]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import harness  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import pyarrow.parquet as pq
import torch

from harness import fmt_times, header, interleaved, median, verdict
from storage import layout
from storage.store import Store, mismatch
from storage.tables import ACTIVATIONS, activation_table
from workers import reduce

TARGET = 0.7
VERIFY_TARGET = 0.95
N = 10
NORM_SKIP = 5
LAYER = 13


def bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def write_sets(store: Store, docs: int, shard_size: int, hidden: int) -> tuple[str, str, int, list]:
    """A base and a finetuned set over the same documents; returns (base, ft, shards, and
    each shard's (base, ft) digests as the writes returned them)."""
    base = layout.activation_set("bench/base", {"bench": "base"})
    ft = layout.activation_set("bench/finetuned", {"bench": "finetuned"})
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(1, 1, N, hidden, generator=gen) * 0.5
    shards = -(-docs // shard_size)
    digests = []
    for i in range(shards):
        ids = np.arange(i * shard_size, min(docs, (i + 1) * shard_size), dtype=np.int64)
        # Residual-stream-like scale: a few large channels over a unit-scale bulk.
        act = torch.randn(len(ids), 1, N, hidden, generator=gen) * (1 + 20 * (torch.arange(hidden) % 97 == 0))
        pair = []
        for prefix, values in ((base, act), (ft, act + bias + 0.1 * torch.randn(act.shape, generator=gen))):
            table = activation_table(ids, [LAYER], bf16_bits(values), "bfloat16")
            pair.append(store.write_table(layout.shard(prefix, i), ACTIVATIONS, table))
        digests.append(tuple(pair))
    return base, ft, shards, digests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=4096)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    header("reducer: shard_sums + finish (verified, unverified) vs pyarrow.parquet.read_table of the same shards")
    with harness.temp_dir("reducer") as tmp:
        store = Store(str(Path(tmp) / "store"))
        base, ft, shards, digests = write_sets(store, args.docs, args.shard_size, args.hidden)
        paths = [store.uri(layout.shard(p, i)) for p in (base, ft) for i in range(shards)]
        size = sum(os.path.getsize(p) for p in paths)
        rows = 2 * args.docs * N
        raw_bytes = rows * args.hidden * 2
        print(f"data: 2 sets x {args.docs} documents x 1 layer x n={N} positions x hidden {args.hidden}, bf16; "
              f"{shards} shards of {args.shard_size} documents per set; {rows:,} rows, "
              f"{size / 1e6:.1f} MB Parquet ({size / raw_bytes:.2f} of {raw_bytes / 1e6:.1f} MB raw)")

        result = {}

        def reducer(verified: bool):
            def run():
                total = None
                for i in range(shards):
                    part = reduce.shard_sums(store, base, ft, i, [LAYER], N, NORM_SKIP,
                                             digests[i] if verified else None)
                    total = part if total is None else total + part
                result.update(reduce.finish(total))
            return run

        def raw():
            for p in paths:
                pq.read_table(p)

        times = interleaved({"raw": raw, "unverified": reducer(False), "ours": reducer(True)},
                            reps=args.reps, warmup=1)
        t = {name: median(times[name]) for name in ("raw", "unverified", "ours")}
        for name in ("raw", "unverified", "ours"):
            print(f"{name:>10}: {fmt_times(times, name)}  -> {rows / t[name] / 1e3:.0f} k rows/s, "
                  f"{size / t[name] / 1e6:.0f} MB/s of Parquet ({raw_bytes / t[name] / 1e6:.0f} MB/s decoded bf16)")
        cpu = {name: median(times.cpu[name]) for name in t}
        ratio = t["raw"] / t["ours"]
        print(f"RATIO ours / raw throughput = {ratio:.3f}x   [{verdict(ratio, TARGET, False)}]")
        cpu_ratio = cpu["raw"] / cpu["ours"]
        print(f"      same in CPU time          = {cpu_ratio:.3f}x   [{verdict(cpu_ratio, TARGET, False)}]")
        # Verification: the medians' ratio, and the median of each turn's own ratio (the two
        # ran back to back, so load that drifts over the run cancels).
        for what, runs in (("wall", times.wall), ("CPU", times.cpu)):
            of_medians = median(runs["unverified"]) / median(runs["ours"])
            paired = median([u / o for u, o in zip(runs["unverified"], runs["ours"])])
            label = "RATIO verified / unverified throughput" if what == "wall" else "      same in CPU time                "
            print(f"{label} = {of_medians:.3f}x (median of per-turn ratios {paired:.3f}x)   "
                  f"[{verdict(paired, VERIFY_TARGET, False)}]")
        # What verifying adds to a read both sides make: the CRC-32 of the bytes, and the
        # comparison with the digest (storage.store.mismatch), on shards already in memory.
        buffers = [(store.read_buffer(layout.shard(p, i)), digests[i][k]) for i in range(shards)
                   for k, p in enumerate((base, ft))]
        alone = interleaved({"check": lambda: [mismatch(data, d) for data, d in buffers]}, reps=args.reps, warmup=1)
        print(f"the check alone (CRC-32 and compare, every shard in memory): {fmt_times(alone, 'check')}; "
              f"{median(alone.cpu['check']) / cpu['unverified']:.1%} of the unverified reducer's CPU time")
        print(f"check: finetuned_norm {result['finetuned_norm'][0]:.3f}, |delta| at position 0 "
              f"{np.linalg.norm(result['delta'][0, 0]):.3f} (synthetic bias {0.5 * np.sqrt(args.hidden):.1f} expected)")


if __name__ == "__main__":
    main()
