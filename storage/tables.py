"""Parquet schemas of every table adl writes, with their encoders and decoders.

Each table carries `adl.table` and `adl.schema_version` in its schema metadata; the README
documents the columns so that pandas, DuckDB or polars read them without this code.
Vectors are fixed-size lists (their width is part of the schema).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1"

# Arrow has no bfloat16: bf16 activations are stored as their raw bits in uint16, which
# keeps them bit-exact (float16 would overflow above 65504 and round).
_STORED_TYPE = {"bfloat16": pa.uint16(), "float16": pa.float16(), "float32": pa.float32()}
_NUMPY_TYPE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}

# zstd + BYTE_STREAM_SPLIT on the vector leaf, dictionary off: measured 0.71 of raw size
# on bf16 activations, bit-exact; dictionary encoding only costs on floats.
ACTIVATION_PARQUET_OPTIONS = dict(
    compression="zstd", use_dictionary=False,
    column_encoding={"act.list.element": "BYTE_STREAM_SPLIT"},
)
TABLE_PARQUET_OPTIONS = dict(compression="zstd")


def _metadata(table: str, **extra) -> dict[bytes, bytes]:
    meta = {"adl.table": table, "adl.schema_version": SCHEMA_VERSION, **extra}
    return {k.encode(): str(v).encode() for k, v in meta.items()}


def _vectors(flat: np.ndarray, width: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    values = pa.array(np.ascontiguousarray(flat).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(values, width)


def table_kind(table: pa.Table) -> str | None:
    meta = table.schema.metadata or {}
    kind = meta.get(b"adl.table")
    return kind.decode() if kind else None


# -- activations ----------------------------------------------------------------------
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
        _metadata("activations", **{"adl.dtype": dtype, "adl.hidden_size": width}))


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
    return pa.table(columns).replace_schema_metadata(_metadata("difference", **metadata))


# -- logit lens -----------------------------------------------------------------------
LOGIT_LENS_SCHEMA = pa.schema([
    ("layer", pa.int16()), ("position", pa.int16()), ("variant", pa.string()),
    ("rank", pa.int16()), ("token_id", pa.int32()), ("token", pa.string()),
    ("probability", pa.float32()),
])


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


def logit_lens_table(rows: dict[str, list]) -> pa.Table:
    return pa.Table.from_pydict(rows, schema=LOGIT_LENS_SCHEMA).replace_schema_metadata(
        _metadata("logit_lens"))


# -- generations ----------------------------------------------------------------------
GENERATIONS_SCHEMA = pa.schema([
    ("pair", pa.string()), ("model_role", pa.string()), ("kind", pa.string()),
    ("prompt_id", pa.int32()), ("prompt", pa.string()), ("sample_index", pa.int32()),
    ("layer", pa.int16()), ("position", pa.int16()), ("alpha", pa.float64()),
    ("text", pa.string()), ("token_count", pa.int32()), ("finish_reason", pa.string()),
    ("seed", pa.int64()),
])


def generations_table(rows: list[dict]) -> pa.Table:
    """One row per generated sample; layer, position and alpha are null when unsteered."""
    return pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA).replace_schema_metadata(
        _metadata("generations"))


STEERING_SCHEMA = pa.schema([
    ("layer", pa.int16()), ("position", pa.int16()), ("prompt_id", pa.int32()),
    ("prompt", pa.string()), ("threshold", pa.float64()), ("alpha", pa.float64()),
    ("trials", pa.list_(pa.struct([("strength", pa.float64()), ("coherent_fraction", pa.float64()),
                                   ("graded", pa.int32()), ("seeds", pa.list_(pa.int64()))]))),
])


def steering_table(rows: list[dict]) -> pa.Table:
    """One row per (layer, position, threshold prompt): that prompt's threshold, the
    (layer, position)'s alpha (the mean over prompts), and every strength tried (with the
    seeds of its samples)."""
    return pa.Table.from_pylist(rows, schema=STEERING_SCHEMA).replace_schema_metadata(_metadata("steering"))


# -- analyses -------------------------------------------------------------------------
PATCHSCOPE_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("position", pa.int32()), ("variant", pa.string()),
    ("scale", pa.float64()), ("rank", pa.int32()), ("token_id", pa.int64()),
    ("token", pa.string()), ("probability", pa.float64()), ("chosen", pa.bool_()),
    ("coherent", pa.bool_()),
])


def patchscope_table(rows: list[dict]) -> pa.Table:
    """One row per (layer, position, variant, scale, rank). chosen: the grader's best scale
    of that (layer, position, variant); coherent: in the grader's coherent subset there."""
    return pa.Table.from_pylist(rows, schema=PATCHSCOPE_SCHEMA).replace_schema_metadata(
        _metadata("patchscope"))


TOKEN_RELEVANCE_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("position", pa.int32()), ("source", pa.string()),
    ("rank", pa.int32()), ("token", pa.string()), ("probability", pa.float64()),
    ("relevant", pa.bool_()), ("frequent", pa.bool_()), ("labels", pa.list_(pa.string())),
])


def token_relevance_table(rows: list[dict]) -> pa.Table:
    """One row per graded token: relevant when every rotation said RELEVANT."""
    return pa.Table.from_pylist(rows, schema=TOKEN_RELEVANCE_SCHEMA).replace_schema_metadata(
        _metadata("token_relevance"))


SIMILARITY_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("position", pa.int32()), ("set_a", pa.string()),
    ("set_b", pa.string()), ("similarity", pa.float64()),
])


def similarity_table(rows: list[dict], **metadata) -> pa.Table:
    """One row per unordered pair of text sets per (layer, position)."""
    return pa.Table.from_pylist(rows, schema=SIMILARITY_SCHEMA).replace_schema_metadata(
        _metadata("similarity", **metadata))


# -- the interpretability agent ---------------------------------------------------------
AGENT_SCHEMA = pa.schema([
    ("agent", pa.string()), ("budget", pa.int32()), ("run", pa.int32()), ("status", pa.string()),
    ("reason", pa.string()), ("description", pa.string()), ("grades", pa.list_(pa.int32())),
    ("mean_grade", pa.float64()), ("grading", pa.string()), ("grading_reason", pa.string()),
    ("llm_calls", pa.int32()), ("interactions_used", pa.int32()), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()), ("total_tokens", pa.int64()), ("grader_calls", pa.int32()),
    ("grader_tokens", pa.int64()), ("seconds", pa.float64()), ("transcript", pa.string()),
])


def agent_table(rows: list[dict], **metadata) -> pa.Table:
    """One row per (agent, budget, run): the run's outcome, its description and grades,
    and what it spent; `transcript` is its JSON's path in the pair's folder."""
    return pa.Table.from_pylist(rows, schema=AGENT_SCHEMA).replace_schema_metadata(_metadata("agent", **metadata))


# -- the catalog ----------------------------------------------------------------------
CATALOG_SCHEMA = pa.schema([
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
    ("best_grade", pa.float64()), ("control", pa.bool_()),
])


def catalog_table(rows: list[dict], job: str, **metadata) -> pa.Table:
    """One row per pair x layer x analysed position across a job's finished pairs; alpha,
    fraction_relevant, similarities and agent_grades (the pair's, on each of its rows) are
    null where the pair has no such results."""
    return pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA).replace_schema_metadata(
        _metadata("catalog", **{"adl.job": job, **metadata}))


# -- the cross-pair view ------------------------------------------------------------------
PAIR_SIMILARITY_SCHEMA = pa.schema([
    ("pair_a", pa.string()), ("pair_b", pa.string()), ("layer", pa.int16()), ("position", pa.int16()),
    ("cosine", pa.float64()), ("same_base", pa.bool_()),
])


def pair_similarity_table(rows: list[dict], job: str) -> pa.Table:
    """One row per two finished pairs of a job (pair_a first in job order; a pair with
    itself included) and (layer, position) both have: the cosine of their deltas."""
    return pa.Table.from_pylist(rows, schema=PAIR_SIMILARITY_SCHEMA).replace_schema_metadata(
        _metadata("pair_similarity", **{"adl.job": job}))


# -- the causal effect of delta ----------------------------------------------------------
CAUSAL_EFFECT_SCHEMA = pa.schema([
    ("layer", pa.int16()), ("position", pa.int16()), ("eval_set", pa.string()), ("intervention", pa.string()),
    ("index", pa.int32()), ("ce", pa.float64()), ("ce_after_k", pa.float64()), ("delta_ce", pa.float64()),
    ("delta_ce_after_k", pa.float64()), ("tokens", pa.int64()), ("tokens_after_k", pa.int64()),
])


def causal_effect_table(rows: list[dict], **metadata) -> pa.Table:
    """One row per (layer, eval set, intervention): none (the unchanged model), delta
    (per position), random and random_difference (per index); ce and its change from none."""
    return pa.Table.from_pylist(rows, schema=CAUSAL_EFFECT_SCHEMA).replace_schema_metadata(
        _metadata("causal_effect", **metadata))
