"""LoRA adapters in vLLM: what an engine must be sized for to serve a set of PEFT adapters
beside its base, and a fix for the CPU build's LoRA kernels.

Which modules the engine wraps. Left to itself (`lora_target_modules` unset), vLLM wraps
every module it can adapt, the unembedding included: its logits processor then applies a
per-sequence LoRA mapping to logits. vLLM 0.32's prompt-logprobs path computes logits for
every prompt token of one request at a time while that mapping holds one entry per request
of the batch, so scoring prompts on a LoRA-enabled engine fails as soon as a batch holds
more than one request (the CPU build: `einsum(): subscript b has size 90 ... size 18`;
vllm-project/vllm#16668, #29955; CUDA builds drop an lm_head adapter's part silently,
#51594). That is what broke the steering search of adapter pairs: the offline grader
scores each round's samples by prompt logprobs on the pair's engine. The engine therefore
wraps exactly the modules its adapters adapt, read from their weights: no adapter that
leaves lm_head alone brings in the logits wrapper, and scoring sees plain logits.

Rows without an adapter. vLLM marks a base request's rows with LoRA index -1; CUDA kernels
skip them, but the CPU build's torch ops index the stacked weights with it, and -1 is the
last slot: a base request batched with adapter requests got the last-loaded adapter's
update (seen: greedy text of the base in a mixed batch differed from the base alone).
`mask_unadapted_rows` makes the shrink step write zeros for those rows, so the expand step
adds nothing to them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

# PEFT weight names end in <module>.lora_A.weight, <module>.lora_B.weight, or for
# embeddings <module>.lora_embedding_A / _B.
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# Modules whose adaptation puts vLLM's LoRA logits processor in the model.
LOGITS_MODULES = ("lm_head",)


def adapted_modules(folder: str) -> set[str] | None:
    """The names (last dotted part) of the modules the adapter's weights adapt, e.g.
    {"q_proj", "down_proj"}; None when the adapter is not a local folder with weights
    that can be listed."""
    root = Path(folder).expanduser()
    safetensors = root / "adapter_model.safetensors"
    if safetensors.is_file():
        from safetensors import safe_open
        with safe_open(str(safetensors), "pt") as f:
            names = list(f.keys())
    elif (root / "adapter_model.bin").is_file():
        import torch
        names = list(torch.load(root / "adapter_model.bin", map_location="cpu", weights_only=True))
    else:
        return None
    modules = set()
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in _LORA_PARTS and i > 0:
                modules.add(parts[i - 1])
                break
    return modules


def engine_lora_settings(adapters: Iterable[str], max_loras: int | None = None) -> dict:
    """vLLM engine arguments that serve these adapter folders beside the base: LoRA on,
    `max_loras` adapters per batch (default: all of them), `max_lora_rank` the smallest
    size vLLM allows that holds the largest rank, and the modules to wrap (those the
    adapters adapt; vLLM's default, all it can, when one adapter cannot be read here)."""
    from workers.engine_settings import adapter_rank, vllm_lora_rank

    adapters = list(dict.fromkeys(adapters))
    if not adapters:
        return {}
    settings = {"enable_lora": True, "max_loras": max(1, min(max_loras or len(adapters), len(adapters))),
                "max_lora_rank": vllm_lora_rank(max(adapter_rank(a) for a in adapters))}
    modules = [adapted_modules(a) for a in adapters]
    if all(m is not None for m in modules):
        settings["lora_target_modules"] = sorted(set().union(*modules))
    return settings


def adapts_logits(settings: dict) -> bool:
    """Whether an engine with these LoRA settings has vLLM's LoRA logits processor, whose
    prompt logprobs vLLM 0.32 computes wrongly (see the module docstring)."""
    if not settings.get("enable_lora"):
        return False
    targets = settings.get("lora_target_modules")
    return targets is None or any(m in targets for m in LOGITS_MODULES)


def mask_unadapted_rows() -> None:
    """Patches the CPU build's LoRA torch ops (vllm.lora.ops.torch_ops, which
    vllm.lora.punica_wrapper.punica_cpu calls) so that rows with LoRA index -1 get no
    adapter's update. Idempotent; CUDA kernels are not touched (they skip -1 already)."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    original = lora_ops.bgmv_shrink
    if getattr(original, "adl_masked", False):
        return

    def bgmv_shrink(inputs, lora_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
        original(inputs, lora_weights, output_tensor, lora_indices_tensor, scaling)
        if lora_indices_tensor.shape[0] == output_tensor.shape[0]:
            output_tensor.masked_fill_((lora_indices_tensor < 0).unsqueeze(-1), 0)

    bgmv_shrink.adl_masked = True
    # sgmv_shrink finds bgmv_shrink in lora_ops' globals; the CPU wrapper imported both names.
    lora_ops.bgmv_shrink = bgmv_shrink
    punica_cpu.bgmv_shrink = bgmv_shrink
