"""The job's graders: one Ray actor per reference model, shared by every stage that asks
(steering coherence, patchscope's best scale, token relevance), alive until the job ends."""
from __future__ import annotations

import threading


class GraderPool:
    def __init__(self, spec, actor, release=None):
        self.spec, self.actor = spec, actor
        self.release = release or kill_actor
        self.handles: dict = {}
        self.loads = 0
        self._lock = threading.Lock()   # pairs run in threads

    def get(self, pair):
        """The grader of a pair. The offline grader's reference is the finetuned model (for
        an adapter, its base): a model that never saw the finetuning domain finds all of its
        text improbable."""
        from jobs.plan import s3_options
        from workers.graders import GraderWorker
        reference = pair.pair.finetuned
        with self._lock:
            if reference not in self.handles:
                self.handles[reference] = self.actor(GraderWorker, source=reference).remote(
                    self.spec.grader, reference, s3_options(self.spec))
                self.loads += 1
            return self.handles[reference]

    def close(self) -> None:
        with self._lock:
            handles = list(self.handles.values())
            self.handles.clear()
        for handle in handles:
            self.release(handle)


def kill_actor(handle) -> None:
    """The default release of an actor outside a tracked job (tests, tools)."""
    import ray
    ray.kill(handle)
