"""Activation extraction: shards of tokenized documents through a loaded model (the
model's actor, workers/model_worker.py, serves them).

The forward runs only on the n tokens kept per document and stops after the deepest
requested block: a causal LM's activations at positions < n depend only on tokens < n,
and block L only on blocks <= L, so nothing later can change them.
"""
from __future__ import annotations

import time

import numpy as np

from storage import layout
from storage.store import Store
from storage.tables import ACTIVATIONS, activation_table
from workers.models import decoder_layers, model_device


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


def extract_shard(model, store: Store, set_prefix: str, layers: list[int], dtype: str, batch_size: int,
                  index: int, doc_ids: np.ndarray, token_ids: np.ndarray, forward_lock=None) -> dict:
    """Writes one activation shard and then its marker, which records the shard's digest
    (size and CRC-32 of the bytes written; each write atomic, so a shard done twice, by a
    retry or a restarted actor, is harmless). With forward_lock, only the forwards hold
    it: the encode and write overlap the next call's forward. Returns the marker, with the
    storage retries this call needed."""
    import contextlib

    import ray
    import torch
    start = time.perf_counter()
    store = store.session()   # this call's own retry count (calls overlap)
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    device = model_device(model)
    with forward_lock or contextlib.nullcontext():
        parts = [stored_bits(block_outputs(model, ids[i:i + batch_size].to(device), layers), dtype)
                 for i in range(0, len(ids), batch_size)]
    acts = np.concatenate(parts)
    table = activation_table(doc_ids, layers, acts, dtype)
    digest = store.write_table(layout.shard(set_prefix, index), ACTIVATIONS, table)
    marker = {"shard": index, "documents": int(len(doc_ids)), "rows": table.num_rows, "digest": digest,
              "seconds": round(time.perf_counter() - start, 3),
              "gpu_ids": list(ray.get_gpu_ids()) if ray.is_initialized() else []}
    store.write_json(layout.shard_marker(set_prefix, index), marker)
    return {**marker, "storage_retries": store.retries}
