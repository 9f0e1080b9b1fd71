"""Jobs on a running Ray cluster, through the Ray Jobs API (the head's dashboard port).

`adl submit` validates the spec here (bad input fails before anything is sent), then
submits an entrypoint that runs it in the cluster, `python -m jobs.cli run --spec-env
ADL_JOB_SPEC`, with a runtime environment carrying this project (its folder, without
virtual environments, outputs, caches or git) and the validated spec (relative paths
already resolved) as an environment variable. The entrypoint joins the cluster through
the RAY_ADDRESS that Ray sets for it (driver.ensure_ray).

`--env NAME` forwards the submitter's value of NAME (HF_TOKEN, a grader's key) in the same
runtime environment, which every process of the job inherits; FORWARDED_ENV names them, so
that the job masks their values in every log line and error (common/redact.py). Ray keeps
a runtime environment in its job table: the dashboard and `ray job list` show it to whoever
can reach the cluster's dashboard (README: "Secrets").
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from common.errors import one_line
from jobs.spec import JobSpec
from storage import layout

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_ENV = "ADL_JOB_SPEC"
FORWARDED_ENV = "ADL_FORWARDED_ENV"    # the names --env forwarded, comma-separated
# Never shipped to the cluster: environments, outputs, caches, version control.
EXCLUDES = [".venv", "venv", ".git", "adl-output", "__pycache__", "*.pyc", ".pytest_cache",
            "*.egg-info", "build", "dist", ".mypy_cache", ".ruff_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(RuntimeError):
    """The cluster cannot be reached, or it knows no such job: one line for the user."""


def address(given: str | None) -> str:
    """--address, else $RAY_ADDRESS when it is an HTTP address, else the local default."""
    env = os.environ.get("RAY_ADDRESS")
    return given or (env if env and env.startswith("http") else DEFAULT_ADDRESS)


def client(addr: str):
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(addr)
    except Exception as e:   # ConnectionError, or a bad URL
        raise ClusterError(f"--address: cannot reach a Ray cluster's Jobs API at {addr} "
                           f"({type(e).__name__})") from None


def _call(fn, job_id: str, *args):
    try:
        return fn(job_id, *args)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise ClusterError(f"{job_id}: no such job on this cluster") from None
        raise ClusterError(f"{job_id}: {one_line(e, typed=False)}") from None
    except OSError as e:
        raise ClusterError(f"the cluster stopped answering: {one_line(e)}") from None


def runtime_env(spec: JobSpec, extra_env: dict | None = None) -> dict:
    env_vars = {SPEC_ENV: json.dumps(spec.to_dict()), "PYTHONUNBUFFERED": "1",
                **{k: v for k, v in (extra_env or {}).items()}}
    return {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env_vars}


def this_machine() -> set[str]:
    """The addresses by which this machine may appear as a Ray node."""
    import socket
    ips = {"127.0.0.1", "localhost"}
    try:
        ips |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    try:
        from ray._private.services import get_node_ip_address
        ips.add(get_node_ip_address())
    except Exception:
        pass
    return ips


def node_ips(addr: str) -> list[str]:
    """The cluster's alive nodes' addresses (the dashboard's state API); [] when unknown."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"{addr.rstrip('/')}/api/v0/nodes?limit=1000", timeout=10) as r:
            nodes = json.load(r)["data"]["result"]["result"]
    except (OSError, KeyError, TypeError, ValueError):
        return []
    return sorted(n["node_ip"] for n in nodes if n.get("state") == "ALIVE")


def check_storage_reach(root: str, ips: list[str], here: set[str]) -> None:
    """A local storage.root is a folder on this machine: refused when the cluster's nodes
    are other machines (each would write its own disk, and the results would be split)."""
    from storage.store import storage_kind
    others = [ip for ip in ips if ip not in here]
    if storage_kind(root) == "local" and others:
        raise ClusterError(f"storage.root: {root} is a folder on this machine, but the cluster's "
                           f"{len(ips)} node(s) ({', '.join(ips[:3])}{', ...' if len(ips) > 3 else ''}) are not: "
                           f"each would write to its own disk; use s3://bucket/prefix")


def forwarded(names: list[str]) -> dict:
    """The submitter's values of the --env names, checked before anything is sent."""
    import re
    out = {}
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in (SPEC_ENV, FORWARDED_ENV, "ADL_UPLOADS") \
                or name.startswith("RAY_"):
            raise ClusterError(f"--env {name!r}: not a variable that can be forwarded")
        if not os.environ.get(name):
            raise ClusterError(f"--env {name}: not set in this environment")
        out[name] = os.environ[name]
    if out:
        out[FORWARDED_ENV] = ",".join(out)
    return out


def submit(spec: JobSpec, addr: str, extra_env: dict | None = None) -> str:
    """Submits the job; returns its Ray job id (adl-<job name>-<random>)."""
    c = client(addr)
    job_id = f"adl-{layout.slug(spec.name)}-{uuid.uuid4().hex[:8]}"
    try:
        return c.submit_job(entrypoint=f"python -m jobs.cli run --spec-env {SPEC_ENV}",
                            submission_id=job_id, runtime_env=runtime_env(spec, extra_env),
                            metadata={"adl_job": spec.name, "storage_root": spec.storage.root})
    except RuntimeError as e:
        raise ClusterError(f"the cluster refused the job: {one_line(e, typed=False)}") from None


def status_text(job_id: str, addr: str) -> str:
    """The Ray job's state, and the adl status record's counts when its storage is reachable."""
    c = client(addr)
    info = _call(c.get_job_info, job_id)
    lines = [f"{job_id}: {info.status}" + (f" ({info.message})" if info.message else "")]
    spec_json = (info.runtime_env or {}).get("env_vars", {}).get(SPEC_ENV)
    if spec_json:
        from jobs.spec import parse_spec
        from jobs.summary import status_lines
        from storage.store import Store
        spec = parse_spec(json.loads(spec_json))
        try:
            store = Store.from_uri(spec.storage.root, spec.storage.options)
            record = store.read_json_or_none(layout.run_status(spec.name))
        except Exception as e:   # the storage may be reachable from the cluster only
            record = None
            lines.append(f"  status record not readable from here: {type(e).__name__}")
        if record:
            lines += status_lines(record, store.uri(layout.run_status(spec.name)))
    return "\n".join(lines)


def job_status(job_id: str, addr: str) -> str:
    return str(_call(client(addr).get_job_status, job_id))


def logs(job_id: str, addr: str, follow: bool = False, out=sys.stdout) -> None:
    c = client(addr)
    if not follow:
        out.write(_call(c.get_job_logs, job_id))
        out.flush()
        return
    import asyncio
    _call(c.get_job_status, job_id)   # an unknown id fails here, in one line

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
    asyncio.run(tail())


def stop(job_id: str, addr: str) -> bool:
    return bool(_call(client(addr).stop_job, job_id))


def wait(job_id: str, addr: str, timeout: float) -> str:
    """Polls until the job ends; returns its final state (for tests and scripts)."""
    c = client(addr)
    deadline = time.time() + timeout
    while True:
        state = str(_call(c.get_job_status, job_id))
        if state in TERMINAL or time.time() > deadline:
            return state
        time.sleep(1.0)
