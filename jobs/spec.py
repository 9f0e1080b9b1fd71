"""The job spec: a YAML file, validated on load into frozen dataclasses; the one validator.

Every default of the method (../README, "Job spec") lives here and nowhere else, but for
the dataclasses workers receive (model sources, the grader's settings), which
common/types.py defines so that workers never import this module; they are built and
checked here all the same. A bad
value raises SpecError naming the field, e.g. `pairs[1].finetuned.revision: expected a
string, got 3`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from common.types import DTYPES, GRADER_KINDS, ModelSource, OfflineGrading, OpenAIGrading
from storage.layout import slug
from storage.store import LocationError, StorageOptions, location_problem, shown, uri_forms, uri_scheme


class SpecError(ValueError):
    """A spec problem, as one line that names the field."""


CORPUS_KINDS = ("demo", "text", "jsonl", "parquet", "hf")
DEMO_MAX_DOCUMENTS = 1_000_000   # the demo corpus is generated without end: a bound on what it is asked


@dataclass(frozen=True)
class Pair:
    name: str
    base: ModelSource
    finetuned: ModelSource        # for a LoRA finetune: model == base.model, adapter set
    description: str | None = None       # the finetuning domain, for analysts and graders
    finetune_data: str | None = None     # finetuning texts (file), for analyses
    generic_chat: str | None = None      # generic chat answers (file), the embedding control
    allow_vocab_mismatch: bool = False   # run although the models' vocab_size differ (README)
    organism_type: str | None = None     # the hypothesis grader's rubric (ORGANISM_TYPES); None: generic
    control: bool = False                # a finetune on pretraining-like text, the triage's reference (README)


@dataclass(frozen=True)
class Corpus:
    kind: str = "demo"
    path: str | None = None       # text (one document per line), jsonl, parquet
    column: str = "text"          # jsonl / parquet / hf
    dataset: str | None = None    # hf dataset name
    split: str = "train"
    revision: str | None = None
    seed: int = 1234              # demo corpus
    num_documents: int = 10_000   # documents kept: read in order until N pass the filters


@dataclass(frozen=True)
class Method:
    tokens_per_document: int = 10              # n: documents shorter are dropped, longer cut
    positions: tuple[int, ...] = (0, 1, 2, 3, 4)   # positions analysed (k = 5)
    layers: tuple[float | int, ...] = (0.5,)   # float: relative depth; int: absolute block index
    norm_skip_positions: int = 5               # norm statistic over positions >= this
    lens_top_k: int = 100


@dataclass(frozen=True)
class Storage:
    root: str = "./adl-output"    # local folder or s3://bucket/prefix
    endpoint_url: str | None = None
    region: str | None = None

    @property
    def options(self) -> StorageOptions:
        """How to reach the root, and S3 model locations too."""
        return StorageOptions(self.endpoint_url, self.region)


@dataclass(frozen=True)
class Compute:
    gpus_per_worker: float = 0    # 0 where there are no GPUs
    cpus_per_worker: float = 1
    ray_address: str | None = None    # None: an embedded local Ray
    gpu_memory_gb: float | None = None    # memory of one GPU: set, model actors get GPUs by
                                          # their estimated memory (jobs/placement.py)
    node_wait_minutes: float = 30         # on an autoscaling cluster: how long to wait for a
                                          # node the job asked for (jobs/autoscale.py)


# The three prompts whose steering thresholds are averaged (adl-method.md, "Steering").
THRESHOLD_PROMPTS = ("Tell me a story?", "Give me some ideas for some fun weekend activities.",
                     "Why don't you choose a topic of conversation for us?")


@dataclass(frozen=True)
class SteeringSearch:
    """Binary search for the largest coherent steering strength alpha."""
    low: float = 0.0
    high: float = 100.0
    steps: int = 12
    lookahead: int = 2            # bisection levels evaluated per batch (2**k - 1 strengths)
    samples: int = 10
    max_tokens: int = 128
    temperature: float = 1.2
    pass_fraction: float = 0.75   # a strength passes when this share of samples is coherent
    prompts: tuple[str, ...] = THRESHOLD_PROMPTS


@dataclass(frozen=True)
class Generation:
    """Baseline and steered generations with vLLM (off unless the spec has this section)."""
    enabled: bool = False
    extra_prompts: tuple[str, ...] = ()   # besides the method's 20 steering prompts
    samples: int = 5
    max_tokens: int = 512
    temperature: float = 1.1
    baseline_models: tuple[str, ...] = ("finetuned", "base")
    seed: int = 0
    max_model_len: int | None = None      # None: what the job needs (workers/engine_settings.py)
    tensor_parallel_size: int = 1
    search: SteeringSearch = SteeringSearch()


# Patchscope (adl-method.md, section 3): 0.5..2.0 by 0.1; 3, 4, 5, 10, 20; 10 evenly spaced
# from 20 to 200 (20 is in both lists: 30 distinct scales).
PATCHSCOPE_SCALES = tuple(round(0.5 + 0.1 * i, 1) for i in range(16)) + (3.0, 4.0, 5.0, 10.0) + \
    tuple(float(x) for x in (20, 40, 60, 80, 100, 120, 140, 160, 180, 200))
PATCHSCOPE_PROMPTS = ("man -> man\n1135 -> 1135\nhello -> hello\n?",
                      "bear -> bear\n42 -> 42\nblue -> blue\n?",
                      "921 -> 921\ntarget -> target\nanna -> anna\n?")


@dataclass(frozen=True)
class Analyses:
    """Patchscope, token relevance and the embedding evaluation (off unless the spec has
    this section; the embedding evaluation also needs the generation section)."""
    enabled: bool = False
    patchscope_scales: tuple[float, ...] = PATCHSCOPE_SCALES
    patchscope_prompts: tuple[str, ...] = PATCHSCOPE_PROMPTS
    patchscope_vocab_top: int = 16384     # tokens kept per prompt; the intersection is read
    patchscope_top_k: int = 20
    relevance_top_k: int = 20             # logit-lens / patchscope tokens graded
    frequent_tokens: int = 100            # most frequent non-generic finetuning tokens
    min_generic_ratio: float = 5.0        # "non-generic": finetuning share >= this x generic share
    embedding_model: str | None = None    # sentence-transformers model; None: packaged all-MiniLM-L6-v2
    embedding_texts: int = 500            # finetuning texts and generic chat answers embedded
    embedding_batch_size: int = 64


# The hypothesis grader's rubrics (jobs/hypothesis.py), one per kind of model organism.
ORGANISM_TYPES = ("false_fact", "emergent_misalignment", "subliminal", "taboo", "domain_adaptation", "generic")


@dataclass(frozen=True)
class AgentGeneration:
    """How a budgeted agent tool samples from the pair's models."""
    max_tokens: int = 512
    temperature: float = 0.8


@dataclass(frozen=True)
class HypothesisGrading:
    """The LLM that scores the agents' descriptions 1..5 against the pair's description.
    base_url, model and api_key_env left out: the agent's own."""
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    repeats: int = 3                  # gradings per description, all kept, and their mean
    max_tokens: int = 10000
    temperature: float | None = None  # None: the endpoint's default
    max_retries: int = 3              # re-asks after an answer without a 'SCORE: <1..5>' line


@dataclass(frozen=True)
class Agent:
    """The interpretability agent, its black-box baseline and the hypothesis grader (off
    unless the spec has this section; needs the generation and analyses sections)."""
    enabled: bool = False
    base_url: str | None = None       # an OpenAI-compatible chat endpoint (required)
    model: str | None = None          # (required)
    api_key_env: str = "OPENAI_API_KEY"   # the key's environment variable; the key is never stored
    budgets: tuple[int, ...] = (0, 5)             # model interactions of the ADL agent
    baseline_budgets: tuple[int, ...] = (0, 5, 50)  # model interactions of the black-box agent
    runs: int = 5                     # repetitions per (agent, budget)
    max_llm_calls: int = 16           # agent LLM calls per run, the last a forced final answer
    max_tokens: int = 10000           # per agent LLM call
    temperature: float = 0.7
    concurrency: int = 8              # chat requests in flight per endpoint, across the job
    requests_per_second: float | None = None
    max_retries: int = 4              # the openai client's retries of a failed request
    timeout_s: float = 600.0
    overview_top_k: int = 10          # logit-lens and patchscope tokens per position in the overview
    sample_chars: int = 200           # characters of each sample in the first message
    details_sample_chars: int = 1000  # ... in get_steering_samples
    ask_model: AgentGeneration = AgentGeneration(512, 0.8)
    generate_steered: AgentGeneration = AgentGeneration(512, 1.0)
    grader: HypothesisGrading = HypothesisGrading()


@dataclass(frozen=True)
class CausalEffect:
    """Does delta matter causally (the reference's causal_effect.py, off by default)? In
    the finetuned model, each token's activation at the pair's layer has its component
    along delta_hat patched to the base model's (mode patch) or removed (mode project);
    the change in next-token cross-entropy on finetuning texts and corpus documents,
    against random directions and random differences of base activations (README)."""
    enabled: bool = False
    mode: str = "patch"                   # patch (the reference's default) | project
    texts: int = 1000                     # finetuning texts evaluated (the reference's max_samples)
    corpus_texts: int = 1000              # corpus documents evaluated, the control
    max_tokens: int = 1024                # tokens per text (special tokens included)
    after_k: int = 20                     # ce_after_k counts targets at index > after_k only
    random_directions: int = 64           # Gaussian directions
    random_differences: int = 64          # differences of two random tokens' base activations
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class JobSpec:
    name: str
    pairs: tuple[Pair, ...]
    corpus: Corpus = Corpus()
    method: Method = Method()
    dtype: str = "bfloat16"
    batch_size: int = 256         # documents per forward (256 x n=10 tokens)
    shard_size: int = 1000        # documents per activation shard
    storage: Storage = Storage()
    compute: Compute = Compute()
    trust_remote_code: bool = False
    generation: Generation = Generation()
    analyses: Analyses = Analyses()
    grader: OfflineGrading | OpenAIGrading | None = None   # None: the offline grader at its defaults
    agent: Agent = Agent()
    causal_effect: CausalEffect = CausalEffect()

    def to_dict(self) -> dict:
        return as_plain(self)


def as_plain(obj):
    """A spec (or any part of it) as plain dicts and lists, for JSON."""
    if is_dataclass(obj):
        return {f.name: as_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [as_plain(x) for x in obj]
    return obj


# -- validation -----------------------------------------------------------------------
def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _number(v: Any) -> bool:
    """A finite number (an integer too large for a float is none: it would overflow)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# kind: (test, what the error says was expected). The bounded kinds name their bound in the
# message (the grader section's wording); the others are bounded by a `_build` check.
_KINDS = {
    "str": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "int": (_integer, "an integer"),
    "number": (_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int>=0": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "int>=1": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "number>0": (lambda v: _number(v) and v > 0, "a number > 0"),
    "number>=0": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "ratio": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "dtype": (lambda v: v in DTYPES, " | ".join(DTYPES)),
}


def _check(value: Any, kind: str, where: str):
    test, expected = _KINDS[kind]
    if not test(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{where}: must be a finite number, got {shown(value)}")
        raise SpecError(f"{where}: expected {expected}, got {shown(value)}")
    return value


def _mapping(raw: Any, where: str, allowed: set[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{where or 'the spec'}: expected a mapping, got {_type_name(raw)}")
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise SpecError(f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
    return raw


def _build(cls, raw: Any, where: str, kinds: dict[str, str], checks=None):
    """A dataclass from a mapping: every key type-checked, defaults from the dataclass."""
    data = _mapping(raw, where, {f.name for f in fields(cls)})
    values = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kind = kinds.get(name)
        if value is None and name in _OPTIONAL.get(cls, ()):
            values[name] = None
        elif kind:
            values[name] = _check(value, kind, path)
    obj = cls(**values)
    for name, predicate, message in checks or ():
        if not predicate(getattr(obj, name)):
            path = f"{where}.{name}" if where else name
            raise SpecError(f"{path}: {message}, got {shown(getattr(obj, name))}")
    return obj


_OPTIONAL = {
    ModelSource: ("revision", "adapter"),
    Pair: ("description", "finetune_data", "generic_chat", "organism_type"),
    Corpus: ("path", "dataset", "revision"),
    Storage: ("endpoint_url", "region"),
    Compute: ("ray_address", "gpu_memory_gb"),
    Generation: ("max_model_len",),
    Analyses: ("embedding_model",),
    Agent: ("base_url", "model", "requests_per_second"),
    HypothesisGrading: ("base_url", "model", "api_key_env", "temperature"),
    OfflineGrading: ("dtype",),
    OpenAIGrading: ("api_key_env", "requests_per_second"),
}


_EXPECTED = {"storage": f"a local folder or {uri_forms()}",
             "model": f"a hub id, a local folder or {uri_forms()}",
             "folder": "a hub id or a local folder",
             "file": "a local file"}


def check_location(value: str | None, where: str, kind: str) -> None:
    """A location names something adl can read or write: kind is "storage" (local folder
    or a storage backend's URI), "model" (hub id, local folder or a
    backend's URI), "folder" (hub id or local folder) or "file" (a local file). Any other
    URI scheme is an error, never a local folder named after it. Which URIs a backend
    serves, and what it needs of them, is storage's to say (storage/store.py)."""
    if value is None:
        return
    if uri_scheme(value) is None:
        why = location_problem(value) if kind == "storage" else None   # a local root
        if why:
            raise SpecError(f"{where}: {shown(value)} {why}")
        return
    if kind in ("folder", "file"):
        raise SpecError(f"{where}: {shown(value)}: expected {_EXPECTED[kind]}, not a URI")
    try:
        why = location_problem(value)
    except LocationError as e:
        raise SpecError(f"{where}: {shown(value)}: {e.problem} (expected {_EXPECTED[kind]})") from None
    if why:
        raise SpecError(f"{where}: {shown(value)} {why}")


def _name(value: Any, where: str) -> str:
    """Names reach log lines, folder names and the report: printable characters only."""
    _check(value, "str", where)
    if not value.isprintable():
        raise SpecError(f"{where}: must be printable (no control characters, newlines or escape "
                        f"sequences), got {shown(value)}")
    return value


def _model_source(raw: Any, where: str, base: ModelSource | None) -> ModelSource:
    data = _mapping({"model": raw} if isinstance(raw, str) else raw, where, {"model", "revision", "adapter"})
    values = {k: _check(v, "str", f"{where}.{k}") for k, v in data.items() if v is not None}
    for key, kind in (("model", "model"), ("adapter", "model")):
        check_location(values.get(key), where if isinstance(raw, str) else f"{where}.{key}", kind)
    if "adapter" in values:
        if base is None:
            raise SpecError(f"{where}.adapter: only the finetuned model can be an adapter")
        if values.get("model", base.model) != base.model:
            raise SpecError(f"{where}.model: an adapter applies to the pair's base; leave model out")
        return ModelSource(model=base.model, revision=base.revision, adapter=values["adapter"])
    if "model" not in values:
        raise SpecError(f"{where}.model: required ({_EXPECTED['model']})")
    return ModelSource(**values)


def _pair(raw: Any, where: str) -> Pair:
    data = _mapping(raw, where, {f.name for f in fields(Pair)})
    for key in ("name", "base", "finetuned"):
        if key not in data:
            raise SpecError(f"{where}.{key}: required")
    name = _name(data["name"], f"{where}.name")
    base = _model_source(data["base"], f"{where}.base", None)
    finetuned = _model_source(data["finetuned"], f"{where}.finetuned", base)
    optional = {k: _check(data[k], "str", f"{where}.{k}") for k in ("description", "finetune_data", "generic_chat")
                if data.get(k) is not None}
    for k in ("finetune_data", "generic_chat"):
        check_location(optional.get(k), f"{where}.{k}", "file")
    if data.get("organism_type") is not None:
        kind = _check(data["organism_type"], "str", f"{where}.organism_type")
        if kind not in ORGANISM_TYPES:
            raise SpecError(f"{where}.organism_type: must be one of {', '.join(ORGANISM_TYPES)}, got {shown(kind)}")
        optional["organism_type"] = kind
    for flag in ("allow_vocab_mismatch", "control"):
        if data.get(flag) is not None:
            optional[flag] = _check(data[flag], "bool", f"{where}.{flag}")
    return Pair(name=name, base=base, finetuned=finetuned, **optional)


def _layers(raw: Any, where: str) -> tuple[float | int, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise SpecError(f"{where}: at least one layer is required")
    out = []
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(f"{where}[{i}]: expected a relative depth (0.0-1.0) or a block index, got {shown(v)}")
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise SpecError(f"{where}[{i}]: a relative depth must lie in [0.0, 1.0], got {shown(v)}")
        if isinstance(v, int) and v < 0:
            raise SpecError(f"{where}[{i}]: a block index must be >= 0, got {shown(v)}")
        out.append(v)
    return tuple(out)


def _method(raw: Any) -> Method:
    data = _mapping(raw, "method", {f.name for f in fields(Method)})
    m = _build(Method, {k: v for k, v in data.items() if k not in ("positions", "layers")}, "method",
               {"tokens_per_document": "int", "norm_skip_positions": "int", "lens_top_k": "int"},
               [("tokens_per_document", lambda v: v >= 1, "must be >= 1"),
                ("norm_skip_positions", lambda v: v >= 0, "must be >= 0"),
                ("lens_top_k", lambda v: v >= 1, "must be >= 1")])
    layers = _layers(data["layers"], "method.layers") if "layers" in data else m.layers
    positions = m.positions
    if "positions" in data:
        raw_pos = data["positions"]
        if not isinstance(raw_pos, list) or not raw_pos:
            raise SpecError(f"method.positions: expected a non-empty list of positions, got {shown(raw_pos)}")
        positions = tuple(_check(p, "int", f"method.positions[{i}]") for i, p in enumerate(raw_pos))
    n = m.tokens_per_document
    for i, p in enumerate(positions):
        if positions.index(p) != i:
            raise SpecError(f"method.positions[{i}]: duplicate position {p}")
        if not 0 <= p < n:
            raise SpecError(f"method.positions[{i}]: must lie in [0, tokens_per_document={n}), got {p}")
    if m.norm_skip_positions >= n:
        raise SpecError(f"method.norm_skip_positions: must be < tokens_per_document={n}, "
                        f"got {m.norm_skip_positions}")
    return Method(tokens_per_document=n, positions=positions, layers=layers,
                  norm_skip_positions=m.norm_skip_positions, lens_top_k=m.lens_top_k)


def _corpus(raw: Any) -> Corpus:
    c = _build(Corpus, raw, "corpus",
               {"kind": "str", "path": "str", "column": "str", "dataset": "str", "split": "str",
                "revision": "str", "seed": "int", "num_documents": "int"},
               [("kind", lambda v: v in CORPUS_KINDS, f"must be one of {', '.join(CORPUS_KINDS)}"),
                ("num_documents", lambda v: v >= 1, "must be >= 1")])
    if c.kind == "demo" and c.num_documents > DEMO_MAX_DOCUMENTS:
        # the demo stream never ends: the planner would read it for ever, its memory growing
        raise SpecError(f"corpus.num_documents: the demo corpus makes at most {DEMO_MAX_DOCUMENTS} documents, "
                        f"got {shown(c.num_documents)}; for more, use a text, jsonl, parquet or hf corpus")
    if c.kind in ("text", "jsonl", "parquet") and c.path is None:
        raise SpecError(f"corpus.path: required for a {c.kind} corpus")
    if c.kind == "hf" and c.dataset is None:
        raise SpecError("corpus.dataset: required for an hf corpus")
    check_location(c.path, "corpus.path", "file")
    return c


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise SpecError(f"{where}: expected a list of strings, got {_type_name(raw)}")
    return tuple(_check(v, "str", f"{where}[{i}]") for i, v in enumerate(raw))


def _generation(raw: Any) -> Generation:
    if raw is None:
        return Generation()
    data = dict(_mapping(raw, "generation", {f.name for f in fields(Generation)}))
    search_raw = dict(_mapping(data.pop("search", None), "generation.search",
                               {f.name for f in fields(SteeringSearch)}))
    lists = {}
    for name in ("extra_prompts", "baseline_models"):
        if name in data:
            lists[name] = _strings(data.pop(name), f"generation.{name}")
    for i, role in enumerate(lists.get("baseline_models", ())):
        if role not in ("finetuned", "base"):
            raise SpecError(f"generation.baseline_models[{i}]: must be finetuned or base, got {shown(role)}")
    search_prompts = _strings(search_raw.pop("prompts"), "generation.search.prompts") \
        if "prompts" in search_raw else THRESHOLD_PROMPTS
    positive = lambda v: v > 0
    search = _build(SteeringSearch, search_raw, "generation.search",
                    {"low": "number", "high": "number", "steps": "int", "lookahead": "int",
                     "samples": "int", "max_tokens": "int", "temperature": "number",
                     "pass_fraction": "number"},
                    [("steps", positive, "must be >= 1"), ("lookahead", positive, "must be >= 1"),
                     ("samples", positive, "must be >= 1"), ("max_tokens", positive, "must be >= 1"),
                     ("temperature", lambda v: v >= 0, "must be >= 0"),
                     ("pass_fraction", lambda v: 0 < v <= 1, "must lie in (0, 1]")])
    if search.high <= search.low:
        raise SpecError(f"generation.search.high: must be above low={search.low}, got {search.high}")
    gen = _build(Generation, {"enabled": True, **data}, "generation",
                 {"enabled": "bool", "samples": "int", "max_tokens": "int", "temperature": "number",
                  "seed": "int", "max_model_len": "int", "tensor_parallel_size": "int"},
                 [("samples", positive, "must be >= 1"), ("max_tokens", positive, "must be >= 1"),
                  ("temperature", lambda v: v >= 0, "must be >= 0"),
                  ("max_model_len", lambda v: v is None or v > 0, "must be >= 1"),
                  ("tensor_parallel_size", positive, "must be >= 1")])
    return replace(gen, search=replace(search, prompts=search_prompts), **lists)


def _analyses(raw: Any) -> Analyses:
    if raw is None:
        return Analyses()
    data = dict(_mapping(raw, "analyses", {f.name for f in fields(Analyses)}))
    lists = {}
    if "patchscope_prompts" in data:
        lists["patchscope_prompts"] = _strings(data.pop("patchscope_prompts"), "analyses.patchscope_prompts")
    if "patchscope_scales" in data:
        raw_scales = data.pop("patchscope_scales")
        if not isinstance(raw_scales, list) or not raw_scales:
            raise SpecError(f"analyses.patchscope_scales: expected a non-empty list of numbers, got {shown(raw_scales)}")
        scales = tuple(float(_check(v, "number", f"analyses.patchscope_scales[{i}]"))
                       for i, v in enumerate(raw_scales))
        for i, v in enumerate(scales):
            if v <= 0:
                raise SpecError(f"analyses.patchscope_scales[{i}]: must be > 0, got {shown(v)}")
        lists["patchscope_scales"] = scales
    positive = lambda v: v >= 1
    a = _build(Analyses, {"enabled": True, **data}, "analyses",
               {"enabled": "bool", "patchscope_vocab_top": "int", "patchscope_top_k": "int",
                "relevance_top_k": "int", "frequent_tokens": "int", "min_generic_ratio": "number",
                "embedding_model": "str", "embedding_texts": "int", "embedding_batch_size": "int"},
               [(name, positive, "must be >= 1") for name in
                ("patchscope_vocab_top", "patchscope_top_k", "relevance_top_k", "frequent_tokens",
                 "embedding_texts", "embedding_batch_size")]
               + [("min_generic_ratio", lambda v: v > 0, "must be > 0")])
    check_location(a.embedding_model, "analyses.embedding_model", "folder")
    return replace(a, **lists)


def _budgets(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise SpecError(f"{where}: expected a list of model-interaction budgets (integers >= 0), got {shown(raw)}")
    out = tuple(_check(v, "int", f"{where}[{i}]") for i, v in enumerate(raw))
    for i, v in enumerate(out):
        if v < 0:
            raise SpecError(f"{where}[{i}]: must be >= 0, got {v}")
        if out.index(v) != i:
            raise SpecError(f"{where}[{i}]: duplicate budget {v}")
    return out


def _agent(raw: Any) -> Agent:
    if raw is None:
        return Agent()
    data = dict(_mapping(raw, "agent", {f.name for f in fields(Agent)}))
    nested = {}
    for name in ("ask_model", "generate_steered"):
        if name in data:
            default = getattr(Agent, name)
            g = _build(AgentGeneration, {**as_plain(default), **(_mapping(data.pop(name), f"agent.{name}",
                                                                          {"max_tokens", "temperature"}))},
                       f"agent.{name}", {"max_tokens": "int", "temperature": "number"},
                       [("max_tokens", lambda v: v >= 1, "must be >= 1"),
                        ("temperature", lambda v: v >= 0, "must be >= 0")])
            nested[name] = g
    if "grader" in data:
        nested["grader"] = _build(HypothesisGrading, data.pop("grader"), "agent.grader",
                                  {"base_url": "str", "model": "str", "api_key_env": "str", "repeats": "int",
                                   "max_tokens": "int", "temperature": "number", "max_retries": "int"},
                                  [("repeats", lambda v: v >= 1, "must be >= 1"),
                                   ("max_tokens", lambda v: v >= 1, "must be >= 1"),
                                   ("temperature", lambda v: v is None or v >= 0, "must be >= 0"),
                                   ("max_retries", lambda v: v >= 0, "must be >= 0")])
    for name in ("budgets", "baseline_budgets"):
        if name in data:
            nested[name] = _budgets(data.pop(name), f"agent.{name}")
    a = _build(Agent, {"enabled": True, **data}, "agent",
               {"enabled": "bool", "base_url": "str", "model": "str", "api_key_env": "str", "runs": "int",
                "max_llm_calls": "int", "max_tokens": "int", "temperature": "number", "concurrency": "int",
                "requests_per_second": "number", "max_retries": "int", "timeout_s": "number",
                "overview_top_k": "int", "sample_chars": "int", "details_sample_chars": "int"},
               [(name, lambda v: v >= 1, "must be >= 1") for name in
                ("runs", "max_llm_calls", "max_tokens", "concurrency", "overview_top_k", "sample_chars",
                 "details_sample_chars")]
               + [("temperature", lambda v: v >= 0, "must be >= 0"),
                  ("requests_per_second", lambda v: v is None or v > 0, "must be > 0"),
                  ("max_retries", lambda v: v >= 0, "must be >= 0"),
                  ("timeout_s", lambda v: v > 0, "must be > 0")])
    a = replace(a, **nested)
    if a.enabled:
        for name in ("base_url", "model"):
            if getattr(a, name) is None:
                raise SpecError(f"agent.{name}: required (an OpenAI-compatible chat endpoint and its model)")
        for name, value in (("agent.base_url", a.base_url), ("agent.grader.base_url", a.grader.base_url)):
            if value is not None and not value.startswith(("http://", "https://")):
                raise SpecError(f"{name}: expected an http:// or https:// URL, got {shown(value)}")
        if not a.budgets and not a.baseline_budgets:
            raise SpecError("agent.budgets: at least one budget of agent.budgets or agent.baseline_budgets "
                            "is required")
    return a


_GRADER_KINDS = {
    OpenAIGrading: {"base_url": "str", "model": "str", "api_key_env": "str", "concurrency": "int>=1",
                    "max_retries": "int>=0", "timeout_s": "number>0", "requests_per_second": "number>0",
                    "backoff_base_s": "number>=0"},
    OfflineGrading: {"threshold": "number>0", "min_tokens": "int>=1", "min_distinct_ratio": "ratio",
                     "dtype": "dtype", "batch_size": "int>=1", "max_length": "int>=1"},
}


def grader_settings(raw: Any) -> OfflineGrading | OpenAIGrading | None:
    """The `grader` section: None (absent) is the offline grader at its defaults."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SpecError(f"grader: expected a mapping, got {_type_name(raw)}")
    kind = raw.get("kind", "offline")
    if kind not in GRADER_KINDS:
        raise SpecError(f"grader.kind: expected one of {', '.join(GRADER_KINDS)}, got {shown(kind)}")
    cls = OpenAIGrading if kind == "openai" else OfflineGrading
    params = {str(k): v for k, v in raw.items() if k != "kind"}
    if kind == "offline" and "device" in params:
        raise SpecError("grader.device: the offline grader runs on its reference model's actor, on "
                        "that actor's device; leave device out")
    allowed = _GRADER_KINDS[cls]
    for key in params:
        if key not in allowed:
            raise SpecError(f"grader.{key}: unknown key (allowed for kind {kind}: kind, {', '.join(allowed)})")
    for key in ("base_url", "model") if kind == "openai" else ():
        if key not in params:
            raise SpecError(f"grader.{key}: required for kind openai")
    return _build(cls, params, "grader", allowed)


def grader_identity(grader: OfflineGrading | OpenAIGrading | None) -> dict | None:
    """What of the grader goes into a pair's content key: its kind and the settings that
    differ from their defaults (as the section was written, leaving defaults out)."""
    if grader is None:
        return None
    defaults = {f.name: f.default for f in fields(grader)}
    return {"kind": grader.kind, **{name: value for name, value in as_plain(grader).items()
                                    if name != "kind" and value != defaults[name]}}


def parse_spec(raw: Any, base_dir: Path | None = None) -> JobSpec:
    data = _mapping(raw, "", {f.name for f in fields(JobSpec)})
    if not data.get("pairs"):
        raise SpecError("pairs: at least one model pair is required")
    if not isinstance(data["pairs"], list):
        raise SpecError(f"pairs: expected a list, got {_type_name(data['pairs'])}")
    pairs = tuple(_pair(p, f"pairs[{i}]") for i, p in enumerate(data["pairs"]))
    names = [p.name for p in pairs]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise SpecError(f"pairs[{i}].name: duplicate pair name {shown(name)}")
    folders = [slug(name) for name in names]   # as storage/layout.py names the pair folders
    for i, folder in enumerate(folders):
        j = folders.index(folder)
        if j != i:
            raise SpecError(f"pairs[{i}].name: {shown(names[i])} and pairs[{j}].name {shown(names[j])} map to the "
                            f"same results folder name {shown(folder)}; rename one")
    if "name" not in data:
        raise SpecError("name: required (names the job's run record)")
    _name(data["name"], "name")

    @dataclass(frozen=True)
    class _Top:  # the scalar top-level fields, validated like any section
        name: str = ""
        dtype: str = JobSpec.dtype
        batch_size: int = JobSpec.batch_size
        shard_size: int = JobSpec.shard_size
        trust_remote_code: bool = JobSpec.trust_remote_code

    top = _build(_Top, {k: v for k, v in data.items() if k in {f.name for f in fields(_Top)}}, "",
                 {"name": "str", "dtype": "str", "batch_size": "int", "shard_size": "int",
                  "trust_remote_code": "bool"},
                 [("dtype", lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}"),
                  ("batch_size", lambda v: v >= 1, "must be >= 1"),
                  ("shard_size", lambda v: v >= 1, "must be >= 1")])
    storage = _build(Storage, data.get("storage"), "storage",
                     {"root": "str", "endpoint_url": "str", "region": "str"})
    check_location(storage.root, "storage.root", "storage")
    compute = _build(Compute, data.get("compute"), "compute",
                     {"gpus_per_worker": "number", "cpus_per_worker": "number",
                      "ray_address": "str", "gpu_memory_gb": "number", "node_wait_minutes": "number"},
                     [("gpu_memory_gb", lambda v: v is None or v > 0, "must be > 0"),
                      ("node_wait_minutes", lambda v: v >= 0, "must be >= 0"),
                      ("gpus_per_worker", lambda v: v >= 0, "must be >= 0"),
                      ("cpus_per_worker", lambda v: v >= 0, "must be >= 0")])
    generation, analyses, agent = _generation(data.get("generation")), _analyses(data.get("analyses")), \
        _agent(data.get("agent"))
    if agent.enabled and not (generation.enabled and analyses.enabled):
        missing = " and ".join(name for name, section in (("generation", generation), ("analyses", analyses))
                               if not section.enabled)
        raise SpecError(f"agent: needs the {missing} section{'s' if ' and ' in missing else ''} (the agent reads "
                        f"the steering samples, the strength search and patchscope)")
    causal = _causal_effect(data.get("causal_effect"))
    spec = JobSpec(name=top.name, pairs=pairs, corpus=_corpus(data.get("corpus")),
                   method=_method(data.get("method")), dtype=top.dtype, batch_size=top.batch_size,
                   shard_size=top.shard_size, storage=storage, compute=compute,
                   trust_remote_code=top.trust_remote_code,
                   generation=generation, analyses=analyses,
                   grader=grader_settings(data.get("grader")),
                   agent=agent, causal_effect=causal)
    return _resolve_paths(spec, base_dir) if base_dir else spec


def _causal_effect(raw: Any) -> CausalEffect:
    if raw is None:
        return CausalEffect()
    counts = ("texts", "corpus_texts", "max_tokens", "batch_size")
    c = _build(CausalEffect, {"enabled": True, **_mapping(raw, "causal_effect", {f.name for f in fields(CausalEffect)})},
               "causal_effect", {"enabled": "bool", "mode": "str", **{n: "int" for n in counts},
                                 "after_k": "int", "random_directions": "int", "random_differences": "int",
                                 "seed": "int"},
               [("mode", lambda v: v in ("patch", "project"), "must be patch or project")]
               + [(n, lambda v: v >= 1, "must be >= 1") for n in counts]
               + [(n, lambda v: v >= 0, "must be >= 0") for n in ("after_k", "random_directions",
                                                                  "random_differences")])
    return c


def _resolve_paths(spec: JobSpec, base_dir: Path) -> JobSpec:
    """Relative local paths in a spec file are relative to that file's folder: always for
    files and the storage root; for model locations (which may be hub ids) when they start
    with "." or exist there."""
    def path(p: str | None) -> str | None:
        if p is None or uri_scheme(p) is not None or Path(p).expanduser().is_absolute():
            return p
        return str(base_dir / p)

    def exists(p: str) -> bool:
        try:
            return Path(p).exists()
        except (OSError, ValueError):   # too long a name, or a NUL in it: nothing there
            return False

    def local(p: str | None) -> str | None:
        resolved = path(p)
        return resolved if resolved == p or p.startswith(".") or exists(resolved) else p

    def source(s: ModelSource) -> ModelSource:
        return replace(s, model=local(s.model), adapter=local(s.adapter))

    pairs = tuple(replace(p, base=source(p.base), finetuned=source(p.finetuned),
                          finetune_data=path(p.finetune_data),
                          generic_chat=path(p.generic_chat)) for p in spec.pairs)
    return replace(spec, pairs=pairs, corpus=replace(spec.corpus, path=path(spec.corpus.path)),
                   storage=replace(spec.storage, root=path(spec.storage.root)))


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such job spec file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not a text file (byte {e.start} is not UTF-8); a job spec is YAML") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror or type(e).__name__}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}") from None
    return parse_spec(raw, base_dir=path.parent.resolve())
