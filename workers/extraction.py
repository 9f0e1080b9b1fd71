"""Activation extraction: one model loaded once, serving shards of tokenized documents.

The forward runs only on the n tokens kept per document and stops after the deepest
requested block: a causal LM's activations at positions < n depend only on tokens < n,
and block L only on blocks <= L, so nothing later can change them.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from jobs.spec import ModelSource
from storage import layout
from storage.store import Store
from storage.tables import ACTIVATION_PARQUET_OPTIONS, activation_table
from workers.models import decoder_layers, load_model


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block to skip the rest of the model."""


def block_outputs(model, input_ids, layers: list[int], truncate: bool = True):
    """Raw outputs of the given decoder blocks, (batch, len(layers), seq, hidden), in the
    model's dtype. With truncate, the blocks after the deepest one do not run."""
    import torch
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(index):
        def hook(_module, _inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if truncate and index == deepest:
                raise _StopForward
        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in sorted(set(layers))]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    first = captured[layers[0]].device   # blocks may sit on several GPUs (device_map)
    return torch.stack([captured[i].to(first) for i in layers], dim=1)


def stored_bits(acts, dtype: str) -> np.ndarray:
    """Activations as the numpy type they are stored in: bf16 as its raw bits."""
    import torch
    acts = acts.detach().cpu()
    if dtype == "bfloat16":
        return acts.view(torch.int16).numpy().view(np.uint16)
    return acts.numpy()


class ExtractionWorker:
    """Loads one model and writes activation shards for one activation set.

    Run as a Ray actor pinned to its GPUs; Ray restarts it and retries a shard if it dies,
    and a shard's rewrite is harmless because every write is atomic. With two calls in
    flight (max_concurrency=2) one shard's encode and write overlap the next one's forward;
    the lock keeps forwards one at a time.
    """

    def __init__(self, source: ModelSource, *, dtype: str, layers: list[int], batch_size: int,
                 store: Store, set_prefix: str, s3: dict, trust_remote_code: bool = False):
        import torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(source, dtype=dtype, s3=s3, trust_remote_code=trust_remote_code,
                                device=self.device)
        self.dtype, self.layers, self.batch_size = dtype, list(layers), batch_size
        self.store, self.set_prefix = store, set_prefix
        self.forward_lock = threading.Lock()

    def gpu_ids(self) -> list:
        import ray
        return list(ray.get_gpu_ids()) if ray.is_initialized() else []

    def extract(self, index: int, doc_ids: np.ndarray, token_ids: np.ndarray) -> dict:
        import torch
        start = time.perf_counter()
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        with self.forward_lock:
            parts = [stored_bits(block_outputs(self.model, ids[i:i + self.batch_size].to(self.device),
                                               self.layers), self.dtype)
                     for i in range(0, len(ids), self.batch_size)]
        acts = np.concatenate(parts)
        table = activation_table(doc_ids, self.layers, acts, self.dtype)
        self.store.write_table(layout.shard(self.set_prefix, index), table, **ACTIVATION_PARQUET_OPTIONS)
        marker = {"shard": index, "documents": int(len(doc_ids)), "rows": table.num_rows,
                  "seconds": round(time.perf_counter() - start, 3), "gpu_ids": self.gpu_ids()}
        self.store.write_json(layout.shard_marker(self.set_prefix, index), marker)
        return marker
