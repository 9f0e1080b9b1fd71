"""Leases on a storage root: which run is doing a unit of work now (an activation set's
extraction, a pair's stages), so that two runs of one spec on one root do each unit once.

A lease is a small JSON object, `leases/<prefix>/<n>.json` (prefix: `activations/<set>` or
`pairs/<pair>`), created only if no object has that key (storage/store.py create_exclusive:
a hard link locally, `If-None-Match: *` on S3). It names its holder (a random owner id,
host, pid, job) and when it expires; the holder's heartbeat thread renews it every
RENEW_S seconds to TTL_S ahead. A lease is live while it has not expired and, when it
was taken on this host, while its process is alive: a run killed on this host is seen at
once, one on another host when its lease expires (host clocks must agree to well within
TTL_S). An expiry further ahead than RENEW_S + TTL_S is no lease: no holder renews that
far ahead, so it was forged or written by a clock far off, and it would block the work
for as long as it claims.

Taking a lease: if any generation n of the prefix is live (and not ours), another run holds
it. Otherwise the next generation (the highest present + 1, or 0) is created
exclusively: of several runs trying at once one succeeds. The winner then checks that no
other generation is live (a run that saw an older listing may have created another) and
gives its own back if one is; then it deletes the expired generations below its own.
Released leases are deleted. The work under a lease is idempotent (atomic,
content-determined writes), so the rare run that loses a lease it held (its heartbeat
stalled past TTL_S) duplicates work but never corrupts it; it says so in the log.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid

from storage import layout
from storage.store import Store, StorageError, shown

TTL_S = 120.0        # a lease not renewed for this long is dead
RENEW_S = 20.0       # how often its holder renews it
POLL_S = 1.0         # how often a waiting run looks again

logger = logging.getLogger("adl.leases")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


class Leases:
    """The leases one run holds; a context manager that renews them while it is open and
    gives back whatever is still held when it closes."""

    def __init__(self, store: Store, job: str):
        self.store, self.job = store, job
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.held: dict[str, int] = {}         # prefix -> generation
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: dict[str, str] = {}    # prefix -> holder last logged

    # -- the lease objects ------------------------------------------------------------
    def _key(self, prefix: str, generation: int) -> str:
        return f"{layout.lease(prefix)}/{generation:08d}.json"

    def _generations(self, prefix: str) -> dict[int, dict | None]:
        """Every generation present: its lease, or None where it does not parse."""
        out = {}
        for key in self.store.list(layout.lease(prefix)):
            name = key.rpartition("/")[2]
            if not (name.endswith(".json") and name[:-5].isdigit()):
                continue
            try:
                lease = self.store.read_json(key)
            except (StorageError, FileNotFoundError):   # garbage, or deleted since the listing
                lease = None
            out[int(name[:-5])] = lease if isinstance(lease, dict) else None
        return out

    def _record(self) -> bytes:
        now = time.time()
        return (json.dumps({"owner": self.owner, "job": self.job, "host": self.host, "pid": self.pid,
                            "renewed": now, "expires": now + TTL_S}, sort_keys=True) + "\n").encode()

    def live(self, lease: dict | None) -> bool:
        if not isinstance(lease, dict):
            return False
        if lease.get("owner") == self.owner:
            return True
        expires = lease.get("expires")
        now = time.time()
        if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not expires > now:
            return False   # expired (or NaN, or not a time)
        if expires > now + TTL_S + RENEW_S:
            return False   # no holder renews that far ahead: forged, or a clock far off
        if lease.get("host") == self.host and not _pid_alive(lease.get("pid")):
            return False   # its process on this host is gone
        return True

    def holder(self, prefix: str) -> dict | None:
        """The live lease another run holds on prefix, if any."""
        for lease in self._generations(prefix).values():
            if self.live(lease) and lease.get("owner") != self.owner:
                return lease
        return None

    # -- taking and giving back --------------------------------------------------------
    def claim(self, prefix: str) -> bool:
        """Takes the lease on prefix unless another run holds it; True when this run holds it."""
        with self._lock:
            if prefix in self.held:
                return True
        generations = self._generations(prefix)
        if any(self.live(lease) for lease in generations.values()):
            return False
        mine = max(generations, default=-1) + 1
        key = self._key(prefix, mine)
        if not self.store.create_exclusive(key, self._record()):
            try:   # a retried PUT whose first attempt landed reads as taken: by us?
                if self.store.read_json(key).get("owner") != self.owner:
                    return False
            except (StorageError, FileNotFoundError, AttributeError):
                return False
        generations = self._generations(prefix)
        if any(self.live(lease) for g, lease in generations.items() if g != mine):
            self.store.delete(key)   # another run took it at the same time: it keeps it
            return False
        for g in generations:
            if g < mine:
                self.store.delete(self._key(prefix, g))   # expired, or its holder is gone
        with self._lock:
            self.held[prefix] = mine
        return True

    def release(self, prefix: str) -> None:
        with self._lock:   # not while a renewal writes it (that would bring it back)
            generation = self.held.pop(prefix, None)
            if generation is None:
                return
            try:
                self.store.delete(self._key(prefix, generation))
            except (StorageError, OSError) as e:   # it expires by itself
                logger.info(f"{prefix}: could not give its lease back ({e}); it expires in {TTL_S:.0f} s")

    def release_all(self) -> None:
        for prefix in list(self.held):
            self.release(prefix)

    # -- waiting for another run --------------------------------------------------------
    def describe(self, lease: dict) -> str:
        left = max(0.0, float(lease.get("expires", 0)) - time.time())
        # The lease is anyone's file: its fields reach the terminal as reprs, cut short.
        return (f"another run (job {shown(lease.get('job'))}, host {shown(lease.get('host'))}, "
                f"pid {shown(lease.get('pid'))}; "
                f"its lease expires in {left:.0f} s unless renewed)")

    def wait(self, prefixes: list[str], sleep=time.sleep) -> None:
        """Returns once some prefix has no live lease of another run (given back, or its
        holder died), logging who holds each when first seen; after a short random pause
        in any case, so that two runs that gave way to each other do not meet again."""
        sleep(random.uniform(0.1, 0.5))
        while True:
            for prefix in prefixes:
                lease = self.holder(prefix)
                if lease is None:
                    return
                who = f"{lease.get('owner')}"
                if self._reported.get(prefix) != who:
                    self._reported[prefix] = who
                    logger.info(f"{prefix}: being worked on by {self.describe(lease)}; waiting for it")
            sleep(POLL_S)

    # -- the heartbeat ---------------------------------------------------------------------
    def renew(self) -> None:
        with self._lock:
            held = dict(self.held)
        for prefix, generation in held.items():
            try:
                newer = [g for g, lease in self._generations(prefix).items() if g > generation and self.live(lease)]
                if newer:
                    if prefix not in self.lost:
                        self.lost.add(prefix)
                        logger.info(f"{prefix}: lost its lease to another run (this run's heartbeat was late); "
                                    f"both may do its work, with the same results")
                    continue
                with self._lock:
                    if self.held.get(prefix) == generation:
                        self.store.write_bytes(self._key(prefix, generation), self._record())
            except (StorageError, OSError) as e:
                logger.info(f"{prefix}: could not renew its lease ({e}); trying again in {RENEW_S:.0f} s")

    def _beat(self) -> None:
        while not self._stop.wait(RENEW_S):
            self.renew()

    def __enter__(self) -> "Leases":
        self._thread = threading.Thread(target=self._beat, name="adl leases", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.release_all()
