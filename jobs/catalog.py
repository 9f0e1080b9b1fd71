"""The job's catalog, `runs/<job>/catalog.parquet`: the headline findings of every
finished pair of the job in one table, one row per pair x layer x analysed position, for
analysts comparing many pairs (schema: storage.tables.CATALOG_SCHEMA, README "Tables").

Built from the pairs' own tables after the job; optional tables (steering, similarity,
token relevance, agent) fill their columns when present and leave them null otherwise.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from storage import layout
from storage.store import Store
from storage.tables import TABLE_PARQUET_OPTIONS, catalog_table

TOP_TOKENS = 10


def pair_rows(store: Store, pair: dict, positions: list[int]) -> list[dict]:
    """pair: a run record's pair entry (name, dir, ...). [] until the pair is complete.
    Every table is checked against the digest the pair's manifest records for it."""
    d = pair["dir"]
    if not store.exists(layout.manifest(d)):
        return []
    files = store.read_json(layout.manifest(d)).get("files") or {}
    diff = store.read_table(f"{d}/{layout.DIFFERENCE}", columns=[
        "layer", "position", "num_documents", "delta_norm", "finetuned_norm"],
        digest=files.get(layout.DIFFERENCE)).to_pylist()
    lens = store.read_table(f"{d}/{layout.LOGIT_LENS}", digest=files.get(layout.LOGIT_LENS)).to_pandas()
    lens = lens[(lens.variant == "delta") & (lens["rank"] < TOP_TOKENS)].sort_values("rank")
    top = {key: (list(g.token), [float(p) for p in g.probability])
           for key, g in lens.groupby(["layer", "position"])}
    alpha = {}
    if store.exists(f"{d}/{layout.STEERING}"):
        for r in store.read_table(f"{d}/{layout.STEERING}", columns=["layer", "position", "alpha"],
                                  digest=files.get(layout.STEERING)).to_pylist():
            alpha[(r["layer"], r["position"])] = r["alpha"]
    similarities: dict = {}
    if store.exists(f"{d}/{layout.SIMILARITY}"):
        for r in store.read_table(f"{d}/{layout.SIMILARITY}", digest=files.get(layout.SIMILARITY)).to_pylist():
            similarities.setdefault((r["layer"], r["position"]), []).append(
                {"set_a": r["set_a"], "set_b": r["set_b"], "similarity": r["similarity"]})
    relevant = {}
    key = f"{d}/{layout.TOKEN_RELEVANCE_JSON}"
    metrics = store.read_json(key, digest=files.get(layout.TOKEN_RELEVANCE_JSON)) if store.exists(key) else None
    if metrics and metrics.get("status") == "done":
        for m in metrics.get("metrics", []):
            if m.get("source") == "logit_lens":
                relevant[(m["layer"], m["position"])] = m["fraction_relevant"]
    agent_grades = None
    if store.exists(f"{d}/{layout.AGENT}"):
        agent_grades = agent_summary(store.read_table(f"{d}/{layout.AGENT}").to_pandas())
    rows = []
    for r in diff:
        key = (r["layer"], r["position"])
        if r["position"] not in positions:
            continue
        tokens, probs = top.get(key, ([], []))
        rows.append({"pair": pair["name"], "pair_dir": d, "base": pair.get("base_activations"),
                     "finetuned": pair.get("finetuned_activations"), **r,
                     "top_tokens": tokens, "top_probabilities": probs, "alpha": alpha.get(key),
                     "fraction_relevant": relevant.get(key), "similarities": similarities.get(key),
                     "agent_grades": agent_grades})
    return rows


def agent_summary(table) -> list[dict]:
    """Per (agent, budget) of an agent table (pandas): the mean over its runs' mean grades
    (runs without a grade left out), the runs and how many were graded."""
    out = []
    for (agent, budget), group in table.groupby(["agent", "budget"], sort=True):
        graded = group.mean_grade.dropna()
        out.append({"agent": agent, "budget": int(budget), "runs": int(len(group)), "graded": int(len(graded)),
                    "mean_grade": float(graded.mean()) if len(graded) else None})
    order = {"adl": 0, "blackbox": 1}
    return sorted(out, key=lambda r: (order.get(r["agent"], 2), r["agent"], r["budget"]))


def build_catalog(store: Store, record: dict) -> pa.Table:
    positions = list(record["spec"]["method"]["positions"])
    rows = [row for pair in record["pairs"] for row in pair_rows(store, pair, positions)]
    rows.sort(key=lambda r: (r["pair"], r["layer"], r["position"]))
    return catalog_table(rows, record["job"])


def write_catalog(store: Store, record_key: str) -> str:
    """Writes the catalog next to the run record, unless it already holds the same rows
    (a rerun that changed nothing rewrites nothing)."""
    record = store.read_json(record_key)
    table = build_catalog(store, record)
    key = layout.run_catalog(record["job"])
    buf = io.BytesIO()
    pq.write_table(table, buf, **TABLE_PARQUET_OPTIONS)
    if not (store.exists(key) and store.read_bytes(key) == buf.getvalue()):
        store.write_bytes(key, buf.getvalue())
    return key
