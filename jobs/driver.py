"""Runs a plan: from the spec's pairs to the units of work (jobs/stages.py), scheduled by
model (jobs/scheduler.py) on Ray actors (jobs/executor.py), then the run record and the
catalog.

Every unit whose output is complete is left out, so a rerun does only what is missing:
an activation set's manifest, a stage's tables and a pair's manifest are their completion
records, all content-keyed.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from jobs.catalog import write_catalog
from jobs.executor import RayBackend, pair_manifest
from jobs.plan import Plan, PairPlan, make_plan
from jobs.scheduler import ModelKey, Scheduler, Unit
from jobs.spec import JobSpec
from jobs.stages import LocalActor, baseline_sources, enabled_stages, offline_grader, transformers, vllm
from jobs.status import JobStatus, describe
from storage import layout
from storage.store import Store


@dataclass
class RunStats:
    shards_extracted: int = 0
    pairs_reduced: int = 0
    gpu_ids: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)     # pair name -> error, for pairs that failed
    loads: Counter = field(default_factory=Counter)    # ModelKey -> times loaded
    reloads: list = field(default_factory=list)        # (ModelKey, why it had been released)
    decisions: list = field(default_factory=list)      # the scheduler's (jobs/scheduler.py)
    max_alive: int = 0                                 # model actors alive at once, at most
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        """Units run in threads: counters go through the lock."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def loaded(self, key: ModelKey) -> None:
        with self._lock:
            self.loads[key] += 1

    @property
    def model_loads(self) -> int:
        return sum(self.loads.values())

    def loads_by_runtime(self) -> dict[str, int]:
        out: Counter = Counter()
        for key, n in self.loads.items():
            out[key.runtime] += n
        return dict(sorted(out.items()))

    def load_counts(self) -> list[dict]:
        with self._lock:
            return [{"model": key.label or str(key.source), "runtime": key.runtime, "loads": n}
                    for key, n in sorted(self.loads.items(), key=lambda kv: str(kv[0]))]

    def as_dict(self) -> dict:
        with self._lock:
            return {"model_loads": sum(self.loads.values()), "shards_extracted": self.shards_extracted,
                    "pairs_run": self.pairs_reduced}


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the job's actors and its private Ray are stopped."""


def _stop_on_sigterm() -> None:
    """Ray's driver turns SIGTERM into an exit that leaves a private cluster's processes
    running; this handler makes it an interrupt that the job cleans up after."""
    import signal

    def terminate(signum, frame):
        raise Terminated()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


def _ignore_signals() -> None:
    import signal
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def _stop_private_ray(grace_s: float = 5.0) -> None:
    """Shuts down the Ray this process started; if that does not end within grace_s
    (threads of the interrupted job may still be inside Ray), its processes are killed."""
    import ray
    node = getattr(ray._private.worker, "_global_node", None)
    stopper = threading.Thread(target=ray.shutdown, daemon=True)
    stopper.start()
    stopper.join(grace_s)
    if stopper.is_alive() and node is not None:
        node.kill_all_processes(check_alive=False, allow_graceful=False)


def log(message: str) -> None:
    print(f"[adl {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_ray(spec: JobSpec) -> bool:
    """Joins compute.ray_address (or $RAY_ADDRESS, which a job submitted to a cluster
    finds set); otherwise starts a private local Ray. True when it started one."""
    import ray
    if ray.is_initialized():
        return False
    address = spec.compute.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # nobody else can reach it
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return address == "local"


def pair_stages(spec: JobSpec) -> tuple[str, ...]:
    """The stages of a pair, in order (the status record lists them)."""
    return tuple(s.name for s in enabled_stages(spec))


def pair_order(pairs: list[PairPlan]) -> list[PairPlan]:
    """Pairs grouped by base, the base shared by the most pairs first (plan order on ties
    and within a group): a base's pairs then run while its actor is loaded."""
    groups: dict[str, list[PairPlan]] = {}
    for pair in pairs:
        groups.setdefault(pair.base.prefix, []).append(pair)
    return [p for group in sorted(groups.values(), key=lambda g: -len(g)) for p in group]


def job_units(spec: JobSpec, pending: list[PairPlan], store: Store, log=log) -> tuple[list[Unit], dict]:
    """The units of work the pending pairs still need, in plan order (each pair's
    activation sets, then its stages, a model's baselines before the first generation
    that reads them), and each pair's stages already complete. A stage whose tables all
    exist, and an activation set with a manifest, is complete and gets no unit."""
    units: list[Unit] = []
    extraction: dict[str, Unit | None] = {}
    baselines: dict = {}
    complete: dict[str, list[str]] = {}
    for pair in pair_order(pending):
        for aset in (pair.base, pair.finetuned):
            if aset.prefix in extraction:
                continue
            if store.exists(layout.manifest(aset.prefix)):
                log(f"{aset.name}: activations complete, reused ({store.uri(aset.prefix)})")
                extraction[aset.prefix] = None
                continue
            extraction[aset.prefix] = Unit(f"extract {aset.name}", "extract", (transformers(aset.source),),
                                           subject=aset, group=pair.pair.name)
            units.append(extraction[aset.prefix])
        mine: dict[str, Unit] = {}
        complete[pair.pair.name] = []
        for stage in enabled_stages(spec):
            if all(store.exists(f"{pair.out_dir}/{name}") for name in stage.writes):
                complete[pair.pair.name].append(stage.name)
                continue
            deps = [mine[name] for name in stage.after if name in mine]
            if stage.name == "reduce":
                deps += [u for u in (extraction[pair.base.prefix], extraction[pair.finetuned.prefix]) if u]
            if stage.name == "generate":
                for source in baseline_sources(spec, pair):
                    if source not in baselines:
                        baselines[source] = Unit(f"baselines {vllm(source).label}", "baselines",
                                                 (vllm(source),), subject=source, group=pair.pair.name)
                        units.append(baselines[source])
                    deps.append(baselines[source])
            mine[stage.name] = Unit(f"{stage.name} {pair.pair.name}", stage.name, stage.needs(spec, pair),
                                    deps, subject=pair, pair=pair.pair.name, group=pair.pair.name)
            units.append(mine[stage.name])
    return units, complete


def run_job(spec: JobSpec, stats: RunStats | None = None) -> str:
    """Runs the job; returns the run record's key under the storage root. A pair that
    fails is recorded (stats.failed, the status record) and does not stop the others."""
    stats = stats or RunStats()
    store = Store(spec.storage.root, spec.storage.endpoint_url, spec.storage.region)
    store.check()
    plan = make_plan(spec)   # every input error surfaces here, before any write
    pending = [p for p in plan.pairs if not store.exists(layout.manifest(p.out_dir))]
    for pair in plan.pairs:
        if pair not in pending:
            log(f"{pair.pair.name}: results complete, skipped ({store.uri(pair.out_dir)})")
    status = JobStatus(store, plan, pending, pair_stages(spec), log)
    status.stats = stats
    units, complete = job_units(spec, pending, store)
    for name, stages in complete.items():
        for stage in stages:
            status.stage_skipped(name, stage)
    private = False
    backend = None
    try:
        if units:
            private = ensure_ray(spec)
            _stop_on_sigterm()
            backend = RayBackend(plan, store, status, stats, log, grader=_llm_grader(spec))
            scheduler = Scheduler(units, backend.requests, backend, log, _on_change(plan, units, store, status, stats))
            try:
                scheduler.run()
            finally:
                stats.reloads.extend((str(k), why) for k, why in scheduler.reloads)
                stats.decisions, stats.max_alive = scheduler.decisions, scheduler.max_alive
        for pair in pending:   # every stage complete from earlier runs: only the manifest was missing
            if not any(u.pair == pair.pair.name for u in units):
                _pair_done(store, pair, status, stats)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if interrupted:
            _ignore_signals()   # a second Ctrl-C must not cut the clean-up short
        if backend is not None:
            backend.kill_all()
        status.finish(error="interrupted" if interrupted else describe(e))
        if interrupted:
            done = sum(p["state"] == "done" for p in status.record["pairs"].values())
            sets = status.record["counts"].get("activation_sets_done", 0)
            log(f"interrupted: {done} of {len(plan.pairs)} pairs and {sets} activation sets are complete; "
                f"rerun the same spec to resume from there")
        if private:
            _stop_private_ray()
        raise
    key = write_run_record(plan, store)
    status.catalog = write_catalog(store, key)
    status.finish()
    return key


def _llm_grader(spec: JobSpec):
    """An LLM grader's requests go out from the driver; the offline grader is a model's actor."""
    if offline_grader(spec) or not (spec.generation.enabled or spec.analyses.enabled):
        return None
    from workers.graders import GraderService, make_grader
    return LocalActor(GraderService(make_grader(spec.grader)))


def _pair_done(store: Store, pair: PairPlan, status: JobStatus, stats: RunStats) -> None:
    pair_manifest(store, pair)
    stats.add("pairs_reduced")
    status.pair_state(pair.pair.name, "done")


def _on_change(plan: Plan, units: list[Unit], store: Store, status: JobStatus, stats: RunStats):
    """A pair's state follows its units: running with the first, failed with the first
    failure, done (its manifest written) when the last is done."""
    pairs = {p.pair.name: p for p in plan.pairs}
    by_pair: dict[str, list[Unit]] = {}
    for u in units:
        if u.pair:
            by_pair.setdefault(u.pair, []).append(u)

    def changed(unit: Unit) -> None:
        name = unit.pair
        if name is None or name in stats.failed:
            return
        if unit.state == "running" and status.record["pairs"][name]["state"] == "pending":
            status.pair_state(name, "running")
        elif unit.state == "failed":
            stats.failed[name] = unit.error
            status.pair_state(name, "failed", unit.error)
        elif unit.state == "done" and all(u.state == "done" for u in by_pair[name]):
            _pair_done(store, pairs[name], status, stats)
    return changed


def write_run_record(plan: Plan, store: Store) -> str:
    """The job's entry point for readers; deterministic, so a rerun rewrites nothing."""
    record = {
        "job": plan.spec.name, "layout_version": layout.LAYOUT_VERSION, "spec": plan.spec.to_dict(),
        "pairs": [{"name": p.pair.name, "dir": p.out_dir, "layers": list(p.layers),
                   "base_activations": p.base.prefix, "finetuned_activations": p.finetuned.prefix}
                  for p in plan.pairs],
    }
    key = layout.run_record(plan.spec.name)
    if store.read_json_or_none(key) != record:
        store.write_json(key, record)
    return key

