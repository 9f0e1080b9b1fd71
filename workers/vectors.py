"""The method's vector math, in one place: delta_hat (the difference rescaled to a typical
finetuned activation), the summary of a set of embeddings, and the similarity of two
summaries (adl-method.md, sections 2-3)."""
from __future__ import annotations

import numpy as np


def unit_scaled(delta: np.ndarray, finetuned_norm: float) -> np.ndarray:
    """delta_hat: delta rescaled to the norm of a typical finetuned activation, so that
    alpha = 1 adds one typical activation."""
    return delta / np.linalg.norm(delta) * finetuned_norm


def set_summary(embeddings: np.ndarray) -> np.ndarray:
    """Mean of the rows after L2-normalizing each (float64)."""
    e = np.asarray(embeddings, np.float64)
    return (e / np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)).mean(0)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Two sets' similarity: the dot product of their summaries."""
    return float(np.dot(a, b))
