"""Generations: baseline samples of each model, the steering strength search, and the
final steered samples (adl-method.md, "Steering").

The stage decides what to generate and in which batches; the vLLM engine and the grader
are actors the executor hands it (workers/generation.py; the offline grader is the
reference model's transformers actor, an LLM grader runs in the driver). Every batch of a pair
goes to its engine as one call, so continuous batching sees hundreds of requests at once:
the search evaluates all its (layer, position, prompt, strength) candidates of a round in
one batch, and a round advances `lookahead` bisection levels at a time.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field

import numpy as np

from jobs.spec import Generation, JobSpec


def steering_prompts(gen: Generation) -> list[str]:
    """The method's 20 prompts (package data, MIT, diffing-toolkit) and the spec's extras."""
    text = importlib.resources.files("workers").joinpath("data/steering_prompts_closed.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()] + list(gen.extra_prompts)


def unit_scaled(delta: np.ndarray, finetuned_norm: float) -> np.ndarray:
    """delta_hat: delta rescaled to the norm of a typical finetuned activation, so that
    alpha = 1 adds one typical activation."""
    return delta / np.linalg.norm(delta) * finetuned_norm


# -- the strength search ----------------------------------------------------------------
def tree_strengths(low: float, high: float, levels: int) -> list[float]:
    """The midpoints a bisection of [low, high] may visit in its next `levels` steps,
    whatever the outcomes: 2**levels - 1 strengths."""
    if levels == 0:
        return []
    mid = (low + high) / 2
    return [mid] + tree_strengths(low, mid, levels - 1) + tree_strengths(mid, high, levels - 1)


def descend(low: float, high: float, levels: int, passed: dict[float, bool]) -> tuple[float, float]:
    """Bisection steps taken with the outcomes of tree_strengths(low, high, levels)."""
    for _ in range(levels):
        mid = (low + high) / 2
        low, high = (mid, high) if passed[mid] else (low, mid)
    return low, high


@dataclass
class SearchState:
    """One (layer, position, prompt) target: the threshold lies in [low, high)."""
    layer: int
    position: int
    prompt_id: int
    low: float
    high: float
    steps_left: int
    trials: list = field(default_factory=list)


def search_rounds(states: list[SearchState], lookahead: int, evaluate) -> None:
    """Runs the bisection of every target to its end. evaluate takes a list of
    (state, strength) and returns, for each, (coherent fraction, passed)."""
    while any(s.steps_left for s in states):
        batch, plans = [], []
        for s in states:
            levels = min(lookahead, s.steps_left)
            strengths = tree_strengths(s.low, s.high, levels)
            plans.append((s, levels, strengths))
            batch.extend((s, a) for a in strengths)
        outcomes = iter(evaluate(batch))
        for s, levels, strengths in plans:
            passed = {}
            for a in strengths:
                fraction, ok, graded = next(outcomes)
                passed[a] = ok
                s.trials.append({"strength": a, "coherent_fraction": fraction, "graded": graded})
            s.low, s.high = descend(s.low, s.high, levels, passed)
            s.steps_left -= levels


# -- the stage ------------------------------------------------------------------------
@dataclass
class PairGenerations:
    """What the generation stage produced for one pair."""
    rows: list[dict]           # generations table rows
    steering: list[dict]       # steering table rows


def _row(pair: str, role: str, kind: str, prompt_id: int, prompt: str, result, seed: int,
         layer=None, position=None, alpha=None) -> dict:
    return {"pair": pair, "model_role": role, "kind": kind, "prompt_id": prompt_id, "prompt": prompt,
            "sample_index": result.sample_index, "layer": layer, "position": position, "alpha": alpha,
            "text": result.text, "token_count": len(result.token_ids),
            "finish_reason": result.finish_reason, "seed": seed}


def baseline_requests(gen: Generation):
    from workers.generation import GenerationRequest
    prompts = steering_prompts(gen)
    requests = [GenerationRequest(p, n=gen.samples, temperature=gen.temperature, max_tokens=gen.max_tokens,
                                  seed=gen.seed + i) for i, p in enumerate(prompts)]
    return prompts, requests


def baseline_rows(pair: str, role: str, gen: Generation, results) -> list[dict]:
    prompts, requests = baseline_requests(gen)
    return [_row(pair, role, "baseline", r.request_index, prompts[r.request_index], r,
                 requests[r.request_index].seed) for r in results]


def steer(pair_name: str, spec: JobSpec, difference, engine, grader, log) -> PairGenerations:
    """The strength search and the final steered samples for one pair.

    difference: the pair's difference table (pandas); engine and grader: Ray actor handles.
    """
    import ray
    from workers.generation import GenerationRequest, Steering
    gen, search = spec.generation, spec.generation.search
    rows = difference[difference.position.isin(spec.method.positions)]
    vectors = {(int(r.layer), int(r.position)): unit_scaled(np.asarray(r.delta), float(r.finetuned_norm))
               for r in rows.itertuples()}
    states = [SearchState(layer, pos, i, search.low, search.high, search.steps)
              for (layer, pos) in vectors for i in range(len(search.prompts))]

    def evaluate(batch):
        requests = [GenerationRequest(search.prompts[s.prompt_id], n=search.samples,
                                      temperature=search.temperature, max_tokens=search.max_tokens,
                                      seed=gen.seed + k,
                                      steering=Steering(s.layer, a * vectors[(s.layer, s.position)]))
                    for k, (s, a) in enumerate(batch)]
        log(f"{pair_name}: steering search, {len(requests)} strengths x {search.samples} samples")
        results = ray.get(engine.generate.remote(requests))
        judgements = ray.get(grader.coherence.remote([r.text for r in results]))
        outcome = []
        for k in range(len(batch)):
            mine = [j for r, j in zip(results, judgements) if r.request_index == k]
            graded = [j for j in mine if j.ok]
            fraction = sum(bool(j.value) for j in graded) / len(mine)
            # Samples the grader failed on count as not coherent: never a silent pass.
            outcome.append((fraction, fraction >= search.pass_fraction, len(graded)))
        return outcome

    search_rounds(states, search.lookahead, evaluate)
    alphas = {key: float(np.mean([s.low for s in states if (s.layer, s.position) == key])) for key in vectors}
    steering_rows = [{"layer": s.layer, "position": s.position, "prompt_id": s.prompt_id,
                      "prompt": search.prompts[s.prompt_id], "threshold": s.low,
                      "alpha": alphas[(s.layer, s.position)], "trials": s.trials} for s in states]

    prompts = steering_prompts(gen)
    targets = [(key, i) for key in vectors for i in range(len(prompts))]
    requests = [GenerationRequest(prompts[i], n=gen.samples, temperature=gen.temperature,
                                  max_tokens=gen.max_tokens, seed=gen.seed + i,
                                  steering=Steering(key[0], alphas[key] * vectors[key]))
                for key, i in targets]
    log(f"{pair_name}: steered generations, {len(requests)} prompts x {gen.samples} samples")
    results = ray.get(engine.generate.remote(requests))
    out = []
    for r in results:
        (layer, pos), i = targets[r.request_index]
        out.append(_row(pair_name, "finetuned", "steered", i, prompts[i], r, requests[r.request_index].seed,
                        layer, pos, alphas[(layer, pos)]))
    return PairGenerations(out, steering_rows)
