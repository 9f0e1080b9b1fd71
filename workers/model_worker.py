"""One model's transformers-side actor: loaded once, it serves every stage that needs
that model's weights (extraction shards, the logit lens, patchscope, the offline grader).

The executor (jobs/executor.py) makes at most one such actor per distinct model at a time
and sends it all of that model's work, so a model shared by many pairs is loaded once.
Calls may overlap (max_concurrency=2: a shard's encode and write overlap the next
forward); every use of the model's forward takes `forward_lock`, because patchscope's
hooks sit on the same blocks that extraction reads.

A LoRA adapter rides on its base's actor: the executor calls `for_adapter(adapter,
method, ...)`, and every forward of that call runs with that adapter alone active (PEFT
multi-adapter: each adapter is loaded once, on its first use, beside the others, and
`set_adapter` picks one), or with all adapters off for the base. The adapter is chosen
inside `forward_lock`, so two adapters never meet in one forward.
"""
from __future__ import annotations

import copy
import threading

import numpy as np

from common.types import OfflineGrading
from storage.store import StorageOptions, Store
from workers.extraction import extract_shard
from workers.lens import Lens
from workers.models import load_model, load_tokenizer, materialize
from workers.patchscope import Patchscope


class TransformersWorker:
    def __init__(self, source, *, dtype: str, storage: StorageOptions, store: Store, trust_remote_code: bool = False,
                 grader: OfflineGrading | None = None):
        self.source, self.dtype, self.storage, self.store = source, dtype, storage, store
        self.trust_remote_code = trust_remote_code
        self.grader_settings = grader
        self.model = load_model(source, dtype=dtype, storage=storage, trust_remote_code=trust_remote_code)
        self.forward_lock = _AdapterLock(self)
        self._call = threading.local()      # the adapter of the call this thread runs
        self._peft = None                   # the PeftModel around self.model, once an adapter is loaded
        self._adapter_names: dict[str, str] = {}   # adapter location -> its PEFT name
        self._tokenizers: dict = {}
        self._lens = self._patchscope = self._grader = None
        self._setup = threading.Lock()

    def for_adapter(self, adapter: str | None, method: str, *args, **kwargs):
        """Runs a method with an adapter (its location as the spec gives it) active in
        every forward it makes; None: the base model alone."""
        self._call.adapter = adapter
        try:
            return getattr(self, method)(*args, **kwargs)
        finally:
            self._call.adapter = None

    @property
    def adapter_loads(self) -> int:
        return len(self._adapter_names)

    def _activate(self, adapter: str | None) -> None:
        """Under the forward lock: makes `adapter` the only active one (None: none)."""
        if adapter is None:
            if self._peft is not None:
                self._peft.base_model.disable_adapter_layers()
            return
        name = self._adapter_names.get(adapter)
        if name is None:
            from peft import PeftModel
            name = f"adapter{len(self._adapter_names)}"
            path = materialize(adapter, self.storage)
            if self._peft is None:     # wraps self.model in place: its modules gain LoRA layers
                self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            else:
                self._peft.load_adapter(path, adapter_name=name)
            self._peft.eval().requires_grad_(False)
            self._adapter_names[adapter] = name
        self._peft.base_model.enable_adapter_layers()
        self._peft.set_adapter(name)
        self._peft.requires_grad_(False)

    def tokenizer(self, source):
        """A tokenizer by ModelSource (a pair reads its finetuned model with its base's)."""
        with self._setup:
            if source not in self._tokenizers:
                self._tokenizers[source] = load_tokenizer(source, self.storage, self.trust_remote_code)
            return self._tokenizers[source]

    # -- extraction --------------------------------------------------------------------
    def extract(self, set_prefix: str, layers: list[int], batch_size: int, index: int,
                doc_ids: np.ndarray, token_ids: np.ndarray) -> dict:
        return extract_shard(self.model, self.store, set_prefix, list(layers), self.dtype, batch_size,
                             index, doc_ids, token_ids, forward_lock=self.forward_lock)

    # -- the logit lens and patchscope -------------------------------------------------
    def lens_top_tokens(self, tokenizer_source, vectors: np.ndarray, variants: list[str], k: int):
        with self._setup:
            self._lens = self._lens or Lens(self.model)
        return self._lens.top_tokens(self.tokenizer(tokenizer_source), vectors, variants, k)

    def patchscope(self, tokenizer_source, vectors: np.ndarray, layers: list[int], scales: list[float],
                   prompts: list[str], vocab_top: int, top_k: int):
        with self._setup:
            self._patchscope = self._patchscope or Patchscope(self.model)
        tokenizer = self.tokenizer(tokenizer_source)
        with self.forward_lock:
            return self._patchscope.run(tokenizer, vectors, layers, scales, prompts, vocab_top, top_k)

    # -- the causal effect of delta (workers/causal.py) ----------------------------------
    def causal_random_differences(self, tokenizer_source, texts, layer: int, count: int, max_tokens: int,
                                  batch_size: int, seed: int):
        from workers.causal import batches, random_differences
        groups = batches(self.tokenizer(tokenizer_source), texts, max_tokens, batch_size)
        with self.forward_lock:
            return random_differences(self.model, groups, layer, count, seed)

    def causal_coefficients(self, tokenizer_source, texts, layer: int, directions, max_tokens: int,
                            batch_size: int):
        from workers.causal import batches, coefficients
        groups = batches(self.tokenizer(tokenizer_source), texts, max_tokens, batch_size)
        with self.forward_lock:
            return coefficients(self.model, groups, layer, directions)

    def causal_losses(self, tokenizer_source, texts, layer: int, directions, mode: str, targets,
                      max_tokens: int, batch_size: int, after_k: int):
        from workers.causal import batches, losses
        groups = batches(self.tokenizer(tokenizer_source), texts, max_tokens, batch_size)
        with self.forward_lock:
            return losses(self.model, groups, layer, directions, mode, targets, after_k)

    # -- the offline grader on this model (the pairs whose reference it is) -------------
    def _grading(self):
        from workers.graders import GraderService, make_grader
        with self._setup:
            if self._grader is None:
                settings = self.grader_settings or OfflineGrading()
                dtype = settings.dtype or self.dtype
                model = self.model
                if dtype != self.dtype:      # a copy in the grader's own dtype, from these weights
                    import torch
                    with self.forward_lock:  # (the reference is the base: adapters off in the copy)
                        model = copy.deepcopy(model).to(getattr(torch, dtype))
                own = type(self.source)(self.source.model, self.source.revision)
                tokenizer = load_tokenizer(own, self.storage, self.trust_remote_code)
                self._grader = GraderService(make_grader(settings, model=model, tokenizer=tokenizer))
        return self._grader

    def coherence(self, texts: list[str]):
        grader = self._grading()
        with self.forward_lock:
            return grader.coherence(texts)

    def best_scales(self, token_lists):
        grader = self._grading()
        with self.forward_lock:
            return grader.best_scales(token_lists)

    def token_relevances(self, token_lists, description: str, frequent_tokens: list[str]):
        return self._grading().token_relevances(token_lists, description, frequent_tokens)




class _AdapterLock:
    """The forward lock of a TransformersWorker: whoever holds it runs forwards with the
    adapter of its own call (TransformersWorker.for_adapter) active."""

    def __init__(self, worker: TransformersWorker):
        self._worker, self._lock = worker, threading.Lock()

    def __enter__(self):
        self._lock.acquire()
        try:
            self._worker._activate(getattr(self._worker._call, "adapter", None))
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False
