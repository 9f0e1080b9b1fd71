"""The method's tokenization of corpus documents (adl-method.md, section 1)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Part of every activation set's content key: bump when the rules below change.
# 2: corpus.num_documents counts kept documents (read until that many survive the filters).
TOKENIZATION_VERSION = 2

# Why a document is not kept, in the order the rules are applied.
DROP_REASONS = ("non_text", "empty", "whitespace", "too_short")


@dataclass(frozen=True)
class KeptDocuments:
    doc_ids: np.ndarray       # (kept,) indices of the kept documents in the corpus
    token_ids: np.ndarray     # (kept, n) their first n tokens
    read: int                 # documents read from the corpus, kept or not
    dropped: dict             # documents not kept, by reason (DROP_REASONS)


def skip_reason(document) -> str | None:
    """Why a document is skipped before tokenizing: not a string, empty, or whitespace
    only; None for text to tokenize."""
    if not isinstance(document, str):
        return "non_text"
    if not document:
        return "empty"
    if not document.strip():
        return "whitespace"
    return None


def keep_documents(tokenizer, documents: Iterable, n: int, limit: int, chunk_size: int = 4096) -> KeptDocuments:
    """The method's documents (adl-method.md, section 1): in corpus order, until `limit`
    are kept or the documents run out, as the reference takes them. Skips non-text,
    empty and whitespace-only documents; cuts each text to its first n*10 characters,
    tokenizes with special tokens (BOS where the tokenizer adds one), drops texts with
    fewer than n tokens and keeps the first n.

    Reads lazily and never past the document that completes `limit`: texts are
    tokenized in batches of at most as many as are still missing (and chunk_size), each
    of which might be kept."""
    documents = iter(documents)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    doc_ids: list[int] = []
    token_ids: list[list[int]] = []
    read, exhausted = 0, False
    while len(doc_ids) < limit and not exhausted:
        batch: list[tuple[int, str]] = []
        while len(batch) < min(limit - len(doc_ids), chunk_size):
            try:
                document = next(documents)
            except StopIteration:
                exhausted = True
                break
            reason = skip_reason(document)
            if reason is None:
                batch.append((read, document[: n * 10]))
            else:
                dropped[reason] += 1
            read += 1
        if not batch:
            continue
        encoded = tokenizer([text for _, text in batch], add_special_tokens=True)["input_ids"]
        for (index, _), ids in zip(batch, encoded):
            if len(ids) >= n:
                doc_ids.append(index)
                token_ids.append(list(ids[:n]))
            else:
                dropped["too_short"] += 1
    return KeptDocuments(np.array(doc_ids, dtype=np.int64),
                         np.array(token_ids, dtype=np.int64).reshape(len(doc_ids), n), read, dropped)


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
    from workers.graders.base import is_trivial_token
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
