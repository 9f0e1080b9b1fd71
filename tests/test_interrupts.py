"""Stopping a job: Ctrl-C and SIGTERM end `adl run` quickly and leave no process of its
private Ray; a killed model actor or a killed driver loses nothing: the rerun (or the
run itself) ends with the tables of an undisturbed run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import wait_for

from jobs.driver import RunStats, run_job
from jobs.spec import parse_spec
from storage import layout
from storage.store import Store
from storage.tables import DIFFERENCE, LOGIT_LENS

REPO = Path(__file__).resolve().parent.parent
TABLES = (DIFFERENCE.file, LOGIT_LENS.file)


def job(make_spec, root) -> dict:
    # 40 shards of 100 documents per model: long enough to be interrupted mid-extraction.
    return make_spec(root, corpus={"num_documents": 4000}, shard_size=100, method={"layers": [1, 2]})


def tables(root) -> dict:
    store = Store(str(root))
    record = store.read_json(layout.run_record("test"))
    return {(p["name"], name): store.read_table(f"{p['dir']}/{name}") for p in record["pairs"] for name in TABLES}


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, make_spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("undisturbed")
    run_job(parse_spec(job(make_spec, root)))
    return tables(root)


def markers(root) -> int:
    return sum(1 for _ in Path(root).glob("activations/*/*.done.json"))


def processes_of(folder: str) -> list[str]:
    """Processes whose command line or environment names the folder (Ray's workers
    rename their command line, but inherit RAY_TMPDIR)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if folder.encode() in cmdline or folder.encode() in environ:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{pid} {shown}")
    return found


def kill_processes_of(folder: str) -> None:
    for line in processes_of(folder):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def adl_run(make_spec, tmp_path):
    """`adl run` in its own process on its own private Ray (RAY_TMPDIR names a fresh
    folder); returns (process, storage root, stderr file, Ray's folder)."""
    ray_tmp = tempfile.mkdtemp(prefix="adlint-", dir="/tmp")   # short: Ray's socket paths
    procs = []

    def start():
        root = tmp_path / "out"
        spec_file = tmp_path / "job.yaml"
        spec_file.write_text(yaml.safe_dump(job(make_spec, root)))
        log = open(tmp_path / "stderr.txt", "w")
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec_file)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        procs.append(proc)
        return proc, root, tmp_path / "stderr.txt", ray_tmp

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    kill_processes_of(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_stops_quickly_leaves_no_ray_and_resumes(adl_run, undisturbed, signum, code):
    proc, root, stderr, ray_tmp = adl_run()
    wait_for(lambda: markers(root) >= 4 or proc.poll() is not None, 180, "extraction under way")
    assert proc.poll() is None, stderr.read_text()[-3000:]
    sent = time.time()
    proc.send_signal(signum)
    try:
        assert proc.wait(timeout=10) == code
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 10 s after the signal:\n{stderr.read_text()[-3000:]}")
    took = time.time() - sent
    said = [line for line in stderr.read_text().splitlines() if "interrupted:" in line]
    assert len(said) == 1 and "rerun the same spec to resume" in said[0], stderr.read_text()[-3000:]
    assert markers(root) < 2 * 40, "the job ran to its end instead"
    wait_for(lambda: not processes_of(ray_tmp), 20, f"Ray's processes to end: {processes_of(ray_tmp)}")
    print(f"exit {time.time() - sent:.1f} s after the signal ({took:.1f} s)")
    # What the signal cut short is recorded as interrupted, never as a failure of its own
    status = Store(str(root)).read_json(layout.run_status("test"))
    assert status["error"] == "interrupted"
    ended = [*status["units"], *status["pairs"].values(), *status["activation_sets"].values(),
             *(s for p in status["pairs"].values() for s in p["stages"].values())]
    assert not [e for e in ended if e["state"] == "failed" or e.get("error")], ended
    assert any(e["state"] == "interrupted" for e in status["activation_sets"].values()), status["activation_sets"]
    sets_done = sum(e["state"] == "done" for e in status["activation_sets"].values())
    assert f"pairs and {sets_done} activation sets are complete" in said[0]

    stats = RunStats()   # the rerun, on the tests' Ray: only what was missing
    run_job(parse_spec(yaml.safe_load((root.parent / "job.yaml").read_text())), stats)
    assert 0 < stats.shards_extracted < 2 * 40
    got = tables(root)
    assert got.keys() == undisturbed.keys() and all(got[k].equals(undisturbed[k]) for k in got)


def test_a_killed_driver_loses_nothing(adl_run, undisturbed):
    proc, root, stderr, ray_tmp = adl_run()
    wait_for(lambda: markers(root) >= 4 or proc.poll() is not None, 180, "extraction under way")
    os.killpg(proc.pid, signal.SIGKILL)   # the driver, without a chance to clean up
    proc.wait(timeout=10)
    kill_processes_of(ray_tmp)            # what SIGKILL leaves of its private Ray
    run_job(parse_spec(yaml.safe_load((root.parent / "job.yaml").read_text())))
    got = tables(root)
    assert got.keys() == undisturbed.keys() and all(got[k].equals(undisturbed[k]) for k in got)


def test_a_killed_model_actor_is_restarted_and_its_work_retried(ray_cluster, make_spec, undisturbed, tmp_path):
    """The finetuned model's actor is killed mid-extraction (its process, not the node):
    Ray restarts it and retries its calls; the run ends with the undisturbed tables."""
    root = tmp_path / "out"
    spec = parse_spec(job(make_spec, root))
    store = Store(str(root))
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("key", run_job(spec)), daemon=True)
    runner.start()

    def finetuned_actor_pid():
        status = store.read_json_or_none(layout.run_status("test")) or {}
        pids = [a["pid"] for a in status.get("actors", []) if a["kind"] == "transformers"
                and a["model"].endswith("finetuned") and a["pid"]]
        return pids[0] if pids and markers(root) >= 4 else None

    wait_for(lambda: finetuned_actor_pid() is not None or not runner.is_alive(), 180, "the actor at work")
    assert runner.is_alive(), "the job ended before the actor could be killed"
    os.kill(finetuned_actor_pid(), signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive() and "key" in outcome
    status = store.read_json(layout.run_status("test"))
    assert status["state"] == "done"
    got = tables(root)
    assert got.keys() == undisturbed.keys() and all(got[k].equals(undisturbed[k]) for k in got)


def test_sigterm_while_ray_starts_is_an_interrupt(adl_run):
    """ray.init has its own SIGTERM handlers while it starts (sys.exit(15), then its node's
    exit 1): a SIGTERM then still ends the job as an interrupt, exit 143 with the
    interrupted line, the status record saying interrupted, and nothing of Ray left."""
    proc, root, stderr, ray_tmp = adl_run()
    ray_processes = lambda: [p for p in processes_of(ray_tmp) if int(p.split()[0]) != proc.pid]
    wait_for(lambda: ray_processes() or proc.poll() is not None, 180, "Ray starting")
    assert proc.poll() is None, stderr.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 143, stderr.read_text()[-3000:]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 30 s after the signal:\n{stderr.read_text()[-3000:]}")
    text = stderr.read_text()
    said = [line for line in text.splitlines() if "interrupted:" in line]
    assert len(said) == 1 and "rerun the same spec to resume" in said[0], text[-3000:]
    assert "Traceback" not in text and "SystemExit" not in text, text[-3000:]
    status = Store(str(root)).read_json(layout.run_status("test"))
    assert status["state"] == "failed" and status["error"] == "interrupted", status
    wait_for(lambda: not ray_processes(), 20, f"Ray's processes to end: {ray_processes()}")


def test_every_attempt_keeps_its_record_and_log(adl_run):
    """A Ctrl-C'd `adl run`, the rerun that finishes the work and a rerun with nothing to
    do: three records and three logs under runs/<job>/attempts/; status.json, `adl
    inspect` and the report show the attempt that did the work first."""
    from jobs.attempts import attempt_log, attempt_record, history
    from jobs.report import build_report
    from jobs.summary import inspect
    proc, root, stderr, _ = adl_run()
    wait_for(lambda: markers(root) >= 4 or proc.poll() is not None, 180, "extraction under way")
    assert proc.poll() is None, stderr.read_text()[-3000:]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    store = Store(str(root))
    spec = parse_spec(yaml.safe_load((root.parent / "job.yaml").read_text()))
    interrupted_status = store.read_json(layout.run_status("test"))
    work, noop = RunStats(), RunStats()
    run_job(spec, work)
    run_job(spec, noop)
    assert work.shards_extracted > 0 and noop.model_loads == 0

    records = history(store, "test")
    assert len(records) == 3 and len({r["attempt"] for r in records}) == 3
    cut, done, nothing = records
    assert cut == interrupted_status and cut["error"] == "interrupted" and cut["finished"]
    assert done["state"] == "done" and done["did_work"] and done["work"]["shards_extracted"] == work.shards_extracted
    assert sum(u["state"] == "done" for u in done["units"]) > 0 and done["work"]["model_loads"] == work.model_loads >= 1
    assert nothing["state"] == "done" and not nothing["did_work"] and nothing["units"] == []
    assert nothing["work"]["model_loads"] == 0 and nothing["counts"]["skipped"] == 1
    assert store.read_json(layout.run_status("test")) == done   # the no-op overwrote nothing
    for r in records:
        assert store.exists(attempt_record("test", r["attempt"]))
    logs = [store.read_bytes(attempt_log("test", r["attempt"])).decode() for r in records]
    assert "interrupted:" in logs[0] and "rerun the same spec to resume" in logs[0]
    assert "pair demo: done" in logs[1] and "extracting" in logs[1] and "interrupted" not in logs[1]
    assert "demo: results complete, skipped" in logs[2] and "extracting" not in logs[2]
    assert all(log.startswith("[adl ") for log in logs)

    page = build_report(store, layout.run_record("test"))
    progress = page[page.index('class="progress"'):page.index("</details>")]
    assert f"attempt {done['attempt']}" in progress.split("run history")[0]
    assert [a for a in (r["attempt"] for r in records) if f'data-attempt="{a}"' in progress] == \
        [r["attempt"] for r in records]
    order = [progress.index(f'data-attempt="{r["attempt"]}"') for r in reversed(records)]
    assert order == sorted(order)   # newest first
    text = inspect(str(root / "runs" / "test" / "run.json"))
    assert "run history (3 attempts" in text and "nothing to do" in text
    assert text.index(nothing["attempt"]) < text.index(done["attempt"]) < text.index(cut["attempt"])
