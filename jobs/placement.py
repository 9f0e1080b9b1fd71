"""Where models go: GPUs by memory.

One home for the placement rules: jobs/executor.py turns them into each model actor's
resource request, which the scheduler (jobs/scheduler.py) packs onto nodes and GPUs, in
a real job and in the scheduler simulation alike.

- A model's memory is estimated from its config: parameters x bytes of the job's dtype,
  times HEADROOM for activations, the CUDA context and allocator slack. A vLLM engine
  also needs room for its KV cache: ENGINE_KV_FACTOR x the weights.
- With `compute.gpu_memory_gb` set, a model that fits one GPU gets the fraction 1/k of a
  GPU, k = how many such models fit in one (so small models share a GPU, and fractions
  always pack exactly); a larger one gets the next power of two of whole GPUs (tensor
  parallelism for vLLM, a device map for transformers; powers of two divide the head
  counts of common models). Without it, every model actor asks for
  `compute.gpus_per_worker` GPUs (x the engine's tensor_parallel_size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
HEADROOM = 1.2            # activations of a batch, CUDA context, allocator slack
ENGINE_KV_FACTOR = 1.0    # a vLLM engine's KV cache: at least as much again as its weights
MAX_SHARING = 8           # at most this many models per GPU (CPU-side limits, contention)


@dataclass(frozen=True)
class Placement:
    num_gpus: float           # the Ray resource request
    devices: int              # GPUs the model spans (tensor parallel size / device map)
    memory_gb: float          # the estimate it came from (0 when not placed by memory)


def parameter_count(config: dict) -> int:
    """Parameters of a decoder-only transformer from its config (embeddings, attention with
    grouped KV heads, gated or plain MLP, experts, norms, an untied LM head)."""
    hidden = int(config.get("hidden_size") or config.get("n_embd") or config.get("d_model"))
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers"))
    vocab = int(config.get("vocab_size", 32000))
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden)
    gated = config.get("hidden_act", config.get("activation_function", "silu")) in ("silu", "swiglu", "geglu") \
        or "llama" in str(config.get("model_type", "")) or "mistral" in str(config.get("model_type", ""))
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 1)
    attention = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp = (3 if gated else 2) * hidden * inter * experts
    per_layer = attention + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings + hidden


def model_memory_gb(parameters: int, dtype: str, engine: bool = False) -> float:
    weights = parameters * DTYPE_BYTES[dtype] / 1e9
    return weights * HEADROOM + (weights * ENGINE_KV_FACTOR if engine else 0.0)


def place(memory_gb: float, gpu_memory_gb: float) -> Placement:
    """The GPUs one model needs: a fraction 1/k of one GPU, or 2**m whole GPUs."""
    if memory_gb <= gpu_memory_gb:
        share = min(MAX_SHARING, max(1, math.floor(gpu_memory_gb / max(memory_gb, 1e-9))))
        return Placement(1.0 / share, 1, memory_gb)
    devices = 2 ** math.ceil(math.log2(math.ceil(memory_gb / gpu_memory_gb)))
    return Placement(float(devices), devices, memory_gb)


def placement(compute, parameters: int, dtype: str, engine: bool = False,
              tensor_parallel_size: int = 1) -> Placement:
    """A model actor's GPUs under a job's compute section (jobs.spec.Compute)."""
    if compute.gpu_memory_gb:
        placed = place(model_memory_gb(parameters, dtype, engine), compute.gpu_memory_gb)
        if tensor_parallel_size > placed.devices:   # the spec asked for more
            return Placement(float(tensor_parallel_size), tensor_parallel_size, placed.memory_gb)
        return placed
    if engine:
        return Placement(compute.gpus_per_worker * tensor_parallel_size, tensor_parallel_size, 0.0)
    return Placement(compute.gpus_per_worker, max(1, math.floor(compute.gpus_per_worker)), 0.0)


def engine_memory_utilization(placed: Placement) -> float:
    """vLLM's gpu_memory_utilization: an engine on a shared GPU must stay inside its share."""
    return 0.85 if placed.num_gpus == 0 or placed.num_gpus >= 1 else round(0.9 * placed.num_gpus, 4)


def gpuless_refusal(compute, cluster_gpus: int) -> str | None:
    """Why a compute section that gives model actors no GPUs must not run on a cluster
    that has some (None: it may): Ray hides no GPU from an actor that asks for none
    (Ray 2.60 leaves CUDA_VISIBLE_DEVICES unset for it), so every model would load onto
    every GPU's memory outside all accounting, and every engine onto cuda:0."""
    if cluster_gpus <= 0 or compute.gpu_memory_gb or compute.gpus_per_worker > 0:
        return None
    return (f"compute: the cluster has {cluster_gpus} GPUs and this spec gives models none: set "
            f"compute.gpu_memory_gb (the memory of one GPU, e.g. 80) or compute.gpus_per_worker")
