"""The model-centric executor: the scheduler (jobs/scheduler.py) on simulated actors and
on a real local Ray, and the one home of model loading (workers/models.py)."""
from __future__ import annotations

import heapq
import random

import pytest

from storage.store import StorageOptions

from jobs.scheduler import ModelKey, NodeResources, Request, Scheduler, SchedulingError, Unit
from jobs.simulation import SimulatedBackend
from workers.demo_pair import DEMO_VERSION

DEMO = f"demo-{DEMO_VERSION}-seed0"   # the demo pair's folder, which labels its models


class Watched(SimulatedBackend):
    """A simulated backend that checks, at every start, what the scheduler promised."""

    def __init__(self, nodes, load_s=lambda k: 1.0, work_s=lambda u, a: 1.0):
        super().__init__(nodes, load_s, work_s)
        self.alive, self.started, self.peak = set(), [], 0

    def create(self, key, slot):
        assert key not in self.alive, f"two actors of {key}"
        self.alive.add(key)
        self.peak = max(self.peak, len(self.alive))
        return super().create(key, slot)

    def release(self, key, handle, lost=False):
        self.alive.discard(key)
        super().release(key, handle, lost)

    def start(self, unit, actors):
        assert all(d.state == "done" for d in unit.deps), f"{unit.name} started before its dependencies"
        assert set(actors) == set(unit.needs) and set(actors) <= self.alive, unit.name
        self.started.append(unit.name)
        super().start(unit, actors)


def random_job(rng: random.Random, pairs: int, bases: int):
    """Units shaped like a job's: extractions, then per pair stages needing 0-3 actors of
    its own models, a shared base's and a shared embedder's."""
    units = []
    embedder = ModelKey("embedder", "e")
    extracted = {}
    for p in range(pairs):
        base, ft = f"base{p % bases}", f"ft{p}"
        tf = {m: ModelKey("transformers", m) for m in (base, ft)}
        for m in (base, ft):
            if m not in extracted:
                extracted[m] = Unit(f"extract {m}", "extract", (tf[m],), group=p)
                units.append(extracted[m])
        reduce = Unit(f"reduce {p}", "reduce", (), [extracted[base], extracted[ft]], group=p)
        lens = Unit(f"lens {p}", "lens", (tf[ft],), [reduce], group=p)
        scope = Unit(f"patchscope {p}", "patchscope", (tf[ft], tf[base]), [reduce], group=p)
        gen = Unit(f"generate {p}", "generate", (ModelKey("vllm", ft), tf[ft]), [reduce], group=p)
        sim = Unit(f"similarity {p}", "similarity", (embedder,), [gen], group=p)
        units += [reduce, lens, scope, gen, sim]
    return units


@pytest.mark.parametrize("seed", range(6))
def test_any_job_finishes_within_the_cluster_and_loads_once_per_use(seed):
    rng = random.Random(seed)
    pairs, bases = rng.randint(1, 30), rng.randint(1, 5)
    slots = rng.randint(2, 6)
    units = random_job(rng, pairs, bases)
    backend = Watched([NodeResources("node", slots * 0.5, 0)],
                      load_s=lambda k: rng.uniform(1, 5), work_s=lambda u, a: rng.uniform(0.1, 3))
    scheduler = Scheduler(units, lambda key: Request(cpus=0.5, gpus=0), backend)
    scheduler.run()
    assert all(u.state == "done" for u in units)
    assert backend.peak <= slots and scheduler.max_alive == backend.peak
    assert sorted(backend.started) == sorted(u.name for u in units)
    distinct = {k for u in units for k in u.needs}
    assert set(scheduler.loads) == distinct
    assert sum(scheduler.loads.values()) == len(distinct) + len(scheduler.reloads)   # every reload counted
    assert all("released" in why or "no work" in why for _, why in scheduler.reloads)


def test_many_pairs_on_two_slots_share_the_base_and_fail_nothing():
    """The issue's hang: graders and engines held every slot. Here 12 pairs over one base
    and 2 actor slots finish; the base's actor is loaded once while its pairs' work runs."""
    units = random_job(random.Random(0), 12, 1)
    backend = Watched([NodeResources("node", 2.0, 0)])
    scheduler = Scheduler(units, lambda key: Request(cpus=1, gpus=0), backend)
    scheduler.run()
    assert all(u.state == "done" for u in units) and backend.peak == 2


def test_a_simulated_unit_with_a_call_per_actor_holds_each_actor_for_its_own_call_only():
    """Two units sharing actor B, each with a 10 s call on its own actor and a 1 s call
    on B (patchscope's shape): B serves both in turn, so both end at 11 s (load 1 s +
    10 s); holding every actor for the whole unit would end the second at 21 s."""
    a, b, c = (ModelKey("transformers", m) for m in "abc")
    units = [Unit("one", "patchscope", (a, b)), Unit("two", "patchscope", (c, b))]
    calls = {"one": {a: 10.0, b: 1.0}, "two": {c: 10.0, b: 1.0}}
    ended = {}
    backend = Watched([NodeResources("node", 3.0, 0)], work_s=lambda u, actors: calls[u.name])
    scheduler = Scheduler(units, lambda key: Request(cpus=1, gpus=0), backend,
                          on_change=lambda u: ended.setdefault(u.name, backend.now) if u.state == "done" else None)
    scheduler.run()
    assert ended == {"one": 11.0, "two": 11.0}
    assert backend.actors[-1].busy_until == 11.0 and [x.busy_until for x in backend.actors if x.key == b] == [3.0]


def test_gpu_actors_pack_by_fraction_and_whole_gpus():
    big, small = ModelKey("vllm", "big"), ModelKey("transformers", "small")
    requests = {big: Request(1, 2.0), small: Request(1, 0.25)}
    units = [Unit(f"u{i}", "x", (small,)) for i in range(3)] + [Unit("g", "x", (big,))]
    backend = Watched([NodeResources("a", 16, 1), NodeResources("b", 16, 2)])
    scheduler = Scheduler(units, requests.__getitem__, backend)
    scheduler.run()
    slots = {a.key: a.slot for a in backend.actors}
    assert slots[big].node_id == "b" and slots[big].gpus == (0, 1)   # the only node with 2 free GPUs
    assert slots[small].node_id == "a" and slots[small].gpus == (0,)


def test_work_that_can_never_fit_is_a_one_line_error():
    a, b = ModelKey("transformers", "a", "org/a"), ModelKey("transformers", "b", "org/b")
    units = [Unit("patchscope p", "patchscope", (a, b))]
    scheduler = Scheduler(units, lambda key: Request(cpus=0, gpus=1.0), Watched([NodeResources("n", 8, 1)]))
    with pytest.raises(SchedulingError) as e:
        scheduler.run()
    assert str(e.value) == (
        "compute: patchscope p needs 2 model actor(s) at once (org/a (transformers), org/b (transformers)), "
        "more than the cluster holds (1 node(s), 8 CPUs, 1 GPUs); give actors less (compute.cpus_per_worker, "
        "compute.gpus_per_worker, or compute.gpu_memory_gb so that models share a GPU)")


def test_a_failed_unit_fails_what_depends_on_it_and_frees_its_actors():
    a = ModelKey("transformers", "a")
    first = Unit("extract a", "extract", (a,))
    after = Unit("lens a", "lens", (a,), [first])
    other = Unit("other", "x", (ModelKey("transformers", "b"),))

    class Failing(Watched):
        def wait(self):
            return [(u, "boom" if u is first else None) for u, _ in super().wait()]

    backend = Failing([NodeResources("n", 1, 0)])
    Scheduler([first, after, other], lambda key: Request(1, 0), backend).run()
    assert (first.state, after.state, after.error, other.state) == ("failed", "failed", "boom", "done")
    assert backend.alive == set()


def test_work_on_an_actor_lost_with_its_node_runs_again_on_a_new_one():
    """The node of the finetuned model's actor leaves mid-extraction: that actor is ended
    (not left for Ray to restart outside the scheduler's accounting), its extraction runs
    again on a new actor on the node that is left, and the pair finishes."""
    base, ft = ModelKey("transformers", "base"), ModelKey("transformers", "ft")
    extract_base = Unit("extract base", "extract", (base,), group=0)
    extract_ft = Unit("extract ft", "extract", (ft,), group=0)
    reduce = Unit("reduce", "reduce", (), [extract_base, extract_ft], group=0)
    lens = Unit("lens", "lens", (ft,), [reduce], group=0)

    class NodeLeaves(Watched):
        leaves_at, failed = 0.5, {}

        def nodes(self):
            return [n for n in self._nodes if n.node_id != "b" or self.now < self.leaves_at]

        def release(self, key, handle, lost=False):
            if lost:   # its calls fail: the units running on it end now, with Ray's error
                for event in [e for e in self._events if e[2].name in handle.units]:
                    self._events.remove(event)
                    self.failed[event[2]] = "ActorDiedError: the actor died unexpectedly"
                    self._events.append((self.now, event[1], event[2]))
                heapq.heapify(self._events)
            super().release(key, handle, lost)

        def wait(self):
            if self.now < self.leaves_at and self._events and self._events[0][0] > self.leaves_at:
                self.now = self.leaves_at   # the node leaves before the next unit ends
                return []
            return [(u, self.failed.pop(u, None)) for u, _ in super().wait()]

    backend = NodeLeaves([NodeResources("a", 1, 0), NodeResources("b", 1, 0)])
    scheduler = Scheduler([extract_base, extract_ft, reduce, lens], lambda key: Request(1, 0), backend)
    scheduler.run()
    assert [u.state for u in (extract_base, extract_ft, reduce, lens)] == ["done"] * 4
    assert backend.started.count("extract ft") == 2 and extract_ft.attempts == 2
    assert ("lost", str(ft), "b") in scheduler.decisions
    assert scheduler.reloads == [(ft, "lost with its node")]
    assert {a.slot.node_id for a in backend.actors if a.key == ft} == {"a", "b"}


# -- the same decisions, simulated and real ------------------------------------------------
def test_the_simulation_runs_the_schedulers_decisions_on_a_real_ray(ray_cluster, make_spec, demo_pair,
                                                                      lora_adapter, tmp_path):
    """Two pairs sharing a base, one an adapter, on two actor slots: the real job's
    scheduler and the same code on simulated actors create the same actors for the same
    work (the adapter on its base's), and hold as many at once."""
    from jobs.driver import RunStats, job_units, run_job
    from jobs.executor import ActorRequests
    from jobs.plan import make_plan
    from jobs.spec import parse_spec
    from storage.store import Store
    raw = make_spec(tmp_path / "real", compute={"cpus_per_worker": 1})
    raw["pairs"].append({"name": "lora", "base": str(demo_pair.base_dir), "finetuned": {"adapter": str(lora_adapter)}})
    spec = parse_spec(raw)
    plan = make_plan(spec)
    units, _ = job_units(spec, list(plan.pairs), Store(str(tmp_path / "empty")))
    simulated = Watched([NodeResources("node", 2.0, 0)])   # what ray_cluster offers: 2 CPUs
    sim = Scheduler(units, ActorRequests(plan), simulated)
    sim.run()
    stats = RunStats()
    run_job(spec, stats)

    creates = lambda decisions: [d for d in decisions if d[0] == "create"]
    assert creates(stats.decisions) == creates(sim.decisions) == [
        ("create", f"{DEMO}/base (transformers)", f"extract {DEMO}/base"),
        ("create", f"{DEMO}/finetuned (transformers)", f"extract {DEMO}/finetuned")]
    adapters = lambda decisions: [d for d in decisions if d[0] == "adapter"]
    assert adapters(stats.decisions) == adapters(sim.decisions) == [
        ("adapter", f"{DEMO}/base (transformers)", str(lora_adapter), f"extract {lora_adapter.parent.name}/adapter")]
    assert stats.max_alive == sim.max_alive == 2
    started = lambda decisions: sorted(d[1] for d in decisions if d[0] == "start")
    assert started(stats.decisions) == started(sim.decisions)


# -- one home for loading --------------------------------------------------------------------
def test_every_runtime_loads_the_pinned_revision(demo_pair, lora_adapter, monkeypatch):
    """A stand-in records what the real loaders receive: transformers (with PEFT on top),
    the tokenizer and vLLM all get the source's revision and trust_remote_code."""
    import transformers
    import peft
    from jobs.spec import ModelSource
    from workers.models import engine_arguments, load_model, load_tokenizer

    seen = []

    def recorder(name, real):
        def record(*args, **kwargs):
            seen.append((name, kwargs.get("revision"), kwargs.get("trust_remote_code")))
            kwargs.pop("revision", None)
            return real(*args, **kwargs)
        return record

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        recorder("model", transformers.AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        recorder("tokenizer", transformers.AutoTokenizer.from_pretrained))
    source = ModelSource(str(demo_pair.base_dir), revision="0123abcd", adapter=str(lora_adapter))
    model = load_model(source, dtype="float32", storage=StorageOptions(), trust_remote_code=True)
    assert isinstance(model, peft.PeftModel)
    load_tokenizer(source, {}, trust_remote_code=True)
    assert seen == [("model", "0123abcd", True), ("tokenizer", "0123abcd", True)]

    import vllm
    from workers import generation

    class Stop(Exception):
        pass

    def fake_llm(**kwargs):
        seen.append(("vllm", kwargs.get("revision"), kwargs.get("trust_remote_code"),
                     kwargs.get("tokenizer_revision"), kwargs.get("model")))
        raise Stop
    monkeypatch.setattr(vllm, "LLM", fake_llm)
    args = engine_arguments(source, {}, trust_remote_code=True)
    assert args["lora_adapter"] == str(lora_adapter) and args["revision"] == "0123abcd"
    with pytest.raises(Stop):
        generation.GenerationEngine(dtype="float32", **args)
    assert seen[-2] == ("tokenizer", "0123abcd", True)
    assert seen[-1] == ("vllm", "0123abcd", True, "0123abcd", str(demo_pair.base_dir))


def test_the_scheduler_benchmark_runs_the_drivers_units():
    """benchmarks/bench_scheduler.py on its crowded case (40 pairs of 32B models on 8 GPUs):
    the driver's units on the real scheduler finish, each model loading once. Kept here so
    that a change to the driver's units cannot leave the benchmark broken unseen."""
    import subprocess
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import bench_scheduler
    finally:
        sys.path.pop(0)
    r = bench_scheduler.simulate("crowded", 8, 80.0, False)
    assert r["pairs"] == 40 and r["loads"] == r["distinct"] == 101 and r["reloads"] == 0
    assert 0 < r["util"] <= r["bound_util"] <= 1 and r["total"] >= r["bound"]
    # And as the script it is (its own imports: a module of benchmarks/ once shadowed common/).
    script = Path(bench_scheduler.__file__)
    run = subprocess.run([sys.executable, str(script), "--case", "crowded"], capture_output=True, text=True,
                         cwd=script.parent.parent, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "crowded: 40 pairs over 50 models" in run.stdout and "loads 101 for 101" in run.stdout, run.stdout



def test_an_actors_warnings_reach_the_drivers_log(ray_cluster, caplog):
    """Ray runs with log_to_driver=False: an actor's warnings come back through its
    placement report, once each, in the driver's `adl` log (and so the attempt's)."""
    import logging
    import ray
    from jobs.executor import _tracked_class
    from jobs.status import ActorLedger

    class Noisy:   # defined here: pickled by value, the workers cannot import tests
        """A model actor's stand-in that warns while it loads and while it works, through
        the loggers a model runtime uses."""

        def __init__(self):
            import logging
            import warnings
            logging.getLogger("transformers").propagate = False
            logging.getLogger("transformers").warning("loading: some weights were not initialized")
            warnings.warn("a deprecated argument", FutureWarning)
            logging.getLogger("adl.workers").info("an INFO line stays on the node")

        def work(self):
            import logging
            logging.getLogger("vllm").propagate = False
            logging.getLogger("vllm").warning("max_model_len is larger than\nthe model's: clipped")
            return 1

    ledger = ActorLedger()
    handle = ray.remote(_tracked_class(Noisy)).options(num_cpus=0).remote()
    with caplog.at_level(logging.INFO, logger="adl"):
        ledger.started(handle, "transformers", "noisy-model", 0.0)
        assert ray.get(handle.work.remote()) == 1
        ledger.snapshot()
        ledger.ended(handle)
        ledger.snapshot()
    ray.kill(handle)
    lines = [r.getMessage() for r in caplog.records if r.name == "adl.status" and r.levelno == logging.WARNING]
    assert lines[0] == "actor noisy-model (transformers): warning: loading: some weights were not initialized"
    assert lines[1].startswith("actor noisy-model (transformers): warning: ") and "a deprecated argument" in lines[1]
    assert lines[2:] == ["actor noisy-model (transformers): warning: max_model_len is larger than"]
    assert not any("INFO line" in r.getMessage() for r in caplog.records)
    assert "warnings" not in ledger.entries[0]
