"""The job's catalog, `runs/<job>/catalog.parquet`: the headline findings of every
finished pair of the job in one table, one row per pair x layer x analysed position, for
analysts comparing many pairs (schema: storage.tables.CATALOG, README "Tables").

Built from the pairs' own tables after the job; optional tables (steering, similarity,
token relevance, agent) fill their columns when present and leave them null otherwise.
"""
from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa

from jobs.results import PairResults, agent_summary  # noqa: F401  (agent_summary: its readers import it here)
from jobs.triage import pair_triage
from storage import layout
from storage.store import StorageError, Store
from storage.tables import CATALOG, SIMILARITY, STEERING

TOP_TOKENS = 10


def pair_rows(store: Store, pair: dict, positions: list[int], control: bool = False) -> list[dict]:
    """pair: a run record's pair entry (name, dir, ...). [] until the pair is complete.
    Every table is checked against the digest the pair's manifest records for it."""
    results = PairResults(store, pair["dir"])
    if not results.complete:
        return []
    diff = results.norms().to_dict("records")
    top = {key: (list(g.token), [float(p) for p in g.probability])
           for key, g in results.lens_top("delta", TOP_TOKENS).groupby(["layer", "position"])}
    steering = results.table(STEERING, ["layer", "position", "alpha", "strength_found"])
    alpha = {} if steering is None else {(r.layer, r.position): None if pd.isna(r.alpha) else float(r.alpha)
                                         for r in steering.itertuples()}
    found = {} if steering is None else {(r.layer, r.position): None if r.strength_found is None
                                         else bool(r.strength_found) for r in steering.itertuples()}
    similarities: dict = {}
    sim = results.table(SIMILARITY)
    for r in ([] if sim is None else sim.itertuples()):
        similarities.setdefault((r.layer, r.position), []).append(
            {"set_a": r.set_a, "set_b": r.set_b, "similarity": r.similarity})
    relevant = results.relevance_metrics("logit_lens") or {}
    agent_grades = results.agent_groups()
    triage = pair_triage(results)
    earlier = results.earlier_stages()   # reused from an earlier run (settings: the pair's manifest)
    rows = []
    for r in diff:
        key = (r["layer"], r["position"])
        if r["position"] not in positions:
            continue
        tokens, probs = top.get(key, ([], []))
        t = triage.get(int(r["layer"]), {})
        rows.append({"pair": pair["name"], "pair_dir": pair["dir"], "base": pair.get("base_activations"),
                     "finetuned": pair.get("finetuned_activations"), **r,
                     "top_tokens": tokens, "top_probabilities": probs, "alpha": alpha.get(key),
                     "fraction_relevant": relevant.get(key), "similarities": similarities.get(key),
                     "agent_grades": agent_grades,
                     "delta_ratio": t.get("delta_ratio", {}).get(int(r["position"]),
                                                                 r["delta_norm"] / r["finetuned_norm"]),
                     "trace_strength": t.get("trace_strength"),
                     "steering_uplift": t.get("steering_uplift", {}).get(int(r["position"])),
                     "best_grade": t.get("best_grade"), "control": control,
                     "strength_found": found.get(key), "earlier_stages": earlier})
    return rows


def build_catalog(store: Store, record: dict) -> pa.Table:
    positions = list(record["spec"]["method"]["positions"])
    controls = {p.get("name") for p in record["spec"].get("pairs", []) if p.get("control")}
    rows = [row for pair in record["pairs"] for row in pair_rows(store, pair, positions, pair["name"] in controls)]
    rows.sort(key=lambda r: (r["pair"], r["layer"], r["position"]))
    return CATALOG.from_rows(rows, **{"adl.job": record["job"],
                                      "adl.pairs": json.dumps(pair_states(store, record), sort_keys=True)})


def pair_states(store: Store, record: dict) -> dict:
    """Every pair of the job: {"state", "error"} from the status record (pending, running,
    done, failed), or done / pending by its manifest when there is no status record."""
    try:
        status = store.read_json_or_none(layout.run_status(record["job"]))
    except StorageError:   # a damaged status record: the manifests still say what is done
        status = None
    pairs = (status or {}).get("pairs") if isinstance(status, dict) else None
    out = {}
    for pair in record["pairs"]:
        entry = pairs.get(pair["name"]) if isinstance(pairs, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("state"), str):
            out[pair["name"]] = {"state": entry["state"], "error": entry.get("error")}
        else:
            done = store.exists(layout.manifest(pair["dir"]))
            out[pair["name"]] = {"state": "done" if done else "pending", "error": None}
    return out


def write_catalog(store: Store, record_key: str) -> str:
    """Writes the catalog next to the run record, unless it already holds the same rows
    (a rerun that changed nothing rewrites nothing)."""
    record = store.read_json(record_key)
    table = build_catalog(store, record)
    key = layout.run_catalog(record["job"])
    store.write_table(key, CATALOG, table, if_changed=True)
    return key
