"""Expensive fixtures, shared by the whole session: one local Ray cluster, one demo pair,
one tiny model per architecture family, one S3-compatible server on loopback."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest

from workers.architectures import FAMILIES

# Before Ray starts, so that its workers inherit them: a private cluster, and the
# credentials the loopback S3 server accepts (read through the usual AWS chain).
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    os.environ.pop(proxy, None)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    temp = tempfile.mkdtemp(prefix="adlray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_pair():
    """Built once into the user's adl cache (as `adl demo` does), reused across runs."""
    from workers.demo_pair import build_demo_pair
    return build_demo_pair()


@pytest.fixture(scope="session", params=list(FAMILIES))
def family_model(request, demo_pair):
    """(Family, model folder) of one tiny model per architecture family
    (workers/architectures.py), built once into the adl cache as the demo pair is; every
    test that takes it runs once per family."""
    from workers.architectures import build_family_model
    return FAMILIES[request.param], build_family_model(request.param)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback (tests/helpers.moto_server)."""
    from helpers import moto_server
    with moto_server() as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint):
    import boto3
    name = f"adl-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def make_spec(demo_pair):
    """A small float32 job on the demo pair (exact comparisons, a few shards), as a dict
    to adjust before parsing."""
    def make(root, **overrides) -> dict:
        spec = {
            "name": "test",
            "pairs": [{"name": "demo", "base": str(demo_pair.base_dir),
                       "finetuned": str(demo_pair.finetuned_dir)}],
            "corpus": {"kind": "demo", "num_documents": 300},
            "dtype": "float32",
            "shard_size": 100,
            "method": {"layers": [0, 1, 2]},
            "storage": {"root": str(root)},
            "compute": {"cpus_per_worker": 0.5},
        }
        for key, value in overrides.items():
            spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
        return spec
    return make


def generation_spec(make_spec, demo_pair, root) -> dict:
    """The demo pair with generations and the analyses, scaled down for 2 cores."""
    spec = make_spec(root, corpus={"num_documents": 1000}, shard_size=500,
                     method={"layers": [0.5], "positions": [0, 1, 2, 3, 4]},
                     generation={"samples": 2, "max_tokens": 48,
                                 "search": {"high": 10.0, "steps": 6, "samples": 4, "max_tokens": 32}},
                     grader={"kind": "offline", "threshold": 5000},
                     analyses={})
    spec["pairs"][0].update(description=demo_pair.description, finetune_data=str(demo_pair.finetune_texts))
    return spec


@pytest.fixture(scope="session")
def generation_run(ray_cluster, make_spec, demo_pair, tmp_path_factory):
    """One whole job on the demo pair with generations and the analyses (vLLM on 2 cores:
    minutes), shared by every test that reads its tables. Returns (spec, store, the run
    record's pair entry, RunStats)."""
    from jobs.driver import RunStats, run_job
    from jobs.spec import parse_spec
    from storage.store import Store
    root = tmp_path_factory.mktemp("gen")
    spec = parse_spec(generation_spec(make_spec, demo_pair, root))
    stats = RunStats()
    store = Store(str(root))
    record = store.read_json(run_job(spec, stats))
    return spec, store, record["pairs"][0], stats


@pytest.fixture(scope="session")
def lora_adapter(demo_pair, tmp_path_factory):
    """A LoRA finetune of the demo base, with non-zero weights so that it changes things."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_pair.base_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    get_peft_model(base, config).save_pretrained(folder)
    return folder
