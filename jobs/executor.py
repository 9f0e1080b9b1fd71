"""The scheduler's real backend: model actors on Ray, and a thread per running unit.

jobs/scheduler.py decides which actors live and which units run; this module makes those
decisions happen on Ray and is the one wrapper around every unit of work: it marks the
status record (running, then done or failed with the error as one line), times it, logs
it, writes a pair stage's marker when the stage returned (the digests of every file it
wrote: what makes it complete), and in a `finally` reports the unit's end to the
scheduler, which then frees or releases the unit's actors.

An actor is pinned (softly) to the node the scheduler packed it on, asks Ray for exactly
the resources the scheduler counted, and is restarted by Ray with its calls retried if its
process dies (every write is atomic, and every call is a pure function of its arguments,
so a retried call gives the same result). If its node dies, the scheduler ends it and runs
its units again on a new actor that it packs itself.
"""
from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time

from common.errors import one_line
from common.types import OfflineGrading
from jobs import autoscale
from jobs.placement import Placement, Workload, engine_memory_utilization, gpuless_refusal, placement
from jobs.plan import Plan
from jobs.scheduler import ModelKey, NodeResources, Request, Slot, Unit
from jobs.stages import (PAIR_STAGES, StageRun, actor_source, extract, model_actor, offline_grader, run_baselines,
                         stage_keys)
from jobs.status import JobStatus, log_actor_warnings
from jobs.steering import engine_need
from jobs.submit import ClusterError
from storage import layout
from storage.store import Store

POLL_S = 0.5        # how long the scheduler's loop waits for an event (SIGINT is seen in between)
RELEASE_S = 60.0    # how long a released GPU actor gets to close its engine and free its cache

logger = logging.getLogger("adl.executor")


def hide_unheld_gpus() -> None:
    """In an actor that holds no GPU, before anything touches CUDA: no GPU visible. Ray
    sets CUDA_VISIBLE_DEVICES only for actors that hold GPUs, so one that asks for none
    would see, and load onto, every GPU of its node outside all accounting."""
    import ray
    if not ray.get_gpu_ids():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@functools.cache
def _tracked_class(cls):
    """cls with a start time taken when Ray places the actor (its __init__ begins) and a
    method that reports where it runs (what the status record's actor entries show) and
    the warnings it logged since it last reported."""
    class Tracked(cls):
        def __init__(self, *args, _adl_gpu_share: tuple[float, bool] = (0.0, False), **kwargs):
            self._adl_started = time.time()
            self._adl_warnings = _WarningsKept()   # before the load: its warnings too
            import ray
            if ray.get_gpu_ids():
                # Room for its share before the model loads (a released neighbour's memory
                # may not be back yet); transformers actors capped to it.
                from workers.gpu_memory import claim_gpu_share
                fraction, cap = _adl_gpu_share
                claim_gpu_share(fraction, cap=cap)
            else:
                hide_unheld_gpus()
            super().__init__(*args, **kwargs)

        def adl_release(self) -> None:
            """Gives back what the actor holds before it is ended: its engine (and vLLM's
            worker processes), then cached CUDA memory."""
            from workers.gpu_memory import release_gpu_memory
            engine = getattr(self, "engine", None)
            if engine is not None and hasattr(engine, "close"):
                engine.close()
            release_gpu_memory()

        def adl_warnings(self) -> list[str]:
            return self._adl_warnings.take()

        def adl_placement(self) -> dict:
            import ray
            return {"node_id": ray.get_runtime_context().get_node_id(),
                    "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(),
                    "started": self._adl_started, "warnings": self._adl_warnings.take()}

    Tracked.__name__, Tracked.__qualname__, Tracked.__doc__ = cls.__name__, cls.__qualname__, cls.__doc__
    return Tracked


class _WarningsKept(logging.Handler):
    """An actor's warnings (its own, vLLM's, transformers', Python's `warnings`), kept for
    the driver's log: the actors' output does not reach it (ray.init(log_to_driver=False):
    vLLM's progress would flood it). Each distinct first line once, with its count."""
    LOGGERS = ("", "vllm", "transformers", "py.warnings")   # vllm and transformers do not propagate
    MAX = 50

    def __init__(self):
        super().__init__(logging.WARNING)
        self.kept: dict[str, int] = {}
        self._guard = threading.Lock()
        logging.captureWarnings(True)
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            lines = record.getMessage().strip().splitlines() or [""]
        except Exception:
            return
        line = f"{record.levelname.lower()}: {lines[0][:300]}"
        with self._guard:
            if line in self.kept or len(self.kept) < self.MAX:
                self.kept[line] = self.kept.get(line, 0) + 1

    def take(self) -> list[str]:
        with self._guard:
            kept, self.kept = self.kept, {}
        return [line + (f" (x{n})" if n > 1 else "") for line, n in kept.items()]


def job_workload(spec) -> Workload:
    """The placement's workload (jobs/placement.Workload): a job's batch sizes and its
    engines' length. max_model_len is the spec's, or the job's need with prompts counted in
    characters (no tokenizer here: at least their tokens), rounded up as the engine rounds it."""
    from workers.causal import LOGIT_ELEMENTS
    from workers.engine_settings import MAX_BATCHED_TOKENS, needed_length
    from workers.patchscope import ROWS_PER_FORWARD
    grading, causal = spec.grader or OfflineGrading(), spec.causal_effect
    return Workload(
        extraction_tokens=spec.batch_size * spec.method.tokens_per_document,
        extraction_layers=len(spec.method.layers), patchscope_rows=ROWS_PER_FORWARD,
        causal=causal.enabled, causal_batch=causal.batch_size, causal_tokens=causal.max_tokens,
        causal_logit_elements=LOGIT_ELEMENTS, grader=offline_grader(spec),
        grader_batch=getattr(grading, "batch_size", 8), grader_tokens=getattr(grading, "max_length", 1024),
        grader_dtype=getattr(grading, "dtype", None),
        max_model_len=spec.generation.max_model_len or needed_length(engine_need(spec).tokens(len), None),
        engine_step_tokens=MAX_BATCHED_TOKENS)


class ActorRequests:
    """Each model actor's resources: GPUs by placement (jobs/placement.py), CPUs from the spec."""

    def __init__(self, plan: Plan):
        self.spec = plan.spec
        self.work = job_workload(plan.spec)
        # Each model's shape from its config (its parameter count where the plan has no shape).
        self.shapes = {a.source: a.shape or a.parameters for a in plan.sets}
        for a in plan.sets:   # an adapter's reference for grading is its base model
            self.shapes.setdefault(type(a.source)(a.source.model, a.source.revision), a.shape or a.parameters)

    def placed(self, key: ModelKey):
        compute = self.spec.compute
        if key.runtime == "embedder":
            # A small sentence-transformers model, on CPUs: a fraction of a GPU held by it
            # for the whole job would keep an engine that needs whole GPUs off that GPU.
            return Placement(0.0, 1, 0.0)
        engine = key.runtime == "vllm"
        tp = self.spec.generation.tensor_parallel_size if engine else 1
        return placement(compute, self.shapes.get(key.source) or 0, self.spec.dtype, engine, tp, self.work)

    def __call__(self, key: ModelKey) -> Request:
        return Request(cpus=self.spec.compute.cpus_per_worker, gpus=self.placed(key).num_gpus)


class RayBackend:
    def __init__(self, plan: Plan, store: Store, status: JobStatus, stats, grader=None,
                 verified: dict | None = None):
        self.plan, self.spec, self.store, self.status, self.stats = plan, plan.spec, store, status, stats
        self.grader = grader                  # an LLM grader in the driver (LocalActor), or None
        self.verified = verified if verified is not None else {}   # set prefix -> {shard: digest} checked
        self.requests = ActorRequests(plan)
        refused = gpuless_refusal(self.spec.compute, sum(n.gpus for n in self.nodes()))
        if refused:
            raise ClusterError(refused)
        self.baselines: dict = {}             # ModelSource -> that model's baseline results
        self.handles: dict[int, tuple] = {}   # id(handle) -> (key, handle): the live actors
        self._events: queue.Queue = queue.Queue()
        self._stages = {s.name: s for s in PAIR_STAGES}
        self._pairs = {p.pair.name: p for p in plan.pairs}
        self._node_types = autoscale.cluster_node_types()

    # -- the cluster and its actors -----------------------------------------------------
    def nodes(self) -> list[NodeResources]:
        import ray
        return [NodeResources(n["NodeID"], n["Resources"].get("CPU", 0.0), int(n["Resources"].get("GPU", 0)))
                for n in ray.nodes() if n.get("Alive")]

    def node_types(self):
        return self._node_types

    def want(self, requests: list[Request]) -> None:
        if self._node_types:
            logger.info(f"asking the cluster for room for {len(requests)} model actor(s)" if requests
                        else "the job needs no more nodes: its request to the autoscaler is lowered to none")
            autoscale.request(requests)

    def create(self, key: ModelKey, slot: Slot):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        cls, args, kwargs, options = self._constructor(key)
        logger.info(f"loading {key}")
        share = (slot.request.gpus, key.runtime == "transformers")
        handle = ray.remote(_tracked_class(cls)).options(
            num_gpus=slot.request.gpus, num_cpus=slot.request.cpus, max_restarts=3, max_task_retries=3,
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=True),
            **options).remote(*args, _adl_gpu_share=share, **kwargs)
        self.handles[id(handle)] = (key, handle)
        self.status.actors.started(handle, key.runtime, key.label or str(key.source), slot.request.gpus)
        self.stats.loaded(key)
        return handle

    def _constructor(self, key: ModelKey):
        spec, storage = self.spec, self.spec.storage.options
        if key.runtime == "transformers":
            from workers.model_worker import TransformersWorker
            return TransformersWorker, (key.source,), dict(
                dtype=spec.dtype, storage=storage, store=self.store, trust_remote_code=spec.trust_remote_code,
                grader=spec.grader if offline_grader(spec) else None), {"max_concurrency": 2}
        if key.runtime == "vllm":
            from workers.generation import GenerationWorker
            gen, placed = spec.generation, self.requests.placed(key)
            return GenerationWorker, (key.source, storage), dict(
                adapters=self._adapters(key),
                trust_remote_code=spec.trust_remote_code, grader=spec.grader if offline_grader(spec) else None,
                dtype=spec.dtype,
                max_model_len=gen.max_model_len, need=engine_need(spec),
                tensor_parallel_size=placed.devices, seed=gen.seed,
                gpu_memory_utilization=engine_memory_utilization(placed)), {}
        from workers.embedding import EmbeddingWorker
        return EmbeddingWorker, (spec.analyses.embedding_model, spec.analyses.embedding_batch_size), {}, {}

    def _adapters(self, key: ModelKey) -> tuple[str, ...]:
        """The job's adapters on this key's model: its engine is sized for all of them."""
        sources = [p.pair.finetuned for p in self.plan.pairs] + [p.pair.base for p in self.plan.pairs]
        return tuple(dict.fromkeys(s.adapter for s in sources if s.adapter and actor_source(s) == key.source))

    def release(self, key: ModelKey, handle, lost: bool = False) -> None:
        import ray
        self.handles.pop(id(handle), None)
        if lost:   # Ray may be restarting it elsewhere, outside the scheduler's accounting: end it first
            ray.kill(handle, no_restart=True)
            self.status.actors.ended(handle)
            return
        self._log_warnings(key, handle, timeout=10)
        logger.info(f"releasing {key}")
        self.status.actors.ended(handle)
        if self.requests(key).gpus > 0:
            # Its engine and CUDA cache given back first, so the next actor on the GPU finds
            # the memory (which it also waits for: workers/gpu_memory.py); bounded, since a
            # stuck actor is ended all the same.
            try:
                ray.get(handle.adl_release.remote(), timeout=RELEASE_S)
            except Exception as e:
                logger.warning(f"releasing {key}: {one_line(e)}; ending it")
        ray.kill(handle)

    def _log_warnings(self, key: ModelKey, handle, timeout: float) -> None:
        """The actor's warnings since the last look, one line each (idle or not: a busy
        actor's are left for later)."""
        import ray
        try:
            warnings = ray.get(handle.adl_warnings.remote(), timeout=timeout)
        except Exception:   # busy, or gone: its error, if any, is the unit's
            return
        log_actor_warnings(key.label or str(key.source), key.runtime, warnings)

    def kill_all(self) -> None:
        """Ends every live actor at once (an interrupted job): no last placement report."""
        import ray
        for _, handle in list(self.handles.values()):
            try:
                ray.kill(handle)
            except Exception:
                pass
        self.handles.clear()

    # -- units ------------------------------------------------------------------------------
    def start(self, unit: Unit, actors: dict) -> None:
        threading.Thread(target=self._run, args=(unit, actors), name=f"adl {unit.name}", daemon=True).start()

    def wait(self) -> list[tuple[Unit, str | None]]:
        try:
            events = [self._events.get(timeout=POLL_S)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _run(self, unit: Unit, actors: dict) -> None:
        """The one wrapper of every unit: status, timing, logging; the end reported in a
        finally, so that the scheduler frees its actors whatever happened."""
        error = None
        start = time.time()
        try:
            if unit.kind == "extract":
                self._extract(unit, actors)
            elif unit.kind == "baselines":
                engine = model_actor(actors, "vllm", unit.subject)
                self.baselines[unit.subject] = run_baselines(self.spec, unit.subject, engine)
            else:
                with self.status.stage(unit.pair, unit.kind):
                    self._stage(unit, actors)
        except BaseException as e:
            error = one_line(e)
            if unit.kind == "extract":
                error = f"activations {unit.subject.name} failed: {error}"
            self._trace(unit, e, error, actors)
        finally:
            seconds = time.time() - start
            if error is None:
                logger.info(f"{unit.name}: done in {seconds:.1f} s")
            self.status.unit_ended(unit.name, unit.kind, seconds, error)
            self._events.put((unit, error))

    def _trace(self, unit: Unit, e: BaseException, error: str, actors: dict) -> None:
        """A failed unit: one line in the log, its whole trace (the actor's, for an actor's
        error: Ray carries it) in the run's folder, and its actors' warnings."""
        import traceback
        from common.redact import redact
        if isinstance(e, KeyboardInterrupt):
            return
        key = layout.run_trace(self.spec.name, unit.name, unit.attempts)
        try:
            self.store.write_bytes(key, redact("".join(traceback.format_exception(e))).encode())
            where = f" (full trace: {self.store.uri(key)})"
        except Exception:
            where = ""
        logger.info(f"{unit.name} failed: {error}{where}")
        for model, handle in actors.items():
            self._log_warnings(model, handle, timeout=2)

    def _stage(self, unit: Unit, actors: dict) -> None:
        """A pair's stage, then its marker: the digests of every file it wrote in the
        pair's folder (what makes it complete; jobs/integrity.py check_stage)."""
        stage, pair = self._stages[unit.kind], self._pairs[unit.pair]
        keys = stage_keys(self.spec, pair)
        # A stage run again in place (its settings or inputs changed, or its files did not
        # verify): its old marker, and the pair's manifest, no longer describe the folder.
        for stale in (layout.manifest(pair.out_dir), layout.stage_marker(pair.out_dir, stage.name)):
            if self.store.exists(stale):
                self.store.delete(stale)
        store = self.store.session(record=True)
        stage.run(StageRun(pair, self.spec, store, actors, self.grader, self.baselines,
                           spend=lambda usage: self.status.llm_spend(unit.pair, unit.kind, usage),
                           keys={name: entry["key"] for name, entry in keys.items()}))
        folder = pair.out_dir.strip("/") + "/"
        files = {key[len(folder):]: d for key, d in store.written.items() if key.startswith(folder)}
        missing = [name for name in stage.writes if name not in files]
        if missing:
            raise RuntimeError(f"{stage.name}: the stage wrote no {', '.join(missing)}")
        store.write_json(layout.stage_marker(pair.out_dir, stage.name),
                         {"stage": stage.name, **keys[stage.name], "files": files})
        self.stats.add("stages_run")

    def _extract(self, unit: Unit, actors: dict) -> None:
        aset = unit.subject
        self.status.set_state(aset.prefix, "running")
        try:
            def on_shard(finished, marker):
                self.stats.add("shards_extracted")
                with self.stats._lock:
                    self.stats.gpu_ids.extend(marker["gpu_ids"])
                self.status.shards(aset.prefix, finished)
            # What was verified before the first run; a second run (its actor was lost)
            # checks storage again, so the shards the first one wrote are kept.
            extract(aset, self.spec, self.store, model_actor(actors, "transformers", aset.source), on_shard,
                    verified=self.verified.pop(aset.prefix, None))
        except BaseException as e:
            self.status.set_state(aset.prefix, "failed", one_line(e))
            raise
        self.status.set_state(aset.prefix, "done")


def pair_manifest(store: Store, pair, spec, earlier=()) -> None:
    """Written last: marks the pair's results complete, listing every file its stages
    wrote with its digest (from the stage markers, complete and verified by now), and
    each stage's content key and settings; earlier: the stages whose results an earlier
    run wrote (this one found them complete)."""
    files, stages = {}, {}
    for name, entry in stage_keys(spec, pair).items():
        files.update(store.read_json(layout.stage_marker(pair.out_dir, name))["files"])
        stages[name] = {**entry, "earlier_run": name in earlier}
    store.write_json(layout.manifest(pair.out_dir), {
        "pair": pair.pair.name, "layers": list(pair.layers),
        "base": pair.base.prefix, "finetuned": pair.finetuned.prefix, "stages": stages, "files": files})
