"""cluster.yaml, the AWS launcher config, read by Ray's own launcher code: it passes Ray's
schema, and the points that made the old one unusable are checked one by one."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(config):
    from ray.autoscaler._private.util import prepare_config, validate_config
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    broken = copy.deepcopy(prepared)
    broken["available_node_types"]["gpu_h100_x8"]["min_workers"] = "none"   # the check can fail
    with pytest.raises(Exception):
        validate_config(broken)


def test_every_node_runs_a_current_gpu_image(config):
    for name, node in config["available_node_types"].items():
        image = node["node_config"]["ImageId"]
        # Not Ray's latest_dlami (Ubuntu 18.04, Python 3.6, CUDA 11): AWS's base DLAMI line,
        # Ubuntu 22.04 (Python 3.10, current driver), or one of its AMIs pinned by id.
        assert image == DLAMI or image.startswith("ami-"), (name, image)


def test_the_head_may_launch_workers_and_workers_reach_s3(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # Its own profile, not the workers' S3-only one (which lacks the autoscaler's EC2 rights).
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "adl-head"}
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    for name, node in types.items():
        if name != config["head_node_type"]:
            assert node["node_config"]["IamInstanceProfile"] == {"Name": "adl-s3-access"}, name
            assert node["min_workers"] == 0, name   # GPU nodes come when a job asks for them


def test_node_types_for_small_and_large_models(config):
    from jobs.autoscale import node_types_from_config
    types = {t.name: t for t in node_types_from_config(config)}
    instance = {name: node["node_config"]["InstanceType"] for name, node in config["available_node_types"].items()}
    assert instance["gpu_a10g_x1"] in ("g5.2xlarge", "g6.2xlarge") and types["gpu_a10g_x1"].gpus == 1
    assert instance["gpu_h100_x8"] == "p5.48xlarge" and types["gpu_h100_x8"].gpus == 8
    assert instance["gpu_a100_x8"] in ("p4d.24xlarge", "p4de.24xlarge") and types["gpu_a100_x8"].gpus == 8
    assert config["head_node_type"] not in types   # what a job can grow to: workers only
    assert all(t.max_count <= config["max_workers"] for t in types.values())


def test_nothing_heavy_is_synced_to_the_nodes(config):
    from ray.autoscaler._private.command_runner import SSHCommandRunner
    # The rsync arguments Ray's launcher builds from the config for every file mount.
    args = SSHCommandRunner._create_rsync_filter_args(None, {"rsync_exclude": config["rsync_exclude"],
                                                             "rsync_filter": config["rsync_filter"]})
    excluded = {args[i + 1] for i, a in enumerate(args) if a == "--exclude"}
    assert {".venv", "adl-output", ".git"} <= excluded
    assert ["--filter", "dir-merge,- .gitignore"] == args[-2:]
    assert list(config["file_mounts"].values()) == ["."]


def test_setup_installs_the_cuda_extra_once_per_node(config):
    import ray
    install = " ".join(config["setup_commands"])
    assert "[cuda,embed]" in install
    assert f"'ray[data,default]=={ray.__version__}'" in install   # the laptop's Ray, for `ray up`/submit
    # Skipped when this pyproject's install is already on the node (a stopped node kept).
    assert "[ -f $stamp ] ||" in install and "sha256sum ~/adl/pyproject.toml" in install
    assert config["provider"]["cache_stopped_nodes"] is True


def test_model_caches_live_on_local_nvme(config):
    start = " ".join(config["worker_start_ray_commands"])
    assert "export ADL_CACHE=/opt/dlami/nvme/cache/adl HF_HOME=/opt/dlami/nvme/cache/hf" in start
    assert start.index("ADL_CACHE") < start.index("ray start")   # the raylet's workers inherit it
