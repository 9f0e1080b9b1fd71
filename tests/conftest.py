"""Expensive fixtures, shared by the whole session: one local Ray cluster, one demo pair,
one S3-compatible server on loopback."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest

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


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


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
