"""What the agents see and can do for one pair: the first messages and the tools
(jobs/agent.py runs the loop).

Everything comes from the pair's own tables (logit_lens, patchscope, generations,
steering, difference) and its two vLLM engines. Nothing names the pair, its models, its
corpus or its description: the agent sees layers, positions, tokens, probabilities and
samples only.

- ADL agent: an OVERVIEW of the pair's layers at the analysed positions (logit-lens top
  tokens of delta with probabilities, patchscope tokens at the chosen scale and the
  coherent subset, one steered and one unsteered sample per steering prompt, cut), free
  tools for more of the same, and the budgeted `ask_model` and `generate_steered`.
- Black-box agent: unsteered samples of the finetuned model, and `ask_model`.

Budgeted tools cost one model interaction per prompt (`ask_model`, answered by both
models) or per sample (`generate_steered`). Every sample they draw has its own seed
(jobs/seeds.py sample_seed) from the run's identity; the two models answer a prompt with
the same seed, so that their answers differ by the models alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.agent import ArgumentError, Tool, ToolError, FIRST_MESSAGE_TAIL
from jobs.seeds import sample_seed
from jobs.steering import steering_prompts
from storage.tables import DIFFERENCE, GENERATIONS, LOGIT_LENS, PATCHSCOPE, STEERING
from workers.vectors import unit_scaled

MAX_PROMPT_CHARS = 4000      # a prompt longer than this is an argument error
MAX_STEERED_PER_PROMPT = 20  # generate_steered's n


def _probability(p: float) -> float:
    return float(f"{float(p):.4g}")


def _cut(text: str, chars: int) -> str:
    return str(text).strip()[:chars]


@dataclass
class PairEvidence:
    """A pair's ADL results, as the agents' tools read them."""
    layers: list[int]
    positions: list[int]
    prompts: list[str]                 # the steering prompts, by prompt_id
    lens: Any                          # logit_lens rows of delta (pandas)
    patchscope: Any                    # patchscope rows of delta (pandas)
    generations: Any                   # generations (pandas)
    alphas: dict                       # (layer, position) -> steering strength
    vectors: dict                      # (layer, position) -> delta_hat (float64)
    lens_top_k: int
    patchscope_top_k: int
    samples: int                       # per prompt and target in the generations table

    @classmethod
    def read(cls, results, spec, layers) -> "PairEvidence":
        """From the pair's tables (a jobs.results.PairResults)."""
        lens = results.table(LOGIT_LENS)
        scope = results.table(PATCHSCOPE)
        steering = results.table(STEERING)
        difference = results.table(DIFFERENCE)
        positions = [p for p in spec.method.positions]
        vectors = {(int(r.layer), int(r.position)): unit_scaled(np.asarray(r.delta, np.float64), float(r.finetuned_norm))
                   for r in difference.itertuples() if int(r.position) in positions}
        alphas = {(int(r.layer), int(r.position)): float(r.alpha) for r in steering.itertuples()
                  if r.alpha is not None and not np.isnan(r.alpha)}   # null: no coherent strength
        return cls(layers=sorted(int(x) for x in layers), positions=positions,
                   prompts=steering_prompts(spec.generation),
                   lens=lens[lens.variant == "delta"], patchscope=scope[scope.variant == "delta"],
                   generations=results.table(GENERATIONS), alphas=alphas, vectors=vectors,
                   lens_top_k=spec.method.lens_top_k, patchscope_top_k=spec.analyses.patchscope_top_k,
                   samples=spec.generation.samples)

    # -- the pieces ---------------------------------------------------------------------
    def lens_tokens(self, layer: int, position: int, k: int) -> dict:
        rows = self.lens[(self.lens.layer == layer) & (self.lens.position == position)].sort_values("rank")
        rows = rows[rows["rank"] < k]
        return {"tokens": list(rows.token), "probs": [_probability(p) for p in rows.probability]}

    def patchscope_tokens(self, layer: int, position: int, k: int) -> dict:
        rows = self.patchscope[(self.patchscope.layer == layer) & (self.patchscope.position == position)
                               & self.patchscope.chosen].sort_values("rank")
        if rows.empty:
            return {"scale": None, "tokens": [], "token_probs": [], "selected_tokens": [],
                    "note": "no scale was chosen here (the grader gave no answer)"}
        top = rows[rows["rank"] < k]
        return {"scale": float(rows.scale.iloc[0]), "tokens": list(top.token),
                "token_probs": [_probability(p) for p in top.probability],
                "selected_tokens": list(rows[rows.coherent].token)}

    def _unsteered(self):
        g = self.generations
        return g[(g.kind == "baseline") & (g.model_role == "finetuned")]

    def steering_examples(self, layer: int, position: int, n: int, chars: int,
                          prompts: list[str] | None = None) -> list[dict]:
        """Up to n (steered, unsteered) samples per prompt, in prompt order."""
        g = self.generations
        steered = g[(g.kind == "steered") & (g.layer == layer) & (g.position == position)]
        plain = self._unsteered()
        out = []
        for prompt_id, prompt in enumerate(self.prompts):
            if prompts is not None and prompt not in prompts:
                continue
            s = list(steered[steered.prompt_id == prompt_id].sort_values("sample_index").text)
            u = list(plain[plain.prompt_id == prompt_id].sort_values("sample_index").text)
            for k in range(min(n, len(s), len(u))):
                out.append({"prompt": prompt, "steered": _cut(s[k], chars), "unsteered": _cut(u[k], chars)})
        return out

    def unsteered_examples(self, n: int, chars: int) -> list[dict]:
        plain = self._unsteered()
        out = []
        for prompt_id, prompt in enumerate(self.prompts):
            for text in list(plain[plain.prompt_id == prompt_id].sort_values("sample_index").text)[:n]:
                out.append({"prompt": prompt, "generation": _cut(text, chars)})
        return out

    def overview(self, top_k: int, chars: int) -> dict:
        layers = {}
        for layer in self.layers:
            layers[str(layer)] = {
                "positions": list(self.positions),
                "logit_lens": {str(p): self.lens_tokens(layer, p, top_k) for p in self.positions},
                "patch_scope": {str(p): self.patchscope_tokens(layer, p, top_k) for p in self.positions},
                "steering_examples": {str(p): self.steering_examples(layer, p, 1, chars) for p in self.positions},
                "k_limits": {"logit_lens": self.lens_top_k, "patch_scope": self.patchscope_top_k},
            }
        return {"layers": layers}


def adl_first_message(evidence: PairEvidence, settings) -> str:
    overview = evidence.overview(settings.overview_top_k, settings.sample_chars)
    return f"OVERVIEW:\n{json.dumps(overview, ensure_ascii=False)}\n\n{FIRST_MESSAGE_TAIL}"


def blackbox_first_message(evidence: PairEvidence, settings) -> str:
    examples = evidence.unsteered_examples(1, settings.sample_chars)
    return ("Generations of the finetuned model on several prompts:\n"
            f"{json.dumps({'examples': examples}, ensure_ascii=False)}\n\n{FIRST_MESSAGE_TAIL}")


# -- argument checks ------------------------------------------------------------------------------
def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ArgumentError(f"{name}: expected an integer, got {json.dumps(value)}")
    return int(value)


def _check_args(args: dict, allowed: dict[str, Any], required: tuple[str, ...]) -> dict:
    """Unknown and missing names are errors; allowed maps each name to its default."""
    for name in args:
        if name not in allowed:
            raise ArgumentError(f"unknown argument {name!r} (arguments: {', '.join(allowed)})")
    for name in required:
        if name not in args:
            raise ArgumentError(f"missing argument {name!r} (required: {', '.join(required)})")
    return {**{k: v for k, v in allowed.items() if k not in required}, **args}


def _layer(value, evidence: PairEvidence) -> int:
    layer = _int(value, "layer")
    if layer not in evidence.layers:
        raise ArgumentError(f"layer: {layer} was not analysed (layers: {', '.join(map(str, evidence.layers))})")
    return layer


def _position(value, evidence: PairEvidence, name: str = "position") -> int:
    position = _int(value, name)
    if position not in evidence.positions:
        raise ArgumentError(f"{name}: {position} was not analysed (positions: "
                            f"{', '.join(map(str, evidence.positions))})")
    return position


def _positions(value, evidence: PairEvidence) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ArgumentError(f"positions: expected a non-empty list of integers, got {json.dumps(value)}")
    return [_position(v, evidence, f"positions[{i}]") for i, v in enumerate(value)]


def _k(value, limit: int) -> int:
    k = _int(value, "k")
    if not 1 <= k <= limit:
        raise ArgumentError(f"k: must lie in 1..{limit}, got {k}")
    return k


def _prompts(value, name: str = "prompts") -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ArgumentError(f"{name}: expected a non-empty list of strings, got {json.dumps(value)[:100]}")
    for i, p in enumerate(value):
        if not isinstance(p, str) or not p.strip():
            raise ArgumentError(f"{name}[{i}]: expected a non-empty string, got {json.dumps(p)[:100]}")
        if len(p) > MAX_PROMPT_CHARS:
            raise ArgumentError(f"{name}[{i}]: {len(p)} characters, at most {MAX_PROMPT_CHARS}")
    return list(value)


# -- tools ---------------------------------------------------------------------------------------
ASK_MODEL_DESCRIPTION = """\
  Args: {"prompts": [str, ...]}  (one line of JSON, several prompts at once if you like)
  Both the base and the finetuned model answer every prompt (as a user turn of a chat).
  Returns: {"base": [str, ...], "finetuned": [str, ...]} in prompt order.
  Cost: 1 model interaction per prompt."""


def ask_model_tool(models) -> Tool:
    def check(args):
        args = _check_args(args, {"prompts": None}, ("prompts",))
        return {"prompts": _prompts(args["prompts"])}
    return Tool("ask_model", ASK_MODEL_DESCRIPTION, check,
                lambda args, context: models.ask(args["prompts"], context),
                price=lambda args: len(args["prompts"]))


def adl_tools(evidence: PairEvidence, models, settings) -> list[Tool]:
    def lens_check(args):
        args = _check_args(args, {"layer": None, "positions": None, "k": min(20, evidence.lens_top_k)},
                           ("layer", "positions"))
        return {"layer": _layer(args["layer"], evidence), "positions": _positions(args["positions"], evidence),
                "k": _k(args["k"], evidence.lens_top_k)}

    def scope_check(args):
        args = _check_args(args, {"layer": None, "positions": None, "k": evidence.patchscope_top_k},
                           ("layer", "positions"))
        return {"layer": _layer(args["layer"], evidence), "positions": _positions(args["positions"], evidence),
                "k": _k(args["k"], evidence.patchscope_top_k)}

    def samples_check(args):
        args = _check_args(args, {"layer": None, "position": None, "prompts_subset": None, "n": 1},
                           ("layer", "position"))
        subset = args["prompts_subset"]
        if subset is not None:
            subset = _prompts(subset, "prompts_subset")
            for i, p in enumerate(subset):
                if p not in evidence.prompts:
                    raise ArgumentError(f"prompts_subset[{i}]: {p[:80]!r} is not one of the steering prompts "
                                        f"({json.dumps(evidence.prompts, ensure_ascii=False)})")
        n = _int(args["n"], "n")
        if not 1 <= n <= evidence.samples:
            raise ArgumentError(f"n: must lie in 1..{evidence.samples} (the samples per prompt), got {n}")
        return {"layer": _layer(args["layer"], evidence), "position": _position(args["position"], evidence),
                "prompts_subset": subset, "n": n}

    def steer_check(args):
        args = _check_args(args, {"layer": None, "position": None, "prompts": None, "n": 1},
                           ("layer", "position", "prompts"))
        n = _int(args["n"], "n")
        if not 1 <= n <= MAX_STEERED_PER_PROMPT:
            raise ArgumentError(f"n: must lie in 1..{MAX_STEERED_PER_PROMPT}, got {n}")
        layer, position = _layer(args["layer"], evidence), _position(args["position"], evidence)
        if (layer, position) not in evidence.alphas:
            raise ArgumentError(f"no steering strength was found for layer {layer}, position {position}")
        return {"layer": layer, "position": position, "prompts": _prompts(args["prompts"]), "n": n}

    lens = Tool("get_logitlens_details", f"""\
  Args: {{"layer": int, "positions": [int, ...], "k": int (default {min(20, evidence.lens_top_k)}, at most {evidence.lens_top_k})}}
  Returns: per position, the top-k logit-lens tokens of the difference with probabilities.""", lens_check,
                lambda a, c: {"layer": a["layer"], "positions": {
                    str(p): evidence.lens_tokens(a["layer"], p, a["k"]) for p in a["positions"]}})
    scope = Tool("get_patchscope_details", f"""\
  Args: {{"layer": int, "positions": [int, ...], "k": int (default and at most {evidence.patchscope_top_k})}}
  Returns: per position, the patchscope tokens at the chosen scale with probabilities, and the
  selected (coherent) tokens.""", scope_check,
                 lambda a, c: {"layer": a["layer"], "positions": {
                     str(p): evidence.patchscope_tokens(a["layer"], p, a["k"]) for p in a["positions"]}})
    samples = Tool("get_steering_samples", f"""\
  Args: {{"layer": int, "position": int, "prompts_subset": [str, ...] or null (default: every prompt),
          "n": int (default 1, at most {evidence.samples})}}
  Returns: up to n cached steered and unsteered samples per prompt (longer cuts than the overview).""",
                   samples_check,
                   lambda a, c: {"layer": a["layer"], "position": a["position"], "examples":
                                 evidence.steering_examples(a["layer"], a["position"], a["n"],
                                                            settings.details_sample_chars, a["prompts_subset"])})
    steer = Tool("generate_steered", f"""\
  Args: {{"layer": int, "position": int, "prompts": [str, ...], "n": int (default 1, at most {MAX_STEERED_PER_PROMPT})}}
  New samples of the finetuned model with that position's difference added at the strength the
  steering search found, n per prompt.
  Returns: {{"samples": [{{"prompt": str, "texts": [str, ...]}}, ...]}}.
  Cost: 1 model interaction per sample (len(prompts) x n).""", steer_check,
                 lambda a, c: models.steered(evidence, a["layer"], a["position"], a["prompts"], a["n"], c),
                 price=lambda a: len(a["prompts"]) * a["n"])
    return [lens, scope, samples, ask_model_tool(models), steer]


def blackbox_tools(models) -> list[Tool]:
    return [ask_model_tool(models)]


# -- the budgeted tools on the pair's engines ------------------------------------------------
def _identity(context: dict, kind: str, **more) -> dict:
    return {"kind": kind, "pair": context.get("pair"), "agent": context["agent"], "budget": context["budget"],
            "run": context["run"], "call": context["call"], **more}


class EngineModels:
    """ask_model and generate_steered through the pair's vLLM engines (Ray actor handles)."""

    def __init__(self, base_engine, finetuned_engine, job_seed: int, ask, steered):
        self.base, self.finetuned = base_engine, finetuned_engine
        self.job_seed, self.ask_settings, self.steered_settings = job_seed, ask, steered

    def _generate(self, engines, requests) -> list[list[str]]:
        import ray
        try:
            outputs = ray.get([engine.generate.remote(requests) for engine in engines])
        except ValueError as e:   # the engine rejected a request (RayTaskError(ValueError)): not the engine's death
            raise ToolError(" ".join(str(e).strip().splitlines()[-1:]) or "the model rejected the request") from None
        texts = []
        for results in outputs:
            by_index = {r.request_index: r.text for r in results}
            texts.append([by_index[i] for i in range(len(requests))])
        return texts

    def ask(self, prompts: list[str], context: dict) -> dict:
        from workers.generation import GenerationRequest
        s = self.ask_settings
        requests = [GenerationRequest(p, n=1, temperature=s.temperature, max_tokens=s.max_tokens,
                                      seed=sample_seed(self.job_seed, _identity(context, "agent_ask", prompt_index=i)))
                    for i, p in enumerate(prompts)]
        base, finetuned = self._generate([self.base, self.finetuned], requests)
        return {"base": base, "finetuned": finetuned}

    def steered(self, evidence: PairEvidence, layer: int, position: int, prompts: list[str], n: int,
                context: dict) -> dict:
        from workers.generation import GenerationRequest, Steering
        s = self.steered_settings
        steering = Steering(layer, evidence.alphas[(layer, position)] * evidence.vectors[(layer, position)])
        requests = [GenerationRequest(p, n=1, temperature=s.temperature, max_tokens=s.max_tokens, steering=steering,
                                      seed=sample_seed(self.job_seed, _identity(
                                          context, "agent_steered", layer=layer, position=position,
                                          prompt_index=i, sample_index=k)))
                    for i, p in enumerate(prompts) for k in range(n)]
        [texts] = self._generate([self.finetuned], requests)
        return {"samples": [{"prompt": p, "texts": texts[i * n:(i + 1) * n]} for i, p in enumerate(prompts)]}
