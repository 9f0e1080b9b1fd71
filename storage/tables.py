"""Every table adl writes, each declared once as a TableKind: its tag, file name, schema,
schema version and Parquet options, with its encoders and decoders.

Stores write and read tables through their kind (storage.store.Store.write_table and
read_table): the writer stamps `adl.table` and `adl.schema_version` into the schema's
metadata and checks the columns, the reader refuses a file of another kind or version
with a line naming it. The README documents the columns so that pandas, DuckDB or
polars read them without this code. Vectors are fixed-size lists (their width is part
of the schema).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"

# Arrow has no bfloat16: bf16 activations are stored as their raw bits in uint16, which
# keeps them bit-exact (float16 would overflow above 65504 and round).
_STORED_TYPE = {"bfloat16": pa.uint16(), "float16": pa.float16(), "float32": pa.float32()}
_NUMPY_TYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}

# zstd + BYTE_STREAM_SPLIT on the vector leaf, dictionary off: measured 0.71 of raw size
# on bf16 activations, bit-exact; dictionary encoding only costs on floats.
_ACTIVATION_OPTIONS = (("compression", "zstd"), ("use_dictionary", False),
                       ("column_encoding", (("act.list.element", "BYTE_STREAM_SPLIT"),)))
_TABLE_OPTIONS = (("compression", "zstd"),)


@dataclass(frozen=True)
class TableKind:
    """One table adl writes. schema None: its columns hold vectors whose width is the
    model's (its builder below makes them); version: the schema version this adl writes
    and reads; parquet_options: pq.write_table's keywords, as pairs (the kind is frozen)."""
    tag: str
    file: str | None          # its file name in its folder; None: named per file (shards)
    schema: pa.Schema | None
    version: str = SCHEMA_VERSION
    parquet_options: tuple = _TABLE_OPTIONS

    def metadata(self, **extra) -> dict[bytes, bytes]:
        meta = {"adl.table": self.tag, "adl.schema_version": self.version, **extra}
        return {k.encode(): str(v).encode() for k, v in meta.items()}

    def from_rows(self, rows: list[dict] | dict[str, list], **metadata) -> pa.Table:
        """The table of rows (a list of dicts, or a dict of columns) in this kind's schema."""
        build = pa.Table.from_pydict if isinstance(rows, dict) else pa.Table.from_pylist
        return build(rows, schema=self.schema).replace_schema_metadata(self.metadata(**metadata))

    def stamped(self, table: pa.Table) -> pa.Table:
        """table with this kind's tag and version first in its metadata (its other keys
        kept); a table of another kind or whose columns differ is a ValueError."""
        meta = dict(table.schema.metadata or {})
        tag = meta.pop(b"adl.table", None)
        if tag not in (None, self.tag.encode()):
            raise ValueError(f"a {tag.decode()} table written as {self.tag}")
        if self.schema is not None and not table.schema.equals(self.schema, check_metadata=False):
            raise ValueError(f"{self.tag}: columns {table.schema.to_string(show_schema_metadata=False)!r} "
                             f"are not its schema's")
        meta.pop(b"adl.schema_version", None)
        return table.replace_schema_metadata({**self.metadata(), **meta})

    def to_parquet(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        options = {k: dict(v) if k == "column_encoding" else v for k, v in self.parquet_options}
        pq.write_table(self.stamped(table), sink, **options)
        return sink.getvalue().to_pybytes()

    def problem(self, schema: pa.Schema) -> str | None:
        """Why a table read from storage is not one of this kind (None: it is)."""
        meta = schema.metadata or {}
        tag, version = meta.get(b"adl.table"), meta.get(b"adl.schema_version")
        if tag is None:
            return f"not an adl table (no adl.table in its metadata; expected {self.tag})"
        if tag != self.tag.encode():
            return f"a {tag.decode(errors='replace')} table, not {self.tag}"
        if version != self.version.encode():
            found = version.decode(errors="replace") if version else "none"
            return (f"{self.tag} table of schema version {found}; this adl reads version {self.version} "
                    f"(written by another adl: rerun the job to write it again)")
        return None


def table_kind(table: pa.Table) -> str | None:
    meta = table.schema.metadata or {}
    kind = meta.get(b"adl.table")
    return kind.decode() if kind else None


def _vectors(flat: np.ndarray, width: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    values = pa.array(np.ascontiguousarray(flat).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(values, width)


# -- activations ----------------------------------------------------------------------
# Rows (doc_id, layer, position); act is the width of the model (activation_table).
ACTIVATIONS = TableKind("activations", None, None, parquet_options=_ACTIVATION_OPTIONS)


def activation_table(doc_ids: np.ndarray, layers: list[int], acts: np.ndarray, dtype: str) -> pa.Table:
    """Rows (doc_id, layer, position) in doc, layer, position order.

    acts has shape (docs, layers, positions, hidden) and holds the stored type of dtype
    (uint16 bits for bfloat16).
    """
    docs, n_layers, n_pos, width = acts.shape
    if acts.dtype != _NUMPY_TYPE[dtype]:
        raise TypeError(f"{dtype} activations must arrive as {_NUMPY_TYPE[dtype].__name__}, got {acts.dtype}")
    per_doc = n_layers * n_pos
    columns = {
        "doc_id": pa.array(np.repeat(np.asarray(doc_ids, dtype=np.int64), per_doc)),
        "layer": pa.array(np.tile(np.repeat(np.asarray(layers, dtype=np.int16), n_pos), docs)),
        "position": pa.array(np.tile(np.arange(n_pos, dtype=np.int16), docs * n_layers)),
        "act": _vectors(acts, width, _STORED_TYPE[dtype]),
    }
    return pa.table(columns).replace_schema_metadata(
        ACTIVATIONS.metadata(**{"adl.dtype": dtype, "adl.hidden_size": width}))


def activation_dtype(table: pa.Table) -> str:
    return table.schema.metadata[b"adl.dtype"].decode()


def _stored_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False), arr.type.list_size


def _widen(stored: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values as float32 (into out's memory when given); bf16 bits become the
    top half of a float32, exactly."""
    if dtype == "bfloat16":
        return np.left_shift(stored, 16, out=out, dtype=np.uint32).view(np.float32)
    if out is None:
        return stored.astype(np.float32, copy=False)
    target = out.view(np.float32)
    np.copyto(target, stored)
    return target


def decode_vectors(column: pa.ChunkedArray | pa.Array, dtype: str) -> np.ndarray:
    """A vector column as a float32 (rows, width) array."""
    stored, width = _stored_values(column)
    return _widen(stored, dtype).reshape(-1, width)


def decoded_chunks(column: pa.ChunkedArray | pa.Array, dtype: str, rows: int):
    """The same, as successive float32 (<= rows, width) views into one reused buffer: a
    reducer over large shards then never holds a full-size float32 copy."""
    stored, width = _stored_values(column)
    stored = stored.reshape(-1, width)
    buffer = np.empty((rows, width), np.uint32)
    for start in range(0, len(stored), rows):
        part = stored[start:start + rows]
        yield _widen(part, dtype, out=buffer[:len(part)])


# -- differences ----------------------------------------------------------------------
# One row per (layer, position); the vectors are the width of the model (difference_table).
DIFFERENCE = TableKind("difference", "difference.parquet", None)


def difference_table(layers: list[int], num_documents: np.ndarray, delta: np.ndarray,
                     base_mean: np.ndarray, finetuned_mean: np.ndarray,
                     finetuned_norm: np.ndarray, **metadata) -> pa.Table:
    """One row per (layer, position). Arrays are (layers, positions, hidden) float64,
    num_documents is (layers, positions), finetuned_norm is (layers,)."""
    n_layers, n_pos, width = delta.shape
    rows = n_layers * n_pos
    columns = {
        "layer": pa.array(np.repeat(np.asarray(layers, dtype=np.int16), n_pos)),
        "position": pa.array(np.tile(np.arange(n_pos, dtype=np.int16), n_layers)),
        "num_documents": pa.array(num_documents.reshape(rows).astype(np.int64)),
        "delta": _vectors(delta, width, pa.float64()),
        "base_mean": _vectors(base_mean, width, pa.float64()),
        "finetuned_mean": _vectors(finetuned_mean, width, pa.float64()),
        "delta_norm": pa.array(np.linalg.norm(delta, axis=-1).reshape(rows)),
        "finetuned_norm": pa.array(np.repeat(finetuned_norm, n_pos).astype(np.float64)),
    }
    return pa.table(columns).replace_schema_metadata(DIFFERENCE.metadata(**metadata))


def difference_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The difference's vectors as a safetensors file, the same bytes on every run:
    safetensors writes its metadata in a hash map's order, which changes from process to
    process, so the header is written again with the metadata sorted (same tensors, same
    offsets: only the header's order changes)."""
    import json

    from safetensors.numpy import save
    blob = save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # the data stays 8-byte aligned, as safetensors keeps it
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


# -- the tables of fixed columns: KIND.from_rows(rows, **metadata) builds one -------------
# Top tokens per (layer, position, variant, rank) of delta, -delta and the two means.
LOGIT_LENS = TableKind("logit_lens", "logit_lens.parquet", pa.schema([
    ("layer", pa.int16()), ("position", pa.int16()), ("variant", pa.string()),
    ("rank", pa.int16()), ("token_id", pa.int32()), ("token", pa.string()),
    ("probability", pa.float32()),
]))

# One row per generated sample; layer, position and alpha are null when unsteered.
GENERATIONS = TableKind("generations", "generations.parquet", pa.schema([
    ("pair", pa.string()), ("model_role", pa.string()), ("kind", pa.string()),
    ("prompt_id", pa.int32()), ("prompt", pa.string()), ("sample_index", pa.int32()),
    ("layer", pa.int16()), ("position", pa.int16()), ("alpha", pa.float64()),
    ("text", pa.string()), ("token_count", pa.int32()), ("finish_reason", pa.string()),
    ("seed", pa.int64()),
]))

# One row per (layer, position, threshold prompt): that prompt's threshold, the (layer,
# position)'s alpha (the mean over prompts), and every strength tried (with the seeds of
# its samples). strength_found false: no strength above search.low passed for any prompt
# of that (layer, position); its alpha is null and it has no steered samples.
STEERING = TableKind("steering", "steering.parquet", pa.schema([
    ("layer", pa.int16()), ("position", pa.int16()), ("prompt_id", pa.int32()),
    ("prompt", pa.string()), ("threshold", pa.float64()), ("alpha", pa.float64()),
    ("strength_found", pa.bool_()),
    ("trials", pa.list_(pa.struct([("strength", pa.float64()), ("coherent_fraction", pa.float64()),
                                   ("graded", pa.int32()), ("seeds", pa.list_(pa.int64()))]))),
]), version="2")

# One row per (layer, position, variant, scale, rank). chosen: the grader's best scale of
# that (layer, position, variant); coherent: in the grader's coherent subset there.
PATCHSCOPE = TableKind("patchscope", "patchscope.parquet", pa.schema([
    ("layer", pa.int32()), ("position", pa.int32()), ("variant", pa.string()),
    ("scale", pa.float64()), ("rank", pa.int32()), ("token_id", pa.int64()),
    ("token", pa.string()), ("probability", pa.float64()), ("chosen", pa.bool_()),
    ("coherent", pa.bool_()),
]))

# One row per graded token: relevant when every rotation said RELEVANT.
TOKEN_RELEVANCE = TableKind("token_relevance", "token_relevance.parquet", pa.schema([
    ("layer", pa.int32()), ("position", pa.int32()), ("source", pa.string()),
    ("rank", pa.int32()), ("token", pa.string()), ("probability", pa.float64()),
    ("relevant", pa.bool_()), ("frequent", pa.bool_()), ("labels", pa.list_(pa.string())),
]))

# One row per unordered pair of text sets per (layer, position).
SIMILARITY = TableKind("similarity", "similarity.parquet", pa.schema([
    ("layer", pa.int32()), ("position", pa.int32()), ("set_a", pa.string()),
    ("set_b", pa.string()), ("similarity", pa.float64()),
]))

# One row per (agent, budget, run): the run's outcome, its description and grades, and
# what it spent; `transcript` is its JSON's path in the pair's folder.
AGENT = TableKind("agent", "agent.parquet", pa.schema([
    ("agent", pa.string()), ("budget", pa.int32()), ("run", pa.int32()), ("status", pa.string()),
    ("reason", pa.string()), ("description", pa.string()), ("grades", pa.list_(pa.int32())),
    ("mean_grade", pa.float64()), ("grading", pa.string()), ("grading_reason", pa.string()),
    ("llm_calls", pa.int32()), ("interactions_used", pa.int32()), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()), ("total_tokens", pa.int64()), ("grader_calls", pa.int32()),
    ("grader_tokens", pa.int64()), ("seconds", pa.float64()), ("transcript", pa.string()),
]))

# One row per (layer, eval set, intervention): none (the unchanged model), delta (per
# position), random and random_difference (per index); ce and its change from none.
CAUSAL_EFFECT = TableKind("causal_effect", "causal_effect.parquet", pa.schema([
    ("layer", pa.int16()), ("position", pa.int16()), ("eval_set", pa.string()), ("intervention", pa.string()),
    ("index", pa.int32()), ("ce", pa.float64()), ("ce_after_k", pa.float64()), ("delta_ce", pa.float64()),
    ("delta_ce_after_k", pa.float64()), ("tokens", pa.int64()), ("tokens_after_k", pa.int64()),
]))

# -- a job's views (metadata adl.job) -----------------------------------------------------
# One row per pair x layer x analysed position across a job's finished pairs; alpha,
# fraction_relevant, similarities and agent_grades (the pair's, on each of its rows) are
# null where the pair has no such results. strength_found: false where the steering
# search found no coherent strength (alpha and steering_uplift null), null without steering.
CATALOG = TableKind("catalog", "catalog.parquet", pa.schema([
    ("pair", pa.string()), ("pair_dir", pa.string()), ("base", pa.string()), ("finetuned", pa.string()),
    ("layer", pa.int16()), ("position", pa.int16()), ("num_documents", pa.int64()),
    ("delta_norm", pa.float64()), ("finetuned_norm", pa.float64()),
    ("top_tokens", pa.list_(pa.string())), ("top_probabilities", pa.list_(pa.float32())),
    ("alpha", pa.float64()), ("fraction_relevant", pa.float64()),
    ("similarities", pa.list_(pa.struct([("set_a", pa.string()), ("set_b", pa.string()),
                                         ("similarity", pa.float64())]))),
    ("agent_grades", pa.list_(pa.struct([("agent", pa.string()), ("budget", pa.int32()),
                                         ("mean_grade", pa.float64()), ("runs", pa.int32()),
                                         ("graded", pa.int32())]))),
    ("delta_ratio", pa.float64()), ("trace_strength", pa.float64()), ("steering_uplift", pa.float64()),
    ("best_grade", pa.float64()), ("control", pa.bool_()), ("strength_found", pa.bool_()),
    ("earlier_stages", pa.list_(pa.string())),
]), version="3")

# One row per two finished pairs of a job (pair_a first in job order; a pair with itself
# included) and (layer, position) both have: the cosine of their deltas.
PAIR_SIMILARITY = TableKind("pair_similarity", "pair_similarity.parquet", pa.schema([
    ("pair_a", pa.string()), ("pair_b", pa.string()), ("layer", pa.int16()), ("position", pa.int16()),
    ("cosine", pa.float64()), ("same_base", pa.bool_()),
]))

# A pair's tables, in the order its stages write them.
PAIR_TABLES = (DIFFERENCE, LOGIT_LENS, GENERATIONS, STEERING, PATCHSCOPE, TOKEN_RELEVANCE,
               SIMILARITY, AGENT, CAUSAL_EFFECT)
KINDS = {kind.tag: kind for kind in (ACTIVATIONS, *PAIR_TABLES, CATALOG, PAIR_SIMILARITY)}
