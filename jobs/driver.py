"""Runs a plan: from the spec's pairs to the units of work (jobs/stages.py), scheduled by
model (jobs/scheduler.py) on Ray actors (jobs/executor.py), then the run record and the
catalog.

Every unit whose output is complete is left out, so a rerun does only what is missing:
an activation set's manifest, a stage's marker and a pair's manifest are their completion
records, all content-keyed, and complete means present and verified: every file they
list matches its recorded digest (jobs/integrity.py). What does not verify is done again,
and the log says why.

Two runs on one storage root share the work through leases (jobs/leases.py): a pair, and
an activation set to extract, is claimed before its units are made; work another run
holds is waited for (its lease given back, or its holder dead), then looked at again, by
which time it is usually complete.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field

from common.errors import one_line
from common.redact import redact_urls
from common.logs import configure as configure_logging
from jobs.attempts import AttemptLog
from jobs.executor import RayBackend, pair_manifest
from jobs.integrity import check_pair, check_set, check_stage, set_manifest
from jobs.leases import Leases
from jobs.placement import gpuless_refusal
from jobs.plan import Plan, PairPlan, make_plan, model_label
from jobs.scheduler import ModelKey, Scheduler, Unit
from jobs.spec import JobSpec, SpecError
from jobs.stages import (LocalActor, baseline_sources, enabled_stages, offline_grader, stage_keys,
                         transformers, vllm)
from jobs.status import JobStatus
from jobs.submit import ClusterError
from jobs.views import Publisher, publish
from storage import layout
from storage.store import StorageError, Store, shown

logger = logging.getLogger("adl.driver")


@dataclass
class RunStats:
    shards_extracted: int = 0
    pairs_reduced: int = 0                             # pairs completed (their manifests written)
    stages_run: int = 0                                # pair stages run to their marker
    gpu_ids: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)     # pair name -> error, for pairs that failed
    loads: Counter = field(default_factory=Counter)    # ModelKey -> times loaded
    adapter_loads: Counter = field(default_factory=Counter)   # (ModelKey, adapter) -> loads onto its base's actor
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


class StorageFault(RuntimeError):
    """The storage root failed during the run (disk full, made read-only, an outage longer
    than the retries): one line naming the root and the cause, exit 1 (jobs/cli.py); the
    failure is recorded in the status record where the root still takes it."""


def _storage_failed(store: Store, e: BaseException, status: JobStatus | None = None) -> StorageFault:
    """The one-line error for a root that failed mid-run; with status, the failure is
    first recorded where the root still takes it."""
    if status is not None:
        _recording(store, lambda: status.finish(error=one_line(e)))
        _recording(store, status.close)
    return StorageFault(f"storage {store.uri()}: {one_line(e, typed=False)}")


def _recording(store: Store, write) -> None:
    """A record of the job's end, written if the root still takes it: a failing root must
    not turn one error into two."""
    try:
        write()
    except (StorageError, OSError) as e:
        logger.info(f"could not record it on {store.uri()}: {one_line(e, typed=False)}")


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


def local_gpus() -> int:
    """The GPUs a private local Ray would have: Ray's own detection (NVML, without touching
    CUDA), within CUDA_VISIBLE_DEVICES."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    manager = get_accelerator_manager_for_resource("GPU")
    count = manager.get_current_node_num_accelerators()
    visible = manager.get_current_process_visible_accelerator_ids()
    return count if visible is None else min(count, len(visible))


def refuse_gpuless_compute(spec: JobSpec) -> None:
    """A ClusterError, before anything is written, for a compute section that gives models
    no GPUs where the cluster has some: the Ray this process is connected to, or the local
    machine for a private one (Ray's own GPU detection). A cluster at an address not yet
    joined is checked when the job joins it (RayBackend)."""
    import ray
    if ray.is_initialized():
        gpus = sum(int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive"))
    elif (spec.compute.ray_address or os.environ.get("RAY_ADDRESS") or "local") == "local":
        gpus = local_gpus()
    else:
        return
    refused = gpuless_refusal(spec.compute, gpus)
    if refused:
        raise ClusterError(refused)


def ensure_ray(spec: JobSpec) -> bool:
    """Joins compute.ray_address (or $RAY_ADDRESS, which a job submitted to a cluster
    finds set); otherwise starts a private local Ray. True when it started one."""
    import ray
    if ray.is_initialized():
        return False
    address = spec.compute.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # nobody else can reach it
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        _stop_on_sigterm()   # at once: Ray's node handler (exit 1) stays in place until then
    except SystemExit:
        # ray.init puts in its own SIGTERM handlers while it starts (sys.exit(15), then the
        # node's sys.exit(1)): a SIGTERM then is this job's, stopped like any other.
        if address == "local":
            _stop_private_ray()
        raise Terminated() from None
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


def _set_unit(aset, store: Store, claim, release, verified: dict) -> "Unit | None | bool":
    """An activation set's extraction unit, None when the set is complete (present and
    verified, or made so by writing its manifest again), False when another run holds it."""
    if check_set(store, aset, deep=False).complete:   # looks complete: verify without a lease
        check = check_set(store, aset)
        if check.complete:
            logger.info(f"{aset.name}: activations complete, reused ({store.uri(aset.prefix)})")
            return None
    if not claim(aset.prefix):
        return False
    check = check_set(store, aset)   # under the lease: another run may have finished it
    if check.complete:
        release(aset.prefix)
        logger.info(f"{aset.name}: activations complete, reused ({store.uri(aset.prefix)})")
        return None
    if check.manifest_problem not in (None, "absent"):
        logger.info(f"{aset.name}: manifest {store.uri(layout.manifest(aset.prefix))}: {check.manifest_problem}")
    for index, why in sorted(check.problems.items()):
        if why:
            logger.info(f"{aset.name}: shard {index} {why}; extracting it again")
    if len(check.good) == aset.documents.num_shards:   # every shard verifies: only the manifest was bad
        store.write_json(layout.manifest(aset.prefix), set_manifest(aset, check.good))
        release(aset.prefix)
        logger.info(f"{aset.name}: every shard verifies; manifest written again, no extraction")
        return None
    verified[aset.prefix] = check.good
    return Unit(f"extract {aset.name}", "extract", (transformers(aset.source),), subject=aset)


def job_units(spec: JobSpec, pending: list[PairPlan], store: Store, leases: Leases | None = None,
              verified: dict | None = None, outcome: dict | None = None) -> tuple[list[Unit], dict]:
    """The units of work the pending pairs still need, in plan order (each pair's
    activation sets, then its stages, a model's baselines before the first generation
    that reads them), and each pair's stages already complete. A stage whose marker
    verifies (jobs/integrity.py), and an activation set whose manifest and shards verify,
    is complete and gets no unit; activation sets are looked at only for pairs whose
    reduce is still to run.

    With leases, a pair is claimed first (then looked at again: another run may just have
    finished it), and an activation set to extract too; what another run holds gets no
    unit. outcome, when given, receives "blocked" (pairs left for later: another run
    holds them or their activations), "waiting" (the prefixes another run holds) and
    "finished" (pairs found complete once claimed).
    verified receives, per activation set to extract, the shards already verified."""
    claim = leases.claim if leases is not None else (lambda prefix: True)
    release = leases.release if leases is not None else (lambda prefix: None)
    verified = {} if verified is None else verified
    outcome = {} if outcome is None else outcome
    for key in ("blocked", "waiting", "finished"):
        outcome.setdefault(key, [])
    units: list[Unit] = []
    extraction: dict[str, "Unit | None | bool"] = {}
    baselines: dict = {}
    complete: dict[str, list[str]] = {}
    stages = enabled_stages(spec)
    for pair in pair_order(pending):
        name = pair.pair.name
        if not claim(pair.out_dir):
            outcome["blocked"].append(pair)
            outcome["waiting"].append(pair.out_dir)
            continue
        keys = stage_keys(spec, pair)
        if leases is not None and check_pair(store, pair, stages, keys) is None:
            release(pair.out_dir)   # finished by another run since this run looked
            outcome["finished"].append(pair)
            continue
        complete[name], todo = [], []
        for stage in stages:
            files, why = check_stage(store, pair, stage, keys[stage.name]["key"])
            if files is not None:
                complete[name].append(stage.name)
                continue
            if why:
                logger.info(f"{name}: stage {stage.name}: {why}; running it again")
            todo.append(stage)
        sets: list[Unit] = []
        if any(stage.name == "reduce" for stage in todo):
            for aset in (pair.base, pair.finetuned):
                if aset.prefix not in extraction:
                    extraction[aset.prefix] = _set_unit(aset, store, claim, release, verified)
                    if extraction[aset.prefix] is None:
                        outcome.setdefault("reused", []).append(aset.prefix)
                    if extraction[aset.prefix] is False:
                        outcome["waiting"].append(aset.prefix)
                    if extraction[aset.prefix]:
                        extraction[aset.prefix].group = name
                        units.append(extraction[aset.prefix])
                if extraction[aset.prefix] is False:
                    sets = None
                    break
                if extraction[aset.prefix]:
                    sets.append(extraction[aset.prefix])
        if sets is None:   # its activations are another run's work now: later
            release(pair.out_dir)
            del complete[name]
            outcome["blocked"].append(pair)
            continue
        mine: dict[str, Unit] = {}
        for stage in todo:
            deps = [mine[s] for s in stage.after if s in mine]
            if stage.name == "reduce":
                deps += sets
            if stage.name == "generate":
                for source in baseline_sources(spec, pair):
                    if source not in baselines:
                        baselines[source] = Unit(f"baselines {model_label(source)}", "baselines",
                                                 (vllm(source),), subject=source, group=name)
                        units.append(baselines[source])
                    deps.append(baselines[source])
            mine[stage.name] = Unit(f"{stage.name} {name}", stage.name, stage.needs(spec, pair),
                                    deps, subject=pair, pair=name, group=name)
            units.append(mine[stage.name])
    return _transformers_work_first(units, {p.pair.name: p.base.prefix for p in pending}), complete


def _transformers_work_first(units: list[Unit], base_of: dict[str, str]) -> list[Unit]:
    """Plan order within each base's pairs (bases in pair_order's order): first the work
    on transformers actors (extraction, lens, patchscope, and what needs no actor), then
    the work on engines and the embedder (baselines, generation, similarity, the agent).
    A pair's transformers actors are then released before its engine loads, instead of
    sitting on GPUs through the long generation (bench_scheduler: 0.55 -> 0.8 of the
    bound's utilisation). Each half of a pair is a group of its own for the scheduler."""
    later: set[int] = set()
    for u in units:   # in dependency order: a unit comes after what it depends on
        if any(k.runtime != "transformers" for k in u.needs) or any(id(d) in later for d in u.deps):
            later.add(id(u))
    bases = list(dict.fromkeys(base_of[u.group] for u in units))
    for u in units:
        u.group = (u.group, "engines" if id(u) in later else "transformers")
    return sorted(units, key=lambda u: (bases.index(base_of[u.group[0]]), id(u) in later))


def pending_pairs(plan: Plan, store: Store) -> list[PairPlan]:
    """The pairs whose results are not complete (present and verified), saying why for
    those whose manifest is there but does not verify."""
    stages = enabled_stages(plan.spec)
    pending = []
    for pair in plan.pairs:
        why = check_pair(store, pair, stages, stage_keys(plan.spec, pair))
        if why is None:
            continue
        if why:
            logger.info(f"{pair.pair.name}: {why}; redoing what changed or does not verify")
        pending.append(pair)
    return pending


def preflight(spec: JobSpec) -> tuple[Store, Plan]:
    """Every check made before a run writes anything: the storage root reachable and
    writable (a probe file, removed), the plan (every input error), the job's folder, and
    the compute section against the GPUs present. `adl run` and `adl validate` both call it."""
    store = Store.from_uri(spec.storage.root, spec.storage.options)
    store.check()
    plan = make_plan(spec)   # every input error surfaces here, before any write
    check_job_folder(store, spec.name)
    refuse_gpuless_compute(spec)
    return store, plan


def run_job(spec: JobSpec, stats: RunStats | None = None) -> str:
    """Runs the job; returns the run record's key under the storage root. A pair that
    fails is recorded (stats.failed, the status record) and does not stop the others.
    Work another run on the same root holds is waited for, then taken up if still needed."""
    configure_logging()   # the `adl` logger's handler, when the CLI has not installed it
    stats = stats or RunStats()
    store, plan = preflight(spec)
    log = AttemptLog.attached(store, spec.name)   # this attempt's log (jobs/attempts.py)
    status = None
    try:
        pending = pending_pairs(plan, store)
        for pair in plan.pairs:
            if pair not in pending:
                logger.info(f"{pair.pair.name}: results complete, skipped ({store.uri(pair.out_dir)})")
        status = JobStatus(store, plan, pending, pair_stages(spec), log)
        status.stats = stats
        key = write_run_record(plan, store)   # first: `adl report` reads a running job through it
    except (StorageError, OSError) as e:   # the root checked writable, and then was not
        log.detach()
        raise _storage_failed(store, e, status) from None
    except BaseException:
        log.detach()
        raise
    private = False
    backend = None
    leases = Leases(store, spec.name)
    publisher = Publisher(store, key)   # rewrites the views as pairs end, off the scheduler's loop
    try:
        _stop_on_sigterm()   # a run waiting for another's work stops cleanly too
        with leases:
            todo = pending
            while todo:
                verified, outcome = {}, {}
                units, complete = job_units(spec, todo, store, leases, verified, outcome)
                for name, stages in complete.items():
                    for stage in stages:
                        status.stage_skipped(name, stage)
                for prefix in outcome.get("reused", ()):
                    status.set_state(prefix, "done", reused=True)
                for pair in outcome["finished"]:
                    logger.info(f"{pair.pair.name}: results completed by another run")
                    for stage in pair_stages(spec):
                        status.stage_skipped(pair.pair.name, stage)
                    status.pair_state(pair.pair.name, "done")
                if units:
                    private = ensure_ray(spec) or private
                    _stop_on_sigterm()
                    backend = RayBackend(plan, store, status, stats, grader=_llm_grader(spec), verified=verified)
                    scheduler = Scheduler(units, backend.requests, backend,
                                          _on_change(plan, units, store, status, stats, leases, publisher.request),
                                          node_wait_s=60 * spec.compute.node_wait_minutes)
                    try:
                        scheduler.run()
                    finally:
                        stats.reloads.extend((str(k), why) for k, why in scheduler.reloads)
                        stats.decisions += scheduler.decisions
                        stats.adapter_loads.update(scheduler.adapter_loads)
                        stats.max_alive = max(stats.max_alive, scheduler.max_alive)
                blocked = {p.out_dir for p in outcome["blocked"]}
                for pair in todo:   # every stage complete from earlier runs: only the manifest was missing
                    if pair.pair.name in complete and not any(u.pair == pair.pair.name for u in units):
                        _pair_done(store, pair, status, stats, spec)
                        leases.release(pair.out_dir)
                leases.release_all()
                todo = [p for p in todo if p.out_dir in blocked]
                if todo:   # another run holds them, or the activations they need
                    leases.wait(outcome["waiting"])
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if interrupted:
            _ignore_signals()   # a second Ctrl-C must not cut the clean-up short
            _recording(store, status.interrupt)
        if backend is not None:
            backend.kill_all()
        _recording(store, lambda: status.finish(error="interrupted" if interrupted else one_line(e)))
        publisher.close()
        _recording(store, lambda: publish(store, key))
        if interrupted:
            done = sum(p["state"] == "done" for p in status.record["pairs"].values())
            sets = status.record["counts"].get("activation_sets_done", 0)
            logger.info(f"interrupted: {done} of {len(plan.pairs)} pairs and {sets} activation sets are complete; "
                        f"rerun the same spec to resume from there")
        if private:
            _stop_private_ray()
        _recording(store, status.close)
        if isinstance(e, (StorageError, OSError)):
            raise _storage_failed(store, e) from None   # recorded above
        raise
    try:
        publisher.close()
        status.catalog = publish(store, key, views=("catalog", "pair similarity"))
        status.finish()
        if pending or not store.exists(layout.report(key)):
            # The page says the job has ended; a rerun that had nothing to do leaves it as it was.
            publish(store, key, views=("report",))
    except (StorageError, OSError) as e:
        raise _storage_failed(store, e, status) from None
    if store.retries:
        logger.info(f"storage: {store.retries} retries in this run")
    status.close()
    return key


def _llm_grader(spec: JobSpec):
    """An LLM grader's requests go out from the driver; the offline grader is a model's actor."""
    if offline_grader(spec) or not (spec.generation.enabled or spec.analyses.enabled):
        return None
    from workers.graders import GraderService, make_grader
    return LocalActor(GraderService(make_grader(spec.grader)))


def _pair_done(store: Store, pair: PairPlan, status: JobStatus, stats: RunStats, spec: JobSpec) -> None:
    stages = status.record["pairs"][pair.pair.name]["stages"]
    pair_manifest(store, pair, spec, earlier=[name for name, entry in stages.items() if entry.get("skipped")])
    stats.add("pairs_reduced")
    status.pair_state(pair.pair.name, "done")


def _on_change(plan: Plan, units: list[Unit], store: Store, status: JobStatus, stats: RunStats,
               leases: Leases | None = None, pair_ended=lambda: None):
    """A pair's state follows its units: running with the first, failed with the first
    failure, done (its manifest written) when the last is done; when a pair is done or
    failed, pair_ended() asks for the job's views to be rewritten (jobs/views.py).
    Leases go back as soon as their work has ended: an activation set's with its
    extraction, a pair's with the last of its units."""
    pairs = {p.pair.name: p for p in plan.pairs}
    by_pair: dict[str, list[Unit]] = {}
    for u in units:
        if u.pair:
            by_pair.setdefault(u.pair, []).append(u)

    def changed(unit: Unit) -> None:
        if leases is not None and unit.kind == "extract" and unit.state in ("done", "failed"):
            leases.release(unit.subject.prefix)
        name = unit.pair
        if name is None:
            return
        ended = all(u.state in ("done", "failed") for u in by_pair[name])
        if name not in stats.failed:
            if unit.state == "running" and status.record["pairs"][name]["state"] == "pending":
                status.pair_state(name, "running")
            elif unit.state == "failed":
                stats.failed[name] = unit.error
                status.pair_state(name, "failed", unit.error)
                pair_ended()
            elif unit.state == "done" and all(u.state == "done" for u in by_pair[name]):
                _pair_done(store, pairs[name], status, stats, plan.spec)
                pair_ended()
        if leases is not None and ended:
            leases.release(pairs[name].out_dir)
    return changed


def check_job_folder(store: Store, name: str) -> None:
    """The job's folder (layout.run_dir) holds no other job's records: a name spelled
    like another job's keyed folder, or equal to it but for case on a case-insensitive
    filesystem, is refused before anything is written (SpecError, exit 2)."""
    for key in (layout.run_record(name), layout.run_status(name)):
        try:
            record = store.read_json_or_none(key)
        except StorageError:
            if key == layout.run_record(name):
                raise
            continue   # a damaged status record is rewritten as the job starts
        other = record.get("job") if isinstance(record, dict) else record
        if record is not None and other != name:
            raise SpecError(f"name: {shown(name)} maps onto {store.uri(layout.run_dir(name))}, which holds the "
                            f"records of another job ({shown(other)}); rename the job")


def write_run_record(plan: Plan, store: Store) -> str:
    """The job's entry point for readers; deterministic, so a rerun rewrites nothing."""
    record = {
        "job": plan.spec.name, "layout_version": layout.LAYOUT_VERSION,
        "spec": redact_urls(plan.spec.to_dict()),   # an endpoint's credentials stay out of storage
        "pairs": [{"name": p.pair.name, "dir": p.out_dir, "layers": list(p.layers),
                   "base_activations": p.base.prefix, "finetuned_activations": p.finetuned.prefix}
                  for p in plan.pairs],
    }
    key = layout.run_record(plan.spec.name)
    if store.read_json_or_none(key) != record:
        store.write_json(key, record)
    return key

