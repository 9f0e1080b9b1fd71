"""Simulated actors and times for the job's real scheduler (jobs/scheduler.py): the
scheduler simulation (benchmarks/bench_scheduler.py) and the test that the simulated and
the real runs decide alike use it.

A simulated actor is loaded `load_s(key)` seconds after its creation and does one call at
a time, in the order they came (as a Ray actor runs its calls in turn). `work_s(unit,
actors)` says how long a unit's work takes:
- seconds (a number): the unit starts when every actor it needs is loaded and free, and
  holds them all until it ends;
- {key: seconds}: the unit makes one call on each of those actors at once, as the real
  stages do (patchscope's finetuned-side and base-side forwards): each call waits in its
  own actor's queue and holds that actor only for its own seconds, and the unit ends
  with its last call (its other actors, if any, are held until then).
Time jumps from one unit's end to the next.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable

from jobs.scheduler import ModelKey, NodeResources, Slot, Unit


@dataclass(eq=False)
class SimulatedActor:
    key: ModelKey
    slot: Slot
    created: float
    ready: float
    busy_until: float = 0.0
    released: float | None = None
    units: list = field(default_factory=list)


class SimulatedBackend:
    def __init__(self, nodes: list[NodeResources], load_s: Callable[[ModelKey], float],
                 work_s: Callable[[Unit, dict], float | dict]):
        self._nodes, self.load_s, self.work_s = list(nodes), load_s, work_s
        self.now = 0.0
        self.actors: list[SimulatedActor] = []
        self.work_gpu_seconds = 0.0       # GPU-seconds spent computing (not loading)
        self._events: list = []
        self._seq = 0

    def nodes(self) -> list[NodeResources]:
        return self._nodes

    def create(self, key: ModelKey, slot: Slot) -> SimulatedActor:
        actor = SimulatedActor(key, slot, self.now, self.now + self.load_s(key))
        actor.busy_until = actor.ready
        self.actors.append(actor)
        return actor

    def release(self, key: ModelKey, handle: SimulatedActor, lost: bool = False) -> None:
        handle.released = max(self.now, handle.busy_until)

    def start(self, unit: Unit, actors: dict) -> None:
        handles = list(actors.values())
        work = self.work_s(unit, actors)
        if isinstance(work, dict):   # one call per actor, each in its own actor's queue
            ends = {}
            for key, seconds in work.items():
                actor = actors[key]
                ends[key] = max(self.now, actor.busy_until) + seconds
                actor.busy_until = ends[key]
                self.work_gpu_seconds += seconds * actor.slot.request.gpus
            end = max(ends.values(), default=self.now)
            for key, actor in actors.items():
                if key not in work:
                    actor.busy_until = max(actor.busy_until, end)
        else:
            end = max([self.now] + [a.busy_until for a in handles]) + work
            for a in handles:
                a.busy_until = end
            # The unit's GPUs: its first actor's (a vLLM engine's while a grader waits on it).
            if handles:
                self.work_gpu_seconds += work * handles[0].slot.request.gpus
        for a in handles:
            a.units.append(unit.name)
        self._seq += 1
        heapq.heappush(self._events, (end, self._seq, unit))

    def wait(self) -> list[tuple[Unit, str | None]]:
        if not self._events:
            return []
        end, _, unit = heapq.heappop(self._events)
        self.now = max(self.now, end)
        done = [(unit, None)]
        while self._events and self._events[0][0] <= self.now:
            done.append((heapq.heappop(self._events)[2], None))
        return done

    def held_gpu_seconds(self) -> float:
        """GPU-seconds the actors held (loaded or loading), until released."""
        return sum(((a.released if a.released is not None else self.now) - a.created) * a.slot.request.gpus
                   for a in self.actors)
