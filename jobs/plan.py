"""From a validated spec to a plan: the activation sets to extract (one per distinct
model, tokenizer, corpus, layers and dtype, shared by every pair that needs it), the
tokenized documents they read, and the pairs to reduce. Everything that can be wrong
with the inputs is found here, before anything is written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np

from common.errors import one_line
from jobs.cluster_check import check_ray_address
from jobs.corpus import corpus_identity, file_identity, iter_documents, kept_documents
from jobs.placement import ModelShape
from jobs.seeds import SEEDING_VERSION
from jobs.spec import JobSpec, ModelSource, Pair, as_plain, grader_identity
from storage import layout
from storage.store import StorageOptions
from workers.models import (ModelError, adapter_base_mismatch, check_weights, config_value, location_identity,
                            load_tokenizer, num_layers, read_adapter_config, read_config)
from workers.tokenization import TOKENIZATION_VERSION


class PlanError(RuntimeError):
    """An input problem found while planning, as one line."""


@dataclass(frozen=True)
class Documents:
    """The corpus as one tokenizer sees it, cut into shards of kept documents."""
    doc_ids: np.ndarray       # (kept,) indices into the corpus
    token_ids: np.ndarray     # (kept, n)
    read: int                 # documents read from the corpus, kept or not
    shard_size: int
    dropped: dict = field(default_factory=dict)   # documents read and not kept, by reason

    @property
    def num_shards(self) -> int:
        return -(-len(self.doc_ids) // self.shard_size)

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = slice(index * self.shard_size, (index + 1) * self.shard_size)
        return self.doc_ids[s], self.token_ids[s]


def model_label(source: ModelSource) -> str:
    """A model's short name (its folder's last two parts): an activation set's name and
    its actors' label."""
    return "/".join((source.adapter or source.model).rstrip("/").split("/")[-2:])


@dataclass(frozen=True)
class ActivationSet:
    prefix: str               # storage key prefix, content-addressed
    source: ModelSource
    layers: tuple[int, ...]
    identity: dict
    documents: Documents = field(repr=False)
    name: str = ""
    parameters: int = 0       # estimated from the config, for placement by memory
    shape: ModelShape | None = None   # what the memory estimate reads from the config


@dataclass(frozen=True)
class PairPlan:
    pair: Pair
    layers: tuple[int, ...]
    base: ActivationSet
    finetuned: ActivationSet
    out_dir: str              # storage key prefix of the pair's results (keyed by its two sets)
    # What the pair's stages may depend on besides the sets, by part: the method's
    # settings, and each enabled section's settings with the files they read. Each stage
    # picks its parts (jobs/stages.py Stage.settings) for its own content key.
    settings: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Plan:
    spec: JobSpec
    sets: tuple[ActivationSet, ...]
    pairs: tuple[PairPlan, ...]


def _resolve_layers(spec: JobSpec, blocks: int, where: str) -> tuple[int, ...]:
    out = set()
    for i, layer in enumerate(spec.method.layers):
        index = int(layer * (blocks - 1)) if isinstance(layer, float) else layer
        if index >= blocks:
            raise PlanError(f"method.layers[{i}]: block {index} is out of range for {where} "
                            f"({blocks} blocks: 0..{blocks - 1})")
        out.add(index)
    return tuple(sorted(out))


def check_pair_models(spec: JobSpec, pair: Pair, where: str, storage: StorageOptions) -> tuple[dict, dict, dict]:
    """(identities, configs, block counts) by role of a pair's two models, from their
    configs and folder listings alone (no weights are loaded). Errors name the field:
    a location that does not exist or holds no config or no weights, an adapter whose
    adapter_config.json is not PEFT's or names another base, and two models whose block
    count, hidden size or (unless the pair sets allow_vocab_mismatch) vocabulary size differ."""
    idents, configs, blocks = {}, {}, {}
    for role in ("base", "finetuned"):
        source, field = getattr(pair, role), f"{where}.{role}"
        try:
            # the config first: a folder that is no model's ("/") is refused before it is listed
            configs[role] = read_config(replace(source, adapter=None), storage, spec.trust_remote_code)
            idents[role] = {"model": location_identity(source.model, source.revision, storage)}
            blocks[role] = num_layers(configs[role])
            check_weights(source.model, storage)
        except ModelError as e:
            raise PlanError(f"{field}: {e}") from None
        if source.adapter:
            try:
                adapter_config = read_adapter_config(source.adapter, storage)
                idents[role]["adapter"] = location_identity(source.adapter, None, storage)
            except ModelError as e:
                raise PlanError(f"{field}.adapter: {e}") from None
            differs = adapter_base_mismatch(adapter_config or {}, pair.base.model)
            if differs:
                recorded, why = differs
                raise PlanError(f"{field}.adapter: {source.adapter.rstrip('/')}/adapter_config.json: "
                                f"base_model_name_or_path {recorded} is not {where}.base {pair.base.model}"
                                + (f" ({why})" if why else ""))
    if not pair.finetuned.adapter:   # an adapter's model is the base itself
        for what in ("blocks", "hidden size", "vocabulary"):
            values = {role: config_value(configs[role], what) for role in configs}
            if None in values.values() or values["base"][1] == values["finetuned"][1]:
                continue
            if what == "vocabulary" and pair.allow_vocab_mismatch:
                continue
            key, value = values["finetuned"]
            hint = (f"; set {where}.allow_vocab_mismatch: true to compare them anyway"
                    if what == "vocabulary" else "")
            raise PlanError(f"{where}.finetuned: {key} {value} does not match {where}.base "
                            f"({values['base'][1]}){hint}")
    return idents, configs, blocks


def check_token_ids(docs: Documents, configs: dict, where: str) -> None:
    """Both models embed the base tokenizer's token ids: each must lie below the model's
    vocab_size (a finetune with a smaller vocabulary, allowed by allow_vocab_mismatch,
    cannot read them)."""
    if not len(docs.token_ids):
        return
    top = int(docs.token_ids.max())
    for role, config in configs.items():
        vocab = config.get("vocab_size")
        if isinstance(vocab, int) and not isinstance(vocab, bool) and top >= vocab:
            raise PlanError(f"{where}.{role}: vocab_size {vocab} is too small for the base tokenizer's "
                            f"token ids (the corpus has token id {top})")


def analyses_identity(spec: JobSpec, pair: Pair, where: str) -> dict:
    """What each analysis stage reads besides its inputs, by stage: patchscope its
    settings; token relevance its settings, the domain description and the finetuning
    file's contents; the embedding similarity its settings and the contents of the
    finetuning and generic chat files (a missing file is an input error found here)."""
    from workers.demo_pair import DEMO_VERSION
    a = as_plain(spec.analyses)
    files = {name: file_identity(getattr(pair, name), f"{where}.{name}")
             for name in ("finetune_data", "generic_chat") if getattr(pair, name)}
    if not pair.generic_chat:   # the packaged control set
        files["generic_chat"] = {"packaged": DEMO_VERSION}
    pick = lambda prefix: {k: v for k, v in a.items() if k.startswith(prefix)}
    return {"patchscope": pick("patchscope_"),
            "token_relevance": {**{k: a[k] for k in ("relevance_top_k", "frequent_tokens", "min_generic_ratio")},
                                "description": pair.description,
                                "files": {k: v for k, v in files.items() if k == "finetune_data"}},
            "similarity": {**pick("embedding_"), "files": files}}


# What does not change an agent run's outcome stays out of the agent stage's key: how many
# requests go at once, how fast, how long to wait, and where the key lives.
AGENT_TRANSPORT = ("concurrency", "requests_per_second", "max_retries", "timeout_s", "api_key_env")


def agent_identity(spec: JobSpec, pair: Pair) -> dict:
    """The agent settings (endpoints and models, budgets, runs, sampling, the grader), the
    pair's description and organism type."""
    settings = {k: v for k, v in as_plain(spec.agent).items() if k not in AGENT_TRANSPORT}
    settings["grader"] = {k: v for k, v in settings["grader"].items() if k != "api_key_env"}
    return {**settings, "description": pair.description, "organism_type": pair.organism_type}

def check_grader_key(spec: JobSpec) -> None:
    """A grader the job will use (an LLM grader, with generation or analyses) whose spec
    names `api_key_env` needs that variable set: without it every request would fail.
    (Without api_key_env, $OPENAI_API_KEY is sent if set, else no key: local servers need none.)"""
    grader = spec.grader
    if grader is None or grader.kind != "openai" or not (spec.generation.enabled or spec.analyses.enabled):
        return
    name = grader.api_key_env
    if name is not None and not os.environ.get(name):
        raise PlanError(f"grader.api_key_env: the environment variable {name} is not set "
                        f"(it must hold the grader's API key)")


def make_plan(spec: JobSpec) -> Plan:
    storage = spec.storage.options
    n = spec.method.tokens_per_document
    corpus_ident = corpus_identity(spec.corpus)
    documents: dict[str, Documents] = {}     # by tokenizer identity
    sets: dict[str, ActivationSet] = {}
    pairs = []
    check_grader_key(spec)
    check_ray_address(spec)
    for i, pair in enumerate(spec.pairs):
        where = f"pairs[{i}]"
        idents, configs, blocks = check_pair_models(spec, pair, where, storage)
        try:
            shapes = {role: ModelShape.of_config(config) for role, config in configs.items()}
            parameters = {role: shape.parameters for role, shape in shapes.items()}
        except (TypeError, ValueError, ZeroDivisionError):
            if spec.compute.gpu_memory_gb:
                raise PlanError(f"{where}: cannot estimate the model's memory from its config "
                                f"(compute.gpu_memory_gb needs hidden_size, layers and heads)") from None
            parameters, shapes = {"base": 0, "finetuned": 0}, {"base": None, "finetuned": None}
        layers = _resolve_layers(spec, blocks["base"], f"{where}.base")

        # The base model's tokenizer serves both models of the pair. Which documents
        # are kept depends on it (too short in its tokens), so each reads the corpus.
        tok_key = layout.content_key(idents["base"]["model"])
        if tok_key not in documents:
            iter_documents(spec.corpus).close()   # a corpus error comes before a tokenizer's
            try:
                tokenizer = load_tokenizer(pair.base, storage, spec.trust_remote_code)
            except Exception as e:
                raise PlanError(f"{where}.base: cannot load its tokenizer: {one_line(e, typed=False)}") from None
            kept = kept_documents(spec.corpus, tokenizer, n)
            documents[tok_key] = Documents(kept.doc_ids, kept.token_ids, kept.read, spec.shard_size, kept.dropped)
        docs = documents[tok_key]
        check_token_ids(docs, configs, where)

        def activation_set(role: str) -> ActivationSet:
            identity = {"model": idents[role], "tokenizer": idents["base"]["model"],
                        "corpus": corpus_ident, "tokenization": TOKENIZATION_VERSION,
                        "tokens_per_document": n, "layers": list(layers), "dtype": spec.dtype,
                        "shard_size": spec.shard_size}
            source = getattr(pair, role)
            # The readable part of the prefix comes from the location alone, so that
            # every pair naming the same model shares the set.
            name = model_label(source)
            prefix = layout.activation_set(name, identity)
            return sets.setdefault(prefix, ActivationSet(prefix, source, layers, identity, docs, name,
                                                         parameters[role], shapes[role]))

        base, finetuned = activation_set("base"), activation_set("finetuned")
        settings = {"norm_skip_positions": spec.method.norm_skip_positions,
                    "positions": list(spec.method.positions), "lens_top_k": spec.method.lens_top_k}
        if spec.generation.enabled or spec.analyses.enabled:
            settings["grader"] = grader_identity(spec.grader)
        if spec.generation.enabled:
            settings.update(generation=as_plain(spec.generation), seeding=SEEDING_VERSION)
        if spec.analyses.enabled:
            settings.update(analyses_identity(spec, pair, where))
        if spec.agent.enabled:
            settings["agent"] = agent_identity(spec, pair)
        if spec.causal_effect.enabled:
            files = ({"finetune_data": file_identity(pair.finetune_data, f"{where}.finetune_data")}
                     if pair.finetune_data else {})
            settings["causal_effect"] = {**as_plain(spec.causal_effect), "files": files}
        # The folder is the pair's two sets; what each stage computed from them is keyed
        # by its own settings and inputs (jobs/stages.py stage_keys), so a changed
        # setting reruns only the stages that depend on it, in place.
        out_dir = layout.pair_dir(pair.name, {"base": base.prefix, "finetuned": finetuned.prefix})
        pairs.append(PairPlan(pair, layers, base, finetuned, out_dir, settings))
    return Plan(spec, tuple(sets.values()), tuple(pairs))
