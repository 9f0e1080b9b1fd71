"""The causal effect of delta (the reference's causal_effect.py): next-token
cross-entropy of a model on texts while each token's activation at one block's output has
its component along a unit direction v changed:

    project:  x <- x - (x.v) v                  (the component removed)
    patch:    x <- x + (b.v - x.v) v            (set to the base model's, b at the same token)

for many directions at once (delta_hat per position, random Gaussian directions, random
differences of two base activations), each in its own forward. Sums and counts come
back, over every target token and over targets after the first after_k; the caller
takes the means.
"""
from __future__ import annotations

import numpy as np

from workers.extraction import block_outputs
from workers.models import core_model, decoder_layers, head_logits, model_device, text_config


def batches(tokenizer, texts: list[str], max_tokens: int, batch_size: int) -> list[tuple]:
    """(input_ids, attention_mask) int64 tensors, right-padded, texts tokenized with
    special tokens and cut to max_tokens; texts of fewer than 2 tokens are left out."""
    import torch
    encoded = [ids[:max_tokens] for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    for start in range(0, len(encoded), batch_size):
        group = encoded[start:start + batch_size]
        width = max(len(ids) for ids in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, row in enumerate(group):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        out.append((ids, mask))
    return out


def unit(directions: np.ndarray) -> np.ndarray:
    d = np.asarray(directions, dtype=np.float64)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def random_directions(hidden: int, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, hidden))


def _acts(model, ids, mask, layer: int):
    """Block `layer`'s output (batch, seq, hidden) in float64 on the CPU."""
    import torch
    device = model_device(model)
    with torch.inference_mode():
        out = block_outputs(model, ids.to(device), [layer])[:, 0]
    return out.to(torch.float64).cpu()


def random_differences(model, groups, layer: int, count: int, seed: int) -> np.ndarray:
    """count differences of two distinct random tokens' activations (padding left out)."""
    if count == 0:
        return np.zeros((0, text_config(model.config).hidden_size))
    pool = np.concatenate([_acts(model, ids, mask, layer)[mask.bool()].numpy() for ids, mask in groups])
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=2 * count, replace=len(pool) < 2 * count)
    return pool[picks[0::2]] - pool[picks[1::2]]


def coefficients(model, groups, layer: int, directions: np.ndarray) -> list[np.ndarray]:
    """Per batch, (batch, seq, directions) float64: each token's activation . v."""
    import torch
    v = torch.from_numpy(unit(directions))
    return [(_acts(model, ids, mask, layer) @ v.T).numpy() for ids, mask in groups]


# Logits held at once in the loss (and in the offline grader's perplexities, which use
# next_token_nll too): rows x vocabulary floats at most (a chunk of positions
# through the unembedding, in float32, and its log-sum-exp), whatever the vocabulary.
# Whole, a batch of 8 x 1024 tokens is 8 x 1024 x vocabulary, three times over (the
# model's dtype, float32, the log-softmax): about 10 GB for Llama 3, 21 GB for Gemma 3.
LOGIT_ELEMENTS = 2 ** 24   # 64 MB of float32


def next_token_nll(model, ids, mask):
    """(batch, seq - 1) float64 on the CPU: the next-token NLL of each position, from the
    body's last hidden states through the unembedding a chunk of positions at a time
    (workers.models.head_logits: the final-logit soft cap where the model has one)."""
    import torch
    device = model_device(model)
    hidden = core_model(model)(input_ids=ids.to(device), attention_mask=mask.to(device),
                               use_cache=False).last_hidden_state[:, :-1]
    batch, positions, width = hidden.shape
    rows, targets = hidden.reshape(-1, width), ids[:, 1:].reshape(-1)
    step = max(1, LOGIT_ELEMENTS // text_config(model.config).vocab_size)
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    for start in range(0, rows.shape[0], step):
        logits = head_logits(model, rows[start:start + step]).float()
        target = targets[start:start + step].to(logits.device)
        picked = logits.gather(1, target[:, None]).squeeze(1)
        out[start:start + step] = (torch.logsumexp(logits, dim=-1) - picked).double().cpu()
        del logits
    return out.reshape(batch, positions)


def losses(model, groups, layer: int, directions: np.ndarray, mode: str, targets: list | None,
           after_k: int) -> dict:
    """{"none": (sum, count, sum_after_k, count_after_k), "directions": [(...) per direction]}."""
    import torch
    block = decoder_layers(model)[layer]
    v_all = torch.from_numpy(unit(directions))
    state = {}

    def hook(_module, _inputs, output):
        if "v" not in state:
            return output
        h = output[0] if isinstance(output, tuple) else output
        v = state["v"].to(h.device)
        x = h.to(torch.float64)
        c = x @ v
        goal = state["target"].to(h.device) if state.get("target") is not None else torch.zeros_like(c)
        new = (x + (goal - c)[..., None] * v).to(h.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def sums(ids, mask):
        with torch.inference_mode():
            nll = next_token_nll(model, ids, mask)
        valid = mask[:, 1:].bool()
        after = valid & (torch.arange(nll.shape[1])[None, :] > after_k)
        return np.array([float(nll[valid].sum()), int(valid.sum()), float(nll[after].sum()), int(after.sum())])

    handle = block.register_forward_hook(hook)
    try:
        none = sum(sums(ids, mask) for ids, mask in groups)
        per = []
        for d in range(len(v_all)):
            total = np.zeros(4)
            for b, (ids, mask) in enumerate(groups):
                state["v"] = v_all[d]
                state["target"] = (torch.from_numpy(targets[b][..., d]) if mode == "patch" else None)
                total = total + sums(ids, mask)
            per.append(tuple(total))
            state.clear()
    finally:
        state.clear()
        handle.remove()
    return {"none": tuple(none), "directions": per}
