"""Jobs on a cluster that starts without workers: a real Ray head with no CPU and Ray's
own autoscaler (its fake multi-node provider, which starts each node it launches as real
raylet processes on this machine), with worker types at `min_workers: 0`. The job must ask
the autoscaler for its nodes, wait for them, finish with the tables of a fixed cluster, and
let them go; a node type that never comes must fail the job within its bound, in one line.

The cluster is this module's own: stopped by the PIDs whose command line holds its private
temp dir (never `ray stop`, which would end every Ray on the machine).
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
import time
from pathlib import Path

import pytest
import yaml
from helpers import wait_for

from storage import layout
from storage.store import Store
from storage.tables import DIFFERENCE, LOGIT_LENS

REPO = Path(__file__).resolve().parent.parent
WORKER_TYPES = {
    "cpu_x2": {"CPU": 2},
    "gpu_x1": {"CPU": 2, "GPU": 1},
    # Its every launch fails (the raylet refuses an object store of 1 byte): a type the
    # cloud never delivers (no capacity, no quota).
    "gpu_x4_never": {"CPU": 2, "GPU": 4, "object_store_memory": 1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeAutoscalingCluster:
    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="adlscale-", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        venv_bin = str(Path(sys.executable).parent)
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{venv_bin}:{os.environ['PATH']}"}
        self.ray = str(Path(venv_bin) / "ray")

    def config(self) -> dict:
        empty = {k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                                 "worker_setup_commands", "head_start_ray_commands",
                                 "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                                 "rsync_filter")}
        return {
            "cluster_name": "adl-fake", "max_workers": 3, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.05,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                **{name: {"resources": r, "node_config": {}, "min_workers": 0, "max_workers": 1}
                   for name, r in WORKER_TYPES.items()}},
            "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
            "file_mounts_sync_continuously": False, **empty}

    def start(self) -> "FakeAutoscalingCluster":
        config = Path(self.temp) / "autoscaler.json"
        config.write_text(json.dumps(self.config()))
        env = {**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        out = subprocess.run([self.ray, "start", "--head", f"--port={self.port}", "--num-cpus=0",
                              f"--temp-dir={self.temp}", f"--autoscaling-config={config}",
                              "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                              "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        return self

    def alive_workers(self) -> list[dict]:
        """The alive nodes with CPUs (the head has none), as {resource: amount}."""
        from ray._raylet import GcsClient
        nodes = GcsClient(address=self.address).get_all_node_info(timeout=10)
        return [dict(n.resources_total) for n in nodes.values()
                if n.state == 0 and dict(n.resources_total).get("CPU", 0) > 0]

    def stop(self) -> None:
        def ours():
            pids = []
            for pid in os.listdir("/proc"):
                if pid.isdigit() and int(pid) != os.getpid():
                    try:
                        if self.temp.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                            pids.append(int(pid))
                    except OSError:
                        pass
            return pids
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in ours():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = FakeAutoscalingCluster()
    try:
        yield c.start()
    finally:
        c.stop()


def adl_run(spec: dict, tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"})


def tables(root: Path, job: str) -> dict:
    store = Store(str(root))
    record = store.read_json(layout.run_record(job))
    return {(p["name"], t.file): store.read_table(f"{p['dir']}/{t.file}")
            for p in record["pairs"] for t in (DIFFERENCE, LOGIT_LENS)}


@pytest.fixture(scope="module")
def fixed_cluster_tables(ray_cluster, make_spec, tmp_path_factory):
    """The demo job on the session's fixed local cluster: the reference."""
    from jobs.driver import run_job
    from jobs.spec import parse_spec
    root = tmp_path_factory.mktemp("fixed")
    run_job(parse_spec(make_spec(root, name="scale")))
    return tables(root, "scale")


@pytest.mark.parametrize("gpus", [0, 0.5], ids=["cpus", "logical-gpus"])
def test_demo_job_scales_the_cluster_up_and_lets_it_go(cluster, make_spec, fixed_cluster_tables, tmp_path, gpus):
    wait_for(lambda: not cluster.alive_workers(), 120, "no worker nodes before the job", poll=1)
    spec = make_spec(tmp_path / "out", name="scale",
                     compute={"ray_address": cluster.address, "gpus_per_worker": gpus, "node_wait_minutes": 3})
    out = adl_run(spec, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr + out.stdout
    assert "the cluster can add up to 1 x cpu_x2 (2 CPUs, 0 GPUs)" in log, log[-3000:]
    assert "asking the cluster for room for 2 model actor(s)" in log
    assert "its request to the autoscaler is lowered to none" in log

    status = Store(str(tmp_path / "out")).read_json(layout.run_status("scale"))
    assert status["state"] == "done" and status["counts"]["done"] == 1
    actors = status["actors"]
    assert len(actors) == 2 and all(a["num_gpus"] == gpus for a in actors)
    if gpus:   # both models on the one logical GPU of a gpu_x1 node
        assert all(a["gpu_ids"] == ["0"] for a in actors) and len({a["node_id"] for a in actors}) == 1

    got = tables(tmp_path / "out", "scale")
    assert got.keys() == fixed_cluster_tables.keys()
    for key, table in fixed_cluster_tables.items():
        assert got[key].equals(table), key
    # The request lowered, the idle node goes (idle_timeout_minutes: 3 s).
    wait_for(lambda: not cluster.alive_workers(), 120, "the idle worker node to be removed", poll=1)


def test_a_node_type_that_never_comes_fails_the_job_within_its_bound(cluster, make_spec, tmp_path):
    spec = make_spec(tmp_path / "out", name="never",
                     compute={"ray_address": cluster.address, "gpus_per_worker": 4, "node_wait_minutes": 0.25})
    start = time.monotonic()
    out = adl_run(spec, tmp_path, timeout=180)
    took = time.monotonic() - start
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("adl: error: compute: no node with room for extract ")
    assert "(0.5 CPU + 4 GPU) joined the cluster in 15 s (compute.node_wait_minutes)" in last, last
    assert "can add 3 node(s), 6 CPUs, 5 GPUs" in last, last
    assert took < 15 + 60, took   # the bound, plus starting and joining Ray
    assert not cluster.alive_workers()


def test_more_than_the_cluster_can_ever_grow_to_fails_at_once(cluster, make_spec, tmp_path):
    spec = make_spec(tmp_path / "out", name="huge", compute={"ray_address": cluster.address, "gpus_per_worker": 8})
    out = adl_run(spec, tmp_path, timeout=180)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("adl: error: compute: extract "), out.stderr[-2000:]
    assert "more than the cluster holds (4 node(s), 6 CPUs, 5 GPUs)" in out.stderr


# -- the scheduler on simulated nodes that join when asked for (no Ray) ---------------------

class Growing:
    """Simulated actors on a cluster of no nodes that adds one (1 GPU, 8 CPUs) per asked-for
    GPU, `delay` simulated seconds after the request; never, with delay None."""

    def __init__(self, delay: float | None):
        from jobs.simulation import SimulatedBackend
        self.sim = SimulatedBackend([], lambda k: 1.0, lambda u, a: 2.0)
        self.delay, self.asked, self.wants = delay, None, []

    def node_types(self):
        from jobs.autoscale import NodeType
        return [NodeType("gpu", 8, 1, 3)]

    def want(self, requests):
        self.wants.append(sorted((r.cpus, r.gpus) for r in requests))
        if requests and self.asked is None:
            self.asked = (self.sim.now, len(requests))

    def nodes(self):
        from jobs.scheduler import NodeResources
        if self.delay is None or self.asked is None or self.sim.now < self.asked[0] + self.delay:
            return []
        return [NodeResources(f"n{i}", 8, 1) for i in range(min(3, self.asked[1]))]

    def wait(self):
        events = self.sim.wait()
        if not events:
            self.sim.now += 0.5   # the real backend's poll
        return events

    def __getattr__(self, name):   # create, release, start
        return getattr(self.sim, name)


def _gpu_units():
    from jobs.scheduler import ModelKey, Unit
    a, b = ModelKey("transformers", "a"), ModelKey("transformers", "b")
    ea, eb = Unit("extract a", "extract", (a,)), Unit("extract b", "extract", (b,))
    return [ea, eb, Unit("lens", "lens", (b,), [ea, eb])]


def test_scheduler_asks_for_nodes_waits_for_them_and_lowers_its_request():
    from jobs.scheduler import Request, Scheduler
    backend = Growing(delay=40.0)
    units = _gpu_units()
    scheduler = Scheduler(units, lambda key: Request(1, 1.0), backend, node_wait_s=60, clock=lambda: backend.sim.now)
    scheduler.run()
    assert all(u.state == "done" for u in units)
    assert backend.asked == (0.0, 2)                     # the peak, before anything ran
    assert backend.wants == [[(1, 1.0), (1, 1.0)], [(1, 1.0)], []]   # lowered as work ended, then to none
    assert min(a.created for a in backend.sim.actors) == pytest.approx(40.0, abs=0.5)


def test_scheduler_fails_in_one_line_when_no_node_comes_within_its_bound():
    from jobs.scheduler import Request, Scheduler, SchedulingError
    backend = Growing(delay=None)
    scheduler = Scheduler(_gpu_units(), lambda key: Request(1, 1.0), backend, node_wait_s=30,
                          clock=lambda: backend.sim.now)
    with pytest.raises(SchedulingError) as e:
        scheduler.run()
    assert str(e.value) == (
        "compute: no node with room for extract a (1 CPU + 1 GPU) joined the cluster in 30 s "
        "(compute.node_wait_minutes); it has 0 node(s), 0 CPUs, 0 GPUs and can add 3 node(s), 24 CPUs, 3 GPUs; "
        "`ray status` and the autoscaler's log (monitor.out) say why")
    assert backend.sim.now == pytest.approx(30.0, abs=0.6) and backend.wants[-1] == []



def test_node_types_from_rays_cluster_config_record(cluster):
    """KubeRay and the v2 autoscaler write what the cluster can grow to into the GCS
    (autoscaler_pb2.ClusterConfig): it is read first."""
    script = f"""
import ray
from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY as KEY, GCS_AUTOSCALER_STATE_NAMESPACE as NS
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put
ray.init(address="{cluster.address}", log_to_driver=False)
config = autoscaler_pb2.ClusterConfig(node_group_configs=[
    autoscaler_pb2.NodeGroupConfig(name="h100", resources={{"CPU": 192, "GPU": 8}}, max_count=2),
    autoscaler_pb2.NodeGroupConfig(name="unbounded", resources={{"CPU": 8, "GPU": 1}}, max_count=-1),
    autoscaler_pb2.NodeGroupConfig(name="off", resources={{"CPU": 8}}, max_count=0)])
_internal_kv_put(KEY, config.SerializeToString(), namespace=NS)
try:
    from jobs.autoscale import cluster_node_types
    print(sorted((t.name, t.cpus, t.gpus, t.max_count) for t in cluster_node_types()))
finally:
    _internal_kv_del(KEY, namespace=NS)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[('h100', 192.0, 8, 2), ('unbounded', 8.0, 1, 256)]"
