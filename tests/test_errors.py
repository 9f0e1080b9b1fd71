"""Bad input: a clear one-line error naming the field or file, exit code 2, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from jobs.cli import main


def run_cli(tmp_path, spec: dict, capsys) -> str:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    assert main(["run", str(spec_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("adl: error: "), err
    return err


@pytest.mark.parametrize("change, message", [
    ({"dtype": "fp8"}, "dtype: must be one of bfloat16, float16, float32, got 'fp8'"),
    ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
    ({"shard_size": "many"}, "shard_size: expected an integer, got 'many'"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"method": {"layers": [1.5]}}, "method.layers[0]: a relative depth must lie in [0.0, 1.0], got 1.5"),
    ({"method": {"positions": [0, 12]}}, "method.positions[1]: must lie in [0, tokens_per_document=10), got 12"),
    ({"corpus": {"kind": "web"}}, "corpus.kind: must be one of"),
    ({"compute": {"cpus_per_worker": -1}}, "compute.cpus_per_worker: must be >= 0, got -1"),
    ({"compute": {"num_workers": 2}}, "compute.num_workers: unknown key"),
    ({"pairs": [{"name": "x", "base": "./a"}]}, "pairs[0].finetuned: required"),
    ({"trust_remote_code": "yes"}, "trust_remote_code: expected true or false, got 'yes'"),
    ({"analyses": {"patchscope_top_k": 0}}, "analyses.patchscope_top_k: must be >= 1, got 0"),
    ({"analyses": {"patchscope_scales": [1, -2]}}, "analyses.patchscope_scales[1]: must be > 0, got -2.0"),
    ({"analyses": {"embeding_model": "x"}}, "analyses.embeding_model: unknown key"),
])
def test_bad_spec_values(tmp_path, make_spec, capsys, change, message):
    spec = make_spec(tmp_path / "out")
    spec.update(change)
    assert message in run_cli(tmp_path, spec, capsys)
    assert not (tmp_path / "out").exists()


def test_missing_finetune_data_file(tmp_path, make_spec, capsys):
    spec = make_spec(tmp_path / "out", analyses={})
    spec["pairs"][0]["finetune_data"] = str(tmp_path / "no-such.jsonl")
    err = run_cli(tmp_path, spec, capsys)
    assert "pairs[0].finetune_data: no such file" in err and "no-such.jsonl" in err


def test_missing_model_folder(tmp_path, make_spec, capsys):
    spec = make_spec(tmp_path / "out")
    spec["pairs"][0]["finetuned"] = str(tmp_path / "no-such-model")
    err = run_cli(tmp_path, spec, capsys)
    assert "pairs[0]" in err and "no-such-model: no such model folder" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ("", "corpus: no documents in"),
    ("a\nb\n\n", "corpus: none of the 3 documents read is kept (1 empty, 2 shorter than tokens_per_document=10 tokens)"),
])
def test_empty_corpus(tmp_path, make_spec, capsys, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(content)
    spec = make_spec(tmp_path / "out", corpus={"kind": "text", "path": str(corpus)})
    assert message in run_cli(tmp_path, spec, capsys)
    assert not (tmp_path / "out").exists()


def test_layer_out_of_range(tmp_path, make_spec, demo_pair, capsys):
    n = json.loads((demo_pair.base_dir / "config.json").read_text())["num_hidden_layers"]
    spec = make_spec(tmp_path / "out", method={"layers": [0, n]})
    err = run_cli(tmp_path, spec, capsys)
    assert f"method.layers[1]: block {n} is out of range for pairs[0].base ({n} blocks: 0..{n - 1})" in err
    assert not (tmp_path / "out").exists()


def test_unreachable_storage_endpoint(tmp_path, make_spec, capsys):
    spec = make_spec("s3://bucket/prefix", storage={"endpoint_url": "http://127.0.0.1:9", "region": "us-east-1"})
    err = run_cli(tmp_path, spec, capsys)
    assert "storage.root: cannot reach s3://bucket/prefix at http://127.0.0.1:9" in err


def test_missing_bucket(tmp_path, make_spec, capsys, s3_endpoint):
    spec = make_spec("s3://no-such-bucket/prefix", storage={"endpoint_url": s3_endpoint, "region": "us-east-1"})
    assert "storage.root: bucket 'no-such-bucket' does not exist" in run_cli(tmp_path, spec, capsys)


def test_the_command_exits_non_zero(tmp_path):
    """The real entry point, as a user runs it."""
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("name: x\npairs: []\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec_file)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "adl: error: pairs: at least one model pair is required"
