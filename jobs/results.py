"""One reader of a pair's results folder, shared by the catalog, the summary, the report
and the job-level views (triage, pair similarity): the pair tables they re-read and
filter (delta, the lens's top tokens, patchscope at the chosen scale, ...) come from here.

A table is read once per reader and checked against the digest the pair's manifest
records for it, when the pair is complete (a running pair has no manifest yet: what its
finished stages wrote is read as it is). It reads only; it never writes.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from storage import layout
from storage.store import Store
from storage.tables import decode_vectors

NORM_COLUMNS = ["layer", "position", "num_documents", "delta_norm", "finetuned_norm"]


class PairResults:
    def __init__(self, store: Store, pair_dir: str):
        self.store, self.dir = store, pair_dir
        manifest = store.read_json_or_none(layout.manifest(pair_dir)) if store.exists(layout.manifest(pair_dir)) \
            else None
        self.complete = manifest is not None
        self.files = (manifest.get("files") or {}) if isinstance(manifest, dict) else {}
        self._cache: dict = {}

    def key(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def has(self, name: str) -> bool:
        return self.store.exists(self.key(name))

    def arrow(self, name: str, columns: list[str] | None = None):
        """A table of the folder (pyarrow), None when absent."""
        cache = (name, tuple(columns) if columns else None)
        if cache not in self._cache:
            self._cache[cache] = (self.store.read_table(self.key(name), columns=columns,
                                                        digest=self.files.get(name))
                                  if self.has(name) else None)
        return self._cache[cache]

    def table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame | None:
        t = self.arrow(name, columns)
        return None if t is None else t.to_pandas()

    def json(self, name: str):
        return self.store.read_json(self.key(name), digest=self.files.get(name)) if self.has(name) else None

    # -- the filtered views its readers share ------------------------------------------
    def norms(self) -> pd.DataFrame | None:
        """difference.parquet without its vectors: (layer, position) -> documents and norms."""
        return self.table(layout.DIFFERENCE, NORM_COLUMNS)

    def delta(self, name: str = "delta") -> tuple[list[tuple[int, int]], np.ndarray] | None:
        """[(layer, position)] and the (rows, hidden) float64 vectors of a difference column
        (delta, base_mean, finetuned_mean)."""
        t = self.arrow(layout.DIFFERENCE, ["layer", "position", name])
        if t is None:
            return None
        keys = list(zip(t.column("layer").to_pylist(), t.column("position").to_pylist()))
        return keys, decode_vectors(t.column(name), "float64").astype(np.float64)

    def lens_top(self, variant: str = "delta", k: int | None = None) -> pd.DataFrame | None:
        lens = self.table(layout.LOGIT_LENS)
        if lens is None:
            return None
        rows = lens[lens.variant == variant]
        if k is not None:
            rows = rows[rows["rank"] < k]
        return rows.sort_values(["layer", "position", "rank"])

    def chosen_patchscope(self, variant: str = "delta", k: int | None = None) -> pd.DataFrame | None:
        ps = self.table(layout.PATCHSCOPE)
        if ps is None:
            return None
        rows = ps[(ps.variant == variant) & ps.chosen]
        if k is not None:
            rows = rows[rows["rank"] < k]
        return rows

    def relevance_metrics(self, source: str = "logit_lens") -> dict | None:
        """(layer, position) -> fraction_relevant of that source's tokens; None unless done."""
        status = self.json(layout.TOKEN_RELEVANCE_JSON)
        if not status or status.get("status") != "done":
            return None
        return {(m["layer"], m["position"]): m["fraction_relevant"]
                for m in status.get("metrics", []) if m.get("source") == source}

    def similarity_to_data(self) -> dict | None:
        """(layer, position) -> (steered, unsteered) similarity to the finetuning data."""
        sim = self.table(layout.SIMILARITY)
        if sim is None:
            return None
        out = {}
        for (layer, pos), g in sim.groupby(["layer", "position"]):
            def against(name):
                hit = g[((g.set_a == name) & (g.set_b == "finetune_data")) |
                        ((g.set_b == name) & (g.set_a == "finetune_data"))]
                return float(hit.similarity.iloc[0]) if not hit.empty else None
            out[(int(layer), int(pos))] = (against("steered"), against("unsteered"))
        return out

    def agent_groups(self) -> list[dict] | None:
        agent = self.table(layout.AGENT)
        return None if agent is None else agent_summary(agent)


def agent_summary(table: pd.DataFrame) -> list[dict]:
    """Per (agent, budget) of an agent table: the mean over its runs' mean grades (runs
    without a grade left out), the runs and how many were graded."""
    out = []
    for (name, budget), group in table.groupby(["agent", "budget"], sort=True):
        graded = group.mean_grade.dropna()
        out.append({"agent": name, "budget": int(budget), "runs": int(len(group)), "graded": int(len(graded)),
                    "mean_grade": float(graded.mean()) if len(graded) else None})
    order = {"adl": 0, "blackbox": 1}
    return sorted(out, key=lambda r: (order.get(r["agent"], 2), r["agent"], r["budget"]))
