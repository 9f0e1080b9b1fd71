"""Truncated extraction against the naive approach, with the analytic FLOP ratio.

Truncated: block_outputs(model, ids[:, :n], [L], truncate=True) — the first n tokens of
           each document, stopped after block L (one batch holding every document, as
           a production batch of >= 410 documents would).
Naive:     the full-length documents through every block and the LM head,
           model(ids, output_hidden_states=True), taking hidden_states[L + 1][:, :n]
           (in batches, as the reference code does).

FLOPs are counted analytically: 2 x tokens x matmul parameters used (blocks run, plus the
LM head for the naive run; embedding lookups are free) plus attention scores and values,
4 x seq^2 x hidden per block per sequence. Reported: speed-up, FLOP ratio, and
speed-up / FLOP ratio (1.0 = the saved time is exactly the saved arithmetic).

    .venv/bin/python benchmarks/bench_truncation.py [--docs 48] [--length 256] [--reps 3]
"""
from __future__ import annotations

from storage.store import StorageOptions

import argparse
from pathlib import Path

import harness  # noqa: F401  (puts the repository root on sys.path)
import torch

from harness import fmt_times, header, interleaved, median, method_layer, si
from jobs.spec import ModelSource
from workers.extraction import block_outputs
from workers.models import load_model

N = 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--length", type=int, default=256, help="full document length (tokens) for the naive run")
    ap.add_argument("--naive-batch", type=int, default=16, help="documents per naive forward")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--truncated-inner", type=int, default=5, help="truncated runs per round (it is cheap)")
    args = ap.parse_args()

    header("truncation: first-n-tokens, stop-after-layer-L forward vs full documents through the whole model")
    with harness.temp_dir("truncation") as tmp:
        bm = harness.build_llama(Path(tmp) / "model")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(ModelSource(model=str(bm.folder)), dtype="float32", storage=StorageOptions(), device=device)
        c = bm.config
        blocks, hidden, vocab = bm.num_layers, c["hidden_size"], c["vocab_size"]
        layer = method_layer(blocks)
        print(f"model: random-init LlamaForCausalLM, {bm.parameters:,} parameters (hidden {hidden}, "
              f"{blocks} layers, intermediate {c['intermediate_size']}, vocab {vocab}); float32 on {device}; layer {layer}")
        _, tokens = harness.make_documents(args.docs, args.length, vocab, seed=2)
        full = torch.as_tensor(tokens).to(device)
        first_n = full[:, :N].contiguous()     # the truncated run's tokens = the naive run's first n
        print(f"data: {args.docs} documents; naive: {args.length} tokens each in batches of {args.naive_batch}, "
              f"blocks 0..{blocks - 1} + LM head; truncated: first n={N} tokens, blocks 0..{layer}, one batch")

        out: dict[str, torch.Tensor] = {}

        def naive():
            parts = []
            with torch.inference_mode():
                for i in range(0, args.docs, args.naive_batch):
                    o = model(input_ids=full[i:i + args.naive_batch], output_hidden_states=True, use_cache=False)
                    parts.append(o.hidden_states[layer + 1][:, :N])
            out["naive"] = torch.cat(parts)
            harness.sync()

        def truncated():
            out["truncated"] = block_outputs(model, first_n, [layer], truncate=True)[:, 0]
            harness.sync()

        with torch.inference_mode():   # warm-up, small
            model(input_ids=full[:2], use_cache=False)
        times = interleaved({"naive": naive, "truncated": truncated}, reps=args.reps, warmup=0,
                            inner={"truncated": args.truncated_inner})
        t_naive, t_trunc = median(times["naive"]), median(times["truncated"])
        diff = (out["naive"] - out["truncated"]).abs().max().item()
        scale = out["naive"].abs().max().item()
        print(f"check: same activations, max |naive - truncated| = {diff:.2e} (max |act| {scale:.2f})")

        # -- analytic FLOPs ------------------------------------------------------------
        per_block = harness.block_linear_params(model)
        head = hidden * vocab

        def flops(seq: int, n_blocks: int, with_head: bool) -> float:
            per_seq = 2 * seq * (n_blocks * per_block + (head if with_head else 0)) + n_blocks * 4 * seq * seq * hidden
            return args.docs * per_seq
        f_naive, f_trunc = flops(args.length, blocks, True), flops(N, layer + 1, False)

        print(f"naive     : {fmt_times(times, 'naive')}  {si(f_naive, 'FLOP')} -> {si(f_naive / t_naive, 'FLOP/s')}")
        print(f"truncated : {fmt_times(times, 'truncated')}  {si(f_trunc, 'FLOP')} -> {si(f_trunc / t_trunc, 'FLOP/s')}")
        speedup, flop_ratio = t_naive / t_trunc, f_naive / f_trunc
        print(f"matmul params per block {per_block:,}, LM head {head:,}")
        cpu_speedup = median(times.cpu["naive"]) / median(times.cpu["truncated"])
        print(f"SPEED-UP  naive / truncated = {speedup:.1f}x wall ({cpu_speedup:.1f}x in CPU time)")
        print(f"FLOP RATIO naive / truncated = {flop_ratio:.1f}x  "
              f"(tokens {args.length}/{N} = {args.length / N:.1f}x, blocks+head "
              f"{(blocks * per_block + head) / ((layer + 1) * per_block):.2f}x, attention share of naive "
              f"{args.docs * blocks * 4 * args.length ** 2 * hidden / f_naive:.1%})")
        print(f"speed-up / FLOP ratio = {speedup / flop_ratio:.2f} wall, {cpu_speedup / flop_ratio:.2f} CPU time  (= the truncated run's achieved FLOP/s "
              f"relative to the naive run's: {args.docs * N} tokens per forward against "
              f"{args.naive_batch * args.length})")

if __name__ == "__main__":
    main()
