"""Every table is declared once (storage/tables.py: a TableKind with its tag, file name,
schema, version and Parquet options), written and read through the store with it: the
writer stamps and checks, the reader refuses another kind or version in a line naming the
file; and the README documents every column of every kind."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.results import PairResults
from storage import layout
from storage.store import IntegrityError, StorageError, Store
from storage.tables import (ACTIVATIONS, DIFFERENCE, KINDS, LOGIT_LENS, PAIR_TABLES, SIMILARITY, TableKind,
                            activation_table, difference_table)

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")

LENS_ROWS = [{"layer": 2, "position": p, "variant": "delta", "rank": 0, "token_id": 7, "token": "cake",
              "probability": 0.5} for p in range(3)]
SIM_ROWS = [{"layer": 2, "position": 0, "set_a": "steered", "set_b": "base", "similarity": 0.25}]


def columns_of(kind: TableKind) -> list[str]:
    if kind is ACTIVATIONS:
        return activation_table(np.arange(1), [0], np.zeros((1, 1, 1, 2), np.float32), "float32").column_names
    if kind is DIFFERENCE:
        z = np.zeros((1, 1, 2))
        return difference_table([0], np.ones((1, 1)), z, z, z, np.ones(1)).column_names
    return kind.schema.names


@pytest.mark.parametrize("tag", sorted(KINDS))
def test_the_readme_documents_every_column_of_every_table(tag):
    kind = KINDS[tag]
    start = README.find(f"**{tag}** (`")
    assert start >= 0, f"README: no **{tag}** (`...`) paragraph"
    end = min(i for i in (README.find("\n**", start + 1), README.find("\n#", start + 1), len(README)) if i > 0)
    section = README[start:end]
    if kind.file is not None:
        assert kind.file in section.split("\n", 1)[0], (tag, kind.file)
    missing = [c for c in columns_of(kind) if not re.search(rf"(?<![\w.]){re.escape(c)}(?![\w])", section)]
    assert not missing, f"README's {tag} paragraph does not name {missing}"


def test_every_pair_table_is_where_the_layout_says():
    for kind in PAIR_TABLES:
        assert f"pairs/<pair>/{kind.file}" in layout.__doc__, kind.file
        assert f"<root>/pairs/<pair>-<key>/{kind.file}" in README, kind.file


def test_a_table_is_written_stamped_and_read_back_through_its_kind(tmp_path):
    store = Store(str(tmp_path))
    bare = pa.Table.from_pylist(SIM_ROWS, schema=SIMILARITY.schema)           # no adl metadata
    store.write_table("s.parquet", SIMILARITY, bare.replace_schema_metadata({"adl.embedding_model": "e"}))
    back = store.read_table("s.parquet", SIMILARITY)
    assert back.to_pylist() == SIM_ROWS
    assert list(back.schema.metadata.items())[:3] == [(b"adl.table", b"similarity"),
                                                      (b"adl.schema_version", b"1"),
                                                      (b"adl.embedding_model", b"e")]
    # the kind's Parquet options are the ones the file was written with
    meta = pq.ParquetFile(tmp_path / "s.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_the_writer_refuses_a_table_of_another_kind_or_other_columns(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(ValueError, match="a logit_lens table written as similarity"):
        store.write_table("x.parquet", SIMILARITY, LOGIT_LENS.from_rows(LENS_ROWS))
    wrong = pa.table({"layer": pa.array([1], pa.int64())})
    with pytest.raises(ValueError, match="similarity: columns"):
        store.write_table("x.parquet", SIMILARITY, wrong)
    assert not (tmp_path / "x.parquet").exists()


def test_the_reader_refuses_another_kind_a_foreign_file_and_another_version(tmp_path):
    store = Store(str(tmp_path))
    store.write_table("lens.parquet", LOGIT_LENS, LOGIT_LENS.from_rows(LENS_ROWS))
    with pytest.raises(StorageError) as e:
        store.read_table("lens.parquet", SIMILARITY)
    assert str(e.value) == f"{tmp_path}/lens.parquet: a logit_lens table, not similarity"
    pq.write_table(pa.table({"layer": [1]}), tmp_path / "foreign.parquet")
    with pytest.raises(StorageError, match=r"foreign.parquet: not an adl table \(no adl.table in its metadata; "
                                           r"expected similarity\)"):
        store.read_table("foreign.parquet", SIMILARITY)
    newer = LOGIT_LENS.from_rows(LENS_ROWS).replace_schema_metadata({"adl.table": "logit_lens",
                                                                     "adl.schema_version": "2"})
    pq.write_table(newer, tmp_path / "newer.parquet")
    with pytest.raises(StorageError, match=r"newer.parquet: logit_lens table of schema version 2; this adl "
                                           r"reads version 1"):
        store.read_table("newer.parquet", LOGIT_LENS, ["layer"])
    assert store.read_table("newer.parquet").num_rows == 3    # without a kind: any Parquet file


def test_if_changed_leaves_a_table_with_the_same_bytes_alone(tmp_path):
    store = Store(str(tmp_path))
    table = LOGIT_LENS.from_rows(LENS_ROWS)
    first = store.write_table("lens.parquet", LOGIT_LENS, table, if_changed=True)
    inode = (tmp_path / "lens.parquet").stat().st_ino       # an atomic write renames a new file into place
    assert store.write_table("lens.parquet", LOGIT_LENS, table, if_changed=True) == first
    assert (tmp_path / "lens.parquet").stat().st_ino == inode
    changed = store.write_table("lens.parquet", LOGIT_LENS, table.slice(0, 2), if_changed=True)
    assert changed != first and (tmp_path / "lens.parquet").stat().st_ino != inode


def test_a_running_pair_is_read_against_its_stage_markers(tmp_path):
    """No manifest yet: a file a stage marker records is checked against that digest; a
    stage reads only recorded files, the views also what no marker records yet."""
    store = Store(str(tmp_path))
    d = "pairs/p-0"
    digest = store.write_table(f"{d}/{LOGIT_LENS.file}", LOGIT_LENS, LOGIT_LENS.from_rows(LENS_ROWS))
    store.write_json(layout.stage_marker(d, "logit_lens"), {"stage": "logit_lens",
                                                            "files": {LOGIT_LENS.file: digest}})
    store.write_table(f"{d}/{SIMILARITY.file}", SIMILARITY, SIMILARITY.from_rows(SIM_ROWS))   # no marker
    assert len(PairResults(store, d, recorded_only=True).table(LOGIT_LENS)) == 3
    assert len(PairResults(store, d).table(SIMILARITY)) == 1
    with pytest.raises(IntegrityError, match="similarity.parquet: no stage marker of the pair records it"):
        PairResults(store, d, recorded_only=True).table(SIMILARITY)
    store.write_table(f"{d}/{LOGIT_LENS.file}", LOGIT_LENS, LOGIT_LENS.from_rows(LENS_ROWS[:2]))   # changed since
    with pytest.raises(IntegrityError, match="logit_lens.parquet: .*recorded"):
        PairResults(store, d).table(LOGIT_LENS)


@pytest.mark.parametrize("damage", ["empty", "garbage", "first half", "second half", "json"])
def test_a_damaged_file_read_with_its_kind_is_not_a_parquet_file(tmp_path, damage):
    store = Store(str(tmp_path))
    store.write_table("lens.parquet", LOGIT_LENS, LOGIT_LENS.from_rows(LENS_ROWS))
    data = (tmp_path / "lens.parquet").read_bytes()
    (tmp_path / "lens.parquet").write_bytes({"empty": b"", "garbage": b"hello world " * 20,
                                             "first half": data[:len(data) // 2],
                                             "second half": data[len(data) // 2:], "json": b'{"a": 1}'}[damage])
    with pytest.raises(StorageError) as e:
        store.read_table("lens.parquet", LOGIT_LENS)
    assert str(e.value) == f"{tmp_path}/lens.parquet: not a Parquet file (corrupted, truncated or another format)"
