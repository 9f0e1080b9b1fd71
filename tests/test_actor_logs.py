"""What happens inside model actors reaches the job's log without flooding it: one line
per failed unit with the path of its full trace in the run's folder, and each actor's
warnings (its own, vLLM's and transformers', which do not propagate, and Python's
`warnings`), each distinct line once."""
from __future__ import annotations

import logging

from pathlib import Path

from helpers import unloadable_copy
from storage import layout
from storage.store import Store


def test_an_actors_warnings_are_kept_once_each(ray_cluster):
    import ray

    from jobs.executor import _tracked_class

    class Noisy:
        def __init__(self):
            import warnings
            for name in ("vllm", "transformers"):   # both keep their records to themselves
                logging.getLogger(name).propagate = False
            for _ in range(3):
                logging.getLogger("vllm.engine").warning("KV cache smaller than asked\nsecond line")
            logging.getLogger("transformers.modeling_utils").warning("some weights were not used")
            logging.getLogger("vllm").info("progress, not for the job's log")
            warnings.warn("a deprecated argument")

        def ping(self):
            logging.getLogger("adl.worker").warning("later")
            return True

    actor = ray.remote(_tracked_class(Noisy)).options(num_cpus=0).remote()
    ray.get(actor.ping.remote())
    got = ray.get(actor.adl_warnings.remote())
    assert got[:2] == ["warning: KV cache smaller than asked (x3)", "warning: some weights were not used"]
    assert "a deprecated argument" in got[2] and got[3] == "warning: later" and len(got) == 4, got
    assert ray.get(actor.adl_warnings.remote()) == []   # taken: not logged twice
    ray.kill(actor)


def test_a_failing_load_is_one_line_in_the_log_and_a_trace_in_the_runs_folder(ray_cluster, make_spec, demo_pair,
                                                                             tmp_path, caplog):
    from jobs.driver import RunStats, run_job
    from jobs.spec import parse_spec
    broken = unloadable_copy(demo_pair.finetuned_dir, tmp_path / "broken")   # passes planning, fails to load
    spec = make_spec(tmp_path / "out", name="broken")
    spec["pairs"][0]["finetuned"] = str(broken)
    stats = RunStats()
    with caplog.at_level(logging.INFO, logger="adl"):
        run_job(parse_spec(spec), stats)
    assert list(stats.failed) == ["demo"]
    lines = [r.getMessage() for r in caplog.records if "failed: " in r.getMessage() and "full trace: " in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("extract ") and "ignore_mismatched_sizes" in lines[0], lines[0]
    where = lines[0].rsplit("(full trace: ", 1)[1].rstrip(")")
    store = Store(str(tmp_path / "out"))
    key = layout.run_trace("broken", lines[0].split(" failed: ")[0], 1)
    assert store.uri(key) == where
    trace = Path(where).read_text()
    # The whole trace, the actor's frames included (Ray carries them to the caller).
    assert trace.startswith("Traceback") and "workers/model_worker.py" in trace and "ignore_mismatched_sizes" in trace
