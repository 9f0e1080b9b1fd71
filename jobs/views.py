"""The job-level views, rewritten as the job goes: whenever a pair finishes (done or
failed) and at the end, the catalog, the pair-similarity table and the report page are
written again (each atomically, Store.write_bytes) from every pair finished so far, so
that analysts read results the morning after without waiting for the last pair.

A view that cannot be written is logged and left as it was: the job's results never
depend on its views.
"""
from __future__ import annotations

import logging
import threading

from common.errors import one_line
from storage.store import Store

logger = logging.getLogger("adl.views")
_lock = threading.Lock()   # one rewrite at a time per process (pairs end in the scheduler's loop)


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
