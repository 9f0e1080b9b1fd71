"""The run history of a job: every attempt (`adl run`, `adl submit`, a rerun, one cut short
by Ctrl-C) keeps its own record and its own log under `runs/<job>/attempts/`, on the
storage root (local or S3), named by when it started:

    runs/<job>/attempts/<started>-<id>.json   its status record (jobs/status.py) as it last wrote it
    runs/<job>/attempts/<started>-<id>.log    what the `adl` logger printed at INFO and above

`runs/<job>/status.json` is the record of the latest attempt that did work: an attempt
that found nothing to do writes its own record and log only, and overwrites nothing of
the attempts before it. Both are written by one function, write_attempt.
"""
from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timezone

from common.logs import DATE_FORMAT, FORMAT
from storage import layout
from storage.layout import attempt_log, attempt_record, attempts_dir   # keys have one home
from storage.store import Store

logger = logging.getLogger("adl.attempts")


def new_attempt() -> str:
    """An attempt's name: its start (UTC, sorting in time order) and a random suffix."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def write_attempt(store: Store, job_name: str, record: dict) -> None:
    """The attempt's record (record["attempt"] names it), and the job's status record when
    the attempt did work (record["did_work"])."""
    store.write_json(attempt_record(job_name, record["attempt"]), record)
    if record.get("did_work"):
        store.write_json(layout.run_status(job_name), record)


def history(store: Store, job_name: str) -> list[dict]:
    """Every attempt's record, oldest first; a record that cannot be read is listed with
    its key and the reason (a history is read next morning: it must not fail on one file)."""
    out = []
    for key in sorted(k for k in store.list(attempts_dir(job_name)) if k.endswith(".json")):
        try:
            record = store.read_json(key)
        except Exception as e:   # noqa: BLE001  (one unreadable record must not hide the others)
            record = {"attempt": key.rpartition("/")[2].removesuffix(".json"), "state": "unreadable",
                      "error": f"{type(e).__name__}: {e}"}
        if isinstance(record, dict):
            out.append(record)
    return out


def units_done(record: dict) -> int:
    return sum(u.get("state") == "done" for u in record.get("units") or [] if isinstance(u, dict))


def loads(record: dict) -> int:
    work = record.get("work") if isinstance(record.get("work"), dict) else {}
    return int(work.get("model_loads", len(record.get("actors") or [])))


def history_lines(records: list[dict]) -> list[str]:
    """One line per attempt, newest first."""
    lines = []
    for r in reversed(records):
        lines.append(f"  {r.get('attempt')}: {r.get('state')}" + (f" ({r['error']})" if r.get("error") else "")
                     + f", started {r.get('started')}, ended {r.get('finished') or '-'}, "
                       f"{float(r.get('seconds') or 0):.0f} s, {units_done(r)} units done, "
                       f"{loads(r)} model loads, {float(r.get('gpu_hours') or 0):.4f} GPU-hours"
                     + ("" if r.get("did_work", True) else ", nothing to do"))
    return lines


class AttemptLog(logging.Handler):
    """The attempt's log: the `adl` logger's records at INFO and above, formatted as on
    stderr, kept in memory and written whole to the attempt's .log by flush() (the status
    record's writes call it; a log of a job is lines, not megabytes)."""

    def __init__(self, store: Store, job_name: str, attempt: str | None = None):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        self.attempt = attempt or new_attempt()
        self.store, self.key = store, attempt_log(job_name, self.attempt)
        self._lines: list[str] = []
        self._written = -1
        self._flush_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:   # noqa: BLE001
            self.handleError(record)
            return
        with self.lock:
            self._lines.append(line)

    def flush(self) -> None:
        with self._flush_lock:
            with self.lock:
                lines = list(self._lines)
            if len(lines) == self._written:
                return
            self.store.write_bytes(self.key, ("\n".join(lines) + "\n").encode() if lines else b"")
            self._written = len(lines)

    @classmethod
    def attached(cls, store: Store, job_name: str) -> "AttemptLog":
        """A new attempt's log, receiving the `adl` logger's records until detach()."""
        log = cls(store, job_name)
        logging.getLogger("adl").addHandler(log)
        return log

    def detach(self) -> None:
        """Receives no more records (its lines are written by the next flush)."""
        logging.getLogger("adl").removeHandler(self)
