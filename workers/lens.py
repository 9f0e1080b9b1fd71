"""The logit lens: a residual-stream vector read through the finetuned model's final norm
and unembedding, softmaxed over the vocabulary, in float32 (adl-method.md, sections 3-4).
"""
from __future__ import annotations

import copy

import numpy as np

from jobs.spec import ModelSource
from workers.models import final_norm, load_model, load_tokenizer

# The vectors read for every (layer, position); the reference negates after the norm.
VARIANTS = ("delta", "neg_delta", "base_mean", "finetuned_mean")


class LensWorker:
    def __init__(self, source: ModelSource, tokenizer: ModelSource, *, dtype: str, s3: dict,
                 trust_remote_code: bool = False):
        import torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(source, dtype=dtype, s3=s3, trust_remote_code=trust_remote_code,
                           device=self.device)
        # float32 copies: the lens must not round through the model's bf16 weights.
        self.norm = copy.deepcopy(final_norm(model)).float().to(self.device)
        self.unembed = copy.deepcopy(model.get_output_embeddings()).float().to(self.device)
        del model
        self.tokenizer = load_tokenizer(tokenizer, s3, trust_remote_code)

    def top_tokens(self, vectors: np.ndarray, variants: list[str], k: int):
        """For each vector (rows of a (N, hidden) array) and its variant name: the top-k
        token ids, their decoded strings and probabilities."""
        import torch
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(vectors), dtype=torch.float32, device=self.device)
            normed = self.norm(x)
            sign = torch.tensor([-1.0 if v == "neg_delta" else 1.0 for v in variants],
                                device=self.device)[:, None]
            probs = torch.softmax(self.unembed(sign * normed).float(), dim=-1)
            top = torch.topk(probs, k=min(k, probs.shape[-1]), dim=-1)
        ids = top.indices.cpu().numpy()
        tokens = [[self.tokenizer.decode([int(t)]) for t in row] for row in ids]
        return ids, tokens, top.values.cpu().numpy()
