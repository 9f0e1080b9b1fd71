"""Faults, and that each costs time, never results: files that are corrupted, truncated,
deleted, garbage or swapped are found and done again on the rerun; S3 behind a proxy
that fails, drops and stalls requests; two runs on one storage root; a grader endpoint
that refuses connections; an endpoint that echoes the API key. Every job ends with the
tables of an undisturbed run (the `reference` fixture), compared exactly."""
from __future__ import annotations

import http.client
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml
from helpers import LoopbackServer, wait_for

from jobs.cli import main
from jobs.driver import RunStats, run_job
from jobs.leases import Leases
from jobs.plan import make_plan
from jobs.spec import parse_spec
from storage import layout
from storage.store import IntegrityError, Store, StorageOptions
from storage.tables import DIFFERENCE, LOGIT_LENS, PATCHSCOPE, TOKEN_RELEVANCE


# -- what a run produced -------------------------------------------------------------------
def results(store: Store) -> dict:
    """Every table of a root by key: the pairs' tables, every activation shard, the catalog
    (less its earlier_stages: which stages a repairing rerun found done is provenance, not a
    result)."""
    keys = [k for k in store.list() if k.endswith(".parquet")]
    tables = {k: store.read_table(k) for k in keys}
    for k, t in tables.items():
        if "earlier_stages" in t.column_names:
            tables[k] = t.drop_columns(["earlier_stages"])
    return tables


def assert_same_results(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].equals(expected[key], check_metadata=True), key


@pytest.fixture(scope="module")
def reference(ray_cluster, make_spec, tmp_path_factory):
    """An undisturbed run: (its root, its tables, its RunStats)."""
    root = tmp_path_factory.mktemp("reference")
    stats = RunStats()
    run_job(parse_spec(make_spec(root)), stats)
    return root, results(Store(str(root))), stats


def record(root: Path) -> dict:
    return json.loads((root / layout.run_record("test")).read_text())


def shard_path(root: Path, role: str, index: int) -> Path:
    return root / layout.shard(record(root)["pairs"][0][f"{role}_activations"], index)


def pair_path(root: Path, name: str = "") -> Path:
    folder = root / record(root)["pairs"][0]["dir"]
    return folder / name if name else folder


def flip(path: Path, count: int = 64) -> None:
    """Inverts `count` bytes in the middle of the file (its size unchanged)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_set_manifest(root: Path, change) -> None:
    path = shard_path(root, "base", 0).parent / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def flip_digit(manifest: dict) -> None:
    digest = manifest["files"][layout.shard_name(1)]
    digest["crc32"] = ("1" if digest["crc32"][0] != "1" else "2") + digest["crc32"][1:]


# -- damage, and the rerun that repairs it ---------------------------------------------------
DAMAGE = {
    # name: (damage, pair results removed too (so that the activations are read again),
    #        what the log must say, shards extracted again, models loaded)
    "flipped shard": (lambda r: flip(shard_path(r, "base", 1)), True,
                      r"shard 1 crc32 [0-9a-f]{8}, [0-9a-f]{8} recorded \(corrupted or replaced\); "
                      r"extracting it again", 1, 2),
    "truncated shard": (lambda r: truncate(shard_path(r, "finetuned", 2)), True,
                        r"shard 2 \d+ bytes, \d+ recorded \(truncated or replaced\); extracting it again", 1, 1),
    "deleted shard": (lambda r: shard_path(r, "base", 0).unlink(), True,
                      r"shard 0 missing; extracting it again", 1, 2),
    # The same shard index of the other set: same documents, same rows, so nothing but
    # the digest tells them apart (the reducer's row checks pass, delta would be 0 there).
    "swapped shard": (lambda r: shutil.copyfile(shard_path(r, "finetuned", 1), shard_path(r, "base", 1)), True,
                      r"shard 1 .* recorded \((corrupted|truncated) or replaced\); extracting it again", 1, 2),
    "garbage set manifest": (lambda r: (shard_path(r, "base", 0).parent / "manifest.json").write_bytes(b"{\x00oops"),
                             True, r"manifest .*manifest.json: not (valid JSON|a JSON file).*\n.*every shard "
                                   r"verifies; manifest written again, no extraction", 0, 1),
    # One digit of a shard's digest, or a field no reader compares: the manifest's own digest
    # finds it, and the shards stand on their markers (intact: nothing is extracted again).
    "flipped digit in a set manifest": (lambda r: edit_set_manifest(r, flip_digit), True,
                                        r"manifest .*manifest.json: does not match its own digest \(edited or "
                                        r"corrupted\)\n.*every shard verifies; manifest written again, no "
                                        r"extraction", 0, 1),
    "edited set manifest field": (lambda r: edit_set_manifest(r, lambda m: m.update(documents_read=1)), True,
                                  r"manifest .*manifest.json: does not match its own digest", 0, 1),
    "garbage pair manifest": (lambda r: pair_path(r, "manifest.json").write_text("{not json"), False,
                              r"demo: its manifest: not valid JSON .*; redoing what changed or does not verify", 0, 0),
    "flipped pair table": (lambda r: flip(pair_path(r, DIFFERENCE.file)), False,
                           r"demo: stage reduce: its marker reduce.done.json: difference.parquet: crc32 "
                           r"[0-9a-f]{8}, [0-9a-f]{8} recorded \(corrupted or replaced\); running it again", 0, 0),
    "deleted pair table": (lambda r: pair_path(r, LOGIT_LENS.file).unlink(), False,
                           r"demo: stage logit_lens: its marker logit_lens.done.json: logit_lens.parquet: missing; "
                           r"running it again", 0, 1),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_found_and_repaired_on_the_rerun(reference, make_spec, tmp_path, capfd, damage):
    ref_root, expected, _ = reference
    root = tmp_path / "root"
    shutil.copytree(ref_root, root)
    harm, redo_pair, said, shards, loads = DAMAGE[damage]
    harm(root)
    if redo_pair:
        shutil.rmtree(root / "pairs")
    capfd.readouterr()
    stats = RunStats()
    run_job(parse_spec(make_spec(root)), stats)
    log = capfd.readouterr().err
    assert re.search(said, log), log
    assert stats.shards_extracted == shards and stats.model_loads == loads, log
    assert not stats.failed
    assert_same_results(results(Store(str(root))), expected)
    # ... and it stays repaired: the next run has nothing to do.
    again = RunStats()
    run_job(parse_spec(make_spec(root)), again)
    assert again.model_loads == again.shards_extracted == again.stages_run == 0
    assert "results complete, skipped" in capfd.readouterr().err


def test_the_reducer_and_the_stages_check_what_they_read(reference, make_spec, tmp_path):
    """Damage that appears after the rerun's checks still never reaches a result: the
    reducer checks each shard against its set's manifest, a stage each table against the
    marker of the stage that wrote it."""
    from jobs.stages import StageRun
    from workers.reduce import shard_sums
    ref_root, _, _ = reference
    root = tmp_path / "root"
    shutil.copytree(ref_root, root)
    store = Store(str(root))
    [plan] = make_plan(parse_spec(make_spec(root))).pairs
    listed = [store.read_json(layout.manifest(a.prefix))["files"] for a in (plan.base, plan.finetuned)]
    digests = lambda i: tuple(files[layout.shard_name(i)] for files in listed)
    args = (store, plan.base.prefix, plan.finetuned.prefix)
    sums = lambda i: shard_sums(*args, i, list(plan.layers), 10, 5, digests(i))
    assert sums(1).count.min() == 100
    shutil.copyfile(shard_path(root, "finetuned", 1), shard_path(root, "base", 1))
    with pytest.raises(IntegrityError, match=r"shard-00001.parquet: .* recorded \((corrupted|truncated) or replaced\)"):
        sums(1)
    assert sums(0).count.min() == 100   # the others still read

    ctx = StageRun(plan, parse_spec(make_spec(root)), store, {})
    assert ctx.read_table(DIFFERENCE).equals(store.read_table(f"{plan.out_dir}/{DIFFERENCE.file}"))
    flip(pair_path(root, DIFFERENCE.file), count=8)
    with pytest.raises(IntegrityError, match=r"difference.parquet: crc32"):
        ctx.read_table(DIFFERENCE)


# -- S3 behind a proxy that fails ------------------------------------------------------------
ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}
FAULTS = ("500", "503", "slowdown", "drop", "stall")


class FaultProxy(LoopbackServer):
    """A threaded HTTP proxy on loopback in front of the S3 server: every `every`-th request
    gets the next fault of FAULTS: an S3 error reply (500, 503, SlowDown) without reaching
    the server, a connection dropped mid-body after the server answered (half the body,
    or no reply at all), or a stall of `stall_s` before it is passed on."""

    def __init__(self, upstream: str, every: int = 4, stall_s: float = 1.0):
        self.upstream = upstream.split("://", 1)[1]
        self.every, self.stall_s = every, stall_s
        self.lock = threading.Lock()
        self.requests = 0
        self.faults: list[tuple[str, str, str]] = []   # (fault, method, path)
        self.down = False               # an outage: every request answered 503
        self.down_after_puts = None     # the outage starts once this many PUTs have passed
        self.puts = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # answers Expect: 100-continue

            def log_message(self, *args):
                pass

            def body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    raw = b""   # passed on as sent (aws-chunked, with its trailer)
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip(), 16)
                        if size == 0:
                            while True:
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def reply(self, status: int, headers, payload: bytes, length: str | None = None) -> None:
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", length if length is not None else str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def handle_any(self):
                body = self.body()
                with proxy.lock:
                    down = proxy.down
                    if self.command == "PUT" and not down:
                        proxy.puts += 1
                        proxy.down = proxy.down_after_puts is not None and proxy.puts >= proxy.down_after_puts
                if down:
                    payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                               b'<Message>Service is unable to handle request.</Message></Error>')
                    return self.reply(503, [("Content-Type", "application/xml")], payload)
                with proxy.lock:
                    proxy.requests += 1
                    fault = None
                    if proxy.requests % proxy.every == 0:
                        fault = FAULTS[len(proxy.faults) % len(FAULTS)]
                        proxy.faults.append((fault, self.command, self.path))
                if fault in ERRORS:
                    status, code, message = ERRORS[fault]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f'<Message>{message}</Message></Error>').encode()
                    return self.reply(status, [("Content-Type", "application/xml")], payload)
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                conn.close()
                if fault == "drop":   # the server did it; the client hears half of it, or nothing
                    if payload and self.command != "HEAD":
                        self.send_response(response.status)
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload[: len(payload) // 2])
                        self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                self.reply(response.status, response.getheaders(), payload,
                           response.getheader("Content-Length", "0") if self.command == "HEAD" else None)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        super().__init__(Handler)

    def errors(self) -> int:
        """Faults that failed a request (a stall only delays it)."""
        return sum(1 for fault, _, _ in self.faults if fault != "stall")


def test_every_storage_operation_survives_the_proxy(s3_endpoint, s3_bucket, caplog):
    """Store's S3 operations through the proxy (every second request failing): each
    succeeds, and each retry is counted and logged (a failed request the SDK works
    around by itself, such as a HEAD before a DELETE, needs none)."""
    with caplog.at_level(logging.INFO, logger="adl.storage"), \
            FaultProxy(s3_endpoint, every=2, stall_s=0.2) as proxy:
        store = Store.from_uri(f"s3://{s3_bucket}/ops", StorageOptions(proxy.url, "us-east-1"))
        store.check()
        payload = bytes(range(256)) * 400
        digests = [store.write_bytes(f"k{i}", payload) for i in range(4)]
        assert all(store.read_bytes(f"k{i}") == payload for i in range(4))
        assert all(store.verify(f"k{i}", d) is None for i, d in enumerate(digests))
        assert store.list() == [f"k{i}" for i in range(4)] and store.exists("k0")
        # (a PUT whose reply was lost is retried and answered 412: False, and the object is ours)
        assert store.create_exclusive("lease", b"mine") or store.read_bytes("lease") == b"mine"
        assert not store.create_exclusive("lease", b"theirs")
        store.delete("k0")
        assert not store.exists("k0") and store.read_bytes("lease") == b"mine"
    assert {fault for fault, _, _ in proxy.faults} == set(FAULTS)
    assert 0 < store.retries <= proxy.errors()
    lines = [r.getMessage() for r in caplog.records if r.name == "adl.storage"]
    assert all(line.startswith("storage: ") for line in lines) and any("retrying in" in line for line in lines)
    assert lines[-1].endswith(f"[{store.retries} storage retries so far]")


def test_a_job_through_a_failing_s3_proxy_has_the_tables_of_a_direct_run(reference, make_spec, s3_endpoint,
                                                                          s3_bucket, capfd):
    _, expected, _ = reference
    with FaultProxy(s3_endpoint, every=4) as proxy:
        spec = parse_spec(make_spec(f"s3://{s3_bucket}/via-proxy",
                                    storage={"endpoint_url": proxy.url, "region": "us-east-1"}))
        stats = RunStats()
        run_job(spec, stats)
    log = capfd.readouterr().err
    assert not stats.failed, log
    assert {fault for fault, _, _ in proxy.faults} == set(FAULTS), proxy.faults
    retries = re.search(r"storage: (\d+) retries in this run", log)
    assert retries and 0 < int(retries.group(1)) <= proxy.errors(), (proxy.faults, log)
    assert re.search(r"storage: \w+ s3://.*: attempt 1 of 6 failed \(AWS Error", log)
    direct = Store.from_uri(f"s3://{s3_bucket}/via-proxy", StorageOptions(s3_endpoint, "us-east-1"))
    assert_same_results(results(direct), expected)
    assert not [k for k in direct.list("leases")]


# -- two runs on one root ------------------------------------------------------------------
def test_two_runs_on_one_root_do_each_unit_once(reference, make_spec, tmp_path, capfd):
    """The second run starts while the first holds the pair: it waits, then finds the
    pair complete. Together they extract each shard once and run each stage once."""
    _, expected, ref_stats = reference
    root = tmp_path / "root"
    spec = parse_spec(make_spec(root))
    stats, errors = [RunStats(), RunStats()], []

    def run(i):
        try:
            run_job(spec, stats[i])
        except BaseException as e:   # pragma: no cover - reported below
            errors.append(e)

    first = threading.Thread(target=run, args=(0,))
    first.start()
    wait_for(lambda: list((root / "leases" / "pairs").glob("*/*.json")) if (root / "leases").exists() else False,
             120, "the first run to take the pair's lease")
    second = threading.Thread(target=run, args=(1,))
    second.start()
    first.join(600)
    second.join(600)
    log = capfd.readouterr().err
    assert not errors, errors
    assert sum(s.shards_extracted for s in stats) == ref_stats.shards_extracted == 6
    assert sum(s.stages_run for s in stats) == ref_stats.stages_run == 2
    assert sum(s.pairs_reduced for s in stats) == 1
    assert sum(s.model_loads for s in stats) == ref_stats.model_loads and stats[1].model_loads == 0
    assert re.search(r"pairs/demo-\w+: being worked on by another run \(job 'test', host .*, pid \d+", log), log
    assert "demo: results completed by another run" in log
    assert_same_results(results(Store(str(root))), expected)
    assert not list((root / "leases").rglob("*.json"))


# -- leases ------------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def lease_store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    return Store.from_uri(f"s3://{bucket}/root", StorageOptions(endpoint, "us-east-1"))


def plant(store: Store, prefix: str, generation: int, **lease) -> None:
    lease = {"owner": "someone", "job": "other", "host": "elsewhere", "pid": 1, "renewed": time.time(),
             "expires": time.time() + 60, **lease}
    store.write_json(f"{layout.lease(prefix)}/{generation:08d}.json", lease)


def test_of_runs_claiming_at_once_exactly_one_wins(lease_store):
    runs = [Leases(lease_store, "job") for _ in range(6)]
    barrier = threading.Barrier(len(runs))
    won = []

    def claim(leases):
        barrier.wait()
        won.append(leases.claim("pairs/p"))
    threads = [threading.Thread(target=claim, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 5 + [True]
    [holder] = [r for r in runs if r.held]
    assert not any(r.claim("pairs/p") for r in runs if r is not holder)
    assert holder.claim("pairs/p")   # its own: still held
    holder.release("pairs/p")
    assert lease_store.list(layout.lease("pairs/p")) == []
    assert next(r for r in runs if r is not holder).claim("pairs/p")


def test_a_lease_whose_holder_died_is_taken_over(lease_store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = Leases(lease_store, "job")
    plant(lease_store, "pairs/expired", 0, expires=time.time() - 1)              # not renewed in time
    plant(lease_store, "pairs/dead", 3, host=socket.gethostname(), pid=dead.pid)  # its process is gone
    plant(lease_store, "pairs/live", 0)                                          # another host, renewed
    plant(lease_store, "pairs/garbage", 0)
    lease_store.write_bytes(f"{layout.lease('pairs/garbage')}/00000000.json", b"\x00\x01")
    assert me.claim("pairs/expired") and me.claim("pairs/dead") and me.claim("pairs/garbage")
    assert not me.claim("pairs/live") and me.holder("pairs/live")["host"] == "elsewhere"
    assert [k.rpartition("/")[2] for k in lease_store.list(layout.lease("pairs/dead"))] == ["00000004.json"]
    mine = lease_store.read_json(f"{layout.lease('pairs/dead')}/00000004.json")
    assert mine["owner"] == me.owner and mine["expires"] > time.time() + 60


def test_a_waiting_run_goes_on_when_the_holder_is_done_and_a_lease_is_kept_alive(lease_store, caplog):
    from jobs import leases as leases_module
    caplog.set_level(logging.INFO, logger="adl.leases")
    lines = lambda: [r.getMessage() for r in caplog.records if r.name == "adl.leases"]
    me = Leases(lease_store, "job")
    plant(lease_store, "pairs/busy", 0, expires=time.time() + 1.5)
    start = time.time()
    me.wait(["pairs/busy"])
    assert 1.0 < time.time() - start < 10
    assert any("pairs/busy: being worked on by another run (job 'other', host 'elsewhere'" in line for line in lines())
    assert me.claim("pairs/busy")
    key = f"{layout.lease('pairs/busy')}/00000001.json"
    first = lease_store.read_json(key)["expires"]
    time.sleep(0.05)
    me.renew()
    assert lease_store.read_json(key)["expires"] > first
    plant(lease_store, "pairs/busy", 2)   # someone took it over (this run's heartbeat was late)
    me.renew()
    assert any("lost its lease" in line for line in lines())
    assert leases_module.TTL_S > 4 * leases_module.RENEW_S


# -- a stage whose work failed -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def grader_root(reference, tmp_path_factory):
    """A root whose activations are extracted already (a copy of the reference's)."""
    root = tmp_path_factory.mktemp("graded") / "root"
    shutil.copytree(reference[0], root)
    return root


def grader_job(make_spec, demo_pair, root, url, **grader) -> dict:
    spec = make_spec(root, method={"positions": [0]}, analyses={"patchscope_scales": [1.0, 5.0, 20.0]},
                     grader={"kind": "openai", "base_url": url, "model": "m", "max_retries": 1,
                             "backoff_base_s": 0.01, "timeout_s": 10, **grader})
    spec["pairs"][0].update(description=demo_pair.description, finetune_data=str(demo_pair.finetune_texts))
    return spec


def chat(relevance_status: int = 200):
    """A grader's answers: the first offered scale (no coherent tokens); every candidate
    IRRELEVANT, or an error status for relevance requests."""
    from test_graders import Reply, answer, candidates_of, offered_scales
    from workers.graders.prompts import BEST_SCALE_PROMPT

    def respond(body):
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system == BEST_SCALE_PROMPT:
            return answer(f"BEST_SCALE: {offered_scales(user)[0]}\nTOKENS: ")
        if relevance_status != 200:
            return Reply(status=relevance_status, body=b'{"error": "overloaded"}')
        return answer("\n".join(f"ANSWER[{i}]: IRRELEVANT" for i in range(1, len(candidates_of(user)) + 1)))
    return respond


def run_cli(tmp_path: Path, spec: dict, capfd) -> tuple[int, str]:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    capfd.readouterr()
    code = main(["run", str(spec_file)])
    out = capfd.readouterr()
    return code, out.out + out.err


def test_an_unreachable_grader_fails_the_pair_and_the_rerun_redoes_the_stage(
        grader_root, make_spec, demo_pair, tmp_path, capfd):
    from test_graders import ChatServer
    port = free_port()   # nothing listens there: connections are refused
    spec = grader_job(make_spec, demo_pair, grader_root, f"http://127.0.0.1:{port}/v1")
    [plan] = make_plan(parse_spec(spec)).pairs
    store = Store(str(grader_root))
    exists = lambda name: store.exists(f"{plan.out_dir}/{name}")
    status = lambda: store.read_json(layout.run_status("test"))["pairs"]["demo"]

    code, out = run_cli(tmp_path, spec, capfd)
    assert code == 1, out
    entry = status()
    assert entry["state"] == "failed" and entry["stages"]["patchscope"]["state"] == "failed"
    assert re.match(r"patchscope: the grader chose no best scale for any of the 9 \(layer, position, variant\): "
                    r"best_scale: ConnectionRefusedError: .*Connection refused.* \(after 2 attempts\)",
                    entry["error"]), entry
    assert f"adl: pair demo failed: {entry['error']}" in out
    assert not exists("manifest.json") and not exists(PATCHSCOPE.file) and not exists("patchscope.done.json")
    assert not exists(layout.TOKEN_RELEVANCE_JSON)
    assert exists("reduce.done.json") and exists("logit_lens.done.json")

    with ChatServer(port) as server:   # the endpoint is back, but relevance requests fail
        server.respond(chat(relevance_status=500))
        code, out = run_cli(tmp_path, spec, capfd)
        assert code == 1, out
        assert "reducing" not in out and "logit lens on" not in out   # complete stages are not redone
        entry = status()
        assert entry["stages"]["patchscope"]["state"] == "done"
        assert re.match(r"token_relevance: the grader labelled none of the \d+ tokens: token_relevance: "
                        r"rotation 0: HTTP 500: .*overloaded", entry["error"]), entry
        assert exists("patchscope.done.json") and not exists(layout.TOKEN_RELEVANCE_JSON)
        assert not exists(TOKEN_RELEVANCE.file) and not exists("manifest.json")

        server.respond(chat())
        code, out = run_cli(tmp_path, spec, capfd)
        assert code == 0, out
        assert "patchscope, " not in out   # only the failed stage ran again
    assert status()["state"] == "done" and exists("manifest.json")
    relevance = store.read_json(f"{plan.out_dir}/{layout.TOKEN_RELEVANCE_JSON}")
    assert relevance["status"] == "done" and all(m["failed"] == 0 for m in relevance["metrics"])
    scope = store.read_table(f"{plan.out_dir}/{PATCHSCOPE.file}").to_pandas()
    chosen = scope[scope.chosen]
    assert len(chosen) == 9 * 20 and set(chosen.scale) == {1.0}


@pytest.mark.parametrize("form", ["plain", "url-encoded"])
def test_a_key_echoed_by_the_endpoint_is_never_shown(grader_root, make_spec, demo_pair, tmp_path, capfd,
                                                     monkeypatch, form):
    from urllib.parse import quote
    from test_graders import ChatServer, Reply
    key = f"sk-planted-{uuid.uuid4().hex}" if form == "plain" else f"planted/{uuid.uuid4().hex}+k="
    echoed = key if form == "plain" else quote(key, safe="")
    monkeypatch.setenv("ADL_TEST_GRADER_KEY", key)
    body = json.dumps({"error": {"message": f"Incorrect API key provided: Bearer {key}. You sent {echoed}.",
                                 "code": "invalid_api_key"}}).encode()
    with ChatServer() as server:
        state = server.respond(lambda request: Reply(status=401, body=body))
        spec = grader_job(make_spec, demo_pair, grader_root, server.url, api_key_env="ADL_TEST_GRADER_KEY")
        code, out = run_cli(tmp_path, spec, capfd)
    assert code == 1, out
    assert state.seen and state.seen[0].headers["Authorization"] == f"Bearer {key}"   # it was sent
    entry = Store(str(grader_root)).read_json(layout.run_status("test"))["pairs"]["demo"]
    assert "HTTP 401: " in entry["error"] and "Bearer ***" in entry["error"], entry
    secrets = [key.removeprefix("sk-"), echoed.removeprefix("sk-")]
    assert "HTTP 401" in out and not [s for s in secrets if s in out]
    for path in grader_root.rglob("*"):
        if path.is_file():
            assert not [s for s in secrets if s.encode() in path.read_bytes()], path


def test_redact_masks_credentials():
    from common.redact import redact, register
    from common.errors import one_line as describe
    register("hunter2-secret-value")
    text = ("401: Bearer abc.DEF-123 sk-proj-AbCdEf123456 token hunter2-secret-value at "
            "https://user:pa55@host/v1 and sk-short")
    assert redact(text) == "401: Bearer *** sk-*** token *** at https://***@host/v1 and sk-short"
    assert describe(RuntimeError("HTTP 401: key hunter2-secret-value rejected")) == \
        "RuntimeError: HTTP 401: key *** rejected"


# -- bad input -----------------------------------------------------------------------------
def test_an_unset_api_key_env_is_an_input_error(tmp_path, make_spec, demo_pair, capsys, monkeypatch):
    from test_bad_inputs import run_fails
    monkeypatch.delenv("ADL_NO_SUCH_KEY", raising=False)
    spec = grader_job(make_spec, demo_pair, tmp_path / "out", "http://127.0.0.1:9/v1", api_key_env="ADL_NO_SUCH_KEY")
    assert run_fails(tmp_path, spec, capsys) == ("grader.api_key_env: the environment variable ADL_NO_SUCH_KEY "
                                                 "is not set (it must hold the grader's API key)")
    assert not (tmp_path / "out").exists()
    unused = {k: v for k, v in spec.items() if k != "analyses"}   # no stage would use the grader
    assert make_plan(parse_spec(unused)).pairs
    monkeypatch.setenv("ADL_NO_SUCH_KEY", "some-key")
    assert make_plan(parse_spec(spec)).pairs


# -- forged leases and secrets ------------------------------------------------------------------
def test_a_lease_expiring_beyond_a_renewal_and_a_ttl_is_no_lease(lease_store):
    """No holder renews further ahead than RENEW_S + TTL_S: an expiry beyond that (a lease
    forged with expires 1e18, or written by a clock far ahead) would block the pair for
    as long as it claims, so it is not live; a lease renewed just now still is."""
    from jobs import leases as leases_module
    me = Leases(lease_store, "job")
    plant(lease_store, "pairs/forged", 0, expires=1e18)
    plant(lease_store, "pairs/skewed", 0, expires=time.time() + leases_module.TTL_S + leases_module.RENEW_S + 60)
    plant(lease_store, "pairs/nan", 0, expires=float("nan"))
    plant(lease_store, "pairs/bool", 0, expires=True)
    plant(lease_store, "pairs/fresh", 0, expires=time.time() + leases_module.TTL_S)
    assert me.claim("pairs/forged") and me.claim("pairs/skewed") and me.claim("pairs/nan") and me.claim("pairs/bool")
    assert not me.claim("pairs/fresh")
    me.wait(["pairs/forged"], sleep=lambda s: None)   # returns at once: nobody holds it


def test_credentials_in_an_endpoint_url_stay_out_of_the_run_record(tmp_path, make_spec, demo_pair, monkeypatch):
    from common.redact import redact, register
    from jobs.driver import write_run_record
    monkeypatch.setenv("ADL_TEST_KEY", "some-key")
    url = "https://admin:sk-planted123456@host.example/v1?api-key=planted-query-key&x=1"
    spec = grader_job(make_spec, demo_pair, tmp_path / "out", url, api_key_env="ADL_TEST_KEY")
    store = Store(str(tmp_path / "out"))
    key = write_run_record(make_plan(parse_spec(spec)), store)
    written = store.read_bytes(key).decode()
    assert "planted" not in written
    assert json.loads(written)["spec"]["grader"]["base_url"] == "https://***@host.example/v1?api-key=***&x=1"
    secret = "k3y/with+special=chars&more"
    register(secret)
    from urllib.parse import quote, quote_plus
    for echoed in (secret, quote(secret, safe=""), quote_plus(secret)):
        assert redact(f"401: you sent ?token={echoed} and {echoed}.") == "401: you sent ?token=*** and ***."


# -- storage failing during a run ------------------------------------------------------------
def test_a_storage_failure_during_a_run_is_one_line_exit_1_and_recorded(tmp_path, make_spec, capfd):
    """The root takes the status record, then refuses the run record (a folder stands in
    its place): one line naming the root and the cause, exit 1, and the failure recorded
    in the status record."""
    root = tmp_path / "out"
    (root / "runs" / "test" / "run.json").mkdir(parents=True)
    code, out = run_cli(tmp_path, make_spec(root), capfd)
    assert code == 1, out
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1] == (f"adl: error: storage {root}: {root}/runs/test/run.json: is a folder, "
                                            f"not a file; refusing to replace it")
    status = json.loads((root / layout.run_status("test")).read_text())
    assert status["state"] == "failed"
    assert status["error"] == f"{root}/runs/test/run.json: is a folder, not a file; refusing to replace it"


def test_an_s3_outage_longer_than_the_retries_ends_the_run_in_one_line(make_spec, s3_endpoint, s3_bucket,
                                                                       tmp_path, capfd):
    """Every request fails once the first objects are written (the attempt's record, the
    status record and the attempt's log): after
    the retries, one line naming the root, exit 1, no traceback; what could not be recorded
    is said in the log."""
    with FaultProxy(s3_endpoint, every=10 ** 9) as proxy:
        proxy.down_after_puts = 3   # the attempt's record, the status record and the attempt's log
        root = f"s3://{s3_bucket}/outage"
        code, out = run_cli(tmp_path, make_spec(root, storage={"endpoint_url": proxy.url, "region": "us-east-1"}),
                            capfd)
    assert code == 1, out
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    # the cause as pyarrow words it: "503" from a read, SERVICE_UNAVAILABLE from a write
    assert last.startswith(f"adl: error: storage {root}: ") and re.search("503|SERVICE_UNAVAILABLE", last), out
    assert re.search(rf"could not record it on {root}: ", out), out
    direct = Store.from_uri(root, StorageOptions(s3_endpoint, "us-east-1"))
    assert direct.read_json(layout.run_status("test"))["state"] == "running"   # written before the outage
    attempt = [k for k in direct.list() if k != layout.run_status("test")]
    assert len(attempt) == 2 and all(k.startswith(f"{layout.run_dir('test')}/attempts/") for k in attempt)


def test_actors_larger_than_any_node_are_one_line(ray_cluster, make_spec, tmp_path, capfd):
    """compute.cpus_per_worker beyond every node: known only once Ray is up (its nodes),
    then one line and exit 2, not a SchedulingError traceback; the failure is recorded."""
    root = tmp_path / "out"
    code, out = run_cli(tmp_path, make_spec(root, compute={"cpus_per_worker": 64}), capfd)
    assert code == 2, out
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("adl: error: compute: extract ") and "more than the cluster holds" in last, out
    status = json.loads((root / layout.run_status("test")).read_text())
    assert status["state"] == "failed" and status["error"].startswith("compute: extract ")
