"""Loading models and tokenizers from a hub id, a local folder or an s3:// prefix, with
an optional LoRA adapter applied on top (not merged), and finding the parts of a causal
LM that the method reads: its decoder blocks, its final norm and its unembedding.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jobs.spec import ModelSource
from storage.store import Store

TORCH_DTYPES = ("bfloat16", "float16", "float32")


class ModelError(RuntimeError):
    """A model that cannot be found or read, as one line naming it."""


def cache_dir() -> Path:
    return Path(os.environ.get("ADL_CACHE", Path.home() / ".cache" / "adl"))


def location_kind(location: str) -> str:
    if location.startswith("s3://"):
        return "s3"
    if Path(location).expanduser().is_dir():
        return "local"
    # A hub id is "name" or "org/name"; anything path-like that is not a folder is missing.
    if location.startswith(("/", "./", "../", "~")) or location.count("/") > 1:
        return "missing"
    return "hub"


def _folder(location: str, s3: dict) -> Store:
    """A local or S3 model folder as a Store (its files by relative key)."""
    return Store(location if location.startswith("s3://") else str(Path(location).expanduser().resolve()), **s3)


def location_identity(location: str, revision: str | None, s3: dict) -> dict:
    """What determines the bytes behind a location: folder listings for local and S3
    (name, size, mtime), id and revision for the hub (pin a commit for reproducibility)."""
    kind = location_kind(location)
    if kind == "hub":
        return {"hub": location, "revision": revision or "main"}
    if kind == "missing":
        raise ModelError(f"{location}: no such model folder")
    store = _folder(location, s3)
    listing = store.listing()
    if not listing:
        raise ModelError(f"{location}: no files there")
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return {kind: store.uri(), "files": digest}


def materialize(location: str, s3: dict) -> str:
    """Something from_pretrained accepts: local folders and hub ids as they are, S3
    prefixes downloaded once into the local cache (keyed by their listing)."""
    if location_kind(location) != "s3":
        return str(Path(location).expanduser()) if location_kind(location) == "local" else location
    ident = location_identity(location, None, s3)
    dest = cache_dir() / "models" / hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]
    if not dest.is_dir():
        _folder(location, s3).download_prefix("", dest)
    return str(dest)


def read_config(source: ModelSource, s3: dict, trust_remote_code: bool) -> dict:
    """The model's config as a dict, without loading weights."""
    kind = location_kind(source.model)
    try:
        if kind == "missing":
            raise ModelError(f"{source.model}: no such model folder")
        if kind in ("local", "s3"):
            store = _folder(source.model, s3)
            if not store.exists("config.json"):
                raise ModelError(f"{source.model}: no config.json (not a transformers model folder)")
            config = store.read_json("config.json")
        else:
            from transformers import AutoConfig
            config = AutoConfig.from_pretrained(source.model, revision=source.revision,
                                                trust_remote_code=trust_remote_code).to_dict()
    except ModelError:
        raise
    except Exception as e:  # hub unreachable, bad JSON, S3 errors: one line is enough
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{source.model}: cannot read its config: {first}") from None
    if source.adapter:
        adapter = source.adapter
        if location_kind(adapter) == "missing":
            raise ModelError(f"{adapter}: no such adapter folder")
        if location_kind(adapter) in ("local", "s3"):
            store = _folder(adapter, s3)
            if not store.exists("adapter_config.json"):
                raise ModelError(f"{adapter}: no adapter_config.json (not a PEFT adapter folder)")
    return config.get("text_config", config) if "num_hidden_layers" not in config else config


def num_layers(config: dict) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise ModelError("config has no num_hidden_layers")


# The one home of loading: every runtime (transformers, PEFT, tokenizers, vLLM) reads a
# ModelSource through these functions, so a pinned revision, trust_remote_code and the
# device are honoured the same way everywhere.

def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(model):
    """Where a loaded model's inputs go (its first parameter's device; with a device map,
    the embedding's)."""
    return next(model.parameters()).device


def load_tokenizer(source: ModelSource, s3: dict, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(materialize(source.model, s3), revision=source.revision,
                                         trust_remote_code=trust_remote_code)


def load_model(source: ModelSource, *, dtype: str, s3: dict, trust_remote_code: bool = False,
               device: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM
    device = device or default_device()
    # An actor placed on several GPUs (a model larger than one) spreads its blocks over them.
    spread = device == "cuda" and torch.cuda.device_count() > 1
    model = AutoModelForCausalLM.from_pretrained(
        materialize(source.model, s3), revision=source.revision, dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code, **({"device_map": "auto"} if spread else {}))
    if source.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, materialize(source.adapter, s3))
    return (model if spread else model.to(device)).eval().requires_grad_(False)


def engine_arguments(source: ModelSource, s3: dict, trust_remote_code: bool = False) -> dict:
    """What a vLLM engine (workers.generation.GenerationEngine) takes for a ModelSource:
    the model fetched onto this node, its revision, and the adapter as a local folder."""
    return {"model": materialize(source.model, s3), "revision": source.revision,
            "lora_adapter": materialize(source.adapter, s3) if source.adapter else None,
            "trust_remote_code": trust_remote_code}


def core_model(model):
    """The transformer inside wrappers (PEFT, *ForCausalLM)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "model", None) or getattr(model, "transformer", None) \
        or getattr(model, "gpt_neox", None) or model


def decoder_layers(model):
    """The ModuleList of decoder blocks: the one with config.num_hidden_layers entries."""
    import torch
    n = model.config.num_hidden_layers
    for module in core_model(model).modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def final_norm(model):
    core = core_model(model)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        if hasattr(core, name):
            return getattr(core, name)
    raise ModelError(f"cannot find the final norm of {type(model).__name__}")
