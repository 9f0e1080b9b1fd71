"""Runs a plan on Ray: extract every activation set not yet complete, reduce every pair
not yet reduced, read it through the logit lens, generate (baseline and steered) and run
the analyses (patchscope, token relevance, embedding evaluation) when the spec asks, and
record the run.

Ray is the executor: stages are plain functions over shards, a shard's marker is its
completion record, and a rerun skips whatever is complete.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from jobs import analyses
from jobs.catalog import write_catalog
from jobs.grading import GraderPool
from jobs.placement import Placement, placement, set_order
from jobs.plan import ActivationSet, Plan, PairPlan, make_plan, s3_options
from jobs.spec import JobSpec, ModelSource
from jobs.status import JobStatus, describe
from jobs.steering import GenerationStage
from storage import layout
from storage.store import Store
from storage.tables import (TABLE_PARQUET_OPTIONS, difference_table, generations_table,
                            logit_lens_table, steering_table)

SHARDS_IN_FLIGHT_PER_WORKER = 2   # one in its forward, one encoding and writing
# A shard whose actor's node died is resubmitted: until Ray notices the death (its health
# checks take tens of seconds), calls fail fast as "temporarily unavailable".
SHARD_ATTEMPTS = 10


@dataclass
class RunStats:
    model_loads: int = 0
    shards_extracted: int = 0
    pairs_reduced: int = 0
    gpu_ids: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)     # pair name -> error, for pairs that failed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        """Pairs and activation sets run in threads: counters go through the lock."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict:
        with self._lock:
            return {"model_loads": self.model_loads, "shards_extracted": self.shards_extracted,
                    "pairs_run": self.pairs_reduced}


def log(message: str) -> None:
    print(f"[adl {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


_RAY_INIT = threading.Lock()


def ensure_ray(spec: JobSpec) -> None:
    """Joins compute.ray_address (or $RAY_ADDRESS, which a job submitted to a cluster
    finds set); otherwise starts a private local Ray."""
    import ray
    with _RAY_INIT:   # pairs and activation sets run in threads
        if ray.is_initialized():
            return
        address = spec.compute.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # nobody else can reach it
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def pair_stages(spec: JobSpec) -> tuple[str, ...]:
    """The stages run_pair runs, in order (the status record lists them as pending)."""
    generation = ("generate",) if spec.generation.enabled else ()
    analysed = (("patchscope", "token_relevance") + (("similarity",) if spec.generation.enabled else ())
                if spec.analyses.enabled else ())
    return ("reduce", "logit_lens") + generation + analysed


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
    global _JOB
    _JOB = _JobActors(spec, plan, status)
    generation = None
    actor = lambda cls, **kw: _actor(cls, spec, **kw)
    graders = GraderPool(spec, actor, release_actor)
    try:
        if spec.generation.enabled and pending:
            # Baselines need no difference: their engines start and work alongside extraction.
            ensure_ray(spec)
            generation = GenerationStage(spec, pending, actor, log, graders, release=release_actor)
            generation.start()
        _run_pending(pending, spec, store, stats, status, generation, graders)
    except BaseException as e:
        status.finish(error=describe(e))
        raise
    finally:
        if generation:
            generation.close()
            stats.add("model_loads", generation.loads)
        graders.close()
        stats.add("model_loads", graders.loads)
        _JOB = None
    key = write_run_record(plan, store)
    status.catalog = write_catalog(store, key)
    status.finish()
    return key


def _run_pending(pending: list[PairPlan], spec: JobSpec, store: Store, stats: RunStats,
                 status: JobStatus, generation: GenerationStage | None, graders: GraderPool) -> None:
    """Every activation set the pending pairs need, and then each pair, as independent
    units in threads: Ray places their actors and tasks as resources free up, so
    independent sets and pairs run side by side; a pair starts once its two sets are done."""
    if not pending:
        return
    sets = set_order(pending)

    def extract_set(aset: ActivationSet) -> None:
        status.set_state(aset.prefix, "running")
        try:
            extract(aset, spec, store, stats, status)
        except BaseException as e:
            status.set_state(aset.prefix, "failed", describe(e))
            raise
        status.set_state(aset.prefix, "done")

    def pair_unit(pair: PairPlan, extracted: dict) -> None:
        name = pair.pair.name
        try:
            for aset in (pair.base, pair.finetuned):
                try:
                    extracted[aset.prefix].result()
                except BaseException as e:
                    raise RuntimeError(f"activations {aset.name} failed: {describe(e)}") from e
            status.pair_state(name, "running")
            run_pair(pair, spec, store, stats, generation, graders,
                     track=lambda stage: status.stage(name, stage))
        except Exception as e:
            error = describe(e)
            stats.failed[name] = error
            status.pair_state(name, "failed", error)
            return
        status.pair_state(name, "done")

    with ThreadPoolExecutor(max_workers=len(sets) + len(pending), thread_name_prefix="adl") as pool:
        extracted = {aset.prefix: pool.submit(extract_set, aset) for aset in sets}
        for future in [pool.submit(pair_unit, pair, extracted) for pair in pending]:
            future.result()


@contextmanager
def _untracked(stage: str):
    yield


def run_pair(pair: PairPlan, spec: JobSpec, store: Store, stats: RunStats,
             generation: GenerationStage | None, graders: GraderPool, track=_untracked) -> None:
    """A pair's stages, in order, once both activation sets are complete; the manifest,
    written last, marks the pair's results complete. track(stage) wraps each stage for
    the status record."""
    with track("reduce"):
        reduce_pair(pair, spec, store)
    with track("logit_lens"):
        logit_lens(pair, spec, store, stats)
    if generation:
        with track("generate"):
            generate(pair, generation, store)
    if spec.analyses.enabled:
        actor = lambda cls, **kw: _actor(cls, spec, **kw)
        with track("patchscope"):
            analyses.patchscope(pair, spec, store, stats, graders.get(pair), actor, log)
        with track("token_relevance"):
            analyses.token_relevance(pair, spec, store, graders.get(pair), log)
        if generation:   # the embedding evaluation compares generations
            with track("similarity"):
                analyses.similarity(pair, spec, store, stats, actor, log)
    store.write_json(layout.manifest(pair.out_dir), {
        "pair": pair.pair.name, "layers": list(pair.layers),
        "base": pair.base.prefix, "finetuned": pair.finetuned.prefix})
    stats.add("pairs_reduced")


@functools.cache
def _tracked_class(cls):
    """cls with a start time taken when Ray places the actor (its __init__ begins) and a
    method that reports where it runs: what the status record's actor entries show."""
    class Tracked(cls):
        def __init__(self, *args, **kwargs):
            self._adl_started = time.time()
            super().__init__(*args, **kwargs)

        def adl_placement(self) -> dict:
            import ray
            return {"node_id": ray.get_runtime_context().get_node_id(),
                    "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(),
                    "started": self._adl_started}

    Tracked.__name__, Tracked.__qualname__, Tracked.__doc__ = cls.__name__, cls.__qualname__, cls.__doc__
    return Tracked


class _JobActors:
    """Makes the job's model actors: GPUs by placement (jobs/placement.py), fractional
    CPUs from the spec, restarts and task retries so that a lost node costs only time,
    and an entry in the status record's actor ledger."""

    def __init__(self, spec: JobSpec, plan: Plan | None, status: JobStatus | None):
        self.spec, self.status = spec, status
        self.parameters = {a.source: a.parameters for a in plan.sets} if plan else {}

    def placement(self, source: ModelSource, engine: bool = False) -> Placement:
        tp = self.spec.generation.tensor_parallel_size if engine else 1
        return placement(self.spec.compute, self.parameters.get(source) or 0, self.spec.dtype, engine, tp)


_JOB: _JobActors | None = None    # the running job's actor maker (one job per driver process)


def _actor(cls, spec: JobSpec, gpus: int = 1, source: ModelSource | None = None, engine: bool = False,
           **options) -> "_ActorFactory":
    """A model actor class to call .remote(...) on. With source (the model it loads), its
    GPUs come from the placement rules; without, gpus x compute.gpus_per_worker."""
    jobs = _JOB or _JobActors(spec, None, None)
    placed = jobs.placement(source, engine) if source is not None else \
        Placement(spec.compute.gpus_per_worker * gpus, gpus, 0.0)
    return _ActorFactory(jobs, cls, source, placed, options)


@dataclass
class _ActorFactory:
    jobs: _JobActors
    cls: type
    source: ModelSource | None
    placed: Placement
    options: dict

    def remote(self, *args, **kwargs):
        import ray
        spec = self.jobs.spec
        handle = ray.remote(_tracked_class(self.cls)).options(
            num_gpus=self.placed.num_gpus, num_cpus=spec.compute.cpus_per_worker,
            max_restarts=3, max_task_retries=3, **self.options).remote(*args, **kwargs)
        if self.jobs.status is not None:
            model = (self.source.adapter or self.source.model) if self.source else None
            self.jobs.status.actors.started(handle, self.cls.__name__, model, self.placed.num_gpus)
        return handle


def release_actor(handle) -> None:
    """Kills a model actor, after its last placement report."""
    import ray
    if _JOB is not None and _JOB.status is not None:
        _JOB.status.actors.ended(handle)
    ray.kill(handle)


def extract(aset: ActivationSet, spec: JobSpec, store: Store, stats: RunStats,
            status: JobStatus | None = None) -> None:
    import ray
    from workers.extraction import ExtractionWorker
    if store.exists(layout.manifest(aset.prefix)):
        log(f"{aset.name}: activations complete, reused ({store.uri(aset.prefix)})")
        return
    docs = aset.documents
    done = {k for k in store.list(aset.prefix) if k.endswith(".done.json")}
    todo = deque(i for i in range(docs.num_shards) if layout.shard_marker(aset.prefix, i) not in done)
    if todo:
        log(f"{aset.name}: extracting layers {list(aset.layers)} from {len(docs.doc_ids)} documents "
            f"({len(todo)} of {docs.num_shards} shards to do)")
        ensure_ray(spec)
        worker = _actor(ExtractionWorker, spec, source=aset.source, max_concurrency=SHARDS_IN_FLIGHT_PER_WORKER)
        actors = [worker.remote(aset.source, dtype=spec.dtype, layers=list(aset.layers),
                                batch_size=spec.batch_size, store=store, set_prefix=aset.prefix,
                                s3=s3_options(spec), trust_remote_code=spec.trust_remote_code)
                  for _ in range(min(spec.compute.num_workers, len(todo)))]
        stats.add("model_loads", len(actors))
        pending = {}   # ObjectRef -> (actor, shard index)
        lost = {}      # shard index -> calls lost to an actor being restarted

        def submit(actor):
            if todo:
                index = todo.popleft()
                pending[actor.extract.remote(index, *docs.shard(index))] = (actor, index)

        for actor in actors:
            for _ in range(SHARDS_IN_FLIGHT_PER_WORKER):
                submit(actor)
        finished, total = docs.num_shards - len(todo) - len(pending), docs.num_shards
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            actor, index = pending.pop(ready)
            try:
                marker = ray.get(ready)
            except ray.exceptions.ActorUnavailableError as e:
                # Its node died and Ray is restarting it elsewhere; the call may or may not
                # have run, and a shard's write is atomic, so the shard is simply done again.
                lost[index] = lost.get(index, 0) + 1
                if lost[index] > SHARD_ATTEMPTS:
                    raise
                log(f"{aset.name}: shard {index} lost with its actor ({type(e).__name__}), retrying")
                time.sleep(min(2.0 * lost[index], 10.0))   # until Ray restarts the actor
                todo.appendleft(index)
                submit(actor)
                continue
            submit(actor)
            finished += 1
            stats.add("shards_extracted")
            with stats._lock:
                stats.gpu_ids.extend(marker["gpu_ids"])
            if status:
                status.shards(aset.prefix, finished)
            log(f"{aset.name}: shard {marker['shard']} done ({finished}/{total}, "
                f"{marker['documents']} documents in {marker['seconds']:.1f} s)")
        for actor in actors:
            release_actor(actor)
    store.write_json(layout.manifest(aset.prefix), {
        "identity": aset.identity, "layers": list(aset.layers), "shards": docs.num_shards,
        "documents": int(len(docs.doc_ids)), "documents_read": docs.read})


def reduce_pair(pair: PairPlan, spec: JobSpec, store: Store) -> None:
    import ray
    from safetensors.numpy import save as save_safetensors
    from workers.reduce import finish, shard_sums
    shards = pair.base.documents.num_shards
    log(f"{pair.pair.name}: reducing {shards} shards")
    ensure_ray(spec)
    remote = ray.remote(shard_sums)
    futures = [remote.remote(store, pair.base.prefix, pair.finetuned.prefix, i, list(pair.layers),
                             spec.method.tokens_per_document, spec.method.norm_skip_positions)
               for i in range(shards)]
    total = None
    while futures:   # merge as partial sums arrive, in any order
        ready, futures = ray.wait(futures, num_returns=1)
        part = ray.get(ready[0])
        total = part if total is None else total + part
    result = finish(total)
    meta = {"adl.pair": pair.pair.name, "adl.base": pair.base.prefix, "adl.finetuned": pair.finetuned.prefix}
    table = difference_table(list(pair.layers), result["num_documents"], result["delta"],
                             result["base_mean"], result["finetuned_mean"], result["finetuned_norm"], **meta)
    store.write_table(f"{pair.out_dir}/{layout.DIFFERENCE}", table, **TABLE_PARQUET_OPTIONS)
    tensors = {name: np.ascontiguousarray(result[name], dtype=np.float32)
               for name in ("delta", "base_mean", "finetuned_mean", "finetuned_norm")}
    tensors["layers"] = np.asarray(pair.layers, dtype=np.int64)
    store.write_bytes(f"{pair.out_dir}/{layout.DIFFERENCE_SAFETENSORS}",
                      save_safetensors(tensors, metadata={k.removeprefix("adl."): v for k, v in meta.items()}))


def logit_lens(pair: PairPlan, spec: JobSpec, store: Store, stats: RunStats) -> None:
    import ray
    from storage.tables import decode_vectors
    from workers.lens import VARIANTS, LensWorker
    table = store.read_table(f"{pair.out_dir}/{layout.DIFFERENCE}")
    layers = table.column("layer").to_numpy()
    positions = table.column("position").to_numpy()
    vectors = {name: decode_vectors(table.column(name), "float64") for name in
               ("delta", "base_mean", "finetuned_mean")}
    vectors["neg_delta"] = vectors["delta"]   # negated after the norm, inside the lens
    rows = [(r, v) for r in range(table.num_rows) if positions[r] in spec.method.positions for v in VARIANTS]
    log(f"{pair.pair.name}: logit lens on {len(rows)} vectors")
    lens = _actor(LensWorker, spec, source=pair.pair.finetuned).remote(
        pair.pair.finetuned, pair.pair.base, dtype=spec.dtype, s3=s3_options(spec),
        trust_remote_code=spec.trust_remote_code)
    stats.add("model_loads")
    batch = np.stack([vectors[v][r] for r, v in rows])
    ids, tokens, probs = ray.get(lens.top_tokens.remote(batch, [v for _, v in rows], spec.method.lens_top_k))
    release_actor(lens)
    out = {name: [] for name in ("layer", "position", "variant", "rank", "token_id", "token", "probability")}
    for (r, variant), row_ids, row_tokens, row_probs in zip(rows, ids, tokens, probs):
        for rank, (tid, tok, p) in enumerate(zip(row_ids, row_tokens, row_probs)):
            for name, value in zip(out, (int(layers[r]), int(positions[r]), variant, rank, int(tid), tok, float(p))):
                out[name].append(value)
    store.write_table(f"{pair.out_dir}/{layout.LOGIT_LENS}", logit_lens_table(out), **TABLE_PARQUET_OPTIONS)


def generate(pair: PairPlan, stage: GenerationStage, store: Store) -> None:
    if all(store.exists(f"{pair.out_dir}/{name}") for name in (layout.GENERATIONS, layout.STEERING)):
        log(f"{pair.pair.name}: generations complete, skipped")   # a later stage failed before
        return
    difference = store.read_table(f"{pair.out_dir}/{layout.DIFFERENCE}").to_pandas()
    result = stage.run(pair, difference)
    store.write_table(f"{pair.out_dir}/{layout.GENERATIONS}", generations_table(result.rows),
                      **TABLE_PARQUET_OPTIONS)
    store.write_table(f"{pair.out_dir}/{layout.STEERING}", steering_table(result.steering),
                      **TABLE_PARQUET_OPTIONS)


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

