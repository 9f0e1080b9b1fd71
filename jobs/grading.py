"""The job's graders: one Ray actor per reference model, shared by every stage that asks
(steering coherence, patchscope's best scale, token relevance)."""
from __future__ import annotations


class GraderPool:
    def __init__(self, spec, actor):
        self.spec, self.actor = spec, actor
        self.handles: dict = {}

    def get(self, pair):
        """The grader of a pair. The offline grader's reference is the finetuned model (for
        an adapter, its base): a model that never saw the finetuning domain finds all of its
        text improbable."""
        from jobs.plan import s3_options
        from workers.graders import GraderWorker
        reference = pair.pair.finetuned
        if reference not in self.handles:
            self.handles[reference] = self.actor(GraderWorker).remote(
                self.spec.grader, reference, s3_options(self.spec))
        return self.handles[reference]

    def close(self) -> None:
        import ray
        for handle in self.handles.values():
            ray.kill(handle)
        self.handles.clear()
