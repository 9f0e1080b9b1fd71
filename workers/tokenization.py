"""The method's tokenization of corpus documents (adl-method.md, section 1)."""
from __future__ import annotations

import numpy as np

# Part of every activation set's content key: bump when the rules below change.
TOKENIZATION_VERSION = 1


def prepare_text(text: str, n: int) -> str | None:
    """The part of a document the tokenizer sees: its first n*10 characters; None for an
    empty or whitespace-only document, which is skipped."""
    if not isinstance(text, str) or not text.strip():
        return None
    return text[: n * 10]


def tokenize_documents(tokenizer, texts: list[str | None], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids, token_ids): the indices of the documents kept and their first n tokens,
    with special tokens (BOS where the tokenizer adds one); documents with fewer than n
    tokens are dropped."""
    index = [i for i, t in enumerate(texts) if t is not None]
    if not index:
        return np.zeros(0, np.int64), np.zeros((0, n), np.int64)
    encoded = tokenizer([texts[i] for i in index], add_special_tokens=True)["input_ids"]
    kept = [(i, ids[:n]) for i, ids in zip(index, encoded) if len(ids) >= n]
    doc_ids = np.array([i for i, _ in kept], dtype=np.int64)
    token_ids = np.array([ids for _, ids in kept], dtype=np.int64).reshape(len(kept), n)
    return doc_ids, token_ids


def frequent_tokens(tokenizer, texts: list[str], generic_ids: np.ndarray, k: int,
                    min_ratio: float) -> list[tuple[int, str]]:
    """The k most frequent non-generic tokens of texts (the finetuning data), as (id,
    decoded token), most frequent first.

    Non-generic: not whitespace or punctuation only, and at least `min_ratio` times as
    frequent (share of all tokens) in texts as in `generic_ids`, a sample of generic text
    in the same tokenizer (the job's corpus; special tokens ignored; add-one smoothing, so
    a token the sample lacks counts as seen once). Stopwords and the like are as frequent
    in generic text and drop out; words of the finetuning domain stay.
    """
    from workers.graders import is_trivial_token
    special = set(tokenizer.all_special_ids)
    vocab = max(len(tokenizer), int(np.max(generic_ids, initial=0)) + 1)
    counts = np.zeros(vocab, np.int64)
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = [i for i in ids if i not in special and i < vocab]
        np.add.at(counts, ids, 1)
    generic = np.asarray(generic_ids, np.int64).reshape(-1)
    generic = generic[~np.isin(generic, list(special))]
    generic_counts = np.bincount(generic, minlength=vocab)[:vocab]
    share = counts / max(counts.sum(), 1)
    generic_share = (generic_counts + 1) / (generic_counts.sum() + vocab)
    out = []
    for i in sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i)):
        token = tokenizer.decode([int(i)])
        if share[i] >= min_ratio * generic_share[i] and not is_trivial_token(token):
            out.append((int(i), token))
            if len(out) == k:
                break
    return out
