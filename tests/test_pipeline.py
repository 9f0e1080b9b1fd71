"""Whole jobs: the planted topic, S3 against local storage, shared bases, reruns, kills."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from helpers import wait_for

from jobs.attempts import attempt_log, attempts_dir, history
from jobs.cli import demo_spec
from jobs.driver import RunStats, run_job
from jobs.spec import parse_spec
from storage import layout
from storage.store import Store, StorageOptions
from storage.tables import DIFFERENCE, LOGIT_LENS

TOP = 20


def tables(store: Store, record_key: str) -> dict:
    """Every result table of a run, by pair name and file."""
    record = store.read_json(record_key)
    return {(p["name"], name): store.read_table(f"{p['dir']}/{name}")
            for p in record["pairs"] for name in (DIFFERENCE.file, LOGIT_LENS.file)}


def test_planted_topic_reads_through_the_lens(ray_cluster, demo_pair, tmp_path):
    """The embedded default job (method defaults, bf16, layer 0.5) on fewer documents."""
    spec = parse_spec(demo_spec(str(tmp_path), num_documents=2000))
    store = Store(str(tmp_path))
    record = store.read_json(run_job(spec))
    lens = store.read_table(f"{record['pairs'][0]['dir']}/{LOGIT_LENS.file}").to_pandas()
    top = lens[lens["rank"] < TOP]
    topic = {w.lower() for w in demo_pair.topic_words}

    def hits(variant, position):
        words = top[(top.variant == variant) & (top.position == position)].token.str.strip().str.lower()
        return topic & set(words)

    found = {p: hits("delta", p) for p in range(5)}
    assert any(found.values()), f"no planted-topic token in the delta lens top {TOP}: {found}"
    for p, words in found.items():
        if words:
            assert not hits("base_mean", p), f"position {p}: topic already in the base mean lens"


def test_s3_and_local_storage_give_identical_tables(ray_cluster, make_spec, s3_endpoint, s3_bucket, tmp_path):
    local = parse_spec(make_spec(tmp_path / "local"))
    remote = parse_spec(make_spec(f"s3://{s3_bucket}/some/prefix", storage={"endpoint_url": s3_endpoint,
                                                                          "region": "us-east-1"}))
    local_store = Store(str(tmp_path / "local"))
    remote_store = Store.from_uri(f"s3://{s3_bucket}/some/prefix", StorageOptions(s3_endpoint, "us-east-1"))
    local_tables = tables(local_store, run_job(local))
    remote_tables = tables(remote_store, run_job(remote))
    assert local_tables.keys() == remote_tables.keys()
    for key in local_tables:
        assert local_tables[key].equals(remote_tables[key], check_metadata=True), key
    shards = [k for k in local_store.list("activations") if k.endswith(".parquet")]
    assert shards and shards == [k for k in remote_store.list("activations") if k.endswith(".parquet")]
    for key in shards:
        assert local_store.read_table(key).equals(remote_store.read_table(key))
    # the attempt's record and log are kept on S3 as locally (jobs/attempts.py)
    [attempt] = history(remote_store, remote.name)
    assert attempt["state"] == "done" and remote_store.read_json(layout.run_status(remote.name)) == attempt
    assert "pair demo: done" in remote_store.read_bytes(attempt_log(remote.name, attempt["attempt"])).decode()


def test_pairs_sharing_a_base_extract_it_once_and_lora_is_applied(ray_cluster, make_spec, demo_pair,
                                                                  lora_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    spec_dict = make_spec(tmp_path)
    spec_dict["pairs"].append({"name": "lora", "base": str(demo_pair.base_dir),
                               "finetuned": {"adapter": str(lora_adapter)}})
    spec = parse_spec(spec_dict)
    stats = RunStats()
    store = Store(str(tmp_path))
    record = store.read_json(run_job(spec, stats))
    sets = {k.split("/")[1] for k in store.list("activations")}
    assert len(sets) == 3                        # base, full finetune, adapter
    assert record["pairs"][0]["base_activations"] == record["pairs"][1]["base_activations"]
    assert stats.shards_extracted == 3 * 3       # 3 sets x 3 shards: the base once
    assert stats.model_loads == 2                # one actor per model: it extracts and reads the lens,
    assert sum(stats.adapter_loads.values()) == 1  # and the adapter rides on its base's

    # The adapter's activations are those of base + LoRA (unmerged), computed directly.
    shard = store.read_table(layout.shard(record["pairs"][1]["finetuned_activations"], 0))
    first = shard.slice(0, 1).to_pylist()[0]
    from workers.demo_pair import generic_documents
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo_pair.base_dir)
    ids = tok(generic_documents(first["doc_id"] + 1, seed=1234)[first["doc_id"]][:100])["input_ids"][:10]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_pair.base_dir), lora_adapter)
    with torch.no_grad():
        hs = peft_model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        plain = AutoModelForCausalLM.from_pretrained(demo_pair.base_dir)(
            input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    layer, pos = first["layer"], first["position"]
    np.testing.assert_allclose(first["act"], hs[layer + 1][0, pos].numpy(), atol=1e-5)
    assert not np.allclose(first["act"], plain[layer + 1][0, pos].numpy(), atol=1e-4)


def test_rerun_does_no_model_work_and_changes_nothing(ray_cluster, make_spec, tmp_path):
    spec = parse_spec(make_spec(tmp_path))
    store = Store(str(tmp_path))
    run_job(spec)
    attempts = attempts_dir(spec.name) + "/"
    results = lambda: [f for f in store.listing() if not f[0].startswith(attempts)]   # each attempt adds its own
    before = results()
    stats = RunStats()
    run_job(spec, stats)
    assert stats.model_loads == 0 and stats.shards_extracted == 0 and stats.pairs_reduced == 0
    assert results() == before   # status.json (the attempt that did the work) included
    first, rerun = history(store, spec.name)
    assert store.read_json(layout.run_status(spec.name)) == first and first["actors"] != []
    assert rerun["state"] == "done" and rerun["counts"]["skipped"] == 1 and rerun["actors"] == []
    assert not rerun["did_work"] and first["did_work"]


def test_job_killed_during_extraction_resumes_to_the_same_result(ray_cluster, make_spec, tmp_path):
    many_shards = {"corpus": {"num_documents": 300}, "shard_size": 10}
    undisturbed = parse_spec(make_spec(tmp_path / "undisturbed", **many_shards))
    expected = tables(Store(str(tmp_path / "undisturbed")), run_job(undisturbed))

    root = tmp_path / "killed"
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec(root, **many_shards)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "killed.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec_file)], env=env,
                            start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    store = Store(str(root))
    markers = lambda: [k for k in store.list("activations") if k.endswith(".done.json")]
    try:
        wait_for(lambda: len(markers()) >= 3 or proc.poll() is not None, 180, "a few extracted shards", poll=0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.seek(0)
    assert proc.returncode == -signal.SIGKILL, f"the job ended before it could be killed:\n{log.read()[-3000:]}"
    assert not store.list("pairs")
    # Model actors outlive their killed driver by a moment and may finish the shards they
    # hold (atomic writes: harmless); count the markers once they have stopped coming.
    counts = [len(markers())]
    while len(counts) < 10 or counts[-1] != counts[-10]:
        time.sleep(0.5)
        counts.append(len(markers()))
    partial = counts[-1]
    assert 0 < partial < 2 * 30

    stats = RunStats()
    got = tables(store, run_job(parse_spec(make_spec(root, **many_shards)), stats))
    assert stats.shards_extracted == 2 * 30 - partial
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].equals(expected[key]), key


def test_models_load_from_an_s3_prefix(demo_pair, s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    """An s3:// model location is downloaded once into the cache and loads like the folder."""
    import boto3
    from jobs.spec import ModelSource
    from workers.models import load_model, location_identity, materialize, num_layers, read_config
    monkeypatch.setenv("ADL_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for f in Path(demo_pair.finetuned_dir).iterdir():
        client.upload_file(str(f), s3_bucket, f"models/ft/{f.name}")
    s3 = StorageOptions(s3_endpoint, "us-east-1")
    source = ModelSource(f"s3://{s3_bucket}/models/ft")
    assert num_layers(read_config(source, s3, False)) == json.loads(
        (Path(demo_pair.finetuned_dir) / "config.json").read_text())["num_hidden_layers"]
    local = Path(materialize(source.model, s3))
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in Path(demo_pair.finetuned_dir).iterdir())
    assert materialize(source.model, s3) == str(local)            # cached, not downloaded again
    assert location_identity(source.model, None, s3) == location_identity(source.model, None, s3)
    ids = torch.tensor([[0, 5, 6, 7]])
    from_s3 = load_model(source, dtype="float32", storage=s3)(input_ids=ids).logits
    from_folder = load_model(ModelSource(str(demo_pair.finetuned_dir)), dtype="float32", storage=StorageOptions())(input_ids=ids).logits
    assert torch.equal(from_s3, from_folder)
