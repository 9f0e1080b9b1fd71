"""A submitted spec's local files and folders travel with it, through the storage root.

`adl submit` runs on a laptop, and a cluster cannot read its disk. Every local folder
(model, adapter) and file (corpus, finetune_data, generic_chat) that the spec names is
uploaded under `<storage root>/uploads/<content key>/<name>`, keyed by the digest of what
it holds, so a rerun finds it there and uploads nothing; its completion marker is
written last. The spec sent to the cluster names the uploads instead:
- a folder by its location in the storage root (an s3:// prefix, which every node reads
  through its model cache, workers/model_cache.py);
- a file (read by the job's driver only) through UPLOADS_ENV: the job fetches it into
  $ADL_CACHE/uploads/<content key>/ on the head and reads it there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from jobs.spec import JobSpec, parse_spec
from storage.store import Store

logger = logging.getLogger("adl.uploads")

UPLOADS_ENV = "ADL_UPLOADS"    # {"corpus.path": uri, "pairs.0.finetune_data": uri, ...}
DONE = ".adl-upload-complete"


def _local(value) -> Path | None:
    if not isinstance(value, str) or "://" in value:
        return None
    path = Path(value).expanduser()
    return path.resolve() if path.exists() else None


def _files(path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [(path.name, path)]
    return sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())


def _upload(store: Store, path: Path) -> str:
    """The key under which path's content lies in the store (uploaded unless there already)."""
    digest = hashlib.sha256()
    files = _files(path)
    for name, p in files:
        digest.update(name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    prefix = f"uploads/{digest.hexdigest()[:24]}"
    key = f"{prefix}/{path.name}"
    if store.exists(f"{prefix}/{DONE}"):
        logger.info(f"{path}: uploaded before ({store.uri(key)})")
        return key
    size = 0
    for name, p in files:
        data = p.read_bytes()
        size += len(data)
        store.write_bytes(f"{key}/{name}" if path.is_dir() else key, data)
    store.write_bytes(f"{prefix}/{DONE}", b"")
    logger.info(f"{path}: uploaded {len(files)} file(s), {size / 1e6:.1f} MB, to {store.uri(key)}")
    return key


def ship(spec: JobSpec) -> tuple[JobSpec, dict]:
    """The spec as the cluster must see it, and the files' uploads for UPLOADS_ENV."""
    store = Store.from_uri(spec.storage.root, spec.storage.options)
    data = spec.to_dict()
    files: dict[str, str] = {}
    done: dict[Path, str] = {}   # a folder named twice (an adapter's base) goes once

    def uploaded(path: Path) -> str:
        if path not in done:
            done[path] = store.uri(_upload(store, path))
        return done[path]

    def folder(value):
        path = _local(value)
        return uploaded(path) if path is not None and path.is_dir() else value

    def file(where: str, value):
        path = _local(value)
        if path is not None and path.is_file():
            files[where] = uploaded(path)
        return value

    data["corpus"]["path"] = file("corpus.path", data["corpus"].get("path"))
    for i, pair in enumerate(data["pairs"]):
        for side in ("base", "finetuned"):
            pair[side]["model"] = folder(pair[side]["model"])
            pair[side]["adapter"] = folder(pair[side].get("adapter"))
        for name in ("finetune_data", "generic_chat"):
            pair[name] = file(f"pairs.{i}.{name}", pair.get(name))
    return parse_spec(data), files


def fetch(data: dict, uploads: dict, options) -> dict:
    """The spec's data with each uploaded file at its copy on this node (the job's driver)."""
    from workers.models import cache_dir
    for where, uri in uploads.items():
        parent, _, name = uri.rstrip("/").rpartition("/")
        local = cache_dir() / "uploads" / parent.rpartition("/")[2] / name
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{name}.tmp-{os.getpid()}")
            tmp.write_bytes(Store.from_uri(parent, options).read_bytes(name))
            os.replace(tmp, local)
        node = data
        *path, last = where.split(".")
        for part in path:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = str(local)
    return data


def fetch_env(data: dict) -> dict:
    uploads = json.loads(os.environ.get(UPLOADS_ENV) or "{}")
    if not uploads:
        return data
    from storage.store import StorageOptions
    storage = data.get("storage") or {}
    return fetch(data, uploads, StorageOptions(storage.get("endpoint_url"), storage.get("region")))
