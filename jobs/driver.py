"""Runs a plan on Ray: extract every activation set not yet complete, reduce every pair
not yet reduced, read it through the logit lens, generate (baseline and steered) and run
the analyses (patchscope, token relevance, embedding evaluation) when the spec asks, and
record the run.

Ray is the executor: stages are plain functions over shards, a shard's marker is its
completion record, and a rerun skips whatever is complete.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from jobs import analyses
from jobs.grading import GraderPool
from jobs.plan import ActivationSet, Plan, PairPlan, make_plan, s3_options
from jobs.spec import JobSpec
from jobs.steering import GenerationStage
from storage import layout
from storage.store import Store
from storage.tables import (TABLE_PARQUET_OPTIONS, difference_table, generations_table,
                            logit_lens_table, steering_table)

SHARDS_IN_FLIGHT_PER_WORKER = 2   # one in its forward, one encoding and writing


@dataclass
class RunStats:
    model_loads: int = 0
    shards_extracted: int = 0
    pairs_reduced: int = 0
    gpu_ids: list = field(default_factory=list)


def log(message: str) -> None:
    print(f"[adl {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_ray(spec: JobSpec) -> None:
    """Joins compute.ray_address (or $RAY_ADDRESS); otherwise starts a private local Ray."""
    import ray
    if ray.is_initialized():
        return
    address = spec.compute.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # nobody else can reach it
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def run_job(spec: JobSpec, stats: RunStats | None = None) -> str:
    """Runs the job; returns the run record's key under the storage root."""
    stats = stats or RunStats()
    store = Store(spec.storage.root, spec.storage.endpoint_url, spec.storage.region)
    store.check()
    plan = make_plan(spec)   # every input error surfaces here, before any write
    pending = [p for p in plan.pairs if not store.exists(layout.manifest(p.out_dir))]
    pending_dirs = {p.out_dir for p in pending}
    generation = None
    actor = lambda cls, **kw: _actor(cls, spec, **kw)
    graders = GraderPool(spec, actor)
    if spec.generation.enabled and pending:
        # Baselines need no difference: their engines start and work alongside extraction.
        ensure_ray(spec)
        generation = GenerationStage(spec, pending, actor, log, graders)
        generation.start()
    try:
        for aset in plan.sets:
            extract(aset, spec, store, stats)
        for pair in plan.pairs:
            if pair.out_dir not in pending_dirs:
                log(f"{pair.pair.name}: results complete, skipped ({store.uri(pair.out_dir)})")
                continue
            run_pair(pair, spec, store, stats, generation, graders)
    finally:
        stats.model_loads += len(graders.handles)
        if generation:
            stats.model_loads += len(generation.engines)
            generation.close()
        graders.close()
    return write_run_record(plan, store)


def run_pair(pair: PairPlan, spec: JobSpec, store: Store, stats: RunStats,
             generation: GenerationStage | None, graders: GraderPool) -> None:
    """A pair's stages, in order, once both activation sets are complete; the manifest,
    written last, marks the pair's results complete."""
    reduce_pair(pair, spec, store)
    logit_lens(pair, spec, store, stats)
    if generation:
        generate(pair, generation, store)
    if spec.analyses.enabled:
        actor = lambda cls, **kw: _actor(cls, spec, **kw)
        analyses.patchscope(pair, spec, store, stats, graders.get(pair), actor, log)
        analyses.token_relevance(pair, spec, store, graders.get(pair), log)
        if generation:   # the embedding evaluation compares generations
            analyses.similarity(pair, spec, store, stats, actor, log)
    store.write_json(layout.manifest(pair.out_dir), {
        "pair": pair.pair.name, "layers": list(pair.layers),
        "base": pair.base.prefix, "finetuned": pair.finetuned.prefix})
    stats.pairs_reduced += 1


def _actor(cls, spec: JobSpec, gpus: int = 1, **options):
    """Ray options of a model actor: pinned to gpus x compute.gpus_per_worker GPUs."""
    import ray
    return ray.remote(cls).options(num_gpus=spec.compute.gpus_per_worker * gpus,
                                   num_cpus=spec.compute.cpus_per_worker,
                                   max_restarts=3, max_task_retries=3, **options)


def extract(aset: ActivationSet, spec: JobSpec, store: Store, stats: RunStats) -> None:
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
        worker = _actor(ExtractionWorker, spec, max_concurrency=SHARDS_IN_FLIGHT_PER_WORKER)
        actors = [worker.remote(aset.source, dtype=spec.dtype, layers=list(aset.layers),
                                batch_size=spec.batch_size, store=store, set_prefix=aset.prefix,
                                s3=s3_options(spec), trust_remote_code=spec.trust_remote_code)
                  for _ in range(min(spec.compute.num_workers, len(todo)))]
        stats.model_loads += len(actors)
        pending = {}

        def submit(actor):
            if todo:
                index = todo.popleft()
                pending[actor.extract.remote(index, *docs.shard(index))] = actor

        for actor in actors:
            for _ in range(SHARDS_IN_FLIGHT_PER_WORKER):
                submit(actor)
        finished, total = docs.num_shards - len(todo) - len(pending), docs.num_shards
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            marker = ray.get(ready)
            submit(pending.pop(ready))
            finished += 1
            stats.shards_extracted += 1
            stats.gpu_ids.extend(marker["gpu_ids"])
            log(f"{aset.name}: shard {marker['shard']} done ({finished}/{total}, "
                f"{marker['documents']} documents in {marker['seconds']:.1f} s)")
        for actor in actors:
            ray.kill(actor)
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
    lens = _actor(LensWorker, spec).remote(pair.pair.finetuned, pair.pair.base, dtype=spec.dtype,
                                           s3=s3_options(spec), trust_remote_code=spec.trust_remote_code)
    stats.model_loads += 1
    batch = np.stack([vectors[v][r] for r, v in rows])
    ids, tokens, probs = ray.get(lens.top_tokens.remote(batch, [v for _, v in rows], spec.method.lens_top_k))
    ray.kill(lens)
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

