"""Models from object storage reach a node once and fast (workers/model_cache.py), against
an S3 server on loopback (moto, in its own process) whose request log counts every GET:
planning reads no weights, two actors on one node download a model once, and the node's
cache stays under its cap by evicting what was used longest ago."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import moto_server
from storage.store import StorageOptions


@pytest.fixture(scope="module")
def counted_s3(tmp_path_factory):
    """(endpoint, a function giving the GET request lines so far) of a moto server."""
    log = tmp_path_factory.mktemp("moto") / "requests.log"
    with moto_server(log) as url:
        yield url, lambda: re.findall(r'GET (\S+) HTTP', log.read_text())


@pytest.fixture(scope="module")
def s3_pair(counted_s3, demo_pair):
    """The demo pair's two folders under s3://models-<n>/{base,finetuned}/."""
    import uuid

    import boto3
    endpoint, _ = counted_s3
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    for name, folder in (("base", demo_pair.base_dir), ("finetuned", demo_pair.finetuned_dir)):
        for f in Path(folder).iterdir():
            s3.upload_file(str(f), bucket, f"{name}/{f.name}")
    return {name: f"s3://{bucket}/{name}" for name in ("base", "finetuned")}


def _gets(counted_s3, uri: str, name: str) -> int:
    path = "/" + uri.removeprefix("s3://") + "/" + name
    return sum(1 for line in counted_s3[1]() if line.split("?")[0] == path)


def test_planning_with_an_s3_base_reads_no_weights(counted_s3, s3_pair, make_spec, tmp_path, monkeypatch):
    from jobs.plan import make_plan
    from jobs.spec import parse_spec
    from workers.models import materialize
    monkeypatch.setenv("ADL_CACHE", str(tmp_path / "cache"))
    spec = make_spec(tmp_path / "out", storage={"endpoint_url": counted_s3[0]})
    spec["pairs"] = [{"name": "demo", "base": s3_pair["base"], "finetuned": s3_pair["finetuned"]}]
    import workers.model_cache
    fetched = []
    real_fetch = workers.model_cache.fetch
    monkeypatch.setattr(workers.model_cache, "fetch",
                        lambda store, files, dest, what: fetched.append(files) or real_fetch(store, files, dest, what))
    plan = make_plan(parse_spec(spec))
    assert plan.pairs and plan.sets[0].parameters > 0
    assert not any(name.endswith(".safetensors") for files in fetched for name, _ in files), fetched
    # Only the weights' headers are read (two ranged reads each, checked for damage:
    # workers/models.safetensors_tensors), never the files themselves.
    for uri in s3_pair.values():
        assert _gets(counted_s3, uri, "model.safetensors") <= 2, uri
    monkeypatch.undo()
    monkeypatch.setenv("ADL_CACHE", str(tmp_path / "cache"))
    before = _gets(counted_s3, s3_pair["base"], "model.safetensors")
    assert _gets(counted_s3, s3_pair["base"], "tokenizer.json") == 1   # the tokenizer was read from S3
    materialize(s3_pair["base"], StorageOptions(counted_s3[0]))        # a model load does read weights:
    assert _gets(counted_s3, s3_pair["base"], "model.safetensors") == before + 1   # the count can fail


def test_two_actors_on_one_node_download_a_model_once(ray_cluster, counted_s3, s3_pair, tmp_path):
    import ray
    cache = tmp_path / "node-cache"

    @ray.remote(num_cpus=0)
    class Loader:
        def load(self, uri, endpoint):
            from workers.models import materialize
            return materialize(uri, StorageOptions(endpoint))

    before = _gets(counted_s3, s3_pair["finetuned"], "model.safetensors")
    actors = [Loader.options(runtime_env={"env_vars": {"ADL_CACHE": str(cache)}}).remote() for _ in range(2)]
    paths = ray.get([a.load.remote(s3_pair["finetuned"], counted_s3[0]) for a in actors])
    assert paths[0] == paths[1] and Path(paths[0]).parent == cache / "models"
    assert (Path(paths[0]) / "model.safetensors").stat().st_size == 18581544
    assert _gets(counted_s3, s3_pair["finetuned"], "model.safetensors") - before == 1
    assert _gets(counted_s3, s3_pair["finetuned"], "config.json") >= 1
    for a in actors:
        ray.kill(a)


def test_the_cache_stays_under_its_cap(counted_s3, s3_pair, demo_pair, tmp_path, monkeypatch, caplog):
    import logging

    from workers import model_cache
    from workers.models import materialize
    monkeypatch.setenv("ADL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ADL_CACHE_MAX_GB", "0.03")   # one demo model (19 MB) fits, not two
    monkeypatch.setattr(model_cache, "PART", 4 << 20)   # the 19 MB weights in five ranged reads at once
    options = StorageOptions(counted_s3[0])
    root = tmp_path / "cache" / "models"
    entries = lambda: sorted(p.name for p in root.iterdir() if p.is_dir())
    size = lambda: sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    with caplog.at_level(logging.INFO, logger="adl.models"):
        base = materialize(s3_pair["base"], options)
        for f in Path(demo_pair.base_dir).iterdir():   # the parts landed where they belong
            assert (Path(base) / f.name).read_bytes() == f.read_bytes(), f.name
        ft = materialize(s3_pair["finetuned"], options)
        assert entries() == [Path(ft).name] and size() <= 0.03e9   # the base went
        materialize(s3_pair["finetuned"], options)                 # a hit: nothing downloaded
        materialize(s3_pair["base"], options)
        assert entries() == [Path(base).name] and size() <= 0.03e9
    lines = [r.getMessage() for r in caplog.records]
    assert sum("downloaded s3://" in line and "first byte after" in line and "MB/s" in line for line in lines) == 3
    assert sum("evicted" in line and "least recently used" in line for line in lines) == 2
