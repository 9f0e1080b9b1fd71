"""The job's stages, each declared once: its name, the tables it writes, whether the spec
enables it, the stages it comes after, the model actors it needs, and one run function
taking a StageRun. Adding a stage is one function and one entry in PAIR_STAGES.

A run function writes its tables through ctx.write_table and reads earlier stages'
through ctx.read_table (by their kinds, storage/tables.py; checked against the digests
their markers record, jobs/results.py); the executor writes
the stage's marker when it returns. A stage whose work failed raises: no marker, so the
rerun does it again.

Two kinds of work are not a pair's: an activation set's extraction and a model's
baseline generations (shared by every pair that uses the set or the model). They are
units of the same scheduler (jobs/scheduler.py) with their own functions here.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from jobs import analyses
from jobs.causal import causal_effect, needs_base
from jobs.agent_stage import agent_stage
from jobs.plan import ActivationSet, PairPlan, model_label
from jobs.results import PairResults
from jobs.scheduler import ModelKey
from jobs.spec import JobSpec, ModelSource
from jobs.steering import baseline_requests, baseline_rows, steer
from storage import layout
from storage.store import Store
from storage.tables import (AGENT, CAUSAL_EFFECT, DIFFERENCE, GENERATIONS, LOGIT_LENS, PATCHSCOPE, SIMILARITY,
                            STEERING, TableKind, decode_vectors, difference_safetensors, difference_table)

# A shard whose actor's node died is resubmitted: until Ray notices the death (its health
# checks take tens of seconds), calls fail fast as "temporarily unavailable".
SHARD_ATTEMPTS = 10
SHARDS_IN_FLIGHT = 2        # one in its forward, one encoding and writing
REDUCE_IN_FLIGHT = 4        # shards' partial sums read at once per pair (memory)

logger = logging.getLogger("adl.stages")


# -- the model actors a stage needs -------------------------------------------------------
_label = model_label


def actor_source(source):
    """The model an actor loads for a source: an adapter rides on its base's actors."""
    return ModelSource(source.model, source.revision) if isinstance(source, ModelSource) and source.adapter \
        else source


def _key(runtime: str, source) -> ModelKey:
    model = actor_source(source)
    return ModelKey(runtime, model, _label(model), getattr(source, "adapter", None))


def transformers(source: ModelSource) -> ModelKey:
    return _key("transformers", source)


def vllm(source: ModelSource) -> ModelKey:
    return _key("vllm", source)


def on_adapter(handle, adapter: str | None):
    """A model actor's handle seen through one of its adapters (None: the base itself):
    `view.method.remote(...)` calls `handle.for_adapter.remote(adapter, "method", ...)`,
    and the actor runs the method with that adapter active (workers/model_worker.py,
    workers/generation.py)."""
    class Method:
        def __init__(self, name):
            self.name = name

        def remote(self, *args, **kwargs):
            return handle.for_adapter.remote(adapter, self.name, *args, **kwargs)

    return type("OnAdapter", (), {"__getattr__": lambda self, name: Method(name)})()


def model_actor(actors: dict, runtime: str, source):
    """The handle a unit calls for `source` in a runtime, out of the actors it was given."""
    handle = actors[ModelKey(runtime, actor_source(source))]
    return on_adapter(handle, source.adapter) if runtime in ("transformers", "vllm") else handle


def embedder(spec: JobSpec) -> ModelKey:
    name = spec.analyses.embedding_model or analyses.PACKAGED_EMBEDDER
    return ModelKey("embedder", name, name)


def grader_reference(pair) -> ModelSource:
    """The offline grader's reference model: the finetuned model (for an adapter, its
    base): a model that never saw the finetuning domain finds all of its text improbable."""
    return ModelSource(pair.finetuned.model, pair.finetuned.revision)


def offline_grader(spec: JobSpec) -> bool:
    from workers.graders import is_offline
    return is_offline(spec.grader)


def _grader_needs(spec: JobSpec, pair: PairPlan) -> tuple[ModelKey, ...]:
    return (transformers(grader_reference(pair.pair)),) if offline_grader(spec) else ()


@dataclass
class StageRun:
    """What a stage's run function gets."""
    pair: PairPlan
    spec: JobSpec
    store: Store
    actors: dict[ModelKey, Any]          # the Ray actor handles of the stage's needs
    grader: Any = None                   # an LLM grader in the driver (LocalActor); None: offline
    baselines: dict = field(default_factory=dict)   # ModelSource -> baseline GenerationResults
    spend: Callable[[dict], None] | None = None     # a stage's LLM calls and tokens -> the status record
    keys: dict[str, str] | None = None              # this spec's stages' content keys (stage_keys)
    _results: PairResults | None = field(default=None, repr=False)

    def model(self, runtime: str, source: ModelSource):
        return model_actor(self.actors, runtime, source)

    def grader_handle(self):
        """The grader, called like an actor: the reference model's actor when offline."""
        return self.grader if self.grader is not None else \
            self.model("transformers", grader_reference(self.pair.pair))

    def path(self, name: str) -> str:
        return f"{self.pair.out_dir}/{name}"

    @property
    def results(self) -> PairResults:
        """The pair's folder as earlier stages of this spec left it: only what their
        markers record (under this spec's keys: not a stage's results under other
        settings), checked against those digests (storage.store.IntegrityError if it differs)."""
        if self._results is None:
            self._results = PairResults(self.store, self.pair.out_dir, recorded_only=True, stage_keys=self.keys)
        return self._results

    def read_table(self, kind: TableKind, columns: list[str] | None = None):
        """A table of this pair's folder that an earlier stage wrote (pyarrow)."""
        return self.results.arrow(kind, columns)

    def write_table(self, kind: TableKind, table) -> dict:
        return self.store.write_table(self.path(kind.file), kind, table)


class LocalActor:
    """A driver-side object called like a Ray actor handle: `handle.method.remote(...)`
    runs it in the calling thread and returns an ObjectRef of the result, so that stages
    treat an LLM grader in the driver and a model actor alike."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        import ray
        method = getattr(self._obj, name)
        return type("Method", (), {"remote": staticmethod(lambda *a, **k: ray.put(method(*a, **k)))})


@dataclass(frozen=True)
class Stage:
    name: str
    writes: tuple[str, ...]                          # in the pair's folder; complete when the stage's
                                                     # marker lists them all and they verify
    enabled: Callable[[JobSpec], bool]
    after: tuple[str, ...]                           # stages of the same pair it reads
    needs: Callable[[JobSpec, PairPlan], tuple[ModelKey, ...]]
    run: Callable[[StageRun], None]
    settings: tuple[str, ...] = ()                   # the parts of PairPlan.settings it depends on;
                                                     # with `after`'s keys, its content key


# -- reduce --------------------------------------------------------------------------------
def _shard_sums(store: Store, *args, **kwargs):
    """workers.reduce.shard_sums in a task, with the storage retries it needed."""
    from workers.reduce import shard_sums
    return shard_sums(store, *args, **kwargs), store.retries


def reduce_pair(ctx: StageRun) -> None:
    import ray
    from workers.reduce import finish
    pair, spec = ctx.pair, ctx.spec
    shards = pair.base.documents.num_shards
    # Every shard is checked against the digest its set's manifest records before it is read.
    listed = [ctx.store.read_json(layout.manifest(a.prefix)).get("files") or {} for a in (pair.base, pair.finetuned)]
    unlisted = [f"{a.prefix}/{layout.shard_name(i)}" for a, files in zip((pair.base, pair.finetuned), listed)
                for i in range(shards) if layout.shard_name(i) not in files]
    if unlisted:
        from storage.store import IntegrityError
        raise IntegrityError(f"{ctx.store.uri(unlisted[0])}: its set's manifest records no digest for it")
    logger.info(f"{pair.pair.name}: reducing {shards} shards")
    # No CPUs asked: model actors may hold every CPU of a small cluster, and these tasks
    # are short reads and sums that must never wait for them.
    remote = ray.remote(num_cpus=0)(_shard_sums)
    todo, futures, total = deque(range(shards)), [], None
    while todo or futures:   # merge as partial sums arrive, in any order
        while todo and len(futures) < REDUCE_IN_FLIGHT:
            i = todo.popleft()
            futures.append(remote.remote(ctx.store, pair.base.prefix, pair.finetuned.prefix, i,
                                         list(pair.layers), spec.method.tokens_per_document,
                                         spec.method.norm_skip_positions,
                                         tuple(files.get(layout.shard_name(i)) for files in listed)))
        ready, futures = ray.wait(futures, num_returns=1)
        part, retries = ray.get(ready[0])
        if retries:
            logger.info(f"{pair.pair.name}: a reduce task needed {retries} storage retries")
            ctx.store.counted(retries)
        total = part if total is None else total + part
    result = finish(total)
    meta = {"adl.pair": pair.pair.name, "adl.base": pair.base.prefix, "adl.finetuned": pair.finetuned.prefix}
    table = difference_table(list(pair.layers), result["num_documents"], result["delta"],
                             result["base_mean"], result["finetuned_mean"], result["finetuned_norm"], **meta)
    ctx.write_table(DIFFERENCE, table)
    tensors = {name: np.ascontiguousarray(result[name], dtype=np.float32)
               for name in ("delta", "base_mean", "finetuned_mean", "finetuned_norm")}
    tensors["layers"] = np.asarray(pair.layers, dtype=np.int64)
    ctx.store.write_bytes(ctx.path(layout.DIFFERENCE_SAFETENSORS),
                          difference_safetensors(tensors, {k.removeprefix("adl."): v for k, v in meta.items()}))


# -- the logit lens -------------------------------------------------------------------------
def logit_lens(ctx: StageRun) -> None:
    import ray
    from workers.lens import VARIANTS
    pair, spec = ctx.pair, ctx.spec
    table = ctx.read_table(DIFFERENCE)
    layers = table.column("layer").to_numpy()
    positions = table.column("position").to_numpy()
    vectors = {name: decode_vectors(table.column(name), "float64") for name in
               ("delta", "base_mean", "finetuned_mean")}
    vectors["neg_delta"] = vectors["delta"]   # negated after the norm, inside the lens
    rows = [(r, v) for r in range(table.num_rows) if positions[r] in spec.method.positions for v in VARIANTS]
    logger.info(f"{pair.pair.name}: logit lens on {len(rows)} vectors")
    batch = np.stack([vectors[v][r] for r, v in rows])
    lens = ctx.model("transformers", pair.pair.finetuned)
    ids, tokens, probs = ray.get(lens.lens_top_tokens.remote(pair.pair.base, batch, [v for _, v in rows],
                                                             spec.method.lens_top_k))
    out = {name: [] for name in ("layer", "position", "variant", "rank", "token_id", "token", "probability")}
    for (r, variant), row_ids, row_tokens, row_probs in zip(rows, ids, tokens, probs):
        for rank, (tid, tok, p) in enumerate(zip(row_ids, row_tokens, row_probs)):
            for name, value in zip(out, (int(layers[r]), int(positions[r]), variant, rank, int(tid), tok, float(p))):
                out[name].append(value)
    ctx.write_table(LOGIT_LENS, LOGIT_LENS.from_rows(out))


# -- generations ----------------------------------------------------------------------------
def baseline_sources(spec: JobSpec, pair: PairPlan) -> list[ModelSource]:
    return list(dict.fromkeys(getattr(pair.pair, role) for role in spec.generation.baseline_models))


def run_baselines(spec: JobSpec, source: ModelSource, engine) -> list:
    """A model's baseline samples: the same requests for every pair, so generated once."""
    import ray
    _, requests = baseline_requests(spec.generation, source)
    logger.info(f"{_label(source)}: baseline generations, {len(requests)} prompts x {spec.generation.samples} samples")
    return ray.get(engine.generate.remote(requests))


def generate(ctx: StageRun) -> None:
    pair, spec = ctx.pair, ctx.spec
    gen = spec.generation
    rows = [row for role in gen.baseline_models
            for row in baseline_rows(pair.pair.name, role, gen, ctx.baselines[getattr(pair.pair, role)],
                                     getattr(pair.pair, role))]
    difference = ctx.read_table(DIFFERENCE).to_pandas()
    engine = ctx.model("vllm", pair.pair.finetuned)
    # The offline grader scores on this engine (an adapter's without it: its base, the
    # reference): one model on the GPUs for the whole search, not two.
    steered = steer(pair.pair.name, spec, difference, engine,
                    ctx.grader if ctx.grader is not None else engine)
    ctx.write_table(GENERATIONS, GENERATIONS.from_rows(rows + steered.rows))
    ctx.write_table(STEERING, STEERING.from_rows(steered.steering))


# -- extraction (an activation set's unit) -------------------------------------------------
def extract(aset: ActivationSet, spec: JobSpec, store: Store, worker, on_shard=None,
            verified: dict | None = None) -> int:
    """Every shard of the set that is not present and verified through its model's actor,
    SHARDS_IN_FLIGHT at a time; then the set's manifest, with every shard's digest.
    verified: {shard index: digest} already checked in this run (jobs/integrity.py);
    None checks them here. Returns the shards extracted."""
    import ray
    from jobs.integrity import check_set, set_manifest
    docs = aset.documents
    if verified is None:
        check = check_set(store, aset)
        for index, why in sorted(check.problems.items()):
            if why:
                logger.info(f"{aset.name}: shard {index} {why}; extracting it again")
        verified = check.good
    digests = dict(verified)
    todo = deque(i for i in range(docs.num_shards) if i not in digests)
    if todo:
        logger.info(f"{aset.name}: extracting layers {list(aset.layers)} from {len(docs.doc_ids)} documents "
                    f"({len(todo)} of {docs.num_shards} shards to do)")
    pending, lost = {}, {}     # ObjectRef -> shard index; shard index -> calls lost with the actor
    finished, extracted = docs.num_shards - len(todo), 0

    def submit():
        if todo:
            index = todo.popleft()
            pending[worker.extract.remote(aset.prefix, list(aset.layers), spec.batch_size, index,
                                          *docs.shard(index))] = index

    for _ in range(SHARDS_IN_FLIGHT):
        submit()
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ready)
        try:
            marker = ray.get(ready)
        except ray.exceptions.ActorUnavailableError as e:
            # Its node died and Ray is restarting it elsewhere; the call may or may not
            # have run, and a shard's write is atomic, so the shard is simply done again.
            lost[index] = lost.get(index, 0) + 1
            if lost[index] > SHARD_ATTEMPTS:
                raise
            logger.info(f"{aset.name}: shard {index} lost with its actor ({type(e).__name__}), retrying")
            time.sleep(min(2.0 * lost[index], 10.0))   # until Ray restarts the actor
            todo.appendleft(index)
            submit()
            continue
        submit()
        finished += 1
        extracted += 1
        digests[marker["shard"]] = marker["digest"]
        if on_shard:
            on_shard(finished, marker)
        retries = marker.get("storage_retries", 0)
        if retries:
            store.counted(retries)
        logger.info(f"{aset.name}: shard {marker['shard']} done ({finished}/{docs.num_shards}, "
                    f"{marker['documents']} documents in {marker['seconds']:.1f} s"
                    + (f", {retries} storage retries" if retries else "") + ")")
    store.write_json(layout.manifest(aset.prefix), set_manifest(aset, digests))
    return extracted


# -- the declarations -------------------------------------------------------------------------
def _ft(runtime):
    return lambda spec, pair: (_key(runtime, pair.pair.finetuned),)


PAIR_STAGES: tuple[Stage, ...] = (   # in an order where a stage comes after what it reads
    Stage("reduce", (DIFFERENCE.file, layout.DIFFERENCE_SAFETENSORS), lambda spec: True, (),
          lambda spec, pair: (), reduce_pair, settings=("norm_skip_positions",)),
    Stage("logit_lens", (LOGIT_LENS.file,), lambda spec: True, ("reduce",),
          _ft("transformers"), logit_lens, settings=("positions", "lens_top_k")),
    Stage("generate", (GENERATIONS.file, STEERING.file), lambda spec: spec.generation.enabled, ("reduce",),
          _ft("vllm"), generate, settings=("positions", "generation", "seeding", "grader")),
    Stage("patchscope", (PATCHSCOPE.file,), lambda spec: spec.analyses.enabled, ("reduce",),
          lambda spec, pair: (transformers(pair.pair.finetuned), transformers(pair.pair.base))
          + _grader_needs(spec, pair), analyses.patchscope, settings=("positions", "patchscope", "grader")),
    Stage("token_relevance", (layout.TOKEN_RELEVANCE_JSON,), lambda spec: spec.analyses.enabled,
          ("logit_lens", "patchscope"), lambda spec, pair: (), analyses.token_relevance,
          settings=("token_relevance", "grader")),
    Stage("similarity", (SIMILARITY.file,),
          lambda spec: spec.analyses.enabled and spec.generation.enabled, ("generate",),
          lambda spec, pair: (embedder(spec),), analyses.similarity, settings=("similarity",)),
    Stage("agent", (AGENT.file,), lambda spec: spec.agent.enabled, ("logit_lens", "patchscope", "generate"),
          lambda spec, pair: (vllm(pair.pair.base), vllm(pair.pair.finetuned)), agent_stage,
          settings=("agent",)),
    Stage("causal_effect", (CAUSAL_EFFECT.file,), lambda spec: spec.causal_effect.enabled, ("reduce",),
          lambda spec, pair: (transformers(pair.pair.finetuned),)
          + ((transformers(pair.pair.base),) if needs_base(spec) else ()), causal_effect,
          settings=("positions", "causal_effect")),
)


def stage_keys(spec: JobSpec, pair: PairPlan) -> dict[str, dict]:
    """Each enabled stage's content key and what it is a hash of: the pair's two sets,
    the stage's own settings, and the keys of the enabled stages it reads (so a stage's
    key changes with anything upstream of it). {stage: {"key", "settings", "reads"}}."""
    out: dict[str, dict] = {}
    for stage in enabled_stages(spec):
        settings = {part: pair.settings[part] for part in stage.settings if part in pair.settings}
        reads = {name: out[name]["key"] for name in stage.after if name in out}
        key = layout.content_key({"stage": stage.name, "base": pair.base.prefix,
                                  "finetuned": pair.finetuned.prefix, "settings": settings, "reads": reads})
        out[stage.name] = {"key": key, "settings": settings, "reads": reads}
    return out


def enabled_stages(spec: JobSpec) -> tuple[Stage, ...]:
    return tuple(s for s in PAIR_STAGES if s.enabled(spec))

