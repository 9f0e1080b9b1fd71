"""Extraction end to end against a bare forward of the same work.

Ours:      TransformersWorker(...).extract(set, layers, batch, index, doc_ids, token_ids) — truncated forward
           (hooks, stop after the deepest block), bits to numpy, Arrow table, Parquet
           encode (zstd, BYTE_STREAM_SPLIT), atomic write to a local Store, marker.
Baseline a: the same blocks 0..L called directly under torch.inference_mode(), nothing
           else — same FLOPs, no bookkeeping, encode or write. Target: ours / a <= 1.15x.
Baseline b: the whole model, model(input_ids), for context (what skipping blocks saves).

    .venv/bin/python benchmarks/bench_extraction.py [--reps 3] [--batches 3]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import harness  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch

from harness import fmt_times, header, interleaved, median, method_layer, si, timed, verdict
from jobs.spec import ModelSource
from storage import layout
from storage.store import Store, StorageOptions
from storage.tables import ACTIVATIONS, activation_table
from workers.extraction import block_outputs, stored_bits
from workers.model_worker import TransformersWorker
from workers.models import model_device

TARGET = 1.15
N = 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3, help="timed shards per variant")
    ap.add_argument("--batches", type=int, default=3, help="batches per shard")
    ap.add_argument("--batch-size", type=int, default=410, help="documents per forward (x n tokens)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()

    header("extraction: TransformersWorker.extract vs a bare truncated forward")
    with harness.temp_dir("extraction") as tmp:
        bm = harness.build_llama(Path(tmp) / "model")
        layer = method_layer(bm.num_layers)
        c = bm.config
        print(f"model: random-init LlamaForCausalLM, {bm.parameters:,} parameters (hidden {c['hidden_size']}, "
              f"{bm.num_layers} layers, intermediate {c['intermediate_size']}, vocab {c['vocab_size']}, "
              f"untied head); dtype {args.dtype}")
        docs = args.batch_size * args.batches
        doc_ids, token_ids = harness.make_documents(docs, N, c["vocab_size"], seed=1)
        print(f"data: shard of {docs} documents x n={N} tokens = {docs * N} tokens, "
              f"{args.batches} batches of {args.batch_size} documents ({args.batch_size * N} tokens); "
              f"layer {layer} (int(0.5*({bm.num_layers}-1))), blocks 0..{layer} run")

        store = Store(str(Path(tmp) / "store"))
        prefix = layout.activation_set("bench", {"bench": "extraction"})
        worker = TransformersWorker(ModelSource(model=str(bm.folder)), dtype=args.dtype, storage=StorageOptions(), store=store)
        model, device = worker.model, model_device(worker.model)
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        batches = [ids[i:i + args.batch_size].to(device) for i in range(0, docs, args.batch_size)]

        # The baseline computes exactly what we store.
        same = torch.equal(harness.plain_truncated_forward(model, batches[0][:8], layer),
                           block_outputs(model, batches[0][:8], [layer])[:, 0])
        print(f"check: bare truncated forward == block_outputs on the same tokens: {same}")

        shard_index = iter(range(10**6))
        kept: list[torch.Tensor] = []

        def ours():
            worker.extract(prefix, [layer], args.batch_size, next(shard_index), doc_ids, token_ids)

        def bare_truncated():
            kept[:] = [harness.plain_truncated_forward(model, b, layer) for b in batches]
            harness.sync()

        def full_one_batch():
            with torch.inference_mode():
                model(input_ids=batches[0], use_cache=False)
            harness.sync()

        # Warm up on one small batch (a whole shard per variant would cost a minute).
        small_ids, small_tokens = doc_ids[:16], token_ids[:16]
        worker.extract(prefix, [layer], args.batch_size, 999_999, small_ids, small_tokens)
        harness.plain_truncated_forward(model, batches[0][:16], layer)
        with torch.inference_mode():
            model(input_ids=batches[0][:16], use_cache=False)

        times = interleaved({"ours": ours, "bare": bare_truncated, "full": full_one_batch},
                            reps=args.reps, warmup=0)
        t_ours, t_bare = median(times["ours"]), median(times["bare"])
        t_full = median(times["full"]) * args.batches
        tokens = docs * N

        print(f"ours  extract (forward+encode+write): {fmt_times(times, 'ours')}  "
              f"-> {si(tokens / t_ours, 'tokens/s')}")
        print(f"bare  truncated forward, blocks 0..{layer}: {fmt_times(times, 'bare')}  "
              f"-> {si(tokens / t_bare, 'tokens/s')}")
        print(f"full  model(input_ids), one batch per round: {fmt_times(times, 'full')}; "
              f"x{args.batches} batches = {t_full:.3f} s per shard")
        ratio = t_ours / t_bare
        print(f"RATIO (a) ours / bare truncated forward = {ratio:.3f}x   [{verdict(ratio, TARGET, True)}]")
        cpu_ratio = median(times.cpu["ours"]) / median(times.cpu["bare"])
        print(f"          same in CPU time                = {cpu_ratio:.3f}x   [{verdict(cpu_ratio, TARGET, True)}]")
        print(f"RATIO (b) ours / bare full forward      = {t_ours / t_full:.3f}x   "
              f"(context: full model costs {t_full / t_bare:.2f}x the truncated forward)")

        # Where ours spends its time beyond the forward, on the bare run's outputs.
        acts_t = [h.unsqueeze(1) for h in kept]
        parts = {}
        acts = None

        def to_numpy():
            nonlocal acts
            acts = np.concatenate([stored_bits(a, args.dtype) for a in acts_t])
        table = None

        def build_table():
            nonlocal table
            table = activation_table(doc_ids, [layer], acts, args.dtype)
        data = None

        def encode():
            nonlocal data
            data = ACTIVATIONS.to_parquet(table)

        def write():
            store.write_bytes(layout.shard(prefix, 888_888), data)
        for name, fn in (("bits + concatenate", to_numpy), ("activation_table", build_table),
                         ("parquet encode", encode), ("atomic write (fsync)", write)):
            parts[name] = median([timed(fn) for _ in range(3)])
        extra = sum(parts.values())
        print(f"breakdown of the non-forward work per shard ({len(data) / 1e6:.1f} MB Parquet from "
              f"{acts.nbytes / 1e6:.1f} MB raw): "
              + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in parts.items())
              + f"; total {extra * 1e3:.0f} ms ({acts.nbytes / extra / 1e6:.0f} MB/s of raw activations) "
              f"= {extra / t_bare:.1%} of the bare forward, i.e. ratio (a) would be "
              f"{(t_bare + extra) / t_bare:.3f}x from these parts alone")
        print(f"          (ours - bare - these parts = {(t_ours - t_bare - extra) * 1e3:+.0f} ms: hooks, stack "
              f"and Python, or just noise when the machine is busy)")

        f32 = harness.matmul_gflops("float32")
        bf16 = harness.matmul_gflops("bfloat16")
        if args.dtype == "float32":
            print(f"bfloat16: not run; this CPU's bf16 matmul runs at {bf16:.2f} GFLOP/s against "
                  f"{f32:.1f} GFLOP/s in float32 (no native bf16), a shard would take "
                  f"~{t_bare * f32 / max(bf16, 1e-9) / 60:.0f} min. Use --dtype bfloat16 on a CPU/GPU with bf16.")
        else:
            print(f"probe: matmul float32 {f32:.1f} GFLOP/s, bfloat16 {bf16:.2f} GFLOP/s")


if __name__ == "__main__":
    main()
