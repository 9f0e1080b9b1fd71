"""Loading models and tokenizers from a hub id, a local folder or an s3:// prefix, with
an optional LoRA adapter applied on top (not merged), and finding the parts of a causal
LM that the method reads: its decoder blocks, its final norm and its unembedding.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from common.errors import one_line
from common.types import ModelSource
from storage.store import LocationError, StorageError, StorageOptions, Store, shown, storage_kind



class ModelError(RuntimeError):
    """A model that cannot be found or read, as one line naming it."""


def cache_dir() -> Path:
    return Path(os.environ.get("ADL_CACHE", Path.home() / ".cache" / "adl"))


def location_kind(location: str) -> str:
    """"local" (a folder here), the name of the storage backend that serves it ("s3": a
    prefix there; storage/store.py storage_kind), "hub" (a hub id) or "missing" (path-like,
    and no folder here)."""
    try:
        backend = storage_kind(location)
    except LocationError:   # a URI no backend serves: the spec refuses these, an adapter's config may name one
        backend = None
    if backend not in (None, "local"):
        return backend
    try:
        if Path(location).expanduser().is_dir():
            return "local"
    except (OSError, ValueError):   # a name too long for a path, or holding NUL: no folder
        return "missing"
    # A hub id is "name" or "org/name"; anything path-like that is not a folder is missing.
    if location.startswith(("/", "./", "../", "~")) or location.count("/") > 1:
        return "missing"
    return "hub"


def _remote(kind: str) -> bool:
    """A location_kind that a storage backend serves (s3), not a folder here or a hub id."""
    return kind not in ("local", "hub", "missing")


def _is_folder(kind: str) -> bool:
    """A location_kind whose files a Store reads: a folder here or a remote prefix."""
    return kind not in ("hub", "missing")


def _folder(location: str, storage: StorageOptions) -> Store:
    """A local or S3 model folder as a Store (its files by relative key)."""
    local = not _remote(location_kind(location))
    return Store.from_uri(str(Path(location).expanduser().resolve()) if local else location, storage)


def location_identity(location: str, revision: str | None, storage: StorageOptions) -> dict:
    """What determines the bytes behind a location: folder listings for local and S3
    (name, size, mtime), id and revision for the hub (pin a commit for reproducibility)."""
    kind = location_kind(location)
    if kind == "hub":
        return {"hub": location, "revision": revision or "main"}
    if kind == "missing":
        raise ModelError(f"{location}: no such model folder")
    store = _folder(location, storage)
    listing = store.listing()
    if not listing:
        raise ModelError(f"{location}: no files there")
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return {kind: store.uri(), "files": digest}


# Files of a model folder that only the weights need (a tokenizer reads none of them).
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


def materialize(location: str, storage: StorageOptions, tokenizer_only: bool = False) -> str:
    """Something from_pretrained accepts: local folders and hub ids as they are, S3
    prefixes downloaded once per node into the local cache (keyed by their listing;
    workers/model_cache.py). tokenizer_only: every file but the weights."""
    kind = location_kind(location)
    if not _remote(kind):
        return str(Path(location).expanduser()) if kind == "local" else location
    from workers.model_cache import fetch
    store = _folder(location, storage)
    listing = store.listing()
    if not listing:
        raise ModelError(f"{location}: no files there")
    ident = {kind: store.uri(), "files": hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}
    dest = cache_dir() / "models" / hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]
    files = [(key, size) for key, size, _ in listing]
    if tokenizer_only:
        if dest.is_dir():   # the whole model is here already
            return str(dest)
        files = [(key, size) for key, size in files if not key.endswith(WEIGHT_FILES)]
        dest = dest.with_name(dest.name + "-tokenizer")
    return str(fetch(store, files, dest, location + (" (tokenizer files)" if tokenizer_only else "")))


def read_config(source: ModelSource, storage: StorageOptions, trust_remote_code: bool) -> dict:
    """The model's config as a dict, without loading weights."""
    kind = location_kind(source.model)
    try:
        if kind == "missing":
            raise ModelError(f"{source.model}: no such model folder")
        if _is_folder(kind):
            store = _folder(source.model, storage)
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
        raise ModelError(f"{source.model}: cannot read its config: {one_line(e, typed=False)}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{source.model}: config.json is not a JSON object")
    if _is_folder(kind) and not trust_remote_code and config.get("auto_map") and not _known_type(config):
        # transformers would refuse it only when a worker loads it, after Ray has started
        raise ModelError(f"{source.model}: its model type {shown(config.get('model_type'))} needs the custom "
                         f"code its config.json names (auto_map); set trust_remote_code: true to run it")
    if source.adapter:
        read_adapter_config(source.adapter, storage)
    config = config.get("text_config", config) if "num_hidden_layers" not in config else config
    if not isinstance(config, dict):
        raise ModelError(f"{source.model}: config.json's text_config is not a JSON object")
    return config


def _known_type(config: dict) -> bool:
    """transformers has the config's model_type built in (no remote code needed)."""
    from transformers import CONFIG_MAPPING
    return isinstance(config.get("model_type"), str) and config["model_type"] in CONFIG_MAPPING


# Top-level files of a model folder that hold its weights; not training leftovers.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
NOT_WEIGHTS = ("training_args.bin",)


def _weight_files(location: str, storage: StorageOptions) -> list[str]:
    names = [key for key, _, _ in _folder(location, storage).listing() if "/" not in key]
    return [n for n in names if n.endswith(WEIGHT_SUFFIXES) and n not in NOT_WEIGHTS]


def check_weights(location: str, storage: StorageOptions) -> None:
    """A local or S3 model folder holds weights (*.safetensors, *.bin or an index file)
    beside its config, and each safetensors file has a whole, well-formed header (a
    truncated or garbage file is found now, not when a worker loads it); hub ids are not
    checked (that would need the network)."""
    if not _is_folder(location_kind(location)):
        return
    files = _weight_files(location, storage)
    if not files:
        raise ModelError(f"{location}: no model weights (*.safetensors, *.bin or an index file)")
    for name in files:
        if name.endswith(".safetensors"):
            safetensors_tensors(location, name, storage)


# Bytes per element of safetensors' dtypes (its format's list).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_SAFETENSORS_HEADER = 100 * 2 ** 20   # safetensors' own limit on the JSON header


def safetensors_tensors(location: str, name: str, storage: StorageOptions) -> dict:
    """The tensors a safetensors file declares ({name: {dtype, shape, data_offsets}}), from
    its header alone, checked against the file: ModelError naming the file when it is
    truncated, its header is not the format's, or a tensor lies outside the file."""
    where = f"{location.rstrip('/')}/{name}"
    store = _folder(location, storage)
    try:
        head, size = store.read_head(name, 8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > MAX_SAFETENSORS_HEADER or 8 + length > size:
            raise ModelError(f"{where}: not a safetensors file (truncated, or no header of the format; "
                             f"{size} bytes)")
        raw, _ = store.read_head(name, 8 + length)
        header = json.loads(raw[8:])
    except ModelError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{where}: not a safetensors file (its header is not JSON)") from None
    except (StorageError, OSError) as e:
        raise ModelError(f"{where}: cannot read: {one_line(e, typed=False)}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{where}: not a safetensors file (its header is not a JSON object)")
    data = size - 8 - length
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for tensor, info in tensors.items():
        ok = isinstance(info, dict) and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
        if not ok:
            raise ModelError(f"{where}: not a safetensors file (tensor {shown(tensor)} has no valid "
                             f"dtype, shape and data_offsets)")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= data:
            raise ModelError(f"{where}: truncated or corrupted: tensor {shown(tensor)} lies at bytes "
                             f"{start}..{end} of a {data}-byte data section")
        width = _DTYPE_BYTES.get(info.get("dtype"))
        if width is not None and end - start != width * math.prod(info["shape"]):
            raise ModelError(f"{where}: corrupted: tensor {shown(tensor)} of shape {info['shape']} and dtype "
                             f"{info['dtype']} takes {end - start} bytes")
    return tensors


def read_adapter_config(location: str, storage: StorageOptions) -> dict | None:
    """A local or S3 PEFT adapter folder's adapter_config.json, checked for what PEFT
    needs (peft_type; for LoRA r and target_modules) and its weights beside it; None for a
    hub id (not checked: that would need the network)."""
    kind = location_kind(location)
    if kind == "missing":
        raise ModelError(f"{location}: no such adapter folder")
    if kind == "hub":
        return None
    store = _folder(location, storage)
    name = f"{location.rstrip('/')}/adapter_config.json"
    if not store.exists("adapter_config.json"):
        raise ModelError(f"{location}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        config = json.loads(store.read_bytes("adapter_config.json"))
    except UnicodeDecodeError:
        raise ModelError(f"{name}: not valid JSON (binary content)") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{name}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{name}: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise ModelError(f"{name}: no peft_type (not a PEFT adapter config)")
    try:
        from peft import PeftType
        known = sorted(t.value for t in PeftType)
    except ImportError:
        known = None
    if known and peft_type not in known:
        raise ModelError(f"{name}: unknown peft_type {peft_type!r}")
    if peft_type == "LORA":
        r = config.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ModelError(f"{name}: r must be the LoRA rank (an integer >= 1), got {r!r}")
        if "target_modules" not in config:
            raise ModelError(f"{name}: no target_modules (the modules LoRA adapts)")
        targets = config["target_modules"]
        if not (targets is None or isinstance(targets, str)
                or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise ModelError(f"{name}: target_modules must be a module name, a list of them or "
                             f"null, got {targets!r}")
    files = _weight_files(location, storage)
    if not files:
        raise ModelError(f"{location}: no adapter weights (adapter_model.safetensors or adapter_model.bin)")
    for file in files:
        if not file.endswith(".safetensors"):
            continue
        tensors = safetensors_tensors(location, file, storage)
        if peft_type == "LORA" and not any("lora_" in t for t in tensors):
            # e.g. a base model's weights saved under the adapter's name: it would load as
            # an adapter that changes nothing, and every |delta| would read 0
            raise ModelError(f"{location.rstrip('/')}/{file}: holds no LoRA tensors (lora_A / lora_B; "
                             f"{len(tensors)} tensors such as {shown(next(iter(tensors), None))}): "
                             f"not a LoRA adapter's weights")
    return config


# Config keys whose values must agree between two models read with the same activations.
SHAPE_KEYS = {"blocks": ("num_hidden_layers", "n_layer", "num_layers"),
              "hidden size": ("hidden_size", "n_embd", "d_model"),
              "vocabulary": ("vocab_size",)}


def config_value(config: dict, what: str) -> tuple[str, object] | None:
    """(key, value) of a shape entry (SHAPE_KEYS) in a config, or None where it has none."""
    for key in SHAPE_KEYS[what]:
        if key in config:
            return key, config[key]
    return None


def adapter_base_mismatch(adapter_config: dict, base: str) -> tuple[str, str] | None:
    """(recorded base, why it differs, or "") when the base an adapter was trained on
    (adapter_config.json's base_model_name_or_path) is not `base`, where the two can be
    compared: both hub ids or both s3:// URIs (as names), or both local folders here (the
    same folder, or configs of the same shape). None where they agree or cannot be
    compared (a hub id against a folder, a folder that is not here)."""
    recorded = adapter_config.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded.strip():
        return None
    kinds = location_kind(recorded), location_kind(base)
    if kinds[0] == kinds[1] and _remote(kinds[0]):
        return None if recorded.rstrip("/") == base.rstrip("/") else (recorded, "")
    if kinds == ("hub", "hub"):
        return None if recorded.lower() == base.lower() else (recorded, "")
    if kinds != ("local", "local"):
        return None
    if Path(recorded).expanduser().resolve() == Path(base).expanduser().resolve():
        return None
    try:
        configs = [json.loads((Path(p).expanduser() / "config.json").read_text()) for p in (recorded, base)]
    except (OSError, ValueError):
        return None
    for what in SHAPE_KEYS:
        values = [config_value(c, what) if isinstance(c, dict) else None for c in configs]
        if None not in values and values[0][1] != values[1][1]:
            return recorded, f"its {values[0][0]} is {values[0][1]}, the base's {values[1][1]}"
    return None


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


def load_tokenizer(source: ModelSource, storage: StorageOptions, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(materialize(source.model, storage, tokenizer_only=True),
                                         revision=source.revision,
                                         trust_remote_code=trust_remote_code)


def load_model(source: ModelSource, *, dtype: str, storage: StorageOptions, trust_remote_code: bool = False,
               device: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM
    device = device or default_device()
    # An actor placed on several GPUs (a model larger than one) spreads its blocks over them.
    spread = device == "cuda" and torch.cuda.device_count() > 1
    model = AutoModelForCausalLM.from_pretrained(
        materialize(source.model, storage), revision=source.revision, dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code, **({"device_map": "auto"} if spread else {}))
    if source.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, materialize(source.adapter, storage))
    return (model if spread else model.to(device)).eval().requires_grad_(False)


def engine_arguments(source: ModelSource, storage: StorageOptions, trust_remote_code: bool = False) -> dict:
    """What a vLLM engine (workers.generation.GenerationEngine) takes for a ModelSource:
    the model fetched onto this node, its revision, and the adapter as a local folder."""
    return {"model": materialize(source.model, storage), "revision": source.revision,
            "lora_adapter": materialize(source.adapter, storage) if source.adapter else None,
            "trust_remote_code": trust_remote_code}


def text_config(config):
    """The language model's settings of a transformers config: the config itself, or the
    `text_config` of a multimodal wrapper (Gemma 3 4B and larger, Qwen2.5-VL), where
    num_hidden_layers, hidden_size and vocab_size live."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def core_model(model):
    """The text transformer inside wrappers: PEFT, *ForCausalLM, and multimodal
    *ForConditionalGeneration, whose `model` holds the vision tower beside the
    `language_model` (Gemma3ForConditionalGeneration.model.language_model)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    core = getattr(model, "model", None) or getattr(model, "transformer", None) \
        or getattr(model, "gpt_neox", None) or model
    language_model = getattr(core, "language_model", None)
    return language_model if language_model is not None else core


def decoder_layers(model):
    """The ModuleList of decoder blocks: the one with num_hidden_layers entries."""
    import torch
    n = text_config(model.config).num_hidden_layers
    for module in core_model(model).modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def head_logits(model, hidden):
    """The unembedding of final hidden states (after the final norm), with the model's
    final-logit soft cap where it has one (Gemma 2), as its forward applies it."""
    import torch
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def final_norm(model):
    core = core_model(model)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        if hasattr(core, name):
            return getattr(core, name)
    raise ModelError(f"cannot find the final norm of {type(model).__name__}")
