"""Which model actors are alive, and which work runs on them: the job's scheduler.

Work comes as units (an activation set's extraction, a model's baseline generations, one
stage of one pair), each needing a few model actors (a ModelKey: a model in a runtime)
and depending on other units. The scheduler is model-centric and never holds and waits:

- A unit starts only when every actor it needs is alive or can be created now; it then
  shares those actors with every other running unit that needs them (an actor queues its
  calls). A unit never holds an actor while waiting for another.
- The actors alive at once are bounded by the cluster: each takes its Ray request (GPUs by
  placement, `compute.cpus_per_worker` CPUs) out of one node's free resources, packed
  first-fit per node and per GPU; with neither GPUs nor CPUs requested, one CPU is counted.
- Units come in plan order: pairs grouped by base (the base shared by the most pairs
  first), each pair's activation sets, then its stages. Ready units start in that order,
  each as soon as its actors fit, so free room always goes to the earliest work that fits
  and later work fills what is left.
- An idle actor that no unfinished unit needs is released at once. An idle actor that
  later units need stays loaded, until a ready unit needs its room: a unit may only push
  out actors whose next use comes later in plan order than itself, the one needed latest
  first. So the work of the first pairs is never slowed by later pairs, a base shared by
  many pairs stays loaded while its pairs' work runs, and the earliest waiting unit can
  always start once what runs has ended: nothing waits for ever.
- A load of a model that was released before is a reload: counted and logged with why.
- An actor whose node left the cluster is lost: the backend ends it, and each unit that
  was using it runs again (up to UNIT_ATTEMPTS times) once a new actor fits; every
  unit's writes are atomic and pure, so a second run gives what the first would have.

- On a cluster that grows (its backend names the node types its autoscaler can add), work
  must fit the cluster as it can grow; the backend is asked for room for every actor the
  unfinished work needs (less as work ends, nothing at the end), and when nothing runs
  and the earliest ready unit fits only nodes yet to come, the scheduler waits for them
  up to node_wait_s, then fails the job in one line naming what never came.

It knows nothing of Ray, models or storage: a Backend creates and releases actors and
runs units. jobs/executor.py is the real one (Ray actors, a thread per unit); the
simulation (jobs/simulation.py, benchmarks/bench_scheduler.py) runs this same code with
simulated actors and times.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

EPS = 1e-9
UNIT_ATTEMPTS = 3   # runs of a unit whose actor was lost with its node

logger = logging.getLogger("adl.scheduler")


@dataclass(frozen=True)
class ModelKey:
    """A model in one runtime: 'transformers' (extraction, lens, patchscope, offline
    grading), 'vllm' (generation) or 'embedder'.

    adapter: the LoRA adapter a unit uses on the model's actor (None: the model itself).
    It is not part of the key: an adapter rides on its base's actor, so every adapter of
    a base and the base share one actor per runtime. Its first use on an actor is an
    adapter load, counted apart from model loads."""
    runtime: str
    source: Any          # a jobs.spec.ModelSource (or the simulation's model); for an adapter, its base
    label: str = field(default="", compare=False)
    adapter: Any = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.label or self.source} ({self.runtime})"


@dataclass(frozen=True)
class Request:
    """An actor's resources: Ray's request, and where on a node it goes."""
    cpus: float
    gpus: float          # fraction of one GPU (< 1) or a whole number of GPUs

    @property
    def counted_cpus(self) -> float:
        return self.cpus if (self.cpus or self.gpus) else 1.0


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    cpus: float
    gpus: int


@dataclass(eq=False)
class Unit:
    name: str
    kind: str                    # "extract", "baselines", or a pair stage's name
    needs: tuple[ModelKey, ...]
    deps: list["Unit"] = field(default_factory=list)
    subject: Any = None          # the activation set, model source or pair plan it works on
    pair: str | None = None
    group: Any = None            # units of one group (a pair's) are consecutive in plan order
    group_key: Any = None        # the scheduler's: group, or the unit alone
    state: str = "waiting"       # waiting, running, done, failed
    error: str | None = None
    attempts: int = 0            # runs started
    lost_actor: bool = False     # an actor of its current run was lost with its node


@dataclass(frozen=True)
class Slot:
    node_id: str
    gpus: tuple[int, ...]
    request: Request


class Cluster:
    """Free resources per node and per GPU; first fit."""

    def __init__(self, nodes: list[NodeResources] = ()):
        self.nodes: dict[str, dict] = {}
        self.update(nodes)

    def update(self, nodes: list[NodeResources]) -> None:
        """Nodes that joined get their full resources; nodes gone are dropped."""
        alive = {n.node_id for n in nodes}
        for node_id in list(self.nodes):
            if node_id not in alive:
                del self.nodes[node_id]
        for n in nodes:
            if n.node_id not in self.nodes:
                self.nodes[n.node_id] = {"cpus": float(n.cpus), "gpus": [1.0] * int(n.gpus)}

    def copy(self) -> "Cluster":
        c = Cluster()
        c.nodes = {k: {"cpus": v["cpus"], "gpus": list(v["gpus"])} for k, v in self.nodes.items()}
        return c

    def take(self, request: Request) -> Slot | None:
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            if node["cpus"] + EPS < request.counted_cpus:
                continue
            gpus = self._gpus(node["gpus"], request.gpus)
            if gpus is None:
                continue
            node["cpus"] -= request.counted_cpus
            for g in gpus:
                node["gpus"][g] -= request.gpus if request.gpus < 1 else 1.0
            return Slot(node_id, tuple(gpus), request)
        return None

    @staticmethod
    def _gpus(free: list[float], amount: float) -> list[int] | None:
        if amount <= 0:
            return []
        if amount < 1:
            return next(([i] for i, f in enumerate(free) if f + EPS >= amount), None)
        whole = [i for i, f in enumerate(free) if f > 1 - EPS]
        return whole[:int(round(amount))] if len(whole) >= round(amount) else None

    def give(self, slot: Slot) -> None:
        node = self.nodes.get(slot.node_id)
        if node is None:        # the node is gone, and its resources with it
            return
        node["cpus"] += slot.request.counted_cpus
        for g in slot.gpus:
            node["gpus"][g] = min(1.0, node["gpus"][g] + (slot.request.gpus if slot.request.gpus < 1 else 1.0))


@dataclass(eq=False)
class LiveActor:
    key: ModelKey
    handle: Any
    slot: Slot
    users: set = field(default_factory=set)    # running units that use it
    last_used: int = 0
    adapters: set = field(default_factory=set)  # adapters loaded on it so far


class Backend(Protocol):
    def nodes(self) -> list[NodeResources]: ...
    def create(self, key: ModelKey, slot: Slot) -> Any: ...
    def release(self, key: ModelKey, handle: Any, lost: bool = False) -> None:
        """lost: its node left the cluster (end it before asking it anything)."""
    def start(self, unit: Unit, actors: dict[ModelKey, Any]) -> None: ...
    def wait(self) -> list[tuple[Unit, str | None]]:
        """Units that ended since the last call, with their error (None: done); may
        return nothing (a timeout), and then the scheduler looks again."""
    # Optional, for a cluster that grows (jobs/autoscale.py):
    # def node_types(self) -> list | None: node types it can add (.template(i) -> NodeResources,
    #                                         .max_count), None for a fixed cluster
    # def want(self, requests: list[Request]) -> None: room for these actors, asked of the cluster


class SchedulingError(RuntimeError):
    """Work that can never run on this cluster, as one line."""


class Scheduler:
    def __init__(self, units: list[Unit], request_of: Callable[[ModelKey], Request], backend: Backend,
                 on_change: Callable[[Unit], None] = lambda u: None, node_wait_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.units = list(units)
        self.request_of, self.backend, self.on_change = request_of, backend, on_change
        self.cluster = Cluster(backend.nodes())
        # A cluster that grows: the nodes it can add, and how long to wait for one.
        types = getattr(backend, "node_types", lambda: None)()
        self.growth = [t.template(i) for t in types or () for i in range(t.max_count)]
        self.node_wait_s, self._now = node_wait_s, clock
        self._waiting_since: float | None = None
        self._wanted: list | None = None
        self.live: dict[ModelKey, LiveActor] = {}
        self.loads: Counter = Counter()          # ModelKey -> loads
        self.adapter_loads: Counter = Counter()  # (ModelKey, adapter) -> loads onto its base's actor
        self.reloads: list[tuple[ModelKey, str]] = []
        self.released: set[ModelKey] = set()
        self.decisions: list[tuple] = []         # ("create", key, unit) / ("release", key, why) / ("start", unit)
                                                 # / ("lost", key, node)
        self.max_alive = 0
        self._clock = 0
        self._order = {id(u): i for i, u in enumerate(self.units)}
        # A group is a pair's units (with the extractions and baselines made for it):
        # consecutive in plan order. Its end is the order of its last unit.
        self._members: dict = {}
        for i, u in enumerate(self.units):
            u.group_key = u.group if u.group is not None else ("unit", i)
            self._members.setdefault(u.group_key, []).append(u)
        self._group_end = {id(u): max(self._order[id(v)] for v in self._members[u.group_key]) for u in self.units}
        self._release_reason: dict[ModelKey, str] = {}

    # -- what is left ------------------------------------------------------------------
    def demand(self, key: ModelKey) -> int:
        """Unfinished units that need the actor."""
        return sum(1 for u in self.units if u.state in ("waiting", "running") and key in u.needs)

    def next_use(self, key: ModelKey) -> float:
        """The plan position of the first unfinished unit that needs the actor."""
        return min((self._order[id(u)] for u in self.units if u.state in ("waiting", "running")
                    and key in u.needs), default=float("inf"))

    def _ready(self) -> list[Unit]:
        return [u for u in self.units if u.state == "waiting" and all(d.state == "done" for d in u.deps)]

    def _fail_orphans(self) -> None:
        """Units whose dependency failed fail with its error (they can never run)."""
        changed = True
        while changed:
            changed = False
            for u in self.units:
                if u.state == "waiting":
                    failed = next((d for d in u.deps if d.state == "failed"), None)
                    if failed is not None:
                        u.state, u.error = "failed", failed.error
                        self.on_change(u)
                        changed = True

    # -- decisions ---------------------------------------------------------------------
    def _release(self, key: ModelKey, why: str) -> None:
        actor = self.live.pop(key)
        self.cluster.give(actor.slot)
        self.released.add(key)
        self._release_reason[key] = why
        self.decisions.append(("release", str(key), why))
        self.backend.release(key, actor.handle)

    def _lose_actors_of_dead_nodes(self) -> None:
        """Actors packed on a node that left: ended, and their running units marked to run
        again (their calls fail once the actor is ended, and Ray must not bring it back
        outside this scheduler's accounting)."""
        self.cluster.update(self.backend.nodes())
        for key in sorted(self.live, key=str):
            actor = self.live[key]
            if actor.slot.node_id in self.cluster.nodes:
                continue
            del self.live[key]
            self.released.add(key)
            self._release_reason[key] = "lost with its node"
            self.decisions.append(("lost", str(key), actor.slot.node_id))
            logger.info(f"{key}: its node {actor.slot.node_id[:12]} left the cluster; "
                        + (f"running {', '.join(sorted(u.name for u in actor.users))} again on a new actor"
                           if actor.users else "it will be loaded again where it is needed"))
            for unit in actor.users:
                unit.lost_actor = True
            self.backend.release(key, actor.handle, lost=True)

    def _release_unneeded(self) -> None:
        for key in sorted(self.live, key=str):
            actor = self.live[key]
            if not actor.users and self.demand(key) == 0:
                self._release(key, "no work left for it")

    def _place(self, unit: Unit, relaxed: bool = False) -> bool:
        """Starts the unit if its missing actors fit, releasing idle actors that only later
        work needs (only when that makes them fit). relaxed: any idle actor may go."""
        missing = [k for k in dict.fromkeys(unit.needs) if k not in self.live]
        if not relaxed and not self._admissible(unit):
            return False
        trial = self.cluster.copy()
        victims: list[LiveActor] = []
        # Only actors that later work alone needs make room (later than the unit's whole
        # group: its pair's extractions and stages), the one needed latest first.
        rank = -1 if relaxed else self._group_end[id(unit)]
        idle = sorted((a for a in self.live.values() if not a.users and a.key not in unit.needs
                       and self.next_use(a.key) > rank),
                      key=lambda a: (-self.next_use(a.key), self.demand(a.key), a.last_used, str(a.key)))
        while True:
            attempt = trial.copy()
            if all(attempt.take(self.request_of(k)) is not None for k in missing):
                break
            if not idle:
                return False
            victim = idle.pop(0)
            trial.give(victim.slot)
            victims.append(victim)
        for victim in victims:
            self._release(victim.key, f"released to make room for {unit.name}")
        for key in missing:
            slot = self.cluster.take(self.request_of(key))
            if key in self.released:
                why = self._release_reason.get(key, "released earlier")
                self.reloads.append((key, why))
                logger.info(f"reloading {key} for {unit.name} (it was {why})")
            self.loads[key] += 1
            self.decisions.append(("create", str(key), unit.name))
            self.live[key] = LiveActor(key, self.backend.create(key, slot), slot)
        self.max_alive = max(self.max_alive, len(self.live))
        self._clock += 1
        handles = {}
        for key in unit.needs:
            actor = self.live[key]
            actor.users.add(unit)
            actor.last_used = self._clock
            handles[key] = actor.handle
            if key.adapter is not None and key.adapter not in actor.adapters:
                actor.adapters.add(key.adapter)
                self.adapter_loads[(key, key.adapter)] += 1
                self.decisions.append(("adapter", str(key), key.adapter, unit.name))
        unit.state, unit.lost_actor = "running", False
        unit.attempts += 1
        self.decisions.append(("start", unit.name))
        self.on_change(unit)
        self.backend.start(unit, handles)
        return True

    def _admissible(self, unit: Unit) -> bool:
        """A group's first unit starts only if the actors its whole group will need fit
        beside those that the groups under way still have to load: groups are admitted
        only as far as they can finish without pushing each other out."""
        members = self._members[unit.group_key]
        if any(u.state != "waiting" for u in members):
            return True
        first = self._order[id(members[0])]
        if any(all(u.state == "waiting" for u in us) and self._order[id(us[0])] < first
               for us in self._members.values()):
            return False   # groups are admitted in plan order: none jumps an earlier one
        under_way = [g for g, us in self._members.items()
                     if any(u.state != "waiting" for u in us) and any(u.state in ("waiting", "running") for u in us)]
        reserved = {k for g in under_way for u in self._members[g] if u.state == "waiting"
                    for k in u.needs if k not in self.live}
        wanted = {k for u in members for k in u.needs if k not in self.live}
        trial = self.cluster.copy()
        return all(trial.take(self.request_of(k)) is not None for k in sorted(reserved | wanted, key=str))

    def step(self) -> None:
        self._lose_actors_of_dead_nodes()
        self._fail_orphans()
        self._release_unneeded()
        ready = sorted(self._ready(), key=lambda u: self._order[id(u)])
        for unit in ready:
            self._place(unit)
        if ready and not any(u.state == "running" for u in self.units):
            # Nothing runs and the earliest work waits for room its own group holds:
            # any idle actor may make room for it.
            self._place(ready[0], relaxed=True)

    def finished(self, unit: Unit, error: str | None) -> None:
        if error is not None and unit.state == "running":
            self._lose_actors_of_dead_nodes()   # was it the node? (before the failure is final)
        for key in unit.needs:
            if key in self.live:
                self.live[key].users.discard(unit)
        if error is not None and unit.lost_actor and unit.attempts < UNIT_ATTEMPTS:
            unit.state = "waiting"
            logger.info(f"{unit.name}: its actor was lost with its node ({error}); it will run again")
            return
        unit.state, unit.error = ("failed", error) if error is not None else ("done", None)
        self.on_change(unit)

    def check_feasible(self) -> None:
        """Every unit's actors must fit together on the cluster as it is now, or as it can
        grow (the nodes its autoscaler can add)."""
        totals = self._grown()
        for unit in self.units:
            trial = totals.copy()
            if not all(trial.take(self.request_of(k)) is not None for k in dict.fromkeys(unit.needs)):
                needs = ", ".join(str(k) for k in dict.fromkeys(unit.needs))
                raise SchedulingError(
                    f"compute: {unit.name} needs {len(set(unit.needs))} model actor(s) at once ({needs}), "
                    f"more than the cluster holds ({_describe(totals)}); give actors less "
                    f"(compute.cpus_per_worker, compute.gpus_per_worker, or compute.gpu_memory_gb "
                    f"so that models share a GPU)")

    def _grown(self) -> Cluster:
        return Cluster(self.backend.nodes() + self.growth)

    def _fits(self, cluster: Cluster, unit: Unit) -> bool:
        trial = cluster.copy()
        return all(trial.take(self.request_of(k)) is not None for k in dict.fromkeys(unit.needs))

    def _want(self, final: bool = False) -> None:
        """Asks the cluster for room for every actor that unfinished work needs (the plan's
        peak at first, less as work ends, nothing at the end), when that changes."""
        want = getattr(self.backend, "want", None)
        if want is None or not self.growth:
            return
        keys = [] if final else sorted({k for u in self.units if u.state in ("waiting", "running")
                                        for k in u.needs}, key=str)
        if keys != self._wanted:
            self._wanted = keys
            want([self.request_of(k) for k in keys])

    def _wait_for_nodes(self, ready: list[Unit]) -> bool:
        """Nothing runs and the earliest ready unit fits only nodes the cluster can still
        add: True while within node_wait_s (a log line every minute); then a one-line error."""
        unit = ready[0]
        if not self.growth or not self._fits(self._grown(), unit):
            return False
        now = self._now()
        if self._waiting_since is None:
            self._waiting_since, self._last_note = now, now
            logger.info(f"waiting for the cluster to add a node for {unit.name} "
                        f"({_requests(self.request_of, unit)}), up to {self.node_wait_s:g} s")
        waited = now - self._waiting_since
        if waited >= self.node_wait_s:
            raise SchedulingError(
                f"compute: no node with room for {unit.name} ({_requests(self.request_of, unit)}) joined the "
                f"cluster in {waited:.0f} s (compute.node_wait_minutes); it has {_describe(self.cluster)} and "
                f"can add {_describe(Cluster(self.growth))}; `ray status` and the autoscaler's log "
                f"(monitor.out) say why")
        if now - self._last_note >= 60:
            self._last_note = now
            logger.info(f"still waiting for a node for {unit.name}: {waited / 60:.0f} min of "
                        f"{self.node_wait_s / 60:g}; the cluster has {_describe(self.cluster)}")
        return True

    def run(self) -> None:
        self.check_feasible()
        try:
            self._run()
        finally:
            self._want(final=True)

    def _run(self) -> None:
        while any(u.state in ("waiting", "running") for u in self.units):
            self._want()
            self.step()
            if not any(u.state == "running" for u in self.units):
                ready = sorted(self._ready(), key=lambda u: self._order[id(u)])
                if ready and self._wait_for_nodes(ready):
                    self.backend.wait()   # a pause, then the nodes are looked at again
                    continue
                # Nothing runs, so every live actor was idle and could have made room: a
                # ready unit that did not start cannot fit the cluster as it is now (nodes
                # left), nor as it can grow. It fails rather than waits for ever.
                for unit in self._ready():
                    self.finished(unit, f"{unit.name}: its actors no longer fit the cluster "
                                        f"({_describe(self.cluster)})")
                self._fail_orphans()
                continue
            self._waiting_since = None
            for unit, error in self.backend.wait():
                self.finished(unit, error)
        self._release_unneeded()
        for key in sorted(self.live, key=str):
            self._release(key, "the job ended")


def _requests(request_of, unit: Unit) -> str:
    """The resources a unit's actors ask for, e.g. '1 CPU + 4 GPUs, 1 CPU + 0.5 GPUs'."""
    parts = []
    for key in dict.fromkeys(unit.needs):
        r = request_of(key)
        parts.append(f"{r.counted_cpus:g} CPU" + (f" + {r.gpus:g} GPU" if r.gpus else ""))
    return ", ".join(parts)


def _describe(cluster: Cluster) -> str:
    cpus = sum(n["cpus"] for n in cluster.nodes.values())
    gpus = sum(len(n["gpus"]) for n in cluster.nodes.values())
    return f"{len(cluster.nodes)} node(s), {cpus:g} CPUs, {gpus} GPUs"
