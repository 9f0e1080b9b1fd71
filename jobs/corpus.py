"""Reading the corpus of random text: the first num_documents documents, in order."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

from jobs.spec import Corpus, SpecError


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
    if not p.is_file():
        raise SpecError(f"corpus.path: no such file: {path}")
    return p


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_documents(corpus: Corpus) -> list:
    """The first num_documents documents (any value; the tokenization skips non-text)."""
    limit = corpus.num_documents
    if corpus.kind == "demo":
        from workers.demo_pair import generic_documents
        docs = generic_documents(limit, seed=corpus.seed)
    elif corpus.kind == "text":
        with open(_existing(corpus.path), encoding="utf-8") as f:
            docs = [line.rstrip("\n") for line in itertools.islice(f, limit)]
    elif corpus.kind == "jsonl":
        docs = []
        with open(_existing(corpus.path), encoding="utf-8") as f:
            for lineno, line in enumerate(itertools.islice(f, limit), start=1):
                try:
                    docs.append(json.loads(line).get(corpus.column))
                except (json.JSONDecodeError, AttributeError):
                    raise SpecError(f"corpus.path: {corpus.path} line {lineno} is not a JSON object") from None
    elif corpus.kind == "parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(_existing(corpus.path))
        if corpus.column not in pf.schema_arrow.names:
            raise SpecError(f"corpus.column: {corpus.path} has no column {corpus.column!r}")
        docs = []
        for batch in pf.iter_batches(columns=[corpus.column]):
            docs.extend(batch.column(0).to_pylist())
            if len(docs) >= limit:
                break
        docs = docs[:limit]
    else:
        docs = _hf_documents(corpus)
    if not docs:
        raise SpecError(f"corpus: no documents in {corpus.path or corpus.dataset or corpus.kind}")
    return docs


def _hf_documents(corpus: Corpus) -> list:
    try:
        import datasets
    except ImportError:
        raise SpecError("corpus.kind: hf needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(corpus.dataset, split=corpus.split, revision=corpus.revision,
                                   streaming=True)
        return [row.get(corpus.column) for row in itertools.islice(ds, corpus.num_documents)]
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SpecError(f"corpus.dataset: cannot read {corpus.dataset}: {first}") from None


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
