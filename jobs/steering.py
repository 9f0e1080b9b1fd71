"""Generations: baseline samples of each model, the steering strength search, and the
final steered samples (adl-method.md, "Steering").

The stage decides what to generate and in which batches; the vLLM engine and the grader
are actors the executor hands it (workers/generation.py; the offline grader scores on
the pair's engine itself, an LLM grader runs in the driver). Every batch of a pair
goes to its engine as one call, so continuous batching sees hundreds of requests at once:
the search evaluates all its (layer, position, prompt, strength) candidates of a round in
one batch, and a round advances `lookahead` bisection levels at a time. Every sample is
its own request with its own seed (jobs/seeds.py).
"""
from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass, field

import numpy as np

from jobs.seeds import baseline_identity, sample_seed, search_identity, steered_identity
from jobs.spec import Generation, JobSpec, ModelSource
from workers.vectors import unit_scaled

logger = logging.getLogger("adl.steering")


def steering_prompts(gen: Generation) -> list[str]:
    """The method's 20 prompts (package data, MIT, diffing-toolkit) and the spec's extras."""
    text = importlib.resources.files("workers").joinpath("data/steering_prompts_closed.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()] + list(gen.extra_prompts)


def engine_need(spec: JobSpec):
    """What a job's vLLM engines must hold (workers/engine_settings.py sizes max_model_len
    by it): every prompt it knows, room for the agent's own, the most tokens it samples."""
    from workers.engine_settings import FREE_PROMPT_TOKENS, EngineNeed
    gen, agent = spec.generation, spec.agent
    max_tokens = max(gen.max_tokens, gen.search.max_tokens)
    if agent.enabled:
        max_tokens = max(max_tokens, agent.ask_model.max_tokens, agent.generate_steered.max_tokens)
    return EngineNeed(max_tokens, tuple(steering_prompts(gen)) + tuple(gen.search.prompts),
                      FREE_PROMPT_TOKENS if agent.enabled else 0)


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
    (state, strength) and returns, for each, (coherent fraction, passed, samples graded)
    and optionally a dict of more fields for the trial's record."""
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
                fraction, ok, graded, *extra = next(outcomes)
                passed[a] = ok
                s.trials.append({"strength": a, "coherent_fraction": fraction, "graded": graded,
                                 **(extra[0] if extra else {})})
            s.low, s.high = descend(s.low, s.high, levels, passed)
            s.steps_left -= levels


# -- the stage ------------------------------------------------------------------------
@dataclass
class PairGenerations:
    """What the generation stage produced for one pair."""
    rows: list[dict]           # generations table rows
    steering: list[dict]       # steering table rows


def _row(pair: str, role: str, kind: str, prompt_id: int, prompt: str, result, sample_index: int, seed: int,
         layer=None, position=None, alpha=None) -> dict:
    return {"pair": pair, "model_role": role, "kind": kind, "prompt_id": prompt_id, "prompt": prompt,
            "sample_index": sample_index, "layer": layer, "position": position, "alpha": alpha,
            "text": result.text, "token_count": len(result.token_ids),
            "finish_reason": result.finish_reason, "seed": seed}


def _sample_of(samples: list, result):
    """What the request of a result was for: one request per sample (n=1), so a result
    is that request's only sample."""
    if result.sample_index != 0 or not 0 <= result.request_index < len(samples):
        raise RuntimeError(f"generation result {result.request_index}.{result.sample_index} does not "
                           f"belong to these {len(samples)} single-sample requests")
    return samples[result.request_index]


def baseline_samples(gen: Generation, source: ModelSource) -> list[tuple[int, int, int]]:
    """(prompt_id, sample_index, seed) of every baseline sample of one model, in request
    order (prompts, then samples). source: the model (jobs/seeds.py baseline_identity)."""
    return [(i, k, sample_seed(gen.seed, baseline_identity(source, i, k)))
            for i in range(len(steering_prompts(gen))) for k in range(gen.samples)]


def baseline_requests(gen: Generation, source: ModelSource):
    """The prompts and one request per baseline sample of the model `source`."""
    from workers.generation import GenerationRequest
    prompts = steering_prompts(gen)
    requests = [GenerationRequest(prompts[i], n=1, temperature=gen.temperature, max_tokens=gen.max_tokens,
                                  seed=seed) for i, _, seed in baseline_samples(gen, source)]
    return prompts, requests


def baseline_rows(pair: str, role: str, gen: Generation, results, source: ModelSource) -> list[dict]:
    """Rows of the results of baseline_requests(gen, source), which must name the same source."""
    prompts, samples = steering_prompts(gen), baseline_samples(gen, source)
    rows = []
    for r in results:
        prompt_id, sample_index, seed = _sample_of(samples, r)
        rows.append(_row(pair, role, "baseline", prompt_id, prompts[prompt_id], r, sample_index, seed))
    return rows


def trial_seeds(pair: str, gen: Generation, state: SearchState, strength: float) -> list[int]:
    """The seeds of one strength-search trial's samples."""
    return [sample_seed(gen.seed, search_identity(pair, state.layer, state.position, state.prompt_id, strength, k))
            for k in range(gen.search.samples)]


def steered_samples(pair: str, gen: Generation, keys) -> list[tuple[tuple[int, int], int, int, int]]:
    """((layer, position), prompt_id, sample_index, seed) of every final steered sample,
    in request order: targets, then prompts, then samples."""
    return [(key, i, k, sample_seed(gen.seed, steered_identity(pair, key[0], key[1], i, k)))
            for key in keys for i in range(len(steering_prompts(gen))) for k in range(gen.samples)]


def steer(pair_name: str, spec: JobSpec, difference, engine, grader) -> PairGenerations:
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
        seeds = [trial_seeds(pair_name, gen, s, a) for s, a in batch]
        requests, owners = [], []
        for t, ((s, a), trial) in enumerate(zip(batch, seeds)):
            steering = Steering(s.layer, a * vectors[(s.layer, s.position)])
            for seed in trial:
                requests.append(GenerationRequest(search.prompts[s.prompt_id], n=1, temperature=search.temperature,
                                                  max_tokens=search.max_tokens, seed=seed, steering=steering))
                owners.append(t)
        logger.info(f"{pair_name}: steering search, {len(batch)} strengths x {search.samples} samples")
        results = ray.get(engine.generate.remote(requests))
        judgements = ray.get(grader.coherence.remote([r.text for r in results]))
        if judgements and not any(j.ok for j in judgements):
            from workers.graders import GradingFailed
            error = next(j.error for j in judgements)
            raise GradingFailed(f"generate: the grader judged none of the {len(judgements)} samples of a "
                                f"steering search round: {error}")
        mine = [[] for _ in batch]
        for r, j in zip(results, judgements):
            mine[_sample_of(owners, r)].append(j)
        outcome = []
        for t, trial in enumerate(mine):
            graded = [j for j in trial if j.ok]
            fraction = sum(bool(j.value) for j in graded) / len(trial)
            # Samples the grader failed on count as not coherent: never a silent pass (a
            # round in which it judged none fails the stage, above).
            outcome.append((fraction, fraction >= search.pass_fraction, len(graded), {"seeds": seeds[t]}))
        return outcome

    search_rounds(states, search.lookahead, evaluate)
    alphas = strengths_found(pair_name, search, states)
    steering_rows = [{"layer": s.layer, "position": s.position, "prompt_id": s.prompt_id,
                      "prompt": search.prompts[s.prompt_id], "threshold": s.low,
                      "alpha": alphas.get((s.layer, s.position)),
                      "strength_found": (s.layer, s.position) in alphas, "trials": s.trials} for s in states]

    # A vector without a coherent strength gets no steered samples: text generated at
    # search.low would be shown as steered while being the model's own.
    found = {key: vector for key, vector in vectors.items() if key in alphas}
    if not found:
        return PairGenerations([], steering_rows)
    requests = steered_requests(pair_name, gen, found, alphas)
    logger.info(f"{pair_name}: steered generations, {len(found) * len(steering_prompts(gen))} prompts x "
                f"{gen.samples} samples")
    results = ray.get(engine.generate.remote(requests))
    return PairGenerations(steered_rows(pair_name, gen, found, alphas, results), steering_rows)


def strengths_found(pair: str, search, states: list[SearchState]) -> dict[tuple[int, int], float]:
    """(layer, position) -> alpha, the mean of its prompts' thresholds, for the vectors
    whose search found a coherent strength above search.low for at least one prompt (a
    threshold rises above low only when a strength passed). The others are left out,
    each with a WARNING naming the strengths tried and their best coherent fractions."""
    by_key: dict[tuple[int, int], list[SearchState]] = {}
    for s in states:
        by_key.setdefault((s.layer, s.position), []).append(s)
    alphas = {}
    for (layer, position), mine in by_key.items():
        if any(s.low > search.low for s in mine):
            alphas[(layer, position)] = float(np.mean([s.low for s in mine]))
            continue
        best: dict[float, float] = {}
        for t in (t for s in mine for t in s.trials):
            best[t["strength"]] = max(best.get(t["strength"], 0.0), t["coherent_fraction"])
        tried = ", ".join(f"{a:.3g} ({best[a]:.2f})" for a in sorted(best))
        logger.warning(f"{pair}: steering layer {layer} position {position}: no coherent strength found in "
                       f"({search.low:g}, {search.high:g}) (pass fraction {search.pass_fraction:g}); strengths "
                       f"tried (best coherent fraction over prompts): {tried}; no steered samples for this vector")
    return alphas


def steered_requests(pair: str, gen: Generation, vectors: dict, alphas: dict) -> list:
    """One request per final steered sample: vectors[(layer, position)] (delta_hat) times
    alphas[(layer, position)], added at that layer."""
    from workers.generation import GenerationRequest, Steering
    prompts = steering_prompts(gen)
    steerings = {key: Steering(key[0], alphas[key] * vectors[key]) for key in vectors}
    return [GenerationRequest(prompts[i], n=1, temperature=gen.temperature, max_tokens=gen.max_tokens,
                              seed=seed, steering=steerings[key])
            for key, i, _, seed in steered_samples(pair, gen, list(vectors))]


def steered_rows(pair: str, gen: Generation, vectors: dict, alphas: dict, results) -> list[dict]:
    """Rows of the results of steered_requests(pair, gen, vectors, alphas)."""
    prompts, samples = steering_prompts(gen), steered_samples(pair, gen, list(vectors))
    rows = []
    for r in results:
        (layer, pos), i, k, seed = _sample_of(samples, r)
        rows.append(_row(pair, "finetuned", "steered", i, prompts[i], r, k, seed, layer, pos, alphas[(layer, pos)]))
    return rows
