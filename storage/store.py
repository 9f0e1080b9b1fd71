"""A storage root — a local folder or an s3:// prefix — addressed by relative keys.

Every write is atomic: a reader sees a whole object or none. Locally that is a write
to a temporary sibling and a rename; on S3 the object is uploaded in one piece from
memory, and a single PUT (or a completed multipart upload) appears atomically, so a
killed writer leaves nothing visible.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(RuntimeError):
    """A storage problem worth one line to the user (unreachable endpoint, missing bucket,
    a file that is not what it should be)."""


# A URI-shaped location: a scheme, a colon and a slash. Only s3:// is storage; anything
# else ("gs://bucket/x", the typo "s3:/bucket") is refused rather than taken for a folder.
URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")
# Kernel pseudo filesystems: they take no files, whatever their permission bits say.
PSEUDO_FILESYSTEMS = ("/proc", "/sys")
# pyarrow's words for a file without Parquet's footer (garbage, truncated, empty).
NOT_PARQUET = "Could not open Parquet input source"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Store:
    def __init__(self, root: str, endpoint_url: str | None = None, region: str | None = None):
        self.root = str(root)
        self.endpoint_url = endpoint_url
        self.region = region
        self.is_s3 = self.root.startswith("s3://")
        if URI.match(self.root) and not self.is_s3:
            raise StorageError(f"{self.root}: unsupported URI scheme {URI.match(self.root).group(1)}:// "
                               f"(expected a local folder or s3://bucket/prefix)")
        if self.is_s3 and not self.root[len("s3://"):].split("/", 1)[0]:
            raise StorageError(f"{self.root}: names no bucket (expected s3://bucket/prefix)")
        if self.is_s3:
            self._base = self.root[len("s3://"):].strip("/")
        else:
            self._base = str(Path(os.path.expanduser(self.root)).resolve())
        self._fs: pafs.FileSystem | None = None

    # Ray ships a Store to workers: send its configuration, not its live connection.
    def __reduce__(self):
        return (Store, (self.root, self.endpoint_url, self.region))

    def __repr__(self) -> str:
        return f"Store({self.uri()!r})"

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = self._make_fs()
        return self._fs

    def _make_fs(self) -> pafs.FileSystem:
        if not self.is_s3:
            return pafs.LocalFileSystem()
        kwargs: dict = dict(connect_timeout=3, request_timeout=30,
                            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
        if self.region:
            kwargs["region"] = self.region
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.rpartition("://")
            kwargs["endpoint_override"] = host or self.endpoint_url
            kwargs["scheme"] = scheme or "https"
        # Credentials come from the usual AWS chain (environment, profile, instance role).
        return pafs.S3FileSystem(**kwargs)

    def child(self, prefix: str) -> "Store":
        """The store rooted at a sub-prefix (same endpoint)."""
        return Store(self.uri(prefix), self.endpoint_url, self.region)

    def uri(self, key: str = "") -> str:
        scheme = "s3://" if self.is_s3 else ""
        return scheme + self._path(key)

    def _path(self, key: str) -> str:
        key = key.strip("/")
        return f"{self._base}/{key}" if key else self._base

    # -- checks -----------------------------------------------------------------------
    def check(self) -> None:
        """Fail early, in one line, if the root cannot be reached or written. Writes
        nothing that stays: a local root is probed with a temporary file, created and
        removed in the root or, while it does not exist yet, its nearest existing parent."""
        try:
            if self.is_s3:
                bucket = self._base.split("/", 1)[0]
                info = self.fs.get_file_info(bucket)
                if info.type == pafs.FileType.NotFound:
                    raise StorageError(f"storage.root: bucket {bucket!r} does not exist ({self.uri()})")
            else:
                self._check_local()
        except StorageError:
            raise
        except OSError as e:
            where = f" at {self.endpoint_url}" if self.endpoint_url else ""
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StorageError(f"storage.root: cannot reach {self.uri()}{where}: {first}") from None

    def _check_local(self) -> None:
        root = Path(self._base)
        for pseudo in map(Path, PSEUDO_FILESYSTEMS):
            if root == pseudo or pseudo in root.parents:
                raise StorageError(f"storage.root: {root} is in {pseudo}, a kernel pseudo filesystem, "
                                   f"not storage")
        existing = root   # the root, or the nearest parent that exists (where it will be made)
        while not os.path.lexists(existing):
            existing = existing.parent
        if not existing.is_dir():
            under = f"{root}: " if existing != root else ""
            raise StorageError(f"storage.root: {under}{existing} is a file, not a folder")
        try:
            fd, probe = tempfile.mkstemp(prefix=".tmp-adl-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StorageError(f"storage.root: {root} is not writable: cannot create a file in "
                               f"{existing} ({e.strerror or type(e).__name__})") from None

    # -- reading ----------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self._path(key)).type == pafs.FileType.File

    def read_bytes(self, key: str) -> bytes:
        with self.fs.open_input_stream(self._path(key)) as f:
            return f.read()

    def read_json(self, key: str):
        """The file's JSON value; a file that is not JSON is a StorageError naming it."""
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except UnicodeDecodeError:
            raise StorageError(f"{self.uri(key)}: not a JSON file (binary content)") from None
        except json.JSONDecodeError as e:
            raise StorageError(f"{self.uri(key)}: not valid JSON ({e.msg}: line {e.lineno} "
                               f"column {e.colno})") from None

    def read_json_or_none(self, key: str):
        return self.read_json(key) if self.exists(key) else None

    def read_table(self, key: str, columns: list[str] | None = None) -> pa.Table:
        """The Parquet table; a file that is not one (or lacks the columns) is a
        StorageError naming it."""
        try:
            return pq.read_table(self._path(key), filesystem=self.fs, columns=columns)
        except pa.ArrowInvalid as e:
            if NOT_PARQUET in str(e):
                raise StorageError(f"{self.uri(key)}: not a Parquet file (corrupted, truncated or "
                                   f"another format)") from None
            raise StorageError(f"{self.uri(key)}: cannot read as Parquet: {_first_line(e)}") from None

    def list(self, prefix: str = "") -> list[str]:
        """Keys of all files under prefix (recursive), sorted; [] if there are none."""
        sel = pafs.FileSelector(self._path(prefix), recursive=True, allow_not_found=True)
        start = len(self._base) + 1
        return sorted(i.path[start:] for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File and ".tmp-" not in i.base_name)

    def listing(self, prefix: str = "") -> list[tuple[str, int, int]]:
        """(key, size, mtime_ns) of files under prefix: enough to fingerprint a folder."""
        sel = pafs.FileSelector(self._path(prefix), recursive=True, allow_not_found=True)
        start = len(self._base) + 1
        return sorted((i.path[start:], i.size, i.mtime_ns or 0) for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File)

    # -- writing ----------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self.is_s3:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_json(self, key: str, obj) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def write_table(self, key: str, table: pa.Table, **parquet_options) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, **parquet_options)
        self.write_bytes(key, buf.getvalue())

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.fs.delete_file(self._path(key))

    def download_prefix(self, prefix: str, dest: Path) -> None:
        """Copy every file under prefix into the local folder dest (atomically, as a whole)."""
        dest = Path(dest)
        tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        keys = self.list(prefix)
        if not keys:
            raise StorageError(f"no files under {self.uri(prefix)}")
        for key in keys:
            target = tmp / key[len(prefix.strip("/")):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(key))
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished the same download first
            shutil.rmtree(tmp, ignore_errors=True)
