"""The executor's own cost: the demo job end to end against the sum of its units' own
times, and its model loads, for this tree and for the executor before the model-centric
one (a git revision, run from an exported copy), side by side in one run.

Each run is `adl run` in its own process (its own private local Ray) on the demo pair
with generations and the analyses, scaled down (--documents). Reported per executor:
wall time (the process, Ray's start included) and CPU time of the driver process alone (Ray's
workers are not its children), the
sum of the units' own times from the status record (activation sets and pair stages;
the new one's baselines units too), their ratio, and model loads.

    .venv/bin/python benchmarks/bench_executor.py [--reps 3] [--before 3294bf9] [--documents 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import yaml

REPO = Path(__file__).resolve().parent.parent


def demo_job(root: Path, documents: int) -> dict:
    from jobs.cli import demo_spec
    spec = demo_spec(str(root), documents)
    spec["name"] = "bench"
    return spec


def run_once(tree: Path, spec: dict, work: Path) -> dict:
    spec_file = work / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_TMPDIR": str(work / "ray")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec_file)], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"adl run failed ({tree}):\n{done.stderr[-3000:]}")
    status = json.loads((Path(spec["storage"]["root"]) / "runs" / "bench" / "status.json").read_text())
    stages = sum(s["seconds"] or 0 for p in status["pairs"].values() for s in p["stages"].values())
    sets = sum(a["seconds"] or 0 for a in status["activation_sets"].values())
    baselines = sum(u["seconds"] for u in status.get("units", []) if u["kind"] == "baselines")
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "units": stages + sets + baselines, "loads": status["work"]["model_loads"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--before", default="3294bf9", help="git revision of the executor to compare with")
    ap.add_argument("--documents", type=int, default=2000)
    args = ap.parse_args()
    harness.header("executor: the demo job end to end vs the sum of its units' own times")
    with tempfile.TemporaryDirectory(prefix="adl-bench-exec-") as tmp:
        tmp = Path(tmp)
        old = tmp / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.before], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        trees = {"ours": REPO, f"before ({args.before})": old}
        results: dict[str, list[dict]] = {name: [] for name in trees}
        for rep in range(args.reps):   # interleaved, so that drifts of a shared machine hit both
            for name, tree in trees.items():
                work = tmp / f"{rep}-{name.split()[0]}"
                work.mkdir()
                results[name].append(run_once(tree, demo_job(work / "out", args.documents), work))
        for name, runs in results.items():
            wall = harness.median([r["wall"] for r in runs])
            cpu = harness.median([r["cpu"] for r in runs])
            units = harness.median([r["units"] for r in runs])
            print(f"  {name:22s} wall {wall:6.1f} s (driver process CPU {cpu:5.1f} s), units' own times {units:6.1f} s, "
                  f"wall / units {wall / units:4.2f}, model loads {runs[0]['loads']}")
        ours, before = (results[n] for n in trees)
        print(f"ratio: ours / before wall time = "
              f"{harness.median([r['wall'] for r in ours]) / harness.median([r['wall'] for r in before]):.3f}; "
              f"loads {ours[0]['loads']} vs {before[0]['loads']} (median of {args.reps} runs each)")


if __name__ == "__main__":
    main()
