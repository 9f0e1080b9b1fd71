"""The reducer against a raw pyarrow read of the same shards.

Ours: workers.reduce.shard_sums for every shard of a base and a finetuned activation set
      (read both shards, decode bf16 bits, check rows line up, float64 sums, norms),
      summed, then finish().
Raw:  pyarrow.parquet.read_table of every shard file of both sets, nothing else.

Data: synthetic bf16 activations (stored as uint16 bits) written with
storage.tables.activation_table and ACTIVATION_PARQUET_OPTIONS through Store.write_table
under storage.layout's shard keys. Files were just written, so both sides read from the
page cache. Target: ours / raw throughput >= 0.7x.

    .venv/bin/python benchmarks/bench_reducer.py [--docs 4096] [--shard-size 1024] [--hidden 2048]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import pyarrow.parquet as pq
import torch

from common import fmt_times, header, interleaved, median, verdict
from storage import layout
from storage.store import Store
from storage.tables import ACTIVATION_PARQUET_OPTIONS, activation_table
from workers import reduce

TARGET = 0.7
N = 10
NORM_SKIP = 5
LAYER = 13


def bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def write_sets(store: Store, docs: int, shard_size: int, hidden: int) -> tuple[str, str, int]:
    """A base and a finetuned set over the same documents; returns (base, ft, shards)."""
    base = layout.activation_set("bench/base", {"bench": "base"})
    ft = layout.activation_set("bench/finetuned", {"bench": "finetuned"})
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(1, 1, N, hidden, generator=gen) * 0.5
    shards = -(-docs // shard_size)
    for i in range(shards):
        ids = np.arange(i * shard_size, min(docs, (i + 1) * shard_size), dtype=np.int64)
        # Residual-stream-like scale: a few large channels over a unit-scale bulk.
        act = torch.randn(len(ids), 1, N, hidden, generator=gen) * (1 + 20 * (torch.arange(hidden) % 97 == 0))
        for prefix, values in ((base, act), (ft, act + bias + 0.1 * torch.randn(act.shape, generator=gen))):
            table = activation_table(ids, [LAYER], bf16_bits(values), "bfloat16")
            store.write_table(layout.shard(prefix, i), table, **ACTIVATION_PARQUET_OPTIONS)
    return base, ft, shards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=4096)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    header("reducer: shard_sums + finish vs pyarrow.parquet.read_table of the same shards")
    with common.temp_dir("reducer") as tmp:
        store = Store(str(Path(tmp) / "store"))
        base, ft, shards = write_sets(store, args.docs, args.shard_size, args.hidden)
        paths = [store.uri(layout.shard(p, i)) for p in (base, ft) for i in range(shards)]
        size = sum(os.path.getsize(p) for p in paths)
        rows = 2 * args.docs * N
        raw_bytes = rows * args.hidden * 2
        print(f"data: 2 sets x {args.docs} documents x 1 layer x n={N} positions x hidden {args.hidden}, bf16; "
              f"{shards} shards of {args.shard_size} documents per set; {rows:,} rows, "
              f"{size / 1e6:.1f} MB Parquet ({size / raw_bytes:.2f} of {raw_bytes / 1e6:.1f} MB raw)")

        result = {}

        def ours():
            total = None
            for i in range(shards):
                part = reduce.shard_sums(store, base, ft, i, [LAYER], N, NORM_SKIP)
                total = part if total is None else total + part
            result.update(reduce.finish(total))

        def raw():
            for p in paths:
                pq.read_table(p)

        times = interleaved({"raw": raw, "ours": ours}, reps=args.reps, warmup=1)
        t_raw, t_ours = median(times["raw"]), median(times["ours"])
        for name, t in (("raw ", t_raw), ("ours", t_ours)):
            print(f"{name}: {fmt_times(times, name.strip())}  -> {rows / t / 1e3:.0f} k rows/s, "
                  f"{size / t / 1e6:.0f} MB/s of Parquet ({raw_bytes / t / 1e6:.0f} MB/s decoded bf16)")
        ratio = t_raw / t_ours
        print(f"RATIO ours / raw throughput = {ratio:.3f}x   [{verdict(ratio, TARGET, False)}]")
        cpu_ratio = median(times.cpu["raw"]) / median(times.cpu["ours"])
        print(f"      same in CPU time          = {cpu_ratio:.3f}x   [{verdict(cpu_ratio, TARGET, False)}]")
        print(f"check: finetuned_norm {result['finetuned_norm'][0]:.3f}, |delta| at position 0 "
              f"{np.linalg.norm(result['delta'][0, 0]):.3f} (synthetic bias {0.5 * np.sqrt(args.hidden):.1f} expected)")


if __name__ == "__main__":
    main()
