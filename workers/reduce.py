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
from storage.tables import activation_dtype, decode_vectors


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


def _read(store: Store, set_prefix: str, index: int, n_layers: int, n_pos: int):
    """(doc_ids, activations as (docs, layers, positions, hidden) float32) of one shard."""
    table = store.read_table(layout.shard(set_prefix, index))
    acts = decode_vectors(table.column("act"), activation_dtype(table))
    docs = table.num_rows // (n_layers * n_pos)
    doc_ids = table.column("doc_id").to_numpy()[:: n_layers * n_pos]
    return table, doc_ids, acts.reshape(docs, n_layers, n_pos, -1)


def shard_sums(store: Store, base_set: str, finetuned_set: str, index: int, layers: list[int],
               n_pos: int, norm_skip: int) -> Sums:
    base_table, base_docs, base = _read(store, base_set, index, len(layers), n_pos)
    ft_table, ft_docs, ft = _read(store, finetuned_set, index, len(layers), n_pos)
    # Both sets come from the same tokenized documents, so rows must line up one to one.
    for name in ("doc_id", "layer", "position"):
        if not base_table.column(name).equals(ft_table.column(name)):
            raise ValueError(f"shard {index}: base and finetuned rows differ in {name!r} "
                             f"({base_set} vs {finetuned_set})")
    expected_layers = np.tile(np.repeat(np.asarray(layers, np.int16), n_pos), len(base_docs))
    if not np.array_equal(base_table.column("layer").to_numpy(), expected_layers):
        raise ValueError(f"shard {index} of {base_set}: rows are not in (doc, layer, position) order")
    norms = np.linalg.norm(ft[:, :, norm_skip:, :], axis=-1)  # (docs, layers, positions >= skip)
    return Sums(
        count=np.full((len(layers), n_pos), len(base_docs), dtype=np.int64),
        base=base.sum(axis=0, dtype=np.float64),
        finetuned=ft.sum(axis=0, dtype=np.float64),
        ft_norm_sum=norms.sum(axis=(0, 2), dtype=np.float64),
        ft_norm_count=np.full(len(layers), norms.shape[0] * norms.shape[2], dtype=np.int64),
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
