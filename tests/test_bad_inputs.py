"""Every bad input is caught before anything is written: one line
`adl: error: <field or file>: <what is wrong>`, exit code 2 through the CLI, and the
storage root (or the bucket) holds nothing new. All of these fail at plan time or
earlier; none starts Ray."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main

VOCAB_HINT = "; set pairs[0].allow_vocab_mismatch: true to compare them anyway"


def fails(argv: list[str], capsys) -> str:
    """The CLI's one stderr line, after checking exit code 2; without its prefix."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adl: error: "), err
    assert "\x1b" not in err
    return lines[0][len("adl: error: "):]


def snapshot(path: Path):
    """What is at a local path: None, a file's bytes, or a folder's tree (for a kernel
    pseudo filesystem, only that it exists)."""
    if not path.exists():
        return None
    if path.parts[1:2] in (("proc",), ("sys",)):
        return "exists"
    return path.read_bytes() if path.is_file() else tree(path)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def run_fails(tmp_path: Path, spec: dict, capsys) -> str:
    """`adl run` on the spec (written to tmp_path/job.yaml) fails in one line; a local
    storage root is as it was (mostly: still absent)."""
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    root = Path(str(spec["storage"]["root"]))
    before = snapshot(root)
    message = fails(["run", str(spec_file)], capsys)
    assert snapshot(root) == before, f"{root} changed"
    return message


def model_copy(source: Path, dest: Path, **config) -> Path:
    """A copy of a model folder with config.json entries replaced."""
    shutil.copytree(source, dest)
    path = dest / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}, indent=1))
    return dest


def base_config(demo_pair) -> dict:
    return json.loads((Path(demo_pair.base_dir) / "config.json").read_text())


# -- the two models of a pair -------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("hidden_size", 128), ("num_hidden_layers", 6)])
def test_models_of_another_shape(tmp_path, make_spec, demo_pair, capsys, key, value):
    ft = model_copy(demo_pair.finetuned_dir, tmp_path / "ft", **{key: value})
    spec = make_spec(tmp_path / "out")
    spec["pairs"][0]["finetuned"] = str(ft)
    assert run_fails(tmp_path, spec, capsys) == (
        f"pairs[0].finetuned: {key} {value} does not match pairs[0].base ({base_config(demo_pair)[key]})")


def test_vocabulary_mismatch_is_an_error_unless_allowed(tmp_path, make_spec, demo_pair, capsys):
    from jobs.plan import make_plan
    from jobs.spec import parse_spec
    vocab = base_config(demo_pair)["vocab_size"]
    ft = model_copy(demo_pair.finetuned_dir, tmp_path / "ft", vocab_size=vocab + 7)
    spec = make_spec(tmp_path / "out")
    spec["pairs"][0]["finetuned"] = str(ft)
    assert run_fails(tmp_path, spec, capsys) == (
        f"pairs[0].finetuned: vocab_size {vocab + 7} does not match pairs[0].base ({vocab}){VOCAB_HINT}")
    # Allowed (a finetune that added tokens): the plan reads both models as usual.
    spec["pairs"][0]["allow_vocab_mismatch"] = True
    [pair] = make_plan(parse_spec(spec)).pairs
    assert pair.pair.allow_vocab_mismatch and pair.finetuned.source.model == str(ft)
    assert not (tmp_path / "out").exists()


def test_allowed_vocabulary_must_still_hold_the_corpus_tokens(tmp_path, make_spec, demo_pair, capsys):
    """A finetuned vocabulary smaller than the base tokenizer's ids cannot embed them."""
    from jobs.plan import make_plan
    from jobs.spec import parse_spec
    top = int(make_plan(parse_spec(make_spec(tmp_path / "out"))).sets[0].documents.token_ids.max())
    ft = model_copy(demo_pair.finetuned_dir, tmp_path / "ft", vocab_size=top)
    spec = make_spec(tmp_path / "out")
    spec["pairs"][0].update(finetuned=str(ft), allow_vocab_mismatch=True)
    assert run_fails(tmp_path, spec, capsys) == (
        f"pairs[0].finetuned: vocab_size {top} is too small for the base tokenizer's token ids "
        f"(the corpus has token id {top})")


@pytest.mark.parametrize("role", ["base", "finetuned"])
def test_model_folder_without_weights(tmp_path, make_spec, demo_pair, capsys, role):
    folder = model_copy(getattr(demo_pair, f"{role}_dir"), tmp_path / role)
    (folder / "model.safetensors").unlink()
    (folder / "training_args.bin").write_bytes(b"not weights")
    spec = make_spec(tmp_path / "out")
    spec["pairs"][0][role] = str(folder)
    assert run_fails(tmp_path, spec, capsys) == (
        f"pairs[0].{role}: {folder}: no model weights (*.safetensors, *.bin or an index file)")


def test_s3_model_folder_without_weights(tmp_path, make_spec, demo_pair, capsys, s3_endpoint, s3_bucket):
    import boto3
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for f in Path(demo_pair.base_dir).iterdir():
        if f.name != "model.safetensors":
            client.upload_file(str(f), s3_bucket, f"models/base/{f.name}")
    before = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    spec = make_spec(f"s3://{s3_bucket}/out", storage={"endpoint_url": s3_endpoint, "region": "us-east-1"})
    spec["pairs"][0]["base"] = f"s3://{s3_bucket}/models/base"
    assert run_fails(tmp_path, spec, capsys) == (
        f"pairs[0].base: s3://{s3_bucket}/models/base: no model weights (*.safetensors, *.bin or an index file)")
    assert sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]) == before


# -- adapters -------------------------------------------------------------------------------
def adapter_spec(make_spec, demo_pair, root, adapter) -> dict:
    spec = make_spec(root)
    spec["pairs"][0]["finetuned"] = {"adapter": str(adapter)}
    return spec


@pytest.mark.parametrize("content, problem", [
    (b"\x89PNG\r\n\x1a\n\xff", "not valid JSON (binary content)"),
    (b'{"peft_type": "LORA", "r": 4,', "not valid JSON (Expecting property name enclosed in double quotes: "
                                      "line 1 column 30)"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'{"r": 4, "target_modules": ["q_proj"]}', "no peft_type (not a PEFT adapter config)"),
    (b'{"peft_type": "SOUP", "r": 4}', "unknown peft_type 'SOUP'"),
    (b'{"peft_type": "LORA", "target_modules": ["q_proj"]}', "r must be the LoRA rank (an integer >= 1), got None"),
    (b'{"peft_type": "LORA", "r": "4", "target_modules": ["q_proj"]}',
     "r must be the LoRA rank (an integer >= 1), got '4'"),
    (b'{"peft_type": "LORA", "r": 4}', "no target_modules (the modules LoRA adapts)"),
    (b'{"peft_type": "LORA", "r": 4, "target_modules": [3]}',
     "target_modules must be a module name, a list of them or null, got [3]"),
])
def test_garbage_adapter_config(tmp_path, make_spec, demo_pair, lora_adapter, capsys, content, problem):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    (adapter / "adapter_config.json").write_bytes(content)
    spec = adapter_spec(make_spec, demo_pair, tmp_path / "out", adapter)
    assert run_fails(tmp_path, spec, capsys) == f"pairs[0].finetuned.adapter: {adapter}/adapter_config.json: {problem}"


def test_adapter_without_weights(tmp_path, make_spec, demo_pair, lora_adapter, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    spec = adapter_spec(make_spec, demo_pair, tmp_path / "out", adapter)
    assert run_fails(tmp_path, spec, capsys) == (
        f"pairs[0].finetuned.adapter: {adapter}: no adapter weights (adapter_model.safetensors or adapter_model.bin)")


def test_adapter_for_another_base(tmp_path, make_spec, demo_pair, lora_adapter, capsys):
    """The adapter's base_model_name_or_path names a local model of another shape."""
    from jobs.plan import make_plan
    from jobs.spec import parse_spec
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(demo_pair.base_dir)   # the real one: accepted
    [pair] = make_plan(parse_spec(adapter_spec(make_spec, demo_pair, tmp_path / "out", adapter))).pairs
    assert pair.finetuned.source.adapter == str(adapter)

    other = model_copy(demo_pair.base_dir, tmp_path / "other-base", hidden_size=512)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    spec = adapter_spec(make_spec, demo_pair, tmp_path / "out", adapter)
    assert run_fails(tmp_path, spec, capsys) == (
        f"pairs[0].finetuned.adapter: {adapter}/adapter_config.json: base_model_name_or_path {other} is not "
        f"pairs[0].base {demo_pair.base_dir} (its hidden_size is 512, the base's 256)")


def test_adapter_base_comparison():
    """Names are compared where both are hub ids or both s3:// URIs; a hub id against a
    folder, or a folder that is not here, cannot be compared."""
    from workers.models import adapter_base_mismatch
    recorded = lambda name: {"base_model_name_or_path": name}
    assert adapter_base_mismatch(recorded("org/model-1b"), "org/model-8b") == ("org/model-1b", "")
    assert adapter_base_mismatch(recorded("Org/Model-1B"), "org/model-1b") is None
    assert adapter_base_mismatch(recorded("s3://b/models/a/"), "s3://b/models/a") is None
    assert adapter_base_mismatch(recorded("s3://b/models/a"), "s3://b/models/c") == ("s3://b/models/a", "")
    assert adapter_base_mismatch(recorded("org/model-1b"), "s3://b/models/a") is None
    assert adapter_base_mismatch(recorded("/no/such/base"), "org/model-1b") is None
    assert adapter_base_mismatch({}, "org/model-1b") is None


# -- the Ray address ----------------------------------------------------------------------
@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_unreachable_ray_address(tmp_path, make_spec, capsys, address):
    spec = make_spec(tmp_path / "out", compute={"ray_address": address})
    start = time.monotonic()
    message = run_fails(tmp_path, spec, capsys)
    assert time.monotonic() - start < 30
    assert message == f"compute.ray_address: cannot reach a Ray cluster at {address} (Connection refused)"


def test_unreachable_ray_address_from_the_environment(tmp_path, make_spec, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    spec = make_spec(tmp_path / "out")
    assert run_fails(tmp_path, spec, capsys) == \
        "$RAY_ADDRESS: cannot reach a Ray cluster at 127.0.0.1:1 (Connection refused)"


@pytest.mark.parametrize("address", ["127.0.0.1:port", "127.0.0.1", "ray://:10001", "127.0.0.1:70000"])
def test_malformed_ray_address(tmp_path, make_spec, capsys, address):
    spec = make_spec(tmp_path / "out", compute={"ray_address": address})
    assert run_fails(tmp_path, spec, capsys) == \
        f"compute.ray_address: {address!r}: expected host:port, ray://host:port, auto or local"


def test_reachable_ray_address_passes_the_check(make_spec, tmp_path):
    """The check only asks that something answers at host:port."""
    import socket
    from jobs.cluster_check import check_ray_address
    from jobs.spec import parse_spec
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "auto", "local"):
            check_ray_address(parse_spec(make_spec(tmp_path / "out", compute={"ray_address": address})))


# -- the storage root -----------------------------------------------------------------------
def test_root_under_a_regular_file(tmp_path, make_spec, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me\n")
    for root, message in [(f / "out", f"storage.root: {f / 'out'}: {f} is a file, not a folder"),
                          (f / "a" / "b", f"storage.root: {f / 'a' / 'b'}: {f} is a file, not a folder"),
                          (f, f"storage.root: {f} is a file, not a folder")]:
        spec = make_spec(root)
        assert run_fails(tmp_path, spec, capsys) == message
        assert f.read_text() == "keep me\n"


@pytest.mark.parametrize("root", ["/proc/adl-test-root", "/sys/adl-test-root", "/proc", "/sys/kernel"])
def test_root_in_a_pseudo_filesystem(tmp_path, make_spec, capsys, root):
    pseudo = "/" + root.split("/")[1]
    spec = make_spec(root)
    assert run_fails(tmp_path, spec, capsys) == \
        f"storage.root: {root} is in {pseudo}, a kernel pseudo filesystem, not storage"


@pytest.mark.parametrize("root, message", [
    ("s3://", "storage.root: 's3://' names no bucket (expected s3://bucket/prefix)"),
    ("s3:///prefix", "storage.root: 's3:///prefix' names no bucket (expected s3://bucket/prefix)"),
    ("s3:/bucket/prefix", "storage.root: 's3:/bucket/prefix': malformed s3:// URI "
                          "(expected a local folder or s3://bucket/prefix)"),
    ("gs://bucket/x", "storage.root: 'gs://bucket/x': unsupported URI scheme gs:// "
                      "(expected a local folder or s3://bucket/prefix)"),
    ("file:///tmp/x", "storage.root: 'file:///tmp/x': unsupported URI scheme file:// "
                      "(expected a local folder or s3://bucket/prefix)"),
])
def test_root_uri_without_bucket_or_of_another_scheme(tmp_path, make_spec, capsys, monkeypatch, root, message):
    monkeypatch.chdir(tmp_path)
    spec = make_spec(root)
    assert run_fails(tmp_path, spec, capsys) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]   # no ./gs:/bucket/x


@pytest.mark.parametrize("location, kind", [("/data/adl", "local"), ("results/adl", "local"), ("s3://b/p", "s3"),
                                            ("s3://", "s3")])
def test_storage_says_which_backend_serves_a_location(location, kind):
    """One home for URI schemes (storage/store.py): the spec's checks and the model loader ask it."""
    from storage.store import storage_kind
    assert storage_kind(location) == kind


@pytest.mark.parametrize("location, problem", [("s3:/b/p", "malformed s3:// URI"),
                                               ("gs://b/p", "unsupported URI scheme gs://")])
def test_storage_refuses_a_uri_no_backend_serves(location, problem):
    from storage.store import LocationError, Store, storage_kind
    with pytest.raises(LocationError) as e:
        storage_kind(location)
    assert e.value.problem == problem
    with pytest.raises(LocationError, match="unsupported URI scheme"):
        Store.from_uri(location)


def test_unknown_scheme_in_demo_root(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fails(["demo", "--root", "gs://bucket/x"], capsys) == (
        "--root: 'gs://bucket/x': unsupported URI scheme gs:// (expected a local folder or s3://bucket/prefix)")
    assert list(tmp_path.iterdir()) == []


def test_relative_root_is_relative_to_the_spec_file(tmp_path, make_spec, monkeypatch):
    from jobs.spec import load_spec
    (tmp_path / "specs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    spec_file = tmp_path / "specs" / "job.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec("results/adl")))
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_spec("../specs/job.yaml").storage.root == str(tmp_path / "specs" / "results" / "adl")


# -- locations of other schemes -------------------------------------------------------------
HUB_OR_S3 = "(expected a hub id, a local folder or s3://bucket/prefix)"


@pytest.mark.parametrize("change, message", [
    (lambda p, s: p.update(base="gs://models/base"),
     f"pairs[0].base: 'gs://models/base': unsupported URI scheme gs:// {HUB_OR_S3}"),
    (lambda p, s: p.update(finetuned={"model": "https://huggingface.co/org/ft"}),
     f"pairs[0].finetuned.model: 'https://huggingface.co/org/ft': unsupported URI scheme https:// {HUB_OR_S3}"),
    (lambda p, s: p.update(finetuned={"adapter": "hf://org/lora"}),
     f"pairs[0].finetuned.adapter: 'hf://org/lora': unsupported URI scheme hf:// {HUB_OR_S3}"),
    (lambda p, s: p.update(base="s3://"), "pairs[0].base: 's3://' names no bucket (expected s3://bucket/prefix)"),
    (lambda p, s: p.update(finetune_data="gs://data/ft.jsonl"),
     "pairs[0].finetune_data: 'gs://data/ft.jsonl': expected a local file, not a URI"),
    (lambda p, s: p.update(generic_chat="s3://data/chat.txt"),
     "pairs[0].generic_chat: 's3://data/chat.txt': expected a local file, not a URI"),
    (lambda p, s: s.update(corpus={"kind": "jsonl", "path": "gs://data/corpus.jsonl"}),
     "corpus.path: 'gs://data/corpus.jsonl': expected a local file, not a URI"),
    (lambda p, s: s.update(analyses={"embedding_model": "s3://models/minilm"}),
     "analyses.embedding_model: 's3://models/minilm': expected a hub id or a local folder, not a URI"),
    (lambda p, s: p.update(base={"revision": "main"}),   # the forms come from storage's backends
     "pairs[0].base.model: required (a hub id, a local folder or s3://bucket/prefix)"),
])
def test_locations_of_other_schemes(tmp_path, make_spec, capsys, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    spec = make_spec(tmp_path / "out")
    change(spec["pairs"][0], spec)
    assert run_fails(tmp_path, spec, capsys) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


# -- the corpus -------------------------------------------------------------------------------
TEXT = "the quick brown fox jumps over the lazy dog again and again, " * 4


@pytest.mark.parametrize("lines, problem", [
    ([{"body": TEXT}], "line 1 has no 'text' field (corpus.column)"),
    ([{"text": TEXT}, {"text": TEXT}, {"text": None}], "line 3: 'text' is null, not text"),
    ([{"text": TEXT}, {"text": 42}], "line 2: 'text' is a number (42), not text"),
    ([{"text": TEXT}, {"text": ["a", "b"]}], "line 2: 'text' is a list, not text"),
    ([{"text": TEXT}, [TEXT]], "line 2 is not a JSON object"),
])
def test_jsonl_corpus_without_text(tmp_path, make_spec, capsys, lines, problem):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    spec = make_spec(tmp_path / "out", corpus={"kind": "jsonl", "path": str(corpus)})
    assert run_fails(tmp_path, spec, capsys) == f"corpus.path: {corpus} {problem}"


@pytest.mark.parametrize("column, message", [
    ({"body": [TEXT, TEXT]}, "corpus.column: {p} has no column 'text'"),
    ({"text": [1, 2]}, "corpus.column: {p} column 'text' holds int64, not text"),
    ({"text": [TEXT, TEXT, None]}, "corpus.path: {p} row 2: 'text' is null, not text"),
])
def test_parquet_corpus_without_text(tmp_path, make_spec, capsys, column, message):
    import pyarrow as pa
    import pyarrow.parquet as pq
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table(column), corpus)
    spec = make_spec(tmp_path / "out", corpus={"kind": "parquet", "path": str(corpus)})
    assert run_fails(tmp_path, spec, capsys) == message.format(p=corpus)


@pytest.mark.parametrize("kind, content, problem", [
    ("parquet", b"PAR1 but not really", "is not a Parquet file (corrupted, truncated or another format)"),
    ("text", b"\x89PNG\r\n\x1a\n\xff\xfe", "is not UTF-8 text"),
    ("jsonl", b'{"text": "\xff\xfe"}\n', "is not UTF-8 text"),
])
def test_corpus_file_of_another_format(tmp_path, make_spec, capsys, kind, content, problem):
    corpus = tmp_path / f"corpus.{kind}"
    corpus.write_bytes(content)
    spec = make_spec(tmp_path / "out", corpus={"kind": kind, "path": str(corpus)})
    assert run_fails(tmp_path, spec, capsys) == f"corpus.path: {corpus} {problem}"


@pytest.mark.parametrize("count", ["0", "-3"])
def test_demo_num_documents_must_be_positive(tmp_path, capsys, count):
    root = tmp_path / "out"
    assert fails(["demo", "--root", str(root), "--num-documents", count], capsys) == \
        f"--num-documents: must be >= 1, got {count}"
    assert not root.exists()


# -- adl inspect and adl report on files that are not what they should be ----------------------
def garbage_runs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Storage roots, each with one runs/x/run.json that is not a run record, and the
    problem named."""
    cases = {
        "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a JSON file (binary content)"),
        "truncated": (b'{"job": "x", "spec": {"name": "x", "pai',
                      "not valid JSON (Unterminated string starting at: line 1 column 36)"),
        "empty-object": (b"{}", "not an adl run record: no 'job'"),
        "array": (b"[1, 2]", "not an adl run record (a JSON object), got an array"),
        "pairs-not-list": (b'{"job": "x", "spec": {}, "pairs": {"a": 1}}', "'pairs' must be an array, got an object"),
        "pair-entry": (b'{"job": "x", "spec": {}, "pairs": [{"name": "a"}]}',
                       'pairs[0] must be an object with "name" and "dir" strings'),
    }
    out = {}
    for name, (content, problem) in cases.items():
        record = tmp_path / name / "runs" / "x" / "run.json"
        record.parent.mkdir(parents=True)
        record.write_bytes(content)
        out[name] = (record, problem)
    return out


@pytest.mark.parametrize("case", ["binary", "truncated", "empty-object", "array", "pairs-not-list", "pair-entry"])
def test_inspect_and_report_on_a_bad_run_record(tmp_path, capsys, case):
    record, problem = garbage_runs(tmp_path)[case]
    root = record.parents[2]
    before = tree(root)
    for argv in (["inspect", str(record)], ["inspect", str(root)],
                 ["report", str(record)], ["report", str(root)]):
        assert fails(argv, capsys) == f"{record}: {problem}", argv
    assert tree(root) == before   # no report.html


def test_inspect_and_report_on_a_run_with_a_garbage_table(tmp_path, capsys):
    """A well-formed run record whose pair's tables are not Parquet."""
    root = tmp_path / "root"
    pair = root / "pairs" / "p-0123456789abcdef"
    pair.mkdir(parents=True)
    (root / "runs" / "x").mkdir(parents=True)
    (root / "runs" / "x" / "run.json").write_text(json.dumps(
        {"job": "x", "spec": {"method": {"positions": [0]}}, "pairs": [{"name": "p", "dir": "pairs/p-0123456789abcdef"}]}))
    (pair / "manifest.json").write_text('{"pair": "p"}')
    for table in ("difference.parquet", "logit_lens.parquet"):
        (pair / table).write_bytes(b"not parquet " * 10)
    before = tree(root)
    not_parquet = "not a Parquet file (corrupted, truncated or another format)"
    assert fails(["inspect", str(pair)], capsys) == f"{pair}/difference.parquet: {not_parquet}"
    assert tree(root) == before


def test_inspect_and_report_show_the_rest_of_a_root_with_a_damaged_pair(tmp_path, capsys):
    """One pair's table is garbage and the status record too: the other pair, and the run,
    are still shown, and what is damaged is named."""
    root = tmp_path / "root"
    pairs = [{"name": name, "dir": f"pairs/{name}-0123456789abcdef"} for name in ("bad", "good")]
    minimal_run(root).write_text(json.dumps({"job": "x", "spec": {"method": {"positions": [0]}}, "pairs": pairs}))
    bad = root / pairs[0]["dir"]
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text('{"pair": "bad"}')
    for table in ("difference.parquet", "logit_lens.parquet"):
        (bad / table).write_bytes(b"not parquet " * 10)
    (root / "runs" / "x" / "status.json").write_bytes(b"\x00garbage")
    not_parquet = "not a Parquet file (corrupted, truncated or another format)"
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"status: damaged, not shown: {root}/runs/x/status.json: not valid JSON (Expecting value: line 1 column 1)" in out
    assert (f"pair bad  ({bad})\n  damaged, not shown: {bad}/difference.parquet: {not_parquet}; a rerun of the "
            f"job repairs it") in out
    assert f"pair good  ({root}/{pairs[1]['dir']})\n  incomplete: no results yet" in out
    assert main(["report", str(root)]) == 0
    page = (root / "runs" / "x" / "report.html").read_text()
    assert f"{bad}/logit_lens.parquet: {not_parquet}; a rerun of the job repairs it" in page
    assert "status record damaged: " in page and "pair good" in page


def test_inspect_on_a_run_record_outside_runs(tmp_path, capsys):
    record = tmp_path / "run.json"
    record.write_text('{"job": "x", "spec": {}, "pairs": []}')
    assert fails(["inspect", str(record)], capsys) == f"{record}: a run record lives at <root>/runs/<job>/run.json"


def test_inspect_on_a_garbage_parquet_file(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"\x00\x01 not parquet at all " * 20)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"a": list(range(1000))}), good)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        assert fails(["inspect", str(path)], capsys) == \
            f"{path}: not a Parquet file (corrupted, truncated or another format)"


@pytest.mark.parametrize("content, problem", [
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a JSON file (binary content)"),
    (b"[]", "not an adl status record (a JSON object), got an array"),
    (b"{}", 'not an adl status record: no "state" string'),
])
def test_inspect_on_a_bad_status_record(tmp_path, capsys, content, problem):
    status = tmp_path / "runs" / "x" / "status.json"
    status.parent.mkdir(parents=True)
    status.write_bytes(content)
    assert fails(["inspect", str(status)], capsys) == f"{status}: {problem}"


# -- the spec file and names -----------------------------------------------------------------
def test_binary_spec_file(tmp_path, capsys):
    spec_file = tmp_path / "job.yaml"
    spec_file.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff")
    assert fails(["run", str(spec_file)], capsys) == f"{spec_file}: not a text file (byte 0 is not UTF-8); a job spec is YAML"
    spec_file.write_bytes(b"name: x\x00\npairs: []\n")
    assert fails(["run", str(spec_file)], capsys) == f"{spec_file}: not valid YAML"


PRINTABLE = "must be printable (no control characters, newlines or escape sequences)"


@pytest.mark.parametrize("field, name", [
    ("pair", "demo\n[adl 12:00:00] demo: results complete, skipped"),
    ("pair", "\x1b[31mred\x1b[0m"),
    ("pair", "tab\there"),
    ("job", "job\r"),
    ("job", "\x1b]0;title\x07"),
])
def test_names_must_be_printable(tmp_path, make_spec, capsys, field, name):
    spec = make_spec(tmp_path / "out")
    if field == "pair":
        spec["pairs"][0]["name"] = name
    else:
        spec["name"] = name
    where = "pairs[0].name" if field == "pair" else "name"
    assert run_fails(tmp_path, spec, capsys) == f"{where}: {PRINTABLE}, got {name!r}"


@pytest.mark.parametrize("names, folder", [(["a/b", "a_b"], "a_b"), (["x", "x."], "x"), (["my pair", "my_pair"], "my_pair")])
def test_pair_names_sharing_a_folder(tmp_path, make_spec, capsys, names, folder):
    spec = make_spec(tmp_path / "out")
    spec["pairs"] = [{**spec["pairs"][0], "name": name} for name in names]
    assert run_fails(tmp_path, spec, capsys) == (
        f"pairs[1].name: {names[1]!r} and pairs[0].name {names[0]!r} map to the same results folder name "
        f"{folder!r}; rename one")


# -- writes replace only what is ours ----------------------------------------------------------
def minimal_run(root: Path, job: str = "x") -> Path:
    """A storage root holding one job's run record (no pairs): enough for `adl report`."""
    record = root / "runs" / job / "run.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"job": job, "spec": {"method": {"positions": [0]}}, "pairs": []}))
    return record


def test_report_out_refuses_what_is_not_a_report_page(tmp_path, capsys):
    """--out replaces an adl report page and nothing else: not a device, a folder, a link,
    another job's run record, a file of someone else's; '' and 'folder/' name no file;
    a folder the OS refuses is one line. Each case leaves everything as it was."""
    root = tmp_path / "root"
    record = minimal_run(root)
    other = minimal_run(root, "other")
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "link.html"
    link.symlink_to(mine)
    before = {p: snapshot(p) for p in (root, mine, folder, tmp_path)}
    cases = [
        ("/dev/full", "/dev/full: is a device, not a file; refusing to replace it"),
        (str(folder), f"{folder}: is a folder, not a file; refusing to replace it"),
        ("", "--out: expected a file path, got ''"),
        (f"{folder}/", f"--out: expected a file path, got '{folder}/'"),
        (str(other), f"{other}: exists and is not an adl report page; refusing to replace it"),
        (str(mine), f"{mine}: exists and is not an adl report page; refusing to replace it"),
        (str(link), f"{link}: is a symbolic link, not a file; refusing to replace it"),
        ("/proc/adl-report.html", "/proc/adl-report.html: cannot write: No such file or directory"),
        ("/sys/adl/report.html", "/sys/adl/report.html: cannot write: Operation not permitted"),
    ]
    for out, message in cases:
        assert fails(["report", str(record), "--out", out], capsys) == message, out
    assert {p: snapshot(p) for p in before} == before
    assert Path("/dev/full").is_char_device()
    page = tmp_path / "page.html"
    for _ in range(2):   # a report page is replaced by the next
        assert main(["report", str(record), "--out", str(page)]) == 0
        assert capsys.readouterr().out.strip() == str(page)
    assert "<title>adl report: x</title>" in page.read_text()


def test_storage_writes_only_regular_files_and_keys_inside_the_root(tmp_path):
    from storage.store import StorageError, Store
    store = Store(str(tmp_path / "root"))
    (tmp_path / "root" / "a-folder").mkdir(parents=True)
    (tmp_path / "root" / "fifo").symlink_to("/dev/null")
    for key, message in [
        ("a-folder", f"{tmp_path}/root/a-folder: is a folder, not a file; refusing to replace it"),
        ("fifo", f"{tmp_path}/root/fifo: is a symbolic link, not a file; refusing to replace it"),
        ("../outside", f"{tmp_path}/root: key '../outside' holds a '.' or '..' component"),
        ("a/./b", f"{tmp_path}/root: key 'a/./b' holds a '.' or '..' component"),
        ("a//b", f"{tmp_path}/root: key 'a//b' holds an empty component ('//')"),
        ("a\x00b", f"{tmp_path}/root: key 'a\\x00b' holds a control character"),
    ]:
        with pytest.raises(StorageError) as e:
            store.write_bytes(key, b"x")
        assert str(e.value) == message
    assert not (tmp_path / "outside").exists() and (tmp_path / "root" / "a-folder").is_dir()
    assert tree(tmp_path / "root") == ["a-folder", "fifo"]


# -- job folders ---------------------------------------------------------------------------------
def test_job_names_never_share_a_folder():
    from storage.layout import run_dir
    names = ["p1", "p1/", "p1.", "P1", "実験", "試験", "эксперимент-1", "опыт-1", "a" * 60 + "x", "b" * 60 + "x",
             "my job", "my_job", "x"]
    folders = [run_dir(name) for name in names]
    assert len(set(folders)) == len(names), folders
    assert run_dir("p1") == "runs/p1" and run_dir("demo") == "runs/demo"   # existing runs keep their folder
    assert all(f.startswith("runs/") and "/" not in f[5:] and ".." not in f for f in folders)


def test_a_name_mapping_onto_another_jobs_folder_is_refused(tmp_path, make_spec, capsys):
    from storage.layout import run_dir
    root = tmp_path / "out"
    spec = make_spec(root)
    spec["name"] = "p1/"
    taken = run_dir("p1/").split("/")[1]      # a job named exactly like p1/'s keyed folder
    minimal_run(root, taken)
    assert run_fails(tmp_path, spec, capsys) == (
        f"name: 'p1/' maps onto {root}/runs/{taken}, which holds the records of another job ({taken!r}); "
        f"rename the job")


# -- S3 roots --------------------------------------------------------------------------------------
@pytest.mark.parametrize("root, problem", [
    ("s3://bucket/../victim/x", "has a prefix that holds a '.' or '..' component"),
    ("s3://bucket/x/..", "has a prefix that holds a '.' or '..' component"),
    ("s3://bucket/./x", "has a prefix that holds a '.' or '..' component"),
    ("s3://bucket//x", "has a prefix that holds an empty component ('//')"),
    ("s3://bucket/x//", "has a prefix that holds an empty component ('//')"),
    ("s3://bucket/x\x00y", "has a prefix that holds a control character"),
    ("s3://bucket/x\ny", "has a prefix that holds a control character"),
    ("s3://b/x", "names no valid bucket ('b': 3 to 63 letters, digits, dots and hyphens; expected s3://bucket/prefix)"),
    ("s3://../x", "names no valid bucket ('..': 3 to 63 letters, digits, dots and hyphens; expected s3://bucket/prefix)"),
])
def test_s3_roots_that_would_leave_their_prefix(tmp_path, make_spec, capsys, root, problem):
    spec = make_spec(root)
    assert run_fails(tmp_path, spec, capsys) == f"storage.root: {root!r} {problem}"


def test_s3_root_and_its_writes_use_one_parsed_location(s3_endpoint, s3_bucket):
    import boto3
    from storage.store import StorageError, StorageOptions, Store
    store = Store.from_uri(f"s3://{s3_bucket}/a/b/", StorageOptions(s3_endpoint, "us-east-1"))
    store.write_bytes("k", b"x")
    with pytest.raises(StorageError):
        store.write_bytes("../../k", b"y")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=s3_bucket).get("Contents", [])]
    assert keys == ["a/b/k"]


def test_a_symlink_loop_root(tmp_path, make_spec, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    root = tmp_path / "a" / "out"
    assert run_fails(tmp_path, make_spec(root), capsys) == \
        f"storage.root: {str(root)!r} cannot be resolved (a loop of symbolic links)"


# -- error text is bounded -----------------------------------------------------------------------------
def test_a_yaml_alias_bomb_makes_a_short_error(tmp_path, capsys):
    nine = lambda x: "[" + ", ".join([x] * 9) + "]"
    levels = ['&a ' + nine('"lol"')] + [f"&{b} " + nine(f"*{a}") for a, b in zip("abcdefg", "bcdefgh")]
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(f"name: [{', '.join(levels)}]\npairs: [{{name: p, base: m, finetuned: m}}]\n")
    assert len(spec_file.read_bytes()) < 600
    started = time.monotonic()
    message = fails(["run", str(spec_file)], capsys)
    assert time.monotonic() - started < 5
    assert message.startswith("name: expected a non-empty string, got [['lol', 'lol', 'lol'")
    assert len(message) < 300 and message.endswith("...")


def test_long_values_are_cut_in_errors(tmp_path, make_spec, capsys):
    spec = make_spec(tmp_path / "out")
    spec["dtype"] = "x" * 100_000
    message = run_fails(tmp_path, spec, capsys)
    assert message.startswith("dtype: must be one of ") and len(message) < 300


# -- numbers are finite --------------------------------------------------------------------------------
@pytest.mark.parametrize("section, field, value, where", [
    ("generation", {"search": {"high": float("nan")}}, None, "generation.search.high: must be a finite number, got nan"),
    ("generation", {"search": {"low": float("-inf")}}, None, "generation.search.low: must be a finite number, got -inf"),
    ("analyses", {"patchscope_scales": [float("inf"), float("nan")]}, None,
     "analyses.patchscope_scales[0]: must be a finite number, got inf"),
    ("compute", {"cpus_per_worker": float("inf")}, None, "compute.cpus_per_worker: must be a finite number, got inf"),
    ("compute", {"gpus_per_worker": float("nan")}, None, "compute.gpus_per_worker: must be a finite number, got nan"),
    ("generation", {"temperature": 10 ** 400}, None, "generation.temperature: expected a number, got 1000000"),
    ("method", {"layers": [float("nan")]}, None, "method.layers[0]: a relative depth must lie in [0.0, 1.0], got nan"),
    ("method", {"positions": [0, 0, 1]}, None, "method.positions[1]: duplicate position 0"),
])
def test_numbers_must_be_finite(tmp_path, make_spec, capsys, section, field, value, where):
    spec = make_spec(tmp_path / "out")
    spec[section] = field
    message = run_fails(tmp_path, spec, capsys)
    assert message.startswith(where), message


# -- records someone else wrote ---------------------------------------------------------------------
def test_inspect_shows_escape_sequences_of_a_record_escaped(tmp_path, capsys):
    record = minimal_run(tmp_path)
    record.write_text(json.dumps({"job": "x\x1b[31mred", "spec": {"method": {"positions": [0]}},
                                  "pairs": [{"name": "\x1b]0;title\x07", "dir": "pairs/p"}]}))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert out.splitlines()[0] == f"job x\\x1b[31mred  ({record})"
    assert f"pair \\x1b]0;title\\x07  ({tmp_path}/pairs/p)" in out


@pytest.mark.parametrize("folder", ["../..", "pairs/../../x", "/etc", "pairs//x", "elsewhere/p"])
def test_a_pair_folder_outside_the_root_is_refused(tmp_path, capsys, folder):
    root = tmp_path / "root"
    record = minimal_run(root)
    record.write_text(json.dumps({"job": "x", "spec": {}, "pairs": [{"name": "p", "dir": folder}]}))
    before = tree(tmp_path)
    for argv in (["inspect", str(root)], ["report", str(root)], ["report", str(record)]):
        assert fails(argv, capsys) == \
            f"{record}: pairs[0].dir must be a folder under pairs/ of this root, got {folder!r}", argv
    assert tree(tmp_path) == before


# -- found before the run, not when a worker loads it ---------------------------------------------------
def safetensors_damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif how == "empty":
        path.write_bytes(b"")
    else:   # a header that is not JSON, of the length its first 8 bytes say
        path.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + data[8:])


@pytest.mark.parametrize("how, problem", [
    ("truncated", "truncated or corrupted: tensor "),
    ("garbage", "not a safetensors file (truncated, or no header of the format; 64 bytes)"),
    ("empty", "not a safetensors file (truncated, or no header of the format; 0 bytes)"),
    ("header", "not a safetensors file (its header is not JSON)"),
])
def test_damaged_safetensors_are_found_while_planning(tmp_path, make_spec, demo_pair, capsys, how, problem):
    folder = model_copy(demo_pair.finetuned_dir, tmp_path / "finetuned")
    safetensors_damage(folder / "model.safetensors", how)
    spec = make_spec(tmp_path / "out")
    spec["pairs"][0]["finetuned"] = str(folder)
    message = run_fails(tmp_path, spec, capsys)
    assert message.startswith(f"pairs[0].finetuned: {folder}/model.safetensors: {problem}"), message


def test_an_adapter_without_lora_tensors_is_refused(tmp_path, make_spec, demo_pair, lora_adapter, capsys):
    """The base's weights saved as adapter_model.safetensors would load as an adapter that
    changes nothing: |delta| = 0 everywhere, and no warning."""
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    shutil.copyfile(Path(demo_pair.base_dir) / "model.safetensors", adapter / "adapter_model.safetensors")
    spec = adapter_spec(make_spec, demo_pair, tmp_path / "out", adapter)
    message = run_fails(tmp_path, spec, capsys)
    assert message.startswith(f"pairs[0].finetuned.adapter: {adapter}/adapter_model.safetensors: holds no LoRA "
                              f"tensors (lora_A / lora_B; "), message
    assert message.endswith("): not a LoRA adapter's weights")


def test_a_model_that_needs_remote_code(tmp_path, make_spec, demo_pair, capsys):
    folder = model_copy(demo_pair.finetuned_dir, tmp_path / "custom", model_type="adl-custom",
                        auto_map={"AutoConfig": "modeling_custom.CustomConfig"})
    spec = make_spec(tmp_path / "out")
    spec["pairs"][0]["finetuned"] = str(folder)
    assert run_fails(tmp_path, spec, capsys) == (
        f"pairs[0].finetuned: {folder}: its model type 'adl-custom' needs the custom code its config.json names "
        f"(auto_map); set trust_remote_code: true to run it")


def test_a_demo_corpus_beyond_its_bound(tmp_path, make_spec, capsys):
    spec = make_spec(tmp_path / "out", corpus={"num_documents": 10 ** 12})
    assert run_fails(tmp_path, spec, capsys) == (
        "corpus.num_documents: the demo corpus makes at most 1000000 documents, got 1000000000000; for more, "
        "use a text, jsonl, parquet or hf corpus")


def test_inspect_and_report_of_an_unreachable_s3_root(tmp_path, capsys, monkeypatch):
    from storage import store as store_module
    monkeypatch.setattr(store_module, "BACKOFF_MAX_S", 0.01)
    monkeypatch.setattr(store_module, "BACKOFF_BASE_S", 0.01)
    for argv in (["inspect", "s3://bucket/x"], ["report", "s3://bucket/x"]):
        message = fails(["--log-level", "WARNING", *argv, "--endpoint-url", "http://127.0.0.1:9"], capsys)
        assert message.startswith("s3://bucket/x: cannot read: ") and "Could not connect" in message, message


# -- fuzzing the spec -----------------------------------------------------------------------------------
HOSTILE = [None, True, False, 0, -1, 1, 3, 2 ** 63, 10 ** 400, 0.5, -0.0, 1e308, float("nan"), float("inf"),
           float("-inf"), "", " ", "x", "x" * 5000, "\x1b[31mred", "a\x00b", "line\nbreak", "../..", "/", "/dev/full",
           "s3://", "s3://b", "s3://bucket/../victim", "s3://bucket//x", "gs://bucket/x", "~", "эксперимент", "実験",
           [], [None], [[[]]], [1, 1, 1], [0.5, float("nan")], {}, {"a": 1}, {"": None}, "1e12", "nan", ".inf",
           "bfloat16", "demo", "openai", "patch"]
# Not mutated: values that make the planner reach the network (a Ray address, an S3 endpoint).
UNREACHED = ("ray_address", "endpoint_url")


def spec_paths(node, prefix=()):
    """(container, key, path) of every value in a spec, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield node, key, (*prefix, key)
        yield from spec_paths(value, (*prefix, key))


def mutated(rng, spec: dict) -> dict:
    import copy
    spec = copy.deepcopy(spec)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in spec_paths(spec) if not any(str(k) in UNREACHED for k in p[2])]
        container, key, _ = rng.choice(paths)
        op = rng.random()
        if op < 0.6:
            container[key] = copy.deepcopy(rng.choice(HOSTILE))
        elif op < 0.75 and isinstance(container, dict):
            del container[key]
        elif op < 0.9 and isinstance(container, dict):
            container[rng.choice(["unknown", "name", "enabled", "kind", "layers", "positions"])] = \
                copy.deepcopy(rng.choice(HOSTILE))
        elif isinstance(container, list):
            container.append(copy.deepcopy(container[key]))
    return spec


def mutated_text(rng, text: str) -> str:
    """The YAML text itself damaged: a character dropped, or YAML syntax put in."""
    i = rng.randrange(len(text))
    if rng.random() < 0.5:
        return text[:i] + text[i + 1:]
    return text[:i] + rng.choice([":", "[", "]", "{", "&a ", "*a", "\t", "- ", "!!python/object ", "'", "\x00"]) + text[i:]


def test_random_and_mutated_specs_end_in_one_line_or_a_plan(tmp_path, make_spec, demo_pair, monkeypatch):
    """Specs made by mutating valid ones (values swapped for hostile ones, keys dropped or
    added, the YAML text damaged), for a bounded time: each is a plan (exit 0's way) or an
    input error of one short line (exit 2's), never another exception, and nothing is
    written anywhere. Validation and planning only: no model is loaded."""
    import random
    import traceback
    from common.errors import one_line
    from jobs.cli import INPUT_ERRORS
    from jobs.plan import make_plan
    from jobs.spec import load_spec
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root = tmp_path / "root"
    plain = make_spec(root, corpus={"num_documents": 20}, method={"layers": [0.5], "positions": [0, 1]})
    full = {**plain, "generation": {"samples": 1, "search": {"high": 4.0, "steps": 2}},
            "analyses": {"patchscope_scales": [1.0, 2.0]}, "grader": {"kind": "offline", "threshold": 50},
            "causal_effect": {"texts": 2}}
    full["pairs"] = [{**plain["pairs"][0], "description": "d", "finetune_data": str(demo_pair.finetune_texts)}]
    agent = {**full, "agent": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "budgets": [0]}}
    bases = [plain, full, agent]
    spec_file = tmp_path / "job.yaml"
    cwd_before = sorted(p.name for p in Path.cwd().iterdir())
    rng = random.Random(int(os.environ.get("ADL_FUZZ_SEED", "20261204")))   # another seed: more cases
    outcomes, problems = {0: 0, 2: 0}, []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and sum(outcomes.values()) < 400:
        spec = mutated(rng, rng.choice(bases))
        text = yaml.safe_dump(spec, allow_unicode=True)
        if rng.random() < 0.2:
            text = mutated_text(rng, text)
        spec_file.write_text(text, encoding="utf-8")
        before = tree(tmp_path)
        try:
            make_plan(load_spec(spec_file))
            outcomes[0] += 1
        except INPUT_ERRORS as e:
            line = one_line(e, typed=False)
            if "\n" in line or len(line) > 1000 or "Traceback" in line:
                problems.append(f"not one short line: {line[:300]!r}\nspec: {text[:800]}")
            outcomes[2] += 1
        except Exception as e:
            where = "".join(traceback.format_tb(e.__traceback__)[-4:])
            problems.append(f"{type(e).__name__}: {str(e)[:300]}\n{where}\nspec: {text[:800]}")
        if tree(tmp_path) != before:
            problems.append(f"wrote {sorted(set(tree(tmp_path)) - set(before))}\nspec: {text[:800]}")
        if problems:
            break
    assert not problems, problems[0].replace("x" * 100, "x...")
    assert sorted(p.name for p in Path.cwd().iterdir()) == cwd_before
    assert not root.exists()
    assert outcomes[0] > 0 and outcomes[2] > 0 and sum(outcomes.values()) >= 50, outcomes
    print(f"fuzzed {sum(outcomes.values())} specs: {outcomes[0]} planned, {outcomes[2]} refused in one line")


# -- the CLI's checks and readers: validate, demo --print-spec, status of a local run, pipes ---------
def test_validate_checks_what_run_checks_and_writes_nothing(tmp_path, make_spec, capsys):
    """`adl validate` passes a good spec in one line and writes nothing; a bad one fails with
    the same line `adl run` prints, including the checks jobs/driver makes before its first
    write (here: a job folder holding another job's records)."""
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec(tmp_path / "out")))
    assert main(["validate", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert out == (f"{spec_file}: valid: job 'test', 1 pair, 2 activation sets, layers 0, 1, 2; "
                   f"storage {tmp_path / 'out'}\n")
    assert tree(tmp_path) == ["job.yaml"]   # no storage root, no probe left behind

    bad = make_spec(tmp_path / "out", dtype="fp8")
    message = run_fails(tmp_path, bad, capsys)
    assert fails(["validate", str(tmp_path / "job.yaml")], capsys) == message
    assert message == "dtype: must be one of bfloat16, float16, float32, got 'fp8'"

    root = tmp_path / "taken"
    record = minimal_run(root, "test")
    record.write_text(json.dumps({"job": "someone-else", "spec": {}, "pairs": []}))
    before = tree(root)
    message = run_fails(tmp_path, make_spec(root), capsys)
    assert message.startswith("name: 'test' maps onto ") and "another job ('someone-else')" in message
    assert fails(["validate", str(tmp_path / "job.yaml")], capsys) == message
    assert tree(root) == before


def test_demo_print_spec_is_the_demos_spec_and_validates(tmp_path, demo_pair, capsys, monkeypatch):
    """`adl demo --print-spec` prints, and runs nothing: the spec `adl demo` runs (its
    demo_spec), as YAML that `adl validate` passes."""
    from jobs.cli import demo_spec
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "out"
    assert main(["demo", "--print-spec", "--root", str(root), "--num-documents", "200"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == demo_spec(str(root), 200)
    assert "dtype: float32" in out and "threshold: 5000" in out
    assert tree(tmp_path) == []   # nothing run, nothing written
    (tmp_path / "demo.yaml").write_text(out)
    assert main(["validate", "demo.yaml"]) == 0
    assert capsys.readouterr().out.startswith("demo.yaml: valid: job 'demo', 1 pair, ")
    assert tree(tmp_path) == ["demo.yaml"]
    assert main(["demo", "--print-spec"]) == 0   # the default root, ./adl-output, as an absolute path
    assert yaml.safe_load(capsys.readouterr().out)["storage"] == {"root": str(tmp_path / "adl-output")}
    assert fails(["demo", "--print-spec", "--num-documents", "0"], capsys) == "--num-documents: must be >= 1, got 0"


def status_record(state: str, done: int, failed: str | None = None) -> dict:
    pairs = {"a": {"state": "done", "stages": {"extract": "done"}}}
    if failed:
        pairs["b"] = {"state": "failed", "error": failed, "stages": {"extract": "failed"}}
    return {"state": state, "seconds": 12.0, "gpu_hours": 0.0,
            "counts": {"pairs": len(pairs), "done": done, "failed": int(bool(failed)), "running": 0,
                       "pending": 0, "skipped": 0, "activation_sets": 2, "activation_sets_done": 2},
            "pairs": pairs}


def test_status_of_a_local_run(tmp_path, capsys, monkeypatch):
    """`adl status` reads a run on local storage as it reads a submitted job's record: a
    status.json, the run.json beside it, or a root (each job), from any folder."""
    from jobs.cli import _is_path
    from jobs.summary import status_lines
    root = tmp_path / "root"
    minimal_run(root, "x")
    (root / "runs/x/status.json").write_text(json.dumps(status_record("failed", 1, "model did not load")))
    minimal_run(root, "y")
    (root / "runs/y/status.json").write_text(json.dumps(status_record("done", 1)))
    x = status_lines(status_record("failed", 1, "model did not load"), str(root / "runs/x/status.json"))
    y = status_lines(status_record("done", 1), str(root / "runs/y/status.json"))
    assert x[0].startswith("status failed: 1/2 pairs done") and x[1] == "  pair b: failed: model did not load  [extract failed]"
    for argv in (["status", str(root / "runs/x/status.json")], ["status", str(root / "runs/x/run.json")]):
        assert main(argv) == 0
        assert capsys.readouterr().out.splitlines() == x
    monkeypatch.chdir(root)
    for where, expected in (("runs/x/status.json", x), ("runs/y/run.json", y), (".", x + y), (str(root), x + y)):
        assert main(["status", where]) == 0, where
        assert capsys.readouterr().out.splitlines() == expected, where
    monkeypatch.chdir(tmp_path)
    assert main(["status", "root"]) == 0   # a bare name: a local folder holding runs/
    assert capsys.readouterr().out.splitlines() == x + y
    monkeypatch.chdir(root / "runs/y")
    assert main(["status", "status.json"]) == 0
    assert capsys.readouterr().out.splitlines() == y
    assert fails(["status", str(tmp_path / "empty")], capsys) == f"{tmp_path}/empty: no adl run here (runs/<job>/status.json)"
    (root / "runs/y/status.json").unlink()
    assert fails(["status", "run.json"], capsys) == f"{root}/runs/y/status.json: no status record"
    assert not _is_path("raysubmit_AbC123") and not _is_path("my-job-1")   # Ray job ids: the Jobs API


def test_output_cut_short_by_head_ends_quietly(tmp_path):
    """`adl inspect ... | head -n 1`: the first line, no BrokenPipeError traceback, and exit
    code 141 (as a command killed by SIGPIPE), seen through pipefail."""
    import subprocess
    import sys
    root = tmp_path / "root"
    record = minimal_run(root)
    pairs = [{"name": f"p{i}", "dir": f"pairs/p{i}-0123456789abcdef"} for i in range(3000)]
    record.write_text(json.dumps({"job": "x", "spec": {"method": {"positions": [0]}}, "pairs": pairs}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cli = f"{sys.executable} -m jobs.cli inspect {root}"
    full = subprocess.run(cli, shell=True, capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 0 and len(full.stdout) > 200_000   # more than a pipe holds
    cut = subprocess.run(["bash", "-c", f"set -o pipefail; {cli} | head -n 1"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert cut.stdout == f"job x  ({record})\n"
    assert cut.stderr == ""
    assert cut.returncode == 141
