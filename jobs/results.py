"""One reader of a pair's results folder, shared by the stages that read earlier stages'
tables, the catalog, the summary, the report, the agent's evidence and the job-level
views (triage, pair similarity): the pair tables they re-read and filter (delta, the
lens's top tokens, patchscope at the chosen scale, ...) come from here.

A table is read by its kind (storage/tables.py: a file of another kind or schema version
is refused), once per reader of the views (a stage's reader reads it each time), and
checked against the digest recorded for it: the pair's manifest when the pair is
complete, else the marker of the stage that wrote it.
A running pair's file that no marker records yet is read as it is, except by a stage
(recorded_only: markers alone count): a stage reads only what a finished stage wrote.
It never writes.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from jobs.integrity import read_record
from storage import layout
from storage.store import IntegrityError, Store
from storage.tables import AGENT, DIFFERENCE, LOGIT_LENS, PATCHSCOPE, SIMILARITY, STEERING, TableKind, decode_vectors

NORM_COLUMNS = ["layer", "position", "num_documents", "delta_norm", "finetuned_norm"]


class PairResults:
    def __init__(self, store: Store, pair_dir: str, recorded_only: bool = False,
                 stage_keys: dict[str, str] | None = None):
        """stage_keys (a stage's reader): {stage: content key}; a marker of another stage,
        or of a stage under another key (other settings), records nothing here."""
        self.store, self.dir, self.recorded_only, self.stage_keys = store, pair_dir, recorded_only, stage_keys
        manifest = store.read_json_or_none(layout.manifest(pair_dir)) if not recorded_only else None
        self.complete = manifest is not None
        stages = manifest.get("stages") if isinstance(manifest, dict) else None
        # stage -> {"key", "settings", "reads", "earlier_run"} (a complete pair's manifest)
        self.stages: dict = stages if isinstance(stages, dict) else {}
        # A manifest that records its stages (layout 3) is the whole of the folder: a file
        # it does not list is another configuration's (a stage this job did not run). A
        # layout-2 folder held one configuration only.
        self._listed_only = bool(self.stages)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        # file name -> digest; None until asked, for a running pair or a stage (the
        # markers are read then: a stage redone under an old manifest is not that manifest's)
        self._digests: dict | None = (files if isinstance(files, dict) else {}) if self.complete else None
        self._cache: dict = {}

    def key(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def has(self, name: str) -> bool:
        return self.store.exists(self.key(name))

    def digest(self, name: str) -> dict | None:
        """The digest recorded for a file of the folder: the manifest's, or (running pair)
        its stage marker's; None when nothing records it."""
        if self._digests is None:   # a running pair: what its stages' markers record
            self._digests = {}
            for key in self.store.list(self.dir):
                if layout.is_stage_marker(self.dir, key):
                    marker, _ = read_record(self.store, key)
                    if marker is not None and self.stage_keys is not None \
                            and self.stage_keys.get(marker.get("stage")) != marker.get("key"):
                        continue
                    files = marker.get("files") if marker is not None else None
                    if isinstance(files, dict):
                        self._digests.update(files)
        return self._digests.get(name)

    def arrow(self, kind: TableKind, columns: list[str] | None = None):
        """A table of the folder (pyarrow), None when absent. The views' reader keeps what
        it read (their sections share tables); a stage's reads and checks every time."""
        cache = (kind.file, tuple(columns) if columns else None)
        if cache in self._cache:
            return self._cache[cache]
        digest = self.digest(kind.file)
        if digest is None and self.recorded_only:
            raise IntegrityError(f"{self.store.uri(self.key(kind.file))}: no stage marker of the pair "
                                 f"records it")
        table = (self.store.read_table(self.key(kind.file), kind, columns, digest)
                 if digest is not None or (not self._listed_only and self.has(kind.file)) else None)
        if not self.recorded_only:
            self._cache[cache] = table
        return table

    def table(self, kind: TableKind, columns: list[str] | None = None) -> pd.DataFrame | None:
        t = self.arrow(kind, columns)
        return None if t is None else t.to_pandas()

    def json(self, name: str):
        digest = self.digest(name)
        return self.store.read_json(self.key(name), digest=digest) \
            if digest is not None or (not self._listed_only and self.has(name)) else None

    def earlier_stages(self) -> list[str]:
        """The stages whose results an earlier run wrote (the manifest records under which
        settings), in the order the stages ran."""
        return [name for name, entry in self.stages.items() if isinstance(entry, dict) and entry.get("earlier_run")]

    # -- the filtered views its readers share ------------------------------------------
    def norms(self) -> pd.DataFrame | None:
        """difference.parquet without its vectors: (layer, position) -> documents and norms."""
        return self.table(DIFFERENCE, NORM_COLUMNS)

    def delta(self, name: str = "delta") -> tuple[list[tuple[int, int]], np.ndarray] | None:
        """[(layer, position)] and the (rows, hidden) float64 vectors of a difference column
        (delta, base_mean, finetuned_mean)."""
        t = self.arrow(DIFFERENCE, ["layer", "position", name])
        if t is None:
            return None
        keys = list(zip(t.column("layer").to_pylist(), t.column("position").to_pylist()))
        return keys, decode_vectors(t.column(name), "float64").astype(np.float64)

    def lens_top(self, variant: str = "delta", k: int | None = None) -> pd.DataFrame | None:
        lens = self.table(LOGIT_LENS)
        if lens is None:
            return None
        rows = lens[lens.variant == variant]
        if k is not None:
            rows = rows[rows["rank"] < k]
        return rows.sort_values(["layer", "position", "rank"])

    def chosen_patchscope(self, variant: str = "delta", k: int | None = None) -> pd.DataFrame | None:
        ps = self.table(PATCHSCOPE)
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
        sim = self.table(SIMILARITY)
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

    def no_strength(self) -> dict[tuple[int, int], list[float]]:
        """(layer, position) -> the strengths tried, for each vector whose steering search
        found no coherent strength (steering.parquet's strength_found false)."""
        steering = self.table(STEERING, ["layer", "position", "strength_found", "trials"])
        out: dict = {}
        for r in ([] if steering is None else steering[steering.strength_found.eq(False)].itertuples()):
            tried = out.setdefault((int(r.layer), int(r.position)), set())
            tried.update(float(t["strength"]) for t in (r.trials if r.trials is not None else []))
        return {key: sorted(tried) for key, tried in sorted(out.items())}

    def no_results(self) -> dict[tuple[int, int], list[str]]:
        """(layer, position) -> what a stage ran for but found nothing: the outputs that
        would otherwise look like results (the report's and the summary's markers)."""
        out: dict = {}
        for key, tried in self.no_strength().items():
            out.setdefault(key, []).append(
                "steering: no coherent strength found (tried " + ", ".join(f"{a:.3g}" for a in tried) + ")")
        scope = self.table(PATCHSCOPE, ["layer", "position", "variant", "chosen"])
        if scope is not None:
            delta = scope[scope.variant == "delta"]
            for (layer, pos), group in delta.groupby(["layer", "position"]):
                if not group.chosen.any():
                    out.setdefault((int(layer), int(pos)), []).append("patchscope: no scale chosen for delta")
        return dict(sorted(out.items()))

    def agent_groups(self) -> list[dict] | None:
        agent = self.table(AGENT)
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
