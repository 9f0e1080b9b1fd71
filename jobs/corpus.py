"""Reading the corpus of random text: documents in corpus order, lazily, until
num_documents of them are kept (adl-method.md, section 1)."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from common.errors import one_line
from jobs.spec import Corpus, SpecError
from workers.tokenization import DROP_REASONS, KeptDocuments, keep_documents

_LOG = logging.getLogger("adl")


def corpus_identity(corpus: Corpus) -> dict:
    """What determines the documents read: file contents, dataset coordinates, or the
    demo recipe."""
    ident: dict = {"kind": corpus.kind, "num_documents": corpus.num_documents}
    if corpus.kind == "demo":
        from workers.demo_pair import DEMO_VERSION
        ident.update(version=DEMO_VERSION, seed=corpus.seed)
    elif corpus.kind == "hf":
        ident.update(dataset=corpus.dataset, split=corpus.split, column=corpus.column,
                     revision=corpus.revision)
    else:
        ident.update(sha256=_file_digest(_existing(corpus.path)), column=corpus.column)
    return ident


def _existing(path: str) -> Path:
    p = Path(path).expanduser()
    try:
        found = p.is_file()
    except (OSError, ValueError):   # too long a name, or a NUL in it
        found = False
    if not found:
        raise SpecError(f"corpus.path: no such file: {path}")
    return p


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def iter_documents(corpus: Corpus) -> Iterator[str]:
    """The corpus's documents in corpus order, read lazily. The file is checked now; a
    JSONL line, Parquet row or dataset row without corpus.column, or whose value is not
    text, is an error naming it when it is reached, and so is a file that is not UTF-8."""
    if corpus.kind == "demo":
        from workers.demo_pair import generic_document_stream
        return generic_document_stream(corpus.seed)
    if corpus.kind == "hf":
        return _hf_documents(corpus)
    path = _existing(corpus.path)
    if corpus.kind == "text":
        return _utf8(corpus, _lines(path))
    if corpus.kind == "jsonl":
        return _utf8(corpus, _jsonl_values(path, corpus))
    pf = _parquet_corpus(corpus)
    return _parquet_values(pf, corpus)


def _utf8(corpus: Corpus, documents: Iterator[str]) -> Iterator[str]:
    """A corpus file that is not UTF-8 text is one line naming it, not a traceback."""
    try:
        yield from documents
    except UnicodeDecodeError:
        raise SpecError(f"corpus.path: {corpus.path} is not UTF-8 text") from None


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def _jsonl_values(path: Path, corpus: Corpus) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            yield jsonl_document(line, corpus, lineno)


def _parquet_values(pf, corpus: Corpus) -> Iterator[str]:
    start = 0
    for batch in pf.iter_batches(columns=[corpus.column], batch_size=1024):
        values = batch.column(0).to_pylist()
        yield from parquet_documents(values, corpus, start)
        start += len(values)


def jsonl_document(line: str, corpus: Corpus, lineno: int) -> str:
    """The text of one JSONL corpus line: a JSON object whose corpus.column is a string
    (possibly empty: the tokenization skips empty documents)."""
    where = f"corpus.path: {corpus.path} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise SpecError(f"{where} is not a JSON object") from None
    if not isinstance(obj, dict):
        raise SpecError(f"{where} is not a JSON object")
    if corpus.column not in obj:
        raise SpecError(f"{where} has no {corpus.column!r} field (corpus.column)")
    value = obj[corpus.column]
    if not isinstance(value, str):
        raise SpecError(f"{where}: {corpus.column!r} is {_json_kind(value)}, not text")
    return value


def _parquet_corpus(corpus: Corpus):
    """The Parquet corpus file, with corpus.column present and of a string type."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(_existing(corpus.path))
    except pa.ArrowInvalid:
        raise SpecError(f"corpus.path: {corpus.path} is not a Parquet file (corrupted, truncated "
                        f"or another format)") from None
    schema = pf.schema_arrow
    if corpus.column not in schema.names:
        raise SpecError(f"corpus.column: {corpus.path} has no column {corpus.column!r}")
    kind = schema.field(corpus.column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise SpecError(f"corpus.column: {corpus.path} column {corpus.column!r} holds {kind}, not text")
    return pf


def parquet_documents(values: list, corpus: Corpus, start: int) -> list[str]:
    """Texts of a Parquet corpus column; a null (row `start + i`) is an error."""
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise SpecError(f"corpus.path: {corpus.path} row {start + i}: {corpus.column!r} is "
                            f"{_json_kind(value)}, not text")
    return values


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def _hf_documents(corpus: Corpus) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise SpecError("corpus.kind: hf needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(corpus.dataset, split=corpus.split, revision=corpus.revision,
                                   streaming=True)
    except Exception as e:
        raise SpecError(f"corpus.dataset: cannot read {corpus.dataset}: {one_line(e, typed=False)}") from None
    return (hf_document(row, corpus, i) for i, row in enumerate(ds))


def hf_document(row: dict, corpus: Corpus, index: int) -> str:
    """The text of one dataset row: corpus.column, a string."""
    if corpus.column not in row:
        raise SpecError(f"corpus.column: {corpus.dataset} row {index} has no column {corpus.column!r}")
    if not isinstance(row[corpus.column], str):
        raise SpecError(f"corpus.dataset: {corpus.dataset} row {index}: {corpus.column!r} is "
                        f"{_json_kind(row[corpus.column])}, not text")
    return row[corpus.column]


def kept_documents(corpus: Corpus, tokenizer, n: int) -> KeptDocuments:
    """The corpus's first num_documents documents that the method keeps (read in corpus
    order until there are that many, or the corpus ends: then one warning on the `adl`
    logger says how many were kept). No document kept is an input error."""
    documents = iter_documents(corpus)
    try:
        kept = keep_documents(tokenizer, documents, n, corpus.num_documents)
    finally:
        documents.close()   # the file, when reading stopped before its end
    where = corpus.path or corpus.dataset or corpus.kind
    if kept.read == 0:
        raise SpecError(f"corpus: no documents in {where}")
    if len(kept.doc_ids) == 0:
        raise SpecError(f"corpus: none of the {kept.read} documents read is kept "
                        f"({describe_dropped(kept.dropped, n)})")
    if len(kept.doc_ids) < corpus.num_documents:
        _LOG.warning(
            f"corpus: {where} ended after {kept.read} documents, {len(kept.doc_ids)} kept of "
            f"num_documents={corpus.num_documents} ({describe_dropped(kept.dropped, n)})")
    return kept


def describe_dropped(dropped: dict, n: int) -> str:
    """The dropped counts as words, e.g. '2 empty, 1 shorter than tokens_per_document=10 tokens'."""
    words = {"non_text": "not text", "empty": "empty", "whitespace": "whitespace-only",
             "too_short": f"shorter than tokens_per_document={n} tokens"}
    parts = [f"{dropped[k]} {words[k]}" for k in DROP_REASONS if dropped.get(k)]
    return ", ".join(parts) or "none dropped"


def read_texts(path: str, limit: int, where: str, column: str = "text") -> list[str]:
    """The first `limit` non-empty texts of a file: .jsonl (objects with `column`), .parquet
    (`column`), anything else one text per line. Errors name the spec field `where`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"{where}: no such file: {path}")
    texts: list[str] = []
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(p)
        if column not in pf.schema_arrow.names:
            raise SpecError(f"{where}: {path} has no column {column!r}")
        for batch in pf.iter_batches(columns=[column]):
            texts.extend(t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())
            if len(texts) >= limit:
                break
    else:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if len(texts) >= limit:
                    break
                if not line.strip():
                    continue
                if p.suffix == ".jsonl":
                    try:
                        line = json.loads(line)[column]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise SpecError(f"{where}: {path} line {lineno} is not a JSON object "
                                        f"with a {column!r} field") from None
                if isinstance(line, str) and line.strip():
                    texts.append(line.rstrip("\n"))
    if not texts:
        raise SpecError(f"{where}: no texts in {path}")
    return texts[:limit]


def file_identity(path: str, where: str) -> str:
    """A text file's content digest, for content keys."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"{where}: no such file: {path}")
    return _file_digest(p)
