"""Where models go: GPUs by memory.

One home for the placement rules: jobs/executor.py turns them into each model actor's
resource request, which the scheduler (jobs/scheduler.py) packs onto nodes and GPUs, in
a real job and in the scheduler simulation alike.

- A model's memory is what its actor holds at its peak, stage by stage (stage_peaks, the
  one home of the estimate): per process a CUDA context; the weights; on a transformers
  actor the lens's float32 copy of the final norm and unembedding and the offline
  grader's copy of the model in its own dtype (both kept by the actor once made, so
  counted in every stage), plus each stage's own transient tensors: extraction's batch,
  patchscope's rows of logits, the causal-effect stage's batch with its float64 hook
  copies and one bounded chunk of logits (workers/causal.LOGIT_ELEMENTS, whatever the
  vocabulary), and the grader's batch with the same bounded chunk (it scores through
  workers/causal.next_token_nll).
  A vLLM engine holds its weights, the KV cache of ENGINE_SEQUENCES sequences of the
  job's max_model_len, and the activations of one step of MAX_BATCHED_TOKENS tokens.
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
MAX_SHARING = 8           # at most this many models per GPU (CPU-side limits, contention)
CUDA_CONTEXT_GB = 0.5     # a process's CUDA context and kernels, outside torch's allocator
ALLOCATOR_SLACK = 1.1     # torch's caching allocator: fragmentation over the live tensors
ENGINE_SEQUENCES = 32     # sequences an engine holds KV for at once, each of max_model_len
ENGINE_MAX_MODEL_LEN = 4096   # an engine's max_model_len when the caller knows none


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


def vision_parameter_count(vision: dict | None, text_hidden: int) -> int:
    """A ViT vision tower (SigLIP's: plain MLP, biases) and a linear projector to the text
    model's width; 0 without a vision_config."""
    if not isinstance(vision, dict):
        return 0
    hidden, inter = int(vision["hidden_size"]), int(vision["intermediate_size"])
    layers = int(vision["num_hidden_layers"])
    patch, image = int(vision.get("patch_size", 14)), int(vision.get("image_size", 224))
    per_layer = 4 * hidden * hidden + 4 * hidden + 2 * hidden * inter + inter + hidden + 4 * hidden
    embeddings = 3 * patch * patch * hidden + hidden + (image // patch) ** 2 * hidden
    return layers * per_layer + embeddings + 2 * hidden + hidden * text_hidden


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate reads from a model's config."""
    parameters: int
    hidden: int
    layers: int
    vocab: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vision_parameters: int = 0   # a multimodal wrapper's vision tower and projector (transformers loads them)

    @classmethod
    def of_config(cls, config: dict) -> "ModelShape":
        """From a config.json (a multimodal wrapper's text_config)."""
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        hidden = int(text.get("hidden_size") or text.get("n_embd") or text.get("d_model"))
        heads = int(text.get("num_attention_heads") or text.get("n_head") or 1)
        return cls(parameter_count(text), hidden,
                   int(text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers")),
                   int(text.get("vocab_size", 32000)), int(text.get("num_key_value_heads") or heads),
                   int(text.get("head_dim") or hidden // heads),
                   int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden),
                   vision_parameter_count(config.get("vision_config"), hidden))

    @classmethod
    def nominal(cls, parameters: int) -> "ModelShape":
        """A model known by its parameter count alone, in Llama 3's proportions (128,256
        tokens, heads of 128, 8 KV heads, blocks = hidden / 128, MLP 3.5 x hidden,
        untied head): the smallest hidden size whose count reaches `parameters`."""
        def shape(hidden: int) -> "ModelShape":
            layers, inter = max(1, hidden // 128), 7 * hidden // 2
            config = {"hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": 128256,
                      "num_attention_heads": max(1, hidden // 128), "num_key_value_heads": 8, "head_dim": 128,
                      "intermediate_size": inter, "hidden_act": "silu"}
            return cls(parameters, hidden, layers, 128256, 8, 128, inter) if parameter_count(config) >= parameters \
                else None
        hidden = 128
        while shape(hidden) is None:
            hidden += 128
        return shape(hidden)


@dataclass(frozen=True)
class Workload:
    """The batch sizes of a job's stages (jobs/spec.py defaults) and its engines' length."""
    extraction_tokens: int = 256 * 10    # batch_size documents x tokens_per_document
    extraction_layers: int = 4           # block outputs captured per forward
    lens_rows: int = 64                  # vectors through the lens at once
    patchscope_rows: int = 256           # workers/patchscope.ROWS_PER_FORWARD
    patchscope_tokens: int = 32          # a patchscope prompt's length
    causal: bool = True                  # the causal-effect stage runs
    causal_batch: int = 8                # causal_effect.batch_size
    causal_tokens: int = 1024            # causal_effect.max_tokens
    causal_logit_elements: int = 2 ** 24   # workers/causal.LOGIT_ELEMENTS: the chunk bound
    grader: bool = True                  # the offline grader runs on this actor's model
    grader_batch: int = 8                # OfflineGrading.batch_size
    grader_tokens: int = 1024            # OfflineGrading.max_length
    grader_dtype: str | None = None      # None: the actor's own (no copy)
    max_model_len: int = ENGINE_MAX_MODEL_LEN
    engine_sequences: int = ENGINE_SEQUENCES
    engine_step_tokens: int = 8192       # workers/engine_settings.MAX_BATCHED_TOKENS


def _activations(shape: ModelShape, tokens: int, width: int) -> float:
    """Bytes one block's forward holds at once for `tokens` tokens: the residual stream, its
    normed copy, queries, keys and values, and the MLP's gate, up and product."""
    qkv = (shape.hidden // max(shape.head_dim, 1) + 2 * shape.kv_heads) * shape.head_dim
    return tokens * (3 * shape.hidden + qkv + 3 * shape.intermediate) * width


def stage_peaks(model: ModelShape | int, dtype: str, engine: bool = False,
                work: Workload = Workload()) -> dict[str, float]:
    """GB each stage of a model's actor holds at its peak (the one home of the estimate):
    for a transformers actor extraction, lens, patchscope, causal and grader; for a vLLM
    engine the engine alone."""
    shape = model if isinstance(model, ModelShape) else ModelShape.nominal(int(model))
    width = DTYPE_BYTES[dtype]
    weights = shape.parameters * width
    if engine:   # the language model only (workers/engine_settings: vLLM's language_model_only)
        kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * width * work.max_model_len * work.engine_sequences
        step = _activations(shape, work.engine_step_tokens, width) + work.engine_sequences * shape.vocab * 4
        return {"engine": CUDA_CONTEXT_GB + (weights + kv + ALLOCATOR_SLACK * step) / 1e9}
    lens_copy = (shape.vocab + 1) * shape.hidden * 4
    grader_copy = shape.parameters * DTYPE_BYTES[work.grader_dtype] \
        if work.grader and work.grader_dtype and work.grader_dtype != dtype else 0
    held = weights + shape.vision_parameters * width + lens_copy + grader_copy
    logits = lambda rows, model_width: rows * shape.vocab * (model_width + 4 + 4)   # dtype, float32, softmax
    causal_rows = work.causal_batch * work.causal_tokens
    transient = {
        "extraction": _activations(shape, work.extraction_tokens, width)
        + 2 * work.extraction_layers * work.extraction_tokens * shape.hidden * width,   # captured, stacked
        "lens": logits(work.lens_rows, 4),
        "patchscope": _activations(shape, work.patchscope_rows * work.patchscope_tokens, width)
        + logits(work.patchscope_rows, width),
    }
    chunk = lambda rows: min(rows, max(1, work.causal_logit_elements // shape.vocab))   # rows of logits at once
    if work.causal:   # + the last hidden states and the hook's float64 x, x.v and patched x
        transient["causal"] = _activations(shape, causal_rows, width) \
            + causal_rows * shape.hidden * (width + 3 * 8) + logits(chunk(causal_rows), width)
    if work.grader:   # perplexities through workers/causal.next_token_nll: the same chunk bound
        grader_width, grader_rows = DTYPE_BYTES[work.grader_dtype or dtype], work.grader_batch * work.grader_tokens
        transient["grader"] = _activations(shape, grader_rows, grader_width) \
            + grader_rows * shape.hidden * grader_width + logits(chunk(grader_rows), grader_width)
    return {stage: CUDA_CONTEXT_GB + (held + ALLOCATOR_SLACK * t) / 1e9 for stage, t in transient.items()}


def model_memory_gb(model: ModelShape | int, dtype: str, engine: bool = False, work: Workload = Workload()) -> float:
    """The most any stage of the model's actor holds (stage_peaks)."""
    return max(stage_peaks(model, dtype, engine, work).values())


def place(memory_gb: float, gpu_memory_gb: float) -> Placement:
    """The GPUs one model needs: a fraction 1/k of one GPU, or 2**m whole GPUs."""
    if memory_gb <= gpu_memory_gb:
        share = min(MAX_SHARING, max(1, math.floor(gpu_memory_gb / max(memory_gb, 1e-9))))
        return Placement(1.0 / share, 1, memory_gb)
    devices = 2 ** math.ceil(math.log2(math.ceil(memory_gb / gpu_memory_gb)))
    return Placement(float(devices), devices, memory_gb)


def placement(compute, parameters: ModelShape | int, dtype: str, engine: bool = False,
              tensor_parallel_size: int = 1, work: Workload = Workload()) -> Placement:
    """A model actor's GPUs under a job's compute section (jobs.spec.Compute); parameters:
    the model's shape, or its parameter count alone (ModelShape.nominal)."""
    if compute.gpu_memory_gb:
        placed = place(model_memory_gb(parameters, dtype, engine, work), compute.gpu_memory_gb)
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
