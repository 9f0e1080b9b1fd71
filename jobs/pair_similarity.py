"""The cross-pair view, `runs/<job>/pair_similarity.parquet`: the cosine similarity of two
pairs' delta vectors at each (layer, position) they share, for every two finished pairs
of the job whose models have the same hidden size (same_base says whether they also
share the base model's activations). Pairs finetuned on related data point their delta
the same way (an organism and its pretraining-mixed variant), so the report orders pairs
by it (average-linkage clustering) and draws it as a heatmap. Read from the pairs' own
difference tables; no model work.
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa

from jobs.results import PairResults
from storage import layout
from storage.store import StorageError, Store
from storage.tables import PAIR_SIMILARITY


def pair_similarity_rows(store: Store, record: dict) -> list[dict]:
    positions = set(record["spec"].get("method", {}).get("positions", [0, 1, 2, 3, 4]))
    deltas = {}   # pair name -> ({(layer, position): vector}, base activations)
    for pair in record["pairs"]:
        results = PairResults(store, pair["dir"])
        try:
            found = results.delta() if results.complete else None
        except StorageError:   # a damaged pair is left out here; its own section names the damage
            found = None
        if found is None:
            continue
        keys, vectors = found
        deltas[pair["name"]] = ({k: v for k, v in zip(keys, vectors) if k[1] in positions},
                                pair.get("base_activations"))
    names = list(deltas)
    rows = []
    for i, a in enumerate(names):
        for b in names[i:]:
            (va, base_a), (vb, base_b) = deltas[a], deltas[b]
            for key in sorted(set(va) & set(vb)):
                x, y = va[key], vb[key]
                if x.shape != y.shape:
                    continue   # another hidden size: not comparable
                norm = float(np.linalg.norm(x) * np.linalg.norm(y))
                rows.append({"pair_a": a, "pair_b": b, "layer": key[0], "position": key[1],
                             "cosine": float(np.dot(x, y) / norm) if norm > 0 else None,
                             "same_base": bool(base_a is not None and base_a == base_b)})
    return rows


def build_pair_similarity(store: Store, record: dict) -> pa.Table:
    return PAIR_SIMILARITY.from_rows(pair_similarity_rows(store, record), **{"adl.job": record["job"]})


def write_pair_similarity(store: Store, record_key: str) -> str:
    from jobs.summary import read_run_record
    record = read_run_record(store, record_key)
    key = layout.run_pair_similarity(record["job"])
    store.write_table(key, PAIR_SIMILARITY, build_pair_similarity(store, record), if_changed=True)
    return key


def matrix(rows, layer: int) -> tuple[list[str], np.ndarray]:
    """(pairs, their symmetric matrix of cosines at layer, averaged over positions); NaN
    where two pairs share no position."""
    at = [r for r in rows if r["layer"] == layer and r["cosine"] is not None]
    names = list(dict.fromkeys([r["pair_a"] for r in at] + [r["pair_b"] for r in at]))
    index = {n: i for i, n in enumerate(names)}
    total, count = np.zeros((len(names),) * 2), np.zeros((len(names),) * 2)
    for r in at:
        i, j = index[r["pair_a"]], index[r["pair_b"]]
        for u, v in {(i, j), (j, i)}:
            total[u, v] += r["cosine"]
            count[u, v] += 1
    with np.errstate(invalid="ignore"):
        return names, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def cluster_order(sim: np.ndarray) -> list[int]:
    """A leaf order of average-linkage agglomerative clustering on similarity: the two
    most similar clusters are merged until one is left, each merge keeping its members
    together, so that a family of pairs sits side by side."""
    clusters = [[i] for i in range(len(sim))]
    s = np.nan_to_num(sim, nan=-2.0)
    while len(clusters) > 1:
        best, pair = -np.inf, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(np.mean(s[np.ix_(clusters[a], clusters[b])]))
                if link > best:
                    best, pair = link, (a, b)
        a, b = pair
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return clusters[0] if clusters else []
