"""The status record of a running job, `runs/<job>/status.json`, for people watching it.

Rewritten atomically (Store.write_json) whenever a pair, a stage or an activation set
changes state, and at most every PROGRESS_EVERY_S seconds for shard progress. It holds,
per pair and stage, pending / running / done / failed (with the error); per activation set
its shards; every model actor's node, GPU ids and lifetime; counts, timings and GPU-hours
(actor lifetimes x GPUs held). A progress line goes to the log with every state change.

The record describes one attempt of the job; the results themselves are complete or not
by their manifests, never by this file. Every attempt's record and log are also kept apart
(jobs/attempts.py): status.json is the latest attempt that did work, and an attempt with
nothing to do leaves it as it was.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from common.errors import one_line
from jobs.attempts import AttemptLog, attempt_log, write_attempt
from storage import layout
from storage.store import Store

PROGRESS_EVERY_S = 2.0
LOG_EVERY_S = 10.0          # the attempt's log is rewritten whole: not with every record
STATES = ("pending", "running", "done", "failed", "interrupted")

logger = logging.getLogger("adl.status")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def document_counts(documents) -> dict:
    """How an activation set's documents came from the corpus (jobs/plan.py Documents)."""
    return {"documents": int(len(documents.doc_ids)), "documents_read": int(documents.read),
            "documents_dropped": dict(documents.dropped)}


class ActorLedger:
    """Every model actor of the job: what it holds, where, and for how long. The actor
    reports its node, GPU ids and start time itself (jobs/executor.py adds adl_placement);
    the driver records when it let it go."""

    def __init__(self):
        self.entries: list[dict] = []
        self._refs: dict[int, object] = {}
        self._lock = threading.Lock()

    def started(self, handle, kind: str, model: str, num_gpus: float) -> None:
        entry = {"kind": kind, "model": model, "num_gpus": num_gpus, "node_id": None, "gpu_ids": None,
                 "pid": None, "requested": time.time(), "started": None, "ended": None}
        with self._lock:
            self._refs[len(self.entries)] = (handle, handle.adl_placement.remote())
            self.entries.append(entry)

    def ended(self, handle) -> None:
        """Call before killing the actor: its placement is read one last time (it may have
        moved if Ray restarted it on another node)."""
        import ray
        with self._lock:
            index = next((i for i, (h, _) in self._refs.items() if h is handle), None)
            if index is None:
                return
            entry = self.entries[index]
            ref = self._refs[index][1]
        try:
            latest, late_error = ray.get(handle.adl_placement.remote(), timeout=30), None
        except Exception as e:   # dead for good, or not answering: keep what it last said
            latest, late_error = None, one_line(e)
        with self._lock:
            self._resolve(index, ref, wait=0)
            if latest:
                _log_warnings(entry, latest)
                if entry["node_id"] and latest["node_id"] != entry["node_id"]:
                    entry["moved_from"] = {"node_id": entry["node_id"], "gpu_ids": entry["gpu_ids"]}
                entry.update({k: latest[k] for k in ("node_id", "gpu_ids", "pid", "started")})
            if late_error:
                entry["last_report_error"] = late_error
            entry["ended"] = time.time()
            self._refs.pop(index, None)

    def _resolve(self, index: int, ref, wait: float) -> None:
        import ray
        entry = self.entries[index]
        if entry["started"] is not None:
            return
        ready, _ = ray.wait([ref], timeout=wait)
        if ready:
            try:
                placed = ray.get(ready[0])
            except Exception as e:   # the actor failed to start
                entry["error"] = one_line(e)
                return
            _log_warnings(entry, placed)
            entry.update(placed)

    def snapshot(self) -> tuple[list[dict], float]:
        """The entries (resolving placements that have arrived) and the GPU-hours so far."""
        with self._lock:
            for index, (_, ref) in list(self._refs.items()):
                self._resolve(index, ref, wait=0)
            now = time.time()
            gpu_seconds = sum(e["num_gpus"] * max(0.0, (e["ended"] or now) - e["started"])
                              for e in self.entries if e["started"] is not None)
            return [dict(e) for e in self.entries], gpu_seconds / 3600


def log_actor_warnings(model: str, kind: str, lines) -> None:
    """Warnings an actor logged (jobs/executor.py _WarningsKept), into the driver's log
    and so the attempt's: the one place they are written, however they were collected."""
    for line in lines or []:
        logger.warning(f"actor {model} ({kind}): {line}")


def _log_warnings(entry: dict, placed: dict) -> None:
    """The warnings an actor logged since it last reported its placement."""
    log_actor_warnings(entry["model"], entry["kind"], placed.pop("warnings", None))


class JobStatus:
    def __init__(self, store: Store, plan, pending, stages: tuple[str, ...], log: AttemptLog):
        """log: the attempt's log (jobs/attempts.py), written with the record (at most every
        LOG_EVERY_S) and whole by close()."""
        self.store, self.stages = store, stages
        self.key = layout.run_status(plan.spec.name)
        self.log = log
        self._last_log = 0.0
        self.actors = ActorLedger()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()   # snapshots reach storage in the order taken
        self._last_write = 0.0
        self._t0 = time.time()
        pending_dirs = {p.out_dir for p in pending}
        needed = {a.prefix for p in pending for a in (p.base, p.finetuned)}
        self.record = {
            "job": plan.spec.name, "attempt": self.log.attempt, "did_work": bool(pending),
            "log": attempt_log(plan.spec.name, self.log.attempt).rpartition("/")[2],
            "state": "running", "started": _now(), "updated": None,
            "finished": None, "seconds": 0.0, "driver_pid": os.getpid(),
            "pairs": {p.pair.name: {
                "dir": p.out_dir, "base_activations": p.base.prefix,
                "finetuned_activations": p.finetuned.prefix,
                "state": "pending" if p.out_dir in pending_dirs else "done",
                "skipped": p.out_dir not in pending_dirs, "error": None, "seconds": None,
                "stages": {s: {"state": "pending" if p.out_dir in pending_dirs else "done",
                               "seconds": None, "error": None} for s in stages}}
                for p in plan.pairs},
            "activation_sets": {a.prefix: {"name": a.name, "state": "pending", "shards": a.documents.num_shards,
                                           "shards_done": 0, "error": None, "seconds": None,
                                           **document_counts(a.documents)}
                                for a in plan.sets if a.prefix in needed},
            "counts": {}, "work": {}, "gpu_hours": 0.0, "actors": [], "units": [],
        }
        self.stats = None
        self.catalog = None
        self.interrupted = False   # from interrupt() on, what ends is interrupted, not failed
        self.write(force=True)

    def interrupt(self) -> None:
        """The job was interrupted (Ctrl-C, SIGTERM): whatever is running now, and whatever
        fails from here on (its actors are being killed), is recorded as interrupted."""
        with self._lock:
            self.interrupted = True
            for pair in self.record["pairs"].values():
                for stage in pair["stages"].values():
                    if stage["state"] == "running":
                        stage.update(state="interrupted", error=None)
                if pair["state"] == "running":
                    pair.update(state="interrupted", error=None)
                    pair.pop("_t", None)
            for entry in self.record["activation_sets"].values():
                if entry["state"] == "running":
                    entry.update(state="interrupted", error=None)
                    entry.pop("_t", None)
        self.write(force=True)

    def _ended(self, state: str, error: str | None) -> tuple[str, str | None]:
        """A failure after interrupt() is the interrupt's doing."""
        return ("interrupted", None) if self.interrupted and state in ("failed", "interrupted") else (state, error)

    # -- state changes ---------------------------------------------------------------
    def set_state(self, prefix: str, state: str, error: str | None = None, **extra) -> None:
        with self._lock:
            state, error = self._ended(state, error)
            entry = self.record["activation_sets"][prefix]
            entry.update(state=state, error=error, **extra)
            if state == "running":
                entry["_t"] = time.time()
            elif "_t" in entry:
                entry["seconds"] = round(time.time() - entry.pop("_t"), 3)
        if state != "running" or error:
            logger.info(f"activations {entry['name']}: {state}" + (f": {error}" if error else ""))
        self.write(force=True)

    def shards(self, prefix: str, done: int) -> None:
        with self._lock:
            self.record["activation_sets"][prefix]["shards_done"] = done
        self.write()

    def pair_state(self, name: str, state: str, error: str | None = None) -> None:
        with self._lock:
            state, error = self._ended(state, error)
            entry = self.record["pairs"][name]
            entry.update(state=state, error=error)
            if state == "running":
                entry["_t"] = time.time()
            elif "_t" in entry:
                entry["seconds"] = round(time.time() - entry.pop("_t"), 3)
            if state == "failed":   # stages that never ran stay pending; a running one failed
                for stage in entry["stages"].values():
                    if stage["state"] == "running":
                        stage.update(state="failed", error=error)
        self.write(force=True)
        counts = self.record["counts"]
        logger.info(f"pair {name}: {state}" + (f": {error}" if error else "")
                    + f"  [{counts['done']}/{counts['pairs']} pairs done, {counts['failed']} failed, "
                      f"{counts['running']} running]")

    def stage_skipped(self, pair: str, stage: str) -> None:
        """A stage of an unfinished pair whose tables an earlier run wrote."""
        with self._lock:
            self.record["pairs"][pair]["stages"][stage].update(state="done", skipped=True)
        self.write(force=True)

    @contextmanager
    def stage(self, pair: str, stage: str):
        """Marks one stage of one pair running, then done or failed (re-raising)."""
        with self._lock:
            entry = self.record["pairs"][pair]["stages"].setdefault(
                stage, {"state": "pending", "seconds": None, "error": None})
            entry["state"] = "running"
        self.write(force=True)
        start = time.time()
        try:
            yield
        except BaseException as e:
            with self._lock:
                state, error = self._ended("failed", one_line(e))
                entry.update(state=state, error=error, seconds=round(time.time() - start, 3))
            self.write(force=True)
            raise
        with self._lock:
            entry.update(state="done", seconds=round(time.time() - start, 3))
        self.write(force=True)

    def unit_ended(self, name: str, kind: str, seconds: float, error: str | None) -> None:
        """Every unit of work that ran (jobs/scheduler.py), with its own time."""
        with self._lock:
            state, error = self._ended("failed", error) if error else ("done", None)
            self.record["units"].append({"name": name, "kind": kind, "seconds": round(seconds, 3),
                                         "state": state, "error": error})

    def llm_spend(self, pair: str, stage: str, usage: dict) -> None:
        """A stage's chat-endpoint spend ({"calls", "prompt_tokens", "completion_tokens",
        "total_tokens", ...}): kept on the stage and summed over the job under "llm"."""
        with self._lock:
            entry = self.record["pairs"][pair]["stages"].setdefault(
                stage, {"state": "pending", "seconds": None, "error": None})
            entry["llm"] = dict(usage)
            total = self.record.setdefault("llm", {})
            for name, value in usage.items():
                total[name] = total.get(name, 0) + value
        self.write(force=True)

    def finish(self, error: str | None = None) -> None:
        with self._lock:
            failed = [p for p in self.record["pairs"].values() if p["state"] != "done"]
            self.record["state"] = "failed" if error or failed else "done"
            self.record["error"] = error
            self.record["finished"] = _now()
            self.record["catalog"] = self.catalog
        self.write(force=True)

    def close(self) -> None:
        """The attempt's log receives no more lines and is written whole."""
        self.log.detach()
        self.log.flush()

    # -- writing ---------------------------------------------------------------------
    def write(self, force: bool = False) -> None:
        with self._write_lock:
            record = self._snapshot(force)
            if record is not None:
                write_attempt(self.store, self.record["job"], record)
                if time.time() - self._last_log >= LOG_EVERY_S:
                    self._last_log = time.time()
                    self.log.flush()

    def _snapshot(self, force: bool) -> dict | None:
        with self._lock:
            now = time.time()
            if not force and now - self._last_write < PROGRESS_EVERY_S:
                return None
            self._last_write = now
            actors, gpu_hours = self.actors.snapshot()
            states = [p["state"] for p in self.record["pairs"].values()]
            self.record.update(
                updated=_now(), seconds=round(now - self._t0, 3), actors=actors,
                gpu_hours=round(gpu_hours, 6),
                counts={"pairs": len(states), **{s: states.count(s) for s in STATES},
                        "skipped": sum(p["skipped"] for p in self.record["pairs"].values()),
                        "activation_sets": len(self.record["activation_sets"]),
                        "activation_sets_done": sum(a["state"] == "done"
                                                    for a in self.record["activation_sets"].values())})
            if self.stats is not None:
                self.record["work"] = self.stats.as_dict()
                self.record["loads"] = self.stats.load_counts()   # per model and runtime
                self.record["reloads"] = [{"model": k, "why": why} for k, why in self.stats.reloads]
            return _public(self.record)


def _public(obj):
    """The record without the private timers (keys starting with _)."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    return obj
