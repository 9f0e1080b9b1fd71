"""The job-level views, rewritten as the job goes: whenever a pair finishes (done or
failed) and at the end, the catalog, the pair-similarity table and the report page are
written again (each atomically, Store.write_bytes) from every pair finished so far, so
that analysts read results the morning after without waiting for the last pair.

While the job runs they are rewritten by a thread of their own (Publisher), never in the
scheduler's loop: a rewrite reads every finished pair's tables, so its time grows with the
job (a 100-pair job would otherwise stop scheduling for a rewrite after each of its
pairs). Pairs that end while a rewrite runs, or within MIN_INTERVAL_S of the last one,
are taken into one rewrite after it; the job's end waits for it, then writes the views a
last time.

A view that cannot be written is logged and left as it was: the job's results never
depend on its views.
"""
from __future__ import annotations

import logging
import threading
import time

from common.errors import one_line
from storage.store import Store

logger = logging.getLogger("adl.views")
_lock = threading.Lock()   # one rewrite at a time per process
MIN_INTERVAL_S = 10.0      # between two rewrites while the job runs


VIEWS = ("catalog", "pair similarity", "report")


def publish(store: Store, record_key: str, views: tuple[str, ...] = VIEWS) -> str | None:
    """Rewrites the job's views (all, or those named); returns the catalog's key (None if
    it was not written)."""
    from jobs.catalog import write_catalog
    from jobs.pair_similarity import write_pair_similarity
    from jobs.report import write_report
    catalog = None
    with _lock:
        for name, write in (("catalog", lambda: write_catalog(store, record_key)),
                            ("pair similarity", lambda: write_pair_similarity(store, record_key)),
                            ("report", lambda: write_report(store, record_key))):
            if name not in views:
                continue
            try:
                out = write()
                if name == "catalog":
                    catalog = out
            except Exception as e:   # a view is never worth failing the job for
                logger.info(f"{name}: not rewritten: {one_line(e)}")
    return catalog


class Publisher:
    """Rewrites every view in its own thread when asked (request()), at most once every
    MIN_INTERVAL_S, requests coalesced; close() waits for what was asked."""

    def __init__(self, store: Store, record_key: str, min_interval_s: float = MIN_INTERVAL_S):
        self.store, self.record_key, self.min_interval_s = store, record_key, min_interval_s
        self._wanted, self._closed = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adl-views", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def close(self) -> None:
        """Waits for a rewrite under way (the job's end writes the views itself)."""
        self._closed.set()
        self._wanted.set()
        self._thread.join()

    def _loop(self) -> None:
        last = float("-inf")
        while True:
            self._wanted.wait()
            # Pairs that end meanwhile share this rewrite.
            self._closed.wait(max(0.0, last + self.min_interval_s - time.monotonic()))
            if self._closed.is_set():
                return
            self._wanted.clear()
            publish(self.store, self.record_key)
            last = time.monotonic()
