"""Per-token projections (the reference dashboard's online projections): a text through
one model, its activation at one block's output per token, dotted with unit directions
(delta_hat of each analysed position). One model, no job."""
from __future__ import annotations

import numpy as np

from storage.store import StorageOptions
from workers.extraction import block_outputs
from workers.models import load_model, load_tokenizer, model_device, text_config


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """With special tokens (BOS where the tokenizer adds one), as the method reads text."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return ids[:max_tokens] if max_tokens else ids


def projections(model, ids: list[int], layer: int, directions: np.ndarray) -> np.ndarray:
    """(tokens, directions) float64: each token's block-`layer` output dotted with each
    direction divided by its norm."""
    import torch
    unit = np.asarray(directions, dtype=np.float64)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    acts = block_outputs(model, torch.tensor([ids], device=model_device(model)), [layer])[0, 0]
    return acts.to(torch.float64).cpu().numpy() @ unit.T


def project_text(source, tokenizer_source, text: str, layer: int, directions: np.ndarray, *, dtype: str,
                 storage: StorageOptions, trust_remote_code: bool = False) -> tuple[list[int], list[str], np.ndarray]:
    """Loads the model (and the pair's tokenizer, the base's), returns (token ids, each
    token as text, projections)."""
    tokenizer = load_tokenizer(tokenizer_source, storage, trust_remote_code)
    model = load_model(source, dtype=dtype, storage=storage, trust_remote_code=trust_remote_code)
    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    ids = token_ids(tokenizer, text, limit)
    return ids, [tokenizer.decode([i]) for i in ids], projections(model, ids, layer, directions)
