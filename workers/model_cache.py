"""A node's cache of models fetched from object storage: parallel ranged downloads, one
download per node and model under a file lock, a size cap with least-recently-used
eviction.

- Every file of a folder downloads in its own thread, and a large file in parts of PART
  bytes read at once (ranged GETs, written in place): an S3 prefix comes at the speed of
  many connections rather than one file after another.
- The cache lives in $ADL_CACHE/models (cluster.yaml puts $ADL_CACHE on the instance's
  local NVMe). An entry is a folder named by the content key of what it holds; it appears
  by an atomic rename, so a reader sees it whole or not at all.
- Actors on one node that need the same model take one lock (fcntl, on a file beside the
  entry): the first downloads, the others wait and then find it there.
- $ADL_CACHE_MAX_GB (default 500) caps the entries' total size: before a download, the
  entries used longest ago are removed until the new one fits (an entry being downloaded
  is never removed; a model already loaded keeps its memory-mapped files open).
- The time to the first byte and the throughput of each download are logged.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("adl.models")

PART = 64 << 20       # a large file comes in ranged reads of this size, in parallel
THREADS = 16          # connections at once per download
USED = ".used"        # beside an entry, touched on every use: the LRU order


def max_bytes() -> int:
    return int(float(os.environ.get("ADL_CACHE_MAX_GB", "500")) * 1e9)


@contextmanager
def _locked(path: Path, blocking: bool = True):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _evict(root: Path, incoming: int, keep: str) -> None:
    """Removes the least recently used entries until `incoming` more bytes fit the cap."""
    entries = [p for p in root.iterdir() if p.is_dir() and ".tmp-" not in p.name and p.name != keep]
    sizes = {p: _size(p) for p in entries}
    total = sum(sizes.values())
    used = lambda p: p.with_name(p.name + USED).stat().st_mtime if p.with_name(p.name + USED).exists() else 0
    for entry in sorted(entries, key=used):
        if total + incoming <= max_bytes():
            break
        with _locked(root / f"{entry.name}.lock", blocking=False) as free:
            if not free:   # being downloaded right now
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes[entry]
            logger.info(f"model cache: evicted {entry.name} ({sizes[entry] / 1e9:.2f} GB, least recently used)")


def fetch(store, files: list[tuple[str, int]], dest: Path, what: str) -> Path:
    """The files (relative key, size) of `store` in the cache entry `dest` (a folder in
    the cache's root), downloaded once per node; `what` names them in the log."""
    root, key = dest.parent, dest.name
    with _locked(root / f"{key}.lock"):
        if not dest.is_dir():
            incoming = sum(size for _, size in files)
            _evict(root, incoming, key)
            _download(store, files, dest, what)
        dest.with_name(key + USED).touch()
    return dest


def _download(store, files: list[tuple[str, int]], dest: Path, what: str) -> None:
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    start = time.monotonic()
    first: list[float] = []
    lock = threading.Lock()
    parts = []
    for name, size in files:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.truncate(size)
        parts += [(name, offset, min(PART, size - offset)) for offset in range(0, size, PART)] or [(name, 0, 0)]

    def part(job):
        name, offset, length = job
        if length == 0:
            return
        def read():
            with store.fs.open_input_file(store._path(name)) as src:
                return src.read_at(length, offset)
        data = store._retrying("reading", name, read)   # transient S3 errors retried, as every read
        if len(data) != length:
            raise OSError(f"{store.uri(name)}: {len(data)} bytes where {length} were expected (changed meanwhile?)")
        with lock:
            if not first:
                first.append(time.monotonic() - start)
        fd = os.open(tmp / name, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(part, parts))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = max(time.monotonic() - start, 1e-6)
    total = sum(size for _, size in files)
    logger.info(f"downloaded {what}: {len(files)} files, {total / 1e6:.1f} MB in {seconds:.1f} s "
                f"(first byte after {first[0] if first else 0:.2f} s, {total / 1e6 / seconds:.1f} MB/s)")
