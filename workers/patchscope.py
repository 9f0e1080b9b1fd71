"""Patchscope (adl-method.md, section 3): a vector written over (replacing) one decoder
block's output at the last token of identity prompts; the next-token distribution says
what the model reads in it.

A worker loads its model once and serves batches: every (vector, scale, prompt) is one
row of a right-padded batch (a causal model's last real token never sees the padding),
and a forward hook on the block replaces each row's last-token output with its own
vector. Softmaxes are float32.
"""
from __future__ import annotations

import numpy as np

from workers.models import core_model, decoder_layers, head_logits, model_device

ROWS_PER_FORWARD = 256


def combine_prompts(probs, vocab_top: int, top_k: int):
    """probs: (prompts, vocab) float32 next-token probabilities of one (vector, scale).
    Tokens outside the intersection of every prompt's top `vocab_top` are zeroed; the rest
    get the mean over prompts. Returns the top_k (ids, probabilities)."""
    import torch
    keep = min(vocab_top, probs.shape[-1])
    mask = torch.ones(probs.shape[-1], dtype=torch.bool, device=probs.device)
    for row in probs:
        in_top = torch.zeros_like(mask)
        in_top[torch.topk(row, keep).indices] = True
        mask &= in_top
    combined = probs.sum(0) * mask / probs.shape[0]
    top = torch.topk(combined, min(top_k, combined.shape[-1]))
    return top.indices, top.values


class Patchscope:
    """Patchscope on one loaded model; prompts are encoded and tokens decoded by the
    tokenizer given to each call (the pair's base tokenizer)."""

    def __init__(self, model):
        self.model, self.device = model, model_device(model)
        self.blocks = decoder_layers(self.model)
        self.core = core_model(self.model)

    def run(self, tokenizer, vectors: np.ndarray, layers: list[int], scales: list[float], prompts: list[str],
            vocab_top: int, top_k: int):
        """vectors: (N, hidden) unit-scaled vectors, layers: each one's block. Returns, per
        vector and scale, (token ids, decoded tokens, probabilities) of the top_k tokens:
        three nested lists indexed [vector][scale]."""
        import torch
        encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        width = max(len(ids) for ids in encoded)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, row in enumerate(encoded):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        last = torch.tensor([len(row) - 1 for row in encoded])
        vectors = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
        n_prompt = len(prompts)
        out_ids = [[None] * len(scales) for _ in range(len(vectors))]
        out_tokens = [[None] * len(scales) for _ in range(len(vectors))]
        out_probs = [[None] * len(scales) for _ in range(len(vectors))]
        # Rows (vector, scale, prompt), grouped by layer (one hook per forward); a chunk
        # holds whole (vector, scale) groups, combined as soon as their prompts are read.
        per_chunk = max(1, ROWS_PER_FORWARD // n_prompt)
        for layer in sorted(set(layers)):
            groups = [(v, s) for v in range(len(vectors)) if layers[v] == layer for s in range(len(scales))]
            for start in range(0, len(groups), per_chunk):
                chunk = groups[start:start + per_chunk]
                prompt_of = torch.arange(n_prompt).repeat(len(chunk))
                patch = torch.stack([scales[s] * vectors[v] for v, s in chunk]).repeat_interleave(n_prompt, 0)
                logits = self._forward(layer, ids[prompt_of], mask[prompt_of], last[prompt_of], patch)
                probs = torch.softmax(logits.float(), dim=-1).reshape(len(chunk), n_prompt, -1)
                for (v, s), group in zip(chunk, probs):
                    top_ids, top_probs = combine_prompts(group, vocab_top, top_k)
                    top_ids = top_ids.cpu().numpy()
                    out_ids[v][s] = top_ids
                    out_tokens[v][s] = [tokenizer.decode([int(t)]) for t in top_ids]
                    out_probs[v][s] = top_probs.cpu().numpy()
        return out_ids, out_tokens, out_probs

    def _forward(self, layer: int, ids, mask, last, patch):
        """Last-token logits with each row's block-`layer` output at its last token replaced
        by that row's patch vector."""
        import torch
        rows = torch.arange(len(ids))

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[rows, last] = patch.to(hidden.dtype).to(hidden.device)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = self.blocks[layer].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                # The body, then the head on the last tokens only: full logits of every
                # position would be rows x length x vocabulary floats.
                hidden = self.core(input_ids=ids.to(self.device),
                                   attention_mask=mask.to(self.device)).last_hidden_state
                return head_logits(self.model, hidden[rows, last])
        finally:
            handle.remove()
