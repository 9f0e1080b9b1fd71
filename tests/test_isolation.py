"""GPU isolation on a Ray cluster that has GPUs (logical ones: `ray.init(num_gpus=2)` on
this GPU-less machine, in a process of its own, since the session's cluster has none): an
actor that holds no GPU sees none, and a spec whose compute gives models no GPUs is
refused in one line before any actor starts."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, os, shutil, sys, tempfile
    import ray
    from jobs.executor import _tracked_class

    class Probe:
        def visible(self):
            return os.environ.get("CUDA_VISIBLE_DEVICES")

    temp = tempfile.mkdtemp(prefix="adlray-", dir="/tmp")
    ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        seen = {}
        for name, cls, gpus in (("tracked, no GPU", _tracked_class(Probe), 0),
                                ("tracked, one GPU", _tracked_class(Probe), 1),
                                ("plain Ray, no GPU", Probe, 0)):
            actor = ray.remote(cls).options(num_gpus=gpus, num_cpus=0.1).remote()
            seen[name] = ray.get(actor.visible.remote())
            ray.kill(actor)
        print("SEEN " + json.dumps(seen), flush=True)
        from jobs.driver import run_job
        from jobs.spec import load_spec
        run_job(load_spec(sys.argv[1]))
    except Exception as e:
        from common.errors import one_line
        print("ERROR " + type(e).__name__ + " " + one_line(e, typed=False), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
''')


def test_gpus_are_hidden_from_actors_that_hold_none_and_gpuless_compute_is_refused(make_spec, tmp_path):
    root = tmp_path / "store"
    spec = make_spec(root)   # compute: cpus_per_worker only, gpus_per_worker 0 by default
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "probe.py").write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "spec.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"})
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines()
             if line.startswith(("SEEN ", "ERROR "))}
    assert "SEEN" in lines, out.stdout[-2000:] + out.stderr[-2000:]
    seen = json.loads(lines["SEEN"])
    assert seen["tracked, no GPU"] == ""
    assert seen["tracked, one GPU"] in ("0", "1")
    assert seen["plain Ray, no GPU"] is None    # what Ray alone does: every GPU visible
    assert lines["ERROR"] == ("ClusterError compute: the cluster has 2 GPUs and this spec gives models none: set "
                              "compute.gpu_memory_gb (the memory of one GPU, e.g. 80) or compute.gpus_per_worker")
    assert not [p for p in root.rglob("*") if p.is_file()]     # nothing written


def test_the_demo_takes_a_share_of_a_gpu_where_there_are_some(monkeypatch):
    """`adl demo` on a GPU machine gives each model an eighth of a GPU (a spec with none
    would be refused there); the count is Ray's own (NVML, here a stand-in), within
    CUDA_VISIBLE_DEVICES."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    from jobs.cli import demo_compute
    from jobs.driver import local_gpus
    manager = get_accelerator_manager_for_resource("GPU")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(manager, "get_current_node_num_accelerators", staticmethod(lambda: 0))
    assert local_gpus() == 0 and demo_compute() == {"cpus_per_worker": 0.5}
    monkeypatch.setattr(manager, "get_current_node_num_accelerators", staticmethod(lambda: 8))
    assert local_gpus() == 8 and demo_compute() == {"cpus_per_worker": 0.5, "gpus_per_worker": 0.125}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert local_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_gpus() == 0 and demo_compute() == {"cpus_per_worker": 0.5}
