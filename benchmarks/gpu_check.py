"""The GPU check: our own extraction, lens, patchscope, causal-effect and offline-grader
code on randomly initialised bf16 models of the paper's families, built on the GPU from
the configs in benchmarks/configs/ (Llama-3.2-1B, Llama-3.1-8B, Gemma-3-4B as the
multimodal wrapper, Qwen3-8B). Per model and stage it prints the measured peak memory
(torch's allocator peak plus one CUDA context) against the placement estimate of that
stage (jobs/placement.stage_peaks at this check's batch sizes; the most of them is what
the scheduler gives the model's actor), and extraction's time
against a bare forward; it exits 1 when a peak exceeds its estimate.

Needs torch, transformers, numpy and pyarrow only (no vLLM, no Ray, no network): the
tokenizer is a byte-level BPE trained here on a few sentences. Sized for one H200 in
well under 10 minutes.

    python benchmarks/gpu_check.py                       # the four models on cuda
    python benchmarks/gpu_check.py --tiny --device cpu   # the same code on tiny shapes (tests/test_gpu_check.py)
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import harness  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch

from jobs.placement import ModelShape, Workload, stage_peaks
from workers.models import text_config

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = ("llama-3.2-1b", "llama-3.1-8b", "gemma-3-4b", "qwen3-8b")
CUDA_CONTEXT_GB = 0.5      # a process's CUDA context, outside the allocator's count
TEXT = ("The quick brown fox jumps over the lazy dog. Tell me a story about a bear who likes "
        "blue numbers. man -> man, 1135 -> 1135, hello -> hello. Why don't you choose a topic? ") * 20


def tiny(config: dict) -> dict:
    """The same family at toy size (text settings shrunk; a wrapper's vision tower too)."""
    config = copy.deepcopy(config)
    text = config.get("text_config", config)
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, vocab_size=1024, max_position_embeddings=2048)
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:4]
    if "query_pre_attn_scalar" in text:
        text["query_pre_attn_scalar"] = 32
    if "vision_config" in config:
        config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
        config.update(mm_tokens_per_image=4, image_token_index=1023, boi_token_index=1022, eoi_token_index=1021)
    return config


def tokenizer_for(vocab: int):
    """A byte-level BPE on TEXT, padded to no more than the model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=min(vocab, 1000), special_tokens=["<bos>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def build(config: dict, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


class Meter:
    """Peak memory and wall time of one stage."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_gb = torch.cuda.max_memory_allocated() / 1e9 + CUDA_CONTEXT_GB if self.cuda else float("nan")


def workload(scale: dict) -> Workload:
    """The placement's workload at this check's batch sizes."""
    return Workload(extraction_tokens=scale["batch"] * scale["tokens"], extraction_layers=1, lens_rows=4,
                    causal_tokens=scale["tokens"])


def check_model(name: str, config: dict, device: str, scale: dict, estimate: dict) -> list[dict]:
    """The five stages on a model built from `config`; `estimate`: the placement's GB by stage."""
    from common.types import OfflineGrading
    from workers.causal import batches, losses
    from workers.extraction import block_outputs
    from workers.graders.offline import OfflineGrader
    from workers.lens import VARIANTS, Lens
    from workers.patchscope import Patchscope
    text = config.get("text_config", config)
    model = build(config, device)
    vocab = text_config(model.config).vocab_size
    layer = int(0.5 * (text["num_hidden_layers"] - 1))
    tokenizer = tokenizer_for(vocab)
    rows = []

    def row(stage, meter, **more):
        rows.append({"model": name, "stage": stage, "peak_gb": meter.peak_gb, "estimate_gb": estimate[stage],
                     "seconds": meter.seconds, **more})

    ids = torch.randint(3, min(vocab, 1000), (scale["batch"], scale["tokens"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with Meter(device) as bare, torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    with Meter(device) as m:
        acts = block_outputs(model, ids, [layer])
    row("extraction", m, vs_bare_forward=m.seconds / bare.seconds)
    vectors = acts[:4, 0, 5].float().cpu().numpy()
    del acts
    with Meter(device) as m:
        Lens(model).top_tokens(tokenizer, vectors, list(VARIANTS), k=100)
    row("lens", m)
    from jobs.spec import PATCHSCOPE_PROMPTS, PATCHSCOPE_SCALES
    with Meter(device) as m:
        Patchscope(model).run(tokenizer, vectors[:2], [layer, layer], list(PATCHSCOPE_SCALES), list(PATCHSCOPE_PROMPTS),
                              16384, 20)
    row("patchscope", m)
    texts = [TEXT[i * 7:] for i in range(scale["causal_texts"])]
    groups = batches(tokenizer, texts, scale["tokens"], 8)
    with Meter(device) as m:
        losses(model, groups, layer, np.random.default_rng(0).standard_normal((2, text["hidden_size"])),
               "project", None, 20)
    row("causal", m)
    with Meter(device) as m:   # the default grader: on the actor's own model (no dtype of its own)
        OfflineGrader(OfflineGrading(), model=model, tokenizer=tokenizer).coherence(texts[:8])
    row("grader", m)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tiny", action="store_true", help="toy shapes of the same families (a smoke test)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    scale = {"batch": 4, "tokens": 64, "causal_texts": 8} if args.tiny else \
        {"batch": 32, "tokens": 1024, "causal_texts": 16}
    rows = []
    for name in args.models.split(","):
        config = json.loads((CONFIGS / name / "config.json").read_text())
        # The estimate is always the real model's (what the scheduler would give it).
        estimate = stage_peaks(ModelShape.of_config(config), "bfloat16", work=workload(scale))
        rows += check_model(name, tiny(config) if args.tiny else config, args.device, scale, estimate)
    print(f"{'model':<14} {'stage':<11} {'peak GB':>8} {'estimate GB':>11} {'seconds':>8}  note")
    over = []
    for r in rows:
        note = f"{r['vs_bare_forward']:.2f}x a bare forward" if "vs_bare_forward" in r else ""
        if r["peak_gb"] > r["estimate_gb"]:
            over.append(r)
            note = (note + "; " if note else "") + "OVER the estimate"
        print(f"{r['model']:<14} {r['stage']:<11} {r['peak_gb']:>8.2f} {r['estimate_gb']:>11.2f} {r['seconds']:>8.2f}  {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if over:
        print(f"gpu_check: {len(over)} stage(s) over the placement estimate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
