"""The job and Ray's autoscaler: what the cluster can grow to, and what the job asks of it.

A cluster started by `ray up` has GPU node types with `min_workers: 0`: no GPU node is
alive until something asks for one, and Ray's autoscaler only adds nodes for demand it
sees. The scheduler (jobs/scheduler.py) creates an actor only where it fits a node that is
alive, so the job must ask itself: `request_resources` with one bundle per model actor the
remaining work needs (lowered as work ends, and to nothing when the job ends, so that idle
nodes go after `idle_timeout_minutes`).

What the cluster can grow to is read from the autoscaler's own configuration:
- Ray's cluster config record in the GCS (`ClusterConfig`: written by KubeRay and the v2
  autoscaler), when there is one;
- otherwise the launcher config that this node's autoscaler (the monitor process of this
  Ray session) was started with: the head of a `ray up` cluster, where a submitted job's
  driver runs, holds it as ~/ray_bootstrap_config.yaml, with each type's resources filled.
Neither: a fixed cluster, planned against the nodes that are alive.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from jobs.scheduler import NodeResources, Request

logger = logging.getLogger("adl.autoscale")


MAX_PLANNED = 256   # nodes of one type planned against at most (a type may have no bound)


@dataclass(frozen=True)
class NodeType:
    name: str
    cpus: float
    gpus: int
    max_count: int

    def template(self, i: int) -> NodeResources:
        return NodeResources(f"{self.name}#{i}", self.cpus, self.gpus)


def node_types_from_config(config: dict) -> list[NodeType]:
    """The worker node types of a launcher config (`available_node_types`), each capped by
    the cluster's `max_workers`."""
    cap = int(config.get("max_workers", 2 ** 31))
    head = config.get("head_node_type")
    types = []
    for name, node in sorted((config.get("available_node_types") or {}).items()):
        resources = node.get("resources") or {}
        count = min(int(node.get("max_workers", 0)), cap, MAX_PLANNED)
        if name == head or count <= 0:
            continue
        types.append(NodeType(name, float(resources.get("CPU", 0)), int(resources.get("GPU", 0)), count))
    return types


def _from_gcs() -> list[NodeType] | None:
    from ray._private.state import state
    try:
        config = state.get_cluster_config()
    except Exception:   # an older GCS without the record
        return None
    if config is None or not config.node_group_configs:
        return None
    return [NodeType(g.name, float(g.resources.get("CPU", 0)), int(g.resources.get("GPU", 0)),
                     g.max_count if 0 <= g.max_count <= MAX_PLANNED else MAX_PLANNED)
            for g in config.node_group_configs if g.max_count != 0]


def _monitor_config(session_dir: str) -> Path | None:
    """The --autoscaling-config of the autoscaler of this Ray session, when it runs here."""
    if not os.path.isdir("/proc"):   # not Linux: no cluster head either
        return None
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") or a.endswith("autoscaler/v2/monitor.py")
                   for a in args):
            continue
        options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        if options.get("logs-dir", "").startswith(session_dir) and options.get("autoscaling-config"):
            return Path(os.path.expanduser(options["autoscaling-config"]))
    return None


def cluster_node_types() -> list[NodeType] | None:
    """The node types the connected cluster can add, or None for a fixed cluster."""
    import ray
    types = _from_gcs()
    if types is not None:
        return types
    node = getattr(ray._private.worker, "_global_node", None)
    session_dir = node.get_session_dir_path() if node is not None else None
    path = _monitor_config(session_dir) if session_dir else None
    if path is None or not path.is_file():
        return None
    import yaml
    text = path.read_text()
    config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    types = node_types_from_config(config or {})
    logger.info("the cluster can add " + (", ".join(
        f"up to {t.max_count} x {t.name} ({t.cpus:g} CPUs, {t.gpus} GPUs)" for t in types) or "no nodes")
        + f" (autoscaler config {shlex.quote(str(path))})")
    return types


def bundle(request: Request) -> dict:
    """A model actor's resources as an autoscaler bundle (what Ray will ask of its node)."""
    out = {"CPU": request.counted_cpus} if request.counted_cpus else {}
    if request.gpus:
        out["GPU"] = request.gpus
    return out


def request(requests: list[Request]) -> None:
    """Asks the autoscaler for room for these actors at once (replacing the last request);
    an empty list lowers it to nothing."""
    from ray.autoscaler.sdk import request_resources
    request_resources(bundles=[bundle(r) for r in requests])
