"""Every bad input is caught before anything is written: one line
`adl: error: <field or file>: <what is wrong>`, exit code 2 through the CLI, and the
storage root (or the bucket) holds nothing new. All of these fail at plan time or
earlier; none starts Ray."""
from __future__ import annotations

import json
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
# -- adapters -------------------------------------------------------------------------------
def adapter_spec(make_spec, demo_pair, root, adapter) -> dict:
    spec = make_spec(root)
    spec["pairs"][0]["finetuned"] = {"adapter": str(adapter)}
    return spec


# -- the Ray address ----------------------------------------------------------------------
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
])
def test_locations_of_other_schemes(tmp_path, make_spec, capsys, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    spec = make_spec(tmp_path / "out")
    change(spec["pairs"][0], spec)
    assert run_fails(tmp_path, spec, capsys) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


# -- the corpus -------------------------------------------------------------------------------
TEXT = "the quick brown fox jumps over the lazy dog again and again, " * 4


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
