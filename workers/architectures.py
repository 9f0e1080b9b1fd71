"""Tiny models of every architecture family the method is checked on, built locally.

The paper runs Gemma 3 (1B as a text model; 4B, 12B and 27B as the multimodal wrapper
Gemma3ForConditionalGeneration, with the text settings in `text_config` and the decoder in
`model.language_model`), Llama 3 and Qwen 3; each family differs in the parts the method
touches: the final norm (Gemma's RMSNorm scales by `1 + w`, a LayerNorm has a bias, so
`-norm(v)` and `norm(-v)` differ), tied or separate unembeddings, where the decoder blocks
and the final norm live, and how vLLM's blocks hand on the residual stream. One model per
family, with the demo pair's tokenizer, trained briefly on the demo pair's generic text (so
that greedy decoding is not a tie) and cached beside the demo pair.

Every norm's parameters are perturbed at initialisation (they start as the identity: 1 and
0, or 0 for Gemma's offset weight), so a test that applied the wrong norm, or none, would
see a different answer.
"""
from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from pathlib import Path

from workers.demo_pair import (DEMO_VERSION, build_demo_pair, cached_build, default_cache_dir, generic_documents,
                               token_windows, train)

ARCH_VERSION = "1"
STEPS, LR, BATCH, SEQ = 60, 5e-3, 16, 64  # about 10 s per family on one core
NORM_NOISE = 0.3

# Shared shape: head_dim 64 (vLLM's CPU attention rejects smaller heads), 3 blocks, so that
# relative depth 0.5 is block 1 and the last block is not the steered one.
_SHAPE = dict(hidden_size=128, num_attention_heads=2, head_dim=64, intermediate_size=256,
              num_hidden_layers=3, max_position_embeddings=512)


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # in transformers
    options: dict
    lora_targets: tuple[str, ...] | str   # module names, or a regular expression over module paths
    # Why vLLM cannot serve a LoRA adapter on this family (None: it can).
    no_vllm_lora: str | None = None
    # A multimodal wrapper's own settings (config_class is then the wrapper's config and
    # the text settings go in its text_config); values "V-1".."V-3" are vocabulary ids
    # counted from the end, for the image marker tokens, which text never feeds.
    wrapper: dict | None = None

    @property
    def peft_targets(self) -> list[str] | str:
        """lora_targets as PEFT's LoraConfig(target_modules=...) takes them."""
        return self.lora_targets if isinstance(self.lora_targets, str) else list(self.lora_targets)

    @property
    def norm(self) -> str:
        """The final norm: "gemma" (RMSNorm scaling by 1 + w), "rms" or "layer"."""
        return "gemma" if self.name.startswith("gemma3") else "layer" if self.name == "stablelm" else "rms"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False), ("q_proj", "v_proj")),
    # Sliding-window layers with a window shorter than the prompt plus its continuation.
    Family("gemma3", "Gemma3TextConfig",
           dict(num_key_value_heads=1, sliding_window=32, query_pre_attn_scalar=64,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
           ("q_proj", "v_proj")),
    # Gemma 3 4B and larger: Gemma3ForConditionalGeneration, a vision tower beside the
    # language model, the text settings in text_config. LoRA on the language model only
    # (the vision tower's attention has q_proj and v_proj too).
    Family("gemma3_mm", "Gemma3Config",
           dict(num_key_value_heads=1, sliding_window=32, query_pre_attn_scalar=64,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
           r".*language_model.*\.(q_proj|v_proj)",
           wrapper=dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14),
                        mm_tokens_per_image=4, image_token_index="V-1", boi_token_index="V-2",
                        eoi_token_index="V-3")),
    Family("qwen3", "Qwen3Config", dict(num_key_value_heads=1, tie_word_embeddings=True), ("q_proj", "v_proj")),
    # LayerNorms with a bias, partial rotary embeddings.
    Family("stablelm", "StableLmConfig", dict(num_key_value_heads=2, tie_word_embeddings=False),
           ("q_proj", "v_proj"),
           no_vllm_lora="vLLM 0.32's StablelmForCausalLM does not implement SupportsLoRA"),
)}


def _build(out: Path, family: Family, tokenizer_dir: Path, seed: int, progress) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = generic_documents(600, seed)
    tokens = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    random.Random(f"arch-mix-{seed}").shuffle(tokens)
    text = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, dtype="float32", **_SHAPE, **family.options)
    if family.wrapper is None:
        config = getattr(transformers, family.config_class)(**text)
    else:
        settings = {k: len(tokenizer) - int(v[2:]) if isinstance(v, str) and v.startswith("V-") else v
                    for k, v in family.wrapper.items()}
        config = getattr(transformers, family.config_class)(text_config=text, dtype="float32", **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
                    if isinstance(param, torch.nn.Parameter):
                        param.add_(NORM_NOISE * torch.randn_like(param))
    stream, starts = token_windows(tokens, SEQ)
    train(model, stream, starts, STEPS, LR, 5, torch.Generator().manual_seed(seed), progress, family.name,
           batch_size=BATCH, seq_len=SEQ)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    progress(f"{family.name} trained ({time.perf_counter() - t0:.1f}s)")


def build_family_model(name: str, cache_dir: Path | str | None = None, seed: int = 0, progress=print) -> Path:
    """The folder of the tiny `name` model (a key of FAMILIES), built once into the adl
    cache ($ADL_CACHE or ~/.cache/adl) as the demo pair is; its tokenizer is the demo's."""
    family = FAMILIES[name]
    tokenizer_dir = build_demo_pair(cache_dir, progress=progress).base_dir
    key = f"arch-{ARCH_VERSION}-demo{DEMO_VERSION}-{name}-seed{seed}"
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / key
    return cached_build(folder, functools.partial(_build, family=family, tokenizer_dir=tokenizer_dir, seed=seed), progress,
                        f"the tiny {name} model")
