"""A job submitted with `adl submit` to a real two-node Ray cluster on loopback: two
`ray start` process trees (head + worker), each declaring 2 logical GPUs, the Jobs API on
the head's dashboard. Three pairs share the demo base; a node is killed mid-job; a
finished job is resubmitted.

The clusters are this module's own processes: they are stopped by killing their process
groups and anything else that names their private temp dir (never `ray stop`, which
would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import wait_for

from jobs.attempts import attempts_dir, history
from storage import layout
from storage.store import Store
from storage.tables import DIFFERENCE, LOGIT_LENS

REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT = 300
DOCS, SHARDS = 400, 20      # per activation set; a shard of 20 documents takes ~0.2 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


class TwoNodeCluster:
    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="adlcluster-", dir="/tmp")
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        venv_bin = str(Path(sys.executable).parent)
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{venv_bin}:{os.environ['PATH']}",
                    # A killed node is declared dead after ~3 s instead of ~30 s.
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
        self.ray = str(Path(venv_bin) / "ray")
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        log = open(Path(self.temp) / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            [self.ray, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=2",
             f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats", *args],
            env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def start(self) -> "TwoNodeCluster":
        self._start("head", ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             f"--temp-dir={self.temp}"])
        wait_for(lambda: self._jobs_api_up(), 120, "the head's Jobs API", poll=0.5)
        # A folder of its own, as a real node has its own disk: two nodes sharing one
        # unpack and collect the job's working_dir package in the same place, and a job
        # then found a packaged file missing.
        self._start("worker", [f"--address=127.0.0.1:{self.gcs_port}", f"--temp-dir={self.temp}/worker-node"])
        wait_for(lambda: len(self.alive_nodes()) == 2, 120, "two alive nodes", poll=0.5)
        return self

    def _jobs_api_up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
            return True
        except OSError:
            return False

    def alive_nodes(self) -> dict[str, bool]:
        """node id -> is head, for alive nodes (the dashboard's state API)."""
        try:
            with urllib.request.urlopen(f"{self.address}/api/v0/nodes?limit=100", timeout=5) as r:
                nodes = json.load(r)["data"]["result"]["result"]
        except (OSError, KeyError, ValueError):
            return {}
        return {n["node_id"]: n["is_head_node"] for n in nodes if n["state"] == "ALIVE"}

    def kill(self, name: str) -> None:
        """SIGKILL to the node's whole process tree: `ray start`, the raylet and every
        worker it started (workers leave the process group; an orphaned actor would keep
        answering the driver for a while)."""
        proc = self.procs.pop(name)
        tree = _descendants(proc.pid) | {proc.pid}
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        # Workers that left the process groups still name the private temp dir.
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if self.temp.encode() in cmdline:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = TwoNodeCluster()
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def variants(demo_pair, tmp_path_factory):
    """Two more finetunes of the demo base, made cheaply: the demo finetune with perturbed
    weights, and a LoRA adapter on the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    folder = tmp_path_factory.mktemp("variants")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(demo_pair.finetuned_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder / "perturbed")
    for f in Path(demo_pair.finetuned_dir).iterdir():   # the tokenizer files
        if not (folder / "perturbed" / f.name).exists():
            shutil.copy(f, folder / "perturbed" / f.name)
    base = AutoModelForCausalLM.from_pretrained(demo_pair.base_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder / "lora")
    return {"perturbed": folder / "perturbed", "lora": folder / "lora"}


def three_pair_spec(make_spec, demo_pair, variants, root) -> dict:
    spec = make_spec(root, name="three", shard_size=DOCS // SHARDS, corpus={"num_documents": DOCS},
                     compute={"cpus_per_worker": 0.25, "gpus_per_worker": 1})
    base = str(demo_pair.base_dir)
    spec["pairs"] = [{"name": "demo", "base": base, "finetuned": str(demo_pair.finetuned_dir)},
                     {"name": "perturbed", "base": base, "finetuned": str(variants["perturbed"])},
                     {"name": "lora", "base": base, "finetuned": {"adapter": str(variants["lora"])}}]
    return spec


def adl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def submit(cluster, spec: dict, tmp_path: Path, name: str) -> str:
    spec_file = tmp_path / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = adl("submit", str(spec_file), "--address", cluster.address)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().splitlines()[-1]
    assert job_id.startswith("adl-"), out.stdout
    return job_id


def finish(cluster, job_id: str) -> str:
    from jobs.submit import wait
    state = wait(job_id, cluster.address, JOB_TIMEOUT)
    if state != "SUCCEEDED":
        logs = adl("logs", job_id, "--address", cluster.address).stdout
        raise AssertionError(f"{job_id} ended {state}:\n{logs[-4000:]}")
    return state


def result_tables(store: Store, job: str) -> dict:
    record = store.read_json(layout.run_record(job))
    return {(p["name"], name): store.read_table(f"{p['dir']}/{name}")
            for p in record["pairs"] for name in (DIFFERENCE.file, LOGIT_LENS.file)}


@pytest.fixture(scope="module")
def finished_job(cluster, make_spec, demo_pair, variants, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submitted")
    spec = three_pair_spec(make_spec, demo_pair, variants, tmp / "out")
    job_id = submit(cluster, spec, tmp, "three")
    finish(cluster, job_id)
    return {"spec": spec, "job_id": job_id, "store": Store(str(tmp / "out")), "tmp": tmp}


def test_submitted_three_pair_job_on_two_nodes(cluster, finished_job):
    store, job_id = finished_job["store"], finished_job["job_id"]
    status = store.read_json(layout.run_status("three"))
    assert status["state"] == "done"
    assert status["counts"] == {"pairs": 3, "pending": 0, "running": 0, "done": 3, "failed": 0, "interrupted": 0, "skipped": 0,
                                "activation_sets": 4, "activation_sets_done": 4}
    for pair in status["pairs"].values():
        assert pair["error"] is None and all(s["state"] == "done" for s in pair["stages"].values())
    shards = SHARDS
    assert all(a["shards_done"] == a["shards"] == shards for a in status["activation_sets"].values())

    # The base shared by three pairs: one activation set, one extraction actor, each shard once.
    bases = {p["base_activations"] for p in status["pairs"].values()}
    assert len(bases) == 1
    extraction = [a for a in status["actors"] if a["kind"] == "transformers"]
    # One actor per model: it extracts and reads the lens of every pair it is the finetune
    # of; the adapter rides on its base's actor (four activation sets, three actors).
    assert len(extraction) == 3 and len({a["model"] for a in extraction}) == 3
    assert status["work"] == {"model_loads": 3, "shards_extracted": 4 * shards, "pairs_run": 3}

    # Every model actor held one GPU, and no two actors alive at once shared one.
    actors = status["actors"]
    assert len(actors) == 3 and all(len(a["gpu_ids"]) == 1 and a["num_gpus"] == 1 for a in actors)
    for i, a in enumerate(actors):
        for b in actors[i + 1:]:
            overlap = a["started"] < b["ended"] and b["started"] < a["ended"]
            if overlap and a["node_id"] == b["node_id"]:
                assert a["gpu_ids"] != b["gpu_ids"], (a, b)
    assert {a["node_id"] for a in actors} == set(cluster.alive_nodes())   # both nodes worked
    gpu_hours = sum(a["ended"] - a["started"] for a in actors) / 3600
    assert status["gpu_hours"] == pytest.approx(gpu_hours, rel=1e-3)

    # The catalog agrees with each pair's tables.
    catalog = store.read_table(layout.run_catalog("three")).to_pandas()
    assert len(catalog) == 3 * 3 * 5
    for (name, table_name), table in result_tables(store, "three").items():
        rows = catalog[catalog.pair == name]
        t = table.to_pandas()
        if table_name == DIFFERENCE.file:
            t = t[t.position < 5].sort_values(["layer", "position"])
            np.testing.assert_array_equal(rows.delta_norm, t.delta_norm)
            np.testing.assert_array_equal(rows.finetuned_norm, t.finetuned_norm)
            np.testing.assert_array_equal(rows.num_documents, t.num_documents)
        else:
            for r in rows.itertuples():
                top = t[(t.variant == "delta") & (t.layer == r.layer) & (t.position == r.position)]
                assert list(r.top_tokens) == list(top.sort_values("rank").token[:10])
        assert rows.alpha.isna().all() and rows.similarities.isna().all()   # no generations asked

    shown = adl("status", job_id, "--address", cluster.address)
    assert shown.returncode == 0 and "SUCCEEDED" in shown.stdout and "3/3 pairs done" in shown.stdout
    for follow in ([], ["--follow"]):   # a finished job's --follow prints it all and returns
        logs = adl("logs", job_id, *follow, "--address", cluster.address)
        assert logs.returncode == 0 and "pair lora: done" in logs.stdout, logs.stderr


def test_resubmitted_job_does_no_model_work(cluster, finished_job):
    store = finished_job["store"]
    attempts = attempts_dir("three") + "/"
    results = lambda: [f for f in store.listing() if not f[0].startswith(attempts)]   # each attempt adds its own
    before = results()
    job_id = submit(cluster, finished_job["spec"], finished_job["tmp"], "again")
    finish(cluster, job_id)
    status = history(store, "three")[-1]   # status.json stays the attempt that did the work
    assert status["work"] == {"model_loads": 0, "shards_extracted": 0, "pairs_run": 0}
    assert status["actors"] == [] and status["counts"]["skipped"] == 3 and status["state"] == "done"
    assert results() == before


def test_cluster_commands_fail_in_one_line(cluster, tmp_path):
    unknown = adl("status", "adl-nope-00000000", "--address", cluster.address)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "adl: error: adl-nope-00000000: no such job on this cluster"
    unreachable = adl("status", "x", "--address", f"http://127.0.0.1:{_free_port()}")
    assert unreachable.returncode == 2 and len(unreachable.stderr.strip().splitlines()) == 1
    assert "cannot reach a Ray cluster" in unreachable.stderr


def test_the_two_loopback_nodes_are_this_machine(cluster):
    from jobs.submit import check_storage_reach, node_ips, this_machine
    ips = node_ips(cluster.address)
    assert len(ips) == 2 and set(ips) <= this_machine(), ips   # both nodes run here: one disk
    check_storage_reach("adl-output", ips, this_machine())   # before the node is killed


def test_killing_a_node_mid_job_gives_identical_results(cluster, finished_job, make_spec, demo_pair,
                                                        variants, tmp_path):
    """The demo pair again, each model actor on two GPUs (a whole node): the base and the
    finetuned model extract on different nodes at once. The worker node's process tree is
    killed once both are extracting; the results equal the undisturbed run's. Last
    in the module: it leaves the cluster with its head node only."""
    spec = three_pair_spec(make_spec, demo_pair, variants, tmp_path / "out")
    spec["pairs"] = spec["pairs"][:1]
    spec["compute"]["gpus_per_worker"] = 2
    store = Store(str(tmp_path / "out"))
    worker_node = next(n for n, head in cluster.alive_nodes().items() if not head)
    job_id = submit(cluster, spec, tmp_path, "killed")

    def under_way():   # both sets have shards written and are not both complete: both actors
        markers = [k for k in store.list("activations") if k.endswith(".done.json")]   # have started
        return len({k.split("/")[1] for k in markers}) == 2 and len(markers) < 2 * SHARDS

    wait_for(under_way, 180, "extraction under way", poll=0.05)
    cluster.kill("worker")
    finish(cluster, job_id)
    assert worker_node not in cluster.alive_nodes()
    status = store.read_json(layout.run_status("three"))
    assert status["state"] == "done" and status["work"]["pairs_run"] == 1
    extraction_nodes = {n for a in status["actors"] if a["kind"] == "transformers"
                        for n in (a["node_id"], a.get("moved_from", {}).get("node_id")) if n}
    assert worker_node in extraction_nodes and len(extraction_nodes) == 2   # the killed node held work
    # An actor still needed when its node died was ended and loaded again by the scheduler
    # (not restarted by Ray, unseen); on the one node left, the other model's idle actor may
    # have had to make room for it. (The node's actor may also have finished its set and
    # been released before the node was seen dead: then nothing is reloaded. The scheduler
    # test on simulated actors, test_executor.py, checks the loss itself.)
    whys = [r["why"] for r in status["reloads"]]
    assert all(w == "lost with its node" or w.startswith("released to make room for") for w in whys), whys
    assert len(whys) <= 2 and whys.count("lost with its node") <= 1, whys
    got = result_tables(store, "three")
    expected = {k: v for k, v in result_tables(finished_job["store"], "three").items() if k[0] == "demo"}
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].equals(expected[key]), key


def test_forwarded_secrets_reach_the_job_and_show_nowhere(cluster, make_spec, tmp_path):
    """`adl submit --env` forwards a planted HF_TOKEN and grader key: the job's driver has
    them, and their values are nowhere under the storage root, in the job's logs, in what
    `adl status` prints, nor in the Ray job's entrypoint and metadata."""
    planted = {"HF_TOKEN": "hf_PlantedToken" + os.urandom(6).hex(),
               "ADL_TEST_GRADER_KEY": "grader-planted-" + os.urandom(6).hex()}
    spec = make_spec(tmp_path / "out", name="secrets", compute={"cpus_per_worker": 0.25, "gpus_per_worker": 1})
    spec_file = tmp_path / "secrets.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), **planted}
    run = lambda *a: subprocess.run([sys.executable, "-m", "jobs.cli", *a], cwd=REPO, capture_output=True,
                                    text=True, env=env, timeout=120)
    sent = run("submit", str(spec_file), "--address", cluster.address, "--env", "HF_TOKEN",
               "--env", "ADL_TEST_GRADER_KEY")
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.strip().splitlines()[-1]
    finish(cluster, job_id)
    logs = run("logs", job_id, "--address", cluster.address).stdout
    assert "forwarded by adl submit: HF_TOKEN, ADL_TEST_GRADER_KEY" in logs   # they arrived, set
    shown = run("status", job_id, "--address", cluster.address).stdout
    assert "SUCCEEDED" in shown
    from ray.job_submission import JobSubmissionClient
    info = JobSubmissionClient(cluster.address).get_job_info(job_id)
    where = {"logs": logs, "status": shown, "entrypoint": info.entrypoint, "metadata": json.dumps(info.metadata),
             "message": str(info.message)}
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            where[str(path)] = path.read_bytes().decode("latin-1")
    assert len(where) > 10
    for name, value in planted.items():
        assert not [k for k, text in where.items() if value in text], name
    # What Ray keeps (README: "Secrets"): the runtime environment holds them, for the job's processes.
    assert info.runtime_env["env_vars"]["HF_TOKEN"] == planted["HF_TOKEN"]


def test_submit_refuses_an_unset_env_in_one_line(tmp_path, make_spec):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec(tmp_path / "out")))
    env = {k: v for k, v in os.environ.items() if k != "ADL_NOT_SET_ANYWHERE"}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", str(spec_file), "--env", "ADL_NOT_SET_ANYWHERE",
                          "--address", f"http://127.0.0.1:{_free_port()}"], cwd=REPO, capture_output=True,
                         text=True, env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "adl: error: --env ADL_NOT_SET_ANYWHERE: not set in this environment"


def test_local_files_travel_with_a_submitted_job(cluster, make_spec, demo_pair, variants, tmp_path):
    """A spec naming a local corpus, finetune data, base folder and adapter folder: `adl
    submit` uploads them under the storage root, and the job runs although the submitter's
    folder is gone (renamed) once the job was sent; a second submit uploads nothing."""
    mine = tmp_path / "laptop"
    shutil.copytree(variants["lora"], mine / "lora")
    shutil.copytree(demo_pair.base_dir, mine / "base")
    shutil.copy(demo_pair.finetune_texts, mine / "corpus.jsonl")
    shutil.copy(demo_pair.finetune_texts, mine / "finetune.jsonl")
    spec = make_spec(tmp_path / "out", name="travel", shard_size=100,
                     corpus={"kind": "jsonl", "path": str(mine / "corpus.jsonl"), "num_documents": 200},
                     compute={"cpus_per_worker": 0.25, "gpus_per_worker": 1})
    spec["pairs"] = [{"name": "lora", "base": str(mine / "base"), "finetuned": {"adapter": str(mine / "lora")},
                      "finetune_data": str(mine / "finetune.jsonl")}]
    job_id = submit(cluster, spec, tmp_path, "travel")
    mine.rename(tmp_path / "renamed")   # the submitter's folder is not there any more
    finish(cluster, job_id)
    store = Store(str(tmp_path / "out"))
    assert store.read_json(layout.run_status("travel"))["state"] == "done"
    sent = store.read_json(layout.run_record("travel"))["spec"]
    uploads = store.uri("uploads")
    assert sent["pairs"][0]["base"]["model"].startswith(uploads)
    assert sent["pairs"][0]["finetuned"]["adapter"].startswith(uploads)
    # The files were read from the head's copies of the uploads.
    assert "/uploads/" in sent["corpus"]["path"] and "/uploads/" in sent["pairs"][0]["finetune_data"]
    assert not sent["corpus"]["path"].startswith(str(tmp_path))
    before = sorted(store.list("uploads"))
    assert len([k for k in before if k.endswith(".adl-upload-complete")]) == 4
    (tmp_path / "renamed").rename(mine)
    again = adl("submit", str(tmp_path / "travel.yaml"), "--address", cluster.address)
    assert again.returncode == 0 and again.stderr.count("uploaded before") == 4, again.stderr
    finish(cluster, again.stdout.strip().splitlines()[-1])
    assert sorted(store.list("uploads")) == before


def test_a_local_storage_root_is_refused_when_the_nodes_are_other_machines():
    from jobs.submit import ClusterError, check_storage_reach
    with pytest.raises(ClusterError) as e:
        check_storage_reach("adl-output", ["10.0.1.5", "10.0.1.6"], {"127.0.0.1", "192.0.2.2"})
    assert str(e.value) == ("storage.root: adl-output is a folder on this machine, but the cluster's 2 node(s) "
                            "(10.0.1.5, 10.0.1.6) are not: each would write to its own disk; use s3://bucket/prefix")
    check_storage_reach("s3://bucket/adl", ["10.0.1.5", "10.0.1.6"], {"127.0.0.1"})   # S3 reaches them all
    check_storage_reach("adl-output", ["127.0.0.1", "127.0.0.1"], {"127.0.0.1"})      # one machine: one disk


