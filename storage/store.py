"""A storage root — a local folder or an s3:// prefix — addressed by relative keys.

`Store.from_uri(uri, StorageOptions(...))` picks the backend by the URI's scheme
(`BACKENDS`; no scheme: `LocalBackend`); a backend holds what differs (the pyarrow
filesystem, retries, the root's check, atomic and exclusive writes), the Store the rest.
The scheme's recognition is here alone: `storage_kind` says which backend serves a
location ("local", "s3"; a LocationError for any other URI), `location_problem` why its
backend refuses it, `uri_forms` what the backends' URIs look like; the spec's checks and
the model loader (workers/models.py) ask these, so a new backend touches storage/ only.

Every write is atomic: a reader sees a whole object or none. Locally that is a write
to a temporary sibling and a rename; on S3 the object is uploaded in one piece from
memory, and a single PUT (or a completed multipart upload) appears atomically, so a
killed writer leaves nothing visible.

Tables are written and read by their kind (storage/tables.py): `write_table(key, kind,
table)` stamps and checks it, `read_table(key, kind)` refuses a file of another kind or
schema version in a line naming it.

Every write returns the object's digest, `{"size": bytes, "crc32": "8 hex digits"}` (zlib's
CRC-32 of exactly the bytes written), which markers and manifests record; `read_verified`,
`read_table(..., digest=)` and `verify` check an object against one (IntegrityError names
the object and what differs). `create_exclusive` writes an object only if none exists
(O_EXCL-like locally, `If-None-Match: *` on S3): the primitive of jobs/leases.py.

On S3 every request that fails transiently (5xx, SlowDown, a dropped or stalled
connection) is retried here, up to STORAGE_ATTEMPTS times with exponential back-off and
bounded timeouts; each retry is counted (`retries`) and logged (the `adl.storage` logger,
at INFO). pyarrow's and boto3's own retries are off or counted, so every retry shows.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.tables import TableKind

logger = logging.getLogger("adl.storage")


class StorageError(RuntimeError):
    """A storage problem worth one line to the user (unreachable endpoint, missing bucket,
    a file that is not what it should be)."""


def shown(value, limit: int = 200) -> str:
    """A value as an error message shows it: its repr, bounded in time and cut to about
    limit characters (a YAML alias bomb's repr runs to hundreds of megabytes)."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 6, 6, 6, 6
    r.maxstring = r.maxlong = r.maxother = limit
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Characters no key or root may hold: C0 controls, DEL and C1 controls (NUL ends a C
# string: "x\0y" would be written as "x").
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def key_problem(key: str) -> str | None:
    """Why a key (relative to a root, outer slashes stripped) names no object of that
    root (None: it does): a "." or ".." component (it would leave the root, or alias
    another key), an empty one (S3 keeps "a//b" apart from "a/b"), a control character."""
    if CONTROL.search(key):
        return "holds a control character"
    if not key:
        return None
    parts = key.split("/")
    if any(part in (".", "..") for part in parts):
        return "holds a '.' or '..' component"
    if any(part == "" for part in parts):
        return "holds an empty component ('//')"
    return None


def _reason(e: BaseException) -> str:
    """What pyarrow, boto3 or the OS said, for a message of ours: the first line (pyarrow
    may go on with a schema dump), or the type's name where it said nothing. These are
    errors raised here, in-process, by libraries: never a Ray wrapper or a remote
    traceback, which common/errors.py one_line (what the job shows them through, masked)
    unwraps; storage imports nothing of ours."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# A URI-shaped location: a scheme, a colon and a slash. Only s3:// is storage; anything
# else ("gs://bucket/x", the typo "s3:/bucket") is refused rather than taken for a folder.
URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")
# Kernel pseudo filesystems: they take no files, whatever their permission bits say.
PSEUDO_FILESYSTEMS = ("/proc", "/sys")
# pyarrow's words for a file without Parquet's footer (garbage, truncated, empty).
NOT_PARQUET = "Could not open Parquet input source"

# S3 requests: attempts per operation (the first and up to 5 retries), back-off between
# them (base x 2^k, jittered, capped), and timeouts that bound a stalled connection.
STORAGE_ATTEMPTS = 6
LISTING_ATTEMPTS = 3    # listings of a folder that changes under the walk (Store._infos)
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0
CONNECT_TIMEOUT_S = 3
REQUEST_TIMEOUT_S = 30
# What the AWS SDK (through pyarrow) says about a failure worth retrying: server errors,
# throttling, and connections that broke (curl 18: partial body, 28: timeout, 52: empty
# reply, 55/56: send/receive failure). curl 7 (connection refused) only outside check().
TRANSIENT = re.compile(r"AWS Error (INTERNAL_FAILURE|SERVICE_UNAVAILABLE|SLOW_DOWN|THROTTLING|REQUEST_TIMEOUT"
                       r"|NETWORK_CONNECTION)|HTTP status 5\d\d|curlCode: (18|28|52|55|56)\b")
REFUSED = re.compile(r"curlCode: 7\b")
# An S3 bucket's name (AWS's rules, loosened to what S3-compatible servers take).
BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")


class IntegrityError(StorageError):
    """An object that is missing or does not match the digest its marker or manifest
    recorded (truncated, corrupted, or another object put in its place)."""


def digest_of(data) -> dict:
    """The digest recorded for an object: its size and the CRC-32 of its bytes."""
    return {"size": len(memoryview(data).cast("B")), "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"}


def mismatch(data, expected) -> str | None:
    """Why data does not match the digest expected (None: it does)."""
    if not isinstance(expected, dict) or not isinstance(expected.get("size"), int) \
            or not isinstance(expected.get("crc32"), str):
        return f"no valid digest recorded for it ({expected!r})"
    size = len(memoryview(data).cast("B"))
    if size != expected["size"]:
        return f"{size} bytes, {expected['size']} recorded (truncated or replaced)"
    crc = f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    if crc != expected["crc32"]:
        return f"crc32 {crc}, {expected['crc32']} recorded (corrupted or replaced)"
    return None



@contextlib.contextmanager
def _synced_temp(path: str, data: bytes):
    """data in a temporary file beside path, synced to disk (its folder made), removed
    after the block: what an atomic local write renames or links into place."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

def _regular_or_absent(path: str) -> None:
    """A local write replaces only a regular file of ours: never a device, a folder, a
    link or a pipe that sits where the object goes."""
    import stat
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise StorageError(f"{path}: cannot write: {e.strerror or _reason(e)}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise StorageError(f"{path}: is {kind}, not a file; refusing to replace it")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach a root beyond its URI: an S3-compatible endpoint and region (None: the
    AWS defaults). A local root needs none."""
    endpoint_url: str | None = None
    region: str | None = None


class Store:
    """A root, whatever its backend: Store.from_uri(uri, options) picks the backend by the
    URI's scheme (BACKENDS; no scheme: a local folder). What differs per backend (the
    filesystem, retries, the check, atomic and exclusive writes) is the backend's; the
    rest (keys, digests, verified reads, JSON and Parquet, sessions) is here, once."""

    def __init__(self, root: str, options: StorageOptions | None = None):
        self.root = str(root)
        self.options = options or StorageOptions()
        self.backend = backend_of(self.root)
        self._base = self.backend.base(self.root)
        self._fs: pafs.FileSystem | None = None
        self._client = None
        self.retries = 0           # requests retried through this store
        self.written: dict | None = None   # key -> digest of every write, in a session(record=True)
        self._counter = threading.Lock()
        self._parent: "Store | None" = None   # a session counts its retries in its store too

    @classmethod
    def from_uri(cls, uri: str, options: StorageOptions | None = None) -> "Store":
        """The store at uri: a local folder or s3://bucket/prefix; any other scheme is a
        StorageError."""
        return cls(uri, options)

    # Ray ships a Store to workers: send its configuration, not its live connection.
    def __reduce__(self):
        return (Store, (self.root, self.options))

    def session(self, record: bool = False) -> "Store":
        """The same store (sharing its connection) with its own retry count and,
        with record, a record of what it writes (`written`: key -> digest)."""
        other = copy.copy(self)
        other._fs = self.fs
        other.retries = 0
        other.written = {} if record else None
        other._counter = threading.Lock()
        other._parent = self
        return other

    def __repr__(self) -> str:
        return f"Store({self.uri()!r})"

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = self.backend.filesystem(self.options)
        return self._fs

    # -- retries ----------------------------------------------------------------------
    def counted(self, n: int) -> int:
        """Adds n retries (made elsewhere, e.g. by a worker's copy of this store, and
        logged there) to this store's count and its parents'; returns the outermost total."""
        with self._counter:
            self.retries += n
            total = self.retries
        return self._parent.counted(n) if self._parent is not None else total

    def _count(self, n: int, what: str, key: str, why: str) -> None:
        total = self.counted(n)
        logger.info(f"storage: {what} {self.uri(key)}: {why} [{total} storage retries so far]")

    def _retrying(self, what: str, key: str, fn, refused_is_transient: bool = True):
        return self.backend.retrying(self, what, key, fn, refused_is_transient)

    def child(self, prefix: str) -> "Store":
        """The store rooted at a sub-prefix (same options)."""
        return Store(self.uri(prefix), self.options)

    def uri(self, key: str = "") -> str:
        return self.backend.prefix + self._path(key)

    def _path(self, key: str) -> str:
        key = key.strip("/")
        why = key_problem(key)
        if why:
            raise StorageError(f"{self.uri()}: key {shown(key)} {why}")
        return f"{self._base.rstrip('/')}/{key}" if key else self._base

    # -- checks -----------------------------------------------------------------------
    def check(self) -> None:
        """Fail early, in one line, if the root cannot be reached or written. Writes
        nothing that stays."""
        try:
            self.backend.check(self)
        except StorageError:
            raise
        except OSError as e:
            where = f" at {self.options.endpoint_url}" if self.options.endpoint_url else ""
            raise StorageError(f"storage.root: cannot reach {self.uri()}{where}: {_reason(e)}") from None

    # -- reading ----------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        info = self._retrying("looking up", key, lambda: self.fs.get_file_info(self._path(key)))
        return info.type == pafs.FileType.File

    def read_buffer(self, key: str) -> pa.Buffer:
        """The object's bytes as an Arrow buffer (no copy into Python bytes)."""
        def read():   # a random-access file reads in one piece (a stream copies in chunks)
            with self.fs.open_input_file(self._path(key)) as f:
                return f.read_buffer()
        return self._retrying("reading", key, read)

    def read_head(self, key: str, nbytes: int) -> tuple[bytes, int]:
        """The object's first nbytes (fewer if it is shorter) and its size: one ranged read,
        for a file's header (a safetensors file's) without reading the file."""
        def read():
            with self.fs.open_input_file(self._path(key)) as f:
                return f.read(nbytes), f.size()
        return self._retrying("reading", key, read)

    def read_bytes(self, key: str) -> bytes:
        return self.read_buffer(key).to_pybytes()

    def _checked(self, key: str, digest: dict):
        """(bytes, None) when the object matches digest, else (None, why). On S3 a mismatch
        is read once more before it counts: a transfer can break too."""
        for attempt in (1, 2):
            try:
                data = self.read_buffer(key)
            except FileNotFoundError:
                return None, "missing"
            why = mismatch(data, digest)
            if why is None:
                return data, None
            if not self.backend.rereads or attempt == 2:
                return None, why
            self._count(1, "verifying", key, f"{why}; reading it again")

    def read_verified(self, key: str, digest: dict) -> pa.Buffer:
        """The object's bytes, checked against the digest recorded for it; IntegrityError
        (naming the object and what differs) when it is missing or does not match."""
        data, why = self._checked(key, digest)
        if why is not None:
            raise IntegrityError(f"{self.uri(key)}: {why}")
        return data

    def verify(self, key: str, digest: dict) -> str | None:
        """Why the object does not match digest (None: it does), read in full."""
        return self._checked(key, digest)[1]

    def read_json(self, key: str, digest: dict | None = None):
        """The file's JSON value; a file that is not JSON is a StorageError naming it
        (with digest, checked first: IntegrityError)."""
        data = (self.read_verified(key, digest) if digest is not None else self.read_buffer(key)).to_pybytes()
        try:
            return json.loads(data)
        except UnicodeDecodeError:
            raise StorageError(f"{self.uri(key)}: not a JSON file (binary content)") from None
        except json.JSONDecodeError as e:
            raise StorageError(f"{self.uri(key)}: not valid JSON ({e.msg}: line {e.lineno} "
                               f"column {e.colno})") from None

    def read_json_or_none(self, key: str):
        return self.read_json(key) if self.exists(key) else None

    def read_table(self, key: str, kind: TableKind | None = None, columns: list[str] | None = None,
                   digest: dict | None = None) -> pa.Table:
        """The Parquet table; a file that is not one (or lacks the columns) is a
        StorageError naming it, and so is, with kind, a table of another kind or schema
        version. With digest, the bytes are checked first (IntegrityError)."""
        data = self.read_verified(key, digest) if digest is not None else self.read_buffer(key)
        not_parquet = StorageError(f"{self.uri(key)}: not a Parquet file (corrupted, truncated or another format)")
        if kind is not None:   # the footer alone says what the file is
            try:
                schema = pq.read_schema(pa.BufferReader(data))
            except pa.ArrowInvalid:
                raise not_parquet from None
            why = kind.problem(schema)
            if why is not None:
                raise StorageError(f"{self.uri(key)}: {why}")
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns)
        except pa.ArrowInvalid as e:
            if NOT_PARQUET in str(e):
                raise not_parquet from None
            raise StorageError(f"{self.uri(key)}: cannot read as Parquet: {_reason(e)}") from None

    def _infos(self, prefix: str):
        sel = pafs.FileSelector(self._path(prefix), recursive=True, allow_not_found=True)
        # A folder that another writer creates (or a temporary file it removes) while it
        # is listed fails pyarrow's walk with FileNotFoundError even with allow_not_found
        # (measured: 10 of 300 six-way lease claims on a local root): list it again.
        for attempt in range(LISTING_ATTEMPTS):
            try:
                return self._retrying("listing", prefix, lambda: self.fs.get_file_info(sel))
            except FileNotFoundError:
                if attempt == LISTING_ATTEMPTS - 1:
                    raise

    def list(self, prefix: str = "") -> list[str]:
        """Keys of all files under prefix (recursive), sorted; [] if there are none."""
        start = len(self._base) + 1
        return sorted(i.path[start:] for i in self._infos(prefix)
                      if i.type == pafs.FileType.File and ".tmp-" not in i.base_name)

    def listing(self, prefix: str = "") -> list[tuple[str, int, int]]:
        """(key, size, mtime_ns) of files under prefix: enough to fingerprint a folder."""
        start = len(self._base) + 1
        return sorted((i.path[start:], i.size, i.mtime_ns or 0) for i in self._infos(prefix)
                      if i.type == pafs.FileType.File)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size} of the files under prefix, from one listing."""
        return {key: size for key, size, _ in self.listing(prefix) if ".tmp-" not in key.rpartition("/")[2]}

    # -- writing ----------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> dict:
        """Writes the object atomically; returns its digest (recorded in a session)."""
        self._write(key, data)
        return self._wrote(key, data)

    def _wrote(self, key: str, data: bytes) -> dict:
        digest = digest_of(data)
        if self.written is not None:
            with self._counter:
                self.written[key.strip("/")] = digest
        return digest

    def _write(self, key: str, data: bytes) -> None:
        self.backend.write(self, key, data)

    def write_json(self, key: str, obj) -> dict:
        return self.write_bytes(key, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def write_table(self, key: str, kind: TableKind, table: pa.Table, if_changed: bool = False) -> dict:
        """Writes table as a Parquet file of its kind (its tag and schema version stamped,
        its columns checked, in the kind's Parquet options). if_changed: an object that
        already holds the same bytes is left alone (a view with nothing new rewrites nothing)."""
        data = kind.to_parquet(table)
        if if_changed:
            try:
                if self.read_buffer(key).equals(pa.py_buffer(data)):
                    return self._wrote(key, data)
            except FileNotFoundError:
                pass
        return self.write_bytes(key, data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Writes the object only if no object has that key (whole, atomically); False when
        one exists. A retried request whose first attempt did land also finds the key taken:
        callers tell theirs by its content."""
        return self.backend.create_exclusive(self, key, data)

    def delete(self, key: str) -> None:
        """Removes the object if it exists."""
        try:
            self._retrying("deleting", key, lambda: self.fs.delete_file(self._path(key)))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)


def write_file(out: str, data: bytes, options: StorageOptions | None, signature: bytes, what: str) -> str:
    """Writes data to out, a file path or URI the user named (`--out`), atomically; returns
    its URI. What is there already is replaced only when it is a file of this kind (its
    first KiB holds signature): never a folder, a device, a link, another job's records
    or any other file. StorageError, in one line, otherwise."""
    if not out.strip() or out.endswith("/"):
        raise StorageError(f"--out: expected a file path, got {shown(out)}")
    parent, _, name = out.rpartition("/")
    target = Store.from_uri(parent or ("/" if out.startswith("/") else "."), options)
    path = target._path(name)
    try:
        info = target._retrying("looking up", name, lambda: target.fs.get_file_info(path))
    except OSError as e:
        raise StorageError(f"{target.uri(name)}: cannot look it up: {_reason(e)}") from None
    if info.type == pafs.FileType.Directory:
        raise StorageError(f"{target.uri(name)}: is a folder, not a file; refusing to replace it")
    if info.type == pafs.FileType.File and target.backend is LocalBackend:
        _regular_or_absent(path)   # pyarrow calls a device or a link's target a file
    if info.type == pafs.FileType.File:
        def head():
            with target.fs.open_input_stream(path) as f:
                return f.read(1024)
        try:
            first = target._retrying("reading", name, head)
        except OSError as e:
            raise StorageError(f"{target.uri(name)}: cannot read what is there: {_reason(e)}") from None
        if signature not in first:
            raise StorageError(f"{target.uri(name)}: exists and is not {what}; refusing to replace it")
    target.write_bytes(name, data)
    return target.uri(name)


# -- backends -----------------------------------------------------------------------------
class LocalBackend:
    """A local folder: atomic writes by a synced temporary sibling and a rename, exclusive
    ones by a hard link (fails if the name is taken); no retries."""
    prefix = ""
    rereads = False   # a mismatch read again is the same bytes

    @staticmethod
    def problem(root: str) -> str | None:
        if CONTROL.search(root):
            return "holds a control character"
        try:
            LocalBackend._resolved(root)
        except RuntimeError:   # Python 3.11's word for a symbolic link loop
            return "cannot be resolved (a loop of symbolic links)"
        except OSError as e:
            return f"cannot be resolved ({e.strerror or _reason(e)})"
        return None

    @staticmethod
    def _resolved(root: str) -> str:
        return str(Path(os.path.expanduser(root)).resolve())

    @staticmethod
    def base(root: str) -> str:
        why = LocalBackend.problem(root)
        if why:
            raise StorageError(f"{shown(root)}: {why}")
        return LocalBackend._resolved(root)

    @staticmethod
    def filesystem(options: StorageOptions) -> pafs.FileSystem:
        return pafs.LocalFileSystem()

    @staticmethod
    def retrying(store: Store, what: str, key: str, fn, refused_is_transient: bool = True):
        return fn()

    @staticmethod
    def check(store: Store) -> None:
        """The root is probed with a temporary file, created and removed in the root or,
        while it does not exist yet, its nearest existing parent."""
        root = Path(store._base)
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

    @staticmethod
    def write(store: Store, key: str, data: bytes) -> None:
        path = store._path(key)
        _regular_or_absent(path)
        try:
            with _synced_temp(path, data) as tmp:
                _regular_or_absent(path)   # made meanwhile (a rename would replace a link, not follow it)
                os.replace(tmp, path)
        except OSError as e:
            raise StorageError(f"{path}: cannot write: {e.strerror or _reason(e)}") from None

    @staticmethod
    def create_exclusive(store: Store, key: str, data: bytes) -> bool:
        path = store._path(key)
        try:
            with _synced_temp(path, data) as tmp:
                try:
                    os.link(tmp, path)   # fails if path exists: the exclusive part
                    return True
                except FileExistsError:
                    return False
        except OSError as e:
            raise StorageError(f"{path}: cannot write: {e.strerror or _reason(e)}") from None


class S3Backend:
    """s3://bucket/prefix on AWS or any S3-compatible endpoint: pyarrow's S3 filesystem
    (one attempt per call: the retries are `retrying`'s, counted and logged), boto3 for
    the conditional PUT pyarrow cannot make."""
    prefix = "s3://"
    form = "s3://bucket/prefix"   # what a root looks like, for messages
    rereads = True    # a transfer can break too: a mismatch is read once more before it counts

    @staticmethod
    def problem(root: str) -> str | None:
        """Why root is no S3 root, without naming it (None: it is one). A root's prefix
        is a key (key_problem): no ".." that would climb into another bucket, no empty
        component, no control character; one trailing slash is allowed."""
        bucket, _, prefix = root[len("s3://"):].partition("/")
        if not bucket:
            return f"names no bucket (expected {S3Backend.form})"
        if not BUCKET.fullmatch(bucket):
            return (f"names no valid bucket ({shown(bucket)}: 3 to 63 letters, digits, dots and hyphens; "
                    f"expected {S3Backend.form})")
        prefix = prefix[:-1] if prefix.endswith("/") else prefix
        why = key_problem(prefix)
        if why or prefix.startswith("/"):
            return f"has a prefix that {why or 'holds an empty component (//)'}"
        return None

    @staticmethod
    def base(root: str) -> str:
        """bucket/prefix, as problem() parsed it: what every request uses."""
        why = S3Backend.problem(root)
        if why:
            raise StorageError(f"{shown(root)}: {why}")
        return root[len("s3://"):].rstrip("/")

    @staticmethod
    def filesystem(options: StorageOptions) -> pafs.FileSystem:
        # allow_delayed_open: an object that fits one part is one PUT, not a multipart upload.
        kwargs: dict = dict(connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
                            allow_delayed_open=True)
        if options.region:
            kwargs["region"] = options.region
        if options.endpoint_url:
            scheme, _, host = options.endpoint_url.rpartition("://")
            kwargs["endpoint_override"] = host or options.endpoint_url
            kwargs["scheme"] = scheme or "https"
        # Credentials come from the usual AWS chain (environment, profile, instance role).
        return pafs.S3FileSystem(**kwargs)

    @staticmethod
    def retrying(store: Store, what: str, key: str, fn, refused_is_transient: bool = True):
        """fn() with S3's transient failures retried."""
        for attempt in range(1, STORAGE_ATTEMPTS + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except OSError as e:
                text = str(e)
                transient = TRANSIENT.search(text) and (refused_is_transient or not REFUSED.search(text))
                if attempt == STORAGE_ATTEMPTS or not transient:
                    raise
                delay = min(BACKOFF_BASE_S * 2 ** (attempt - 1), BACKOFF_MAX_S) * (0.5 + 0.5 * random.random())
                store._count(1, what, key, f"attempt {attempt} of {STORAGE_ATTEMPTS} failed "
                                           f"({_reason(e)}); retrying in {delay:.1f} s")
                time.sleep(delay)

    @staticmethod
    def check(store: Store) -> None:
        bucket = store._base.split("/", 1)[0]
        info = store._retrying("checking", "", lambda: store.fs.get_file_info(bucket), refused_is_transient=False)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"storage.root: bucket {bucket!r} does not exist ({store.uri()})")

    @staticmethod
    def write(store: Store, key: str, data: bytes) -> None:
        path = store._path(key)

        def upload():
            with store.fs.open_output_stream(path) as f:
                f.write(data)
        try:
            store._retrying("writing", key, upload)
        except OSError as e:
            raise StorageError(f"{store.uri(key)}: cannot write: {_reason(e)}") from None

    @staticmethod
    def _client(store: Store):
        """A boto3 client (one per store); its own retries are counted from each response."""
        if store._client is None:
            import boto3
            from botocore.config import Config
            store._client = boto3.client(
                "s3", endpoint_url=store.options.endpoint_url, region_name=store.options.region,
                config=Config(retries={"mode": "standard", "max_attempts": STORAGE_ATTEMPTS},
                              connect_timeout=CONNECT_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S))
        return store._client

    @staticmethod
    def create_exclusive(store: Store, key: str, data: bytes) -> bool:
        """`PUT` with `If-None-Match: *` (412 when the key exists)."""
        from botocore.exceptions import BotoCoreError, ClientError
        bucket, _, name = store._path(key).partition("/")
        try:
            response = S3Backend._client(store).put_object(Bucket=bucket, Key=name, Body=data, IfNoneMatch="*")
            meta = response.get("ResponseMetadata", {})
            created = True
        except BotoCoreError as e:   # the endpoint did not answer, after boto3's retries
            raise StorageError(f"{store.uri(key)}: cannot create: {_reason(e)}") from None
        except ClientError as e:
            meta = e.response.get("ResponseMetadata", {})
            code = str(e.response.get("Error", {}).get("Code", ""))
            if meta.get("HTTPStatusCode") not in (409, 412) and code not in (
                    "PreconditionFailed", "ConditionalRequestConflict"):
                raise StorageError(f"{store.uri(key)}: cannot create: {_reason(e)}") from None
            created = False
        if meta.get("RetryAttempts"):
            store._count(meta["RetryAttempts"], "creating", key,
                         f"boto3 retried the request {meta['RetryAttempts']} time(s)")
        return created


# A new backend is a class like these and an entry here, and nothing outside storage/.
BACKENDS = {"s3": S3Backend}


def uri_forms() -> str:
    """What the backends' roots look like, for messages: "s3://bucket/prefix"."""
    return " or ".join(backend.form for backend in BACKENDS.values())


class LocationError(StorageError):
    """A URI no backend serves: of another scheme ("gs://bucket/x") or malformed
    ("s3:/bucket"). `problem` says which without naming the location, for callers that
    name it their own way (the spec's checks)."""

    def __init__(self, location: str, scheme: str, served: bool):
        self.location, self.scheme = location, scheme
        self.problem = f"malformed {scheme}:// URI" if served else f"unsupported URI scheme {scheme}://"
        super().__init__(f"{location}: unsupported URI scheme {scheme}:// (expected a local folder or {uri_forms()})")


def uri_scheme(location: str) -> str | None:
    """The scheme of a URI-shaped location (a scheme, a colon and a slash: "s3" for
    s3://bucket/x and for the typo s3:/bucket, "gs" for gs://bucket/x); None for a path."""
    m = URI.match(location)
    return m.group(1) if m else None


def storage_kind(location: str) -> str:
    """Which backend serves a location: "local" for a path (no URI scheme), else the
    name of its backend in BACKENDS ("s3"). Any other URI, or a malformed one
    ("s3:/bucket"), is a LocationError, never a folder named after it."""
    scheme = uri_scheme(location)
    if scheme is None:
        return "local"
    backend = BACKENDS.get(scheme)
    if backend is None or not location.startswith(backend.prefix):
        raise LocationError(location, scheme, served=backend is not None)
    return scheme


def backend_of(uri: str):
    """The backend of a root by its URI scheme (storage_kind)."""
    kind = storage_kind(uri)
    return LocalBackend if kind == "local" else BACKENDS[kind]


def location_problem(location: str) -> str | None:
    """Why a location's backend refuses it as a root, without naming it ("names no
    bucket (expected s3://bucket/prefix)"); None where it takes it. LocationError for a
    URI no backend serves."""
    return backend_of(location).problem(location)
