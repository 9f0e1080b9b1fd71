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
