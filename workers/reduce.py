"""The reducer: per (layer, position) sums over documents of a base and a finetuned
activation set, as partial sums per shard that merge by addition, all in float64.

delta = mean(ft) - mean(base) equals mean(ft - base) exactly in real arithmetic; in
float64 the difference of the sums loses nothing that matters at activation scale and
saves a pass over the data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage import layout
from storage.store import Store
from storage.tables import ACTIVATIONS, activation_dtype, decoded_chunks


@dataclass
class Sums:
    count: np.ndarray          # (layers, positions) documents seen
    base: np.ndarray           # (layers, positions, hidden) float64 sums
    finetuned: np.ndarray      # (layers, positions, hidden)
    ft_norm_sum: np.ndarray    # (layers,) sum of |ft| over positions >= norm_skip
    ft_norm_count: np.ndarray  # (layers,)

    def __add__(self, other: "Sums") -> "Sums":
        return Sums(*(a + b for a, b in zip(self.fields(), other.fields())))

    def fields(self):
        return (self.count, self.base, self.finetuned, self.ft_norm_sum, self.ft_norm_count)


# Documents widened to float32 at a time: large enough for fast numpy, small enough to
# stay in cache instead of materialising a whole shard in float32.
CHUNK_DOCUMENTS = 32


def _shard_sums(table, n_layers: int, n_pos: int, norm_skip: int | None):
    """Float64 sums over the documents of one shard, (layers, positions, hidden), and
    with norm_skip the sum of activation norms at positions >= norm_skip, (layers,)."""
    sums, norm_sum = 0.0, np.zeros(n_layers)
    per_doc = n_layers * n_pos
    for chunk in decoded_chunks(table.column("act"), activation_dtype(table), CHUNK_DOCUMENTS * per_doc):
        x = chunk.reshape(-1, n_layers, n_pos, chunk.shape[-1])
        sums = sums + x.sum(axis=0, dtype=np.float64)
        if norm_skip is not None:
            tail = x[:, :, norm_skip:]
            norm_sum += np.sqrt(np.einsum("dlph,dlph->dlp", tail, tail)).sum(axis=(0, 2), dtype=np.float64)
    return sums, norm_sum


def shard_sums(store: Store, base_set: str, finetuned_set: str, index: int, layers: list[int],
               n_pos: int, norm_skip: int, digests: tuple[dict, dict] | None) -> Sums:
    """digests: the (base, finetuned) shard's digest as its set's manifest records it;
    each shard is checked against it before it is read (storage.store.IntegrityError when
    it is missing, truncated, corrupted or another shard). None reads them unchecked (the
    benchmark's comparison only)."""
    base_digest, ft_digest = digests if digests is not None else (None, None)
    base = store.read_table(layout.shard(base_set, index), ACTIVATIONS, digest=base_digest)
    ft = store.read_table(layout.shard(finetuned_set, index), ACTIVATIONS, digest=ft_digest)
    # Both sets come from the same tokenized documents, so rows must line up one to one.
    for name in ("doc_id", "layer", "position"):
        if not base.column(name).equals(ft.column(name)):
            raise ValueError(f"shard {index}: base and finetuned rows differ in {name!r} "
                             f"({base_set} vs {finetuned_set})")
    docs = base.num_rows // (len(layers) * n_pos)
    expected = np.tile(np.repeat(np.asarray(layers, np.int16), n_pos), docs)
    if not np.array_equal(base.column("layer").to_numpy(), expected):
        raise ValueError(f"shard {index} of {base_set}: rows are not in (doc, layer, position) order")
    base_sum, _ = _shard_sums(base, len(layers), n_pos, None)
    ft_sum, norm_sum = _shard_sums(ft, len(layers), n_pos, norm_skip)
    return Sums(
        count=np.full((len(layers), n_pos), docs, dtype=np.int64),
        base=base_sum, finetuned=ft_sum, ft_norm_sum=norm_sum,
        ft_norm_count=np.full(len(layers), docs * (n_pos - norm_skip), dtype=np.int64),
    )


def finish(total: Sums) -> dict[str, np.ndarray]:
    """Means, delta and the norm statistic from merged sums."""
    count = total.count[..., None].astype(np.float64)
    base_mean = total.base / count
    finetuned_mean = total.finetuned / count
    return {
        "num_documents": total.count,
        "delta": finetuned_mean - base_mean,
        "base_mean": base_mean,
        "finetuned_mean": finetuned_mean,
        "finetuned_norm": total.ft_norm_sum / np.maximum(total.ft_norm_count, 1),
    }
