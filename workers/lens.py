"""The logit lens: a residual-stream vector read through the finetuned model's final norm
and unembedding, softmaxed over the vocabulary, in float32 (adl-method.md, sections 3-4).
"""
from __future__ import annotations

import copy

import numpy as np

from workers.models import final_norm, model_device

# The vectors read for every (layer, position); the reference negates after the norm.
VARIANTS = ("delta", "neg_delta", "base_mean", "finetuned_mean")


class Lens:
    """The lens of one loaded model: float32 copies of its final norm and unembedding
    (the lens must not round through the model's bf16 weights)."""

    def __init__(self, model):
        self.device = model_device(model)
        self.norm = copy.deepcopy(final_norm(model)).float().to(self.device)
        self.unembed = copy.deepcopy(model.get_output_embeddings()).float().to(self.device)

    def top_tokens(self, tokenizer, vectors: np.ndarray, variants: list[str], k: int):
        """For each vector (rows of a (N, hidden) array) and its variant name: the top-k
        token ids, their decoded strings (by `tokenizer`) and probabilities."""
        import torch
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(vectors), dtype=torch.float32, device=self.device)
            normed = self.norm(x)
            sign = torch.tensor([-1.0 if v == "neg_delta" else 1.0 for v in variants],
                                device=self.device)[:, None]
            probs = torch.softmax(self.unembed(sign * normed).float(), dim=-1)
            top = torch.topk(probs, k=min(k, probs.shape[-1]), dim=-1)
        ids = top.indices.cpu().numpy()
        tokens = [[tokenizer.decode([int(t)]) for t in row] for row in ids]
        return ids, tokens, top.values.cpu().numpy()
