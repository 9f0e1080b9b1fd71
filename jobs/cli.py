"""`adl`: run a job spec, run the demo, inspect results, write the report page; submit
jobs to a Ray cluster and watch them (status, logs, stop)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from common.errors import one_line, terminal_safe
from common.logs import configure as configure_logging
from jobs.plan import PlanError
from jobs.project import ProjectError
from jobs.report import ReportError
from jobs.scheduler import SchedulingError
from jobs.spec import SpecError, check_location, load_spec, parse_spec
from jobs.submit import ClusterError
from storage.store import StorageError, StorageOptions, write_file
from workers.models import ModelError

logger = logging.getLogger("adl.cli")

# Errors about the user's inputs: one line and exit code 2, never a traceback.
INPUT_ERRORS = (SpecError, PlanError, StorageError, ModelError, ReportError, FileNotFoundError,
                ClusterError, ProjectError, SchedulingError)


DEMO_MODELS = ("demo", "gemma-3-270m")


def demo_compute() -> dict:
    """The demo's compute: half a CPU per model actor, and on a machine with GPUs an
    eighth of one (the demo's models are small), since a spec that gives models no GPUs
    is refused where there are some (jobs/driver.refuse_gpuless_compute)."""
    from jobs.driver import local_gpus
    return {"cpus_per_worker": 0.5, **({"gpus_per_worker": 0.125} if local_gpus() else {})}


def demo_spec(root: str, num_documents: int | None = None, model: str = "demo") -> dict:
    """The embedded default: the demo pair on the demo corpus, local storage, method
    defaults everywhere else. model "gemma-3-270m": the real pretrained pair
    (workers/gemma_pair.py, the gemma extra) instead of the 5-block demo pair."""
    from workers.demo_pair import PLANTED_DESCRIPTION, build_demo_pair
    # Bad arguments fail before the demo pair is built (minutes, the first time).
    if model not in DEMO_MODELS:
        raise SpecError(f"--model: must be one of {', '.join(DEMO_MODELS)}, got {model!r}")
    if num_documents is not None and num_documents < 1:
        raise SpecError(f"--num-documents: must be >= 1, got {num_documents}")
    check_location(root, "--root", "storage")
    if model == "gemma-3-270m":
        from workers.gemma_pair import require_extra
        require_extra()
        return _gemma_demo_spec(root, num_documents)
    pair = build_demo_pair(progress=lambda m: print(f"[adl demo] {m}", file=sys.stderr, flush=True))
    spec = {
        "name": "demo",
        "pairs": [{"name": "demo", "base": str(pair.base_dir), "finetuned": str(pair.finetuned_dir),
                   "description": PLANTED_DESCRIPTION, "finetune_data": str(pair.finetune_texts)}],
        "corpus": {"kind": "demo"},
        "storage": {"root": root},
        # The demo runs on CPUs, where bf16 matmuls are ~50x slower than float32 (measured
        # by benchmarks/bench_extraction.py); the demo pair is trained in float32 anyway.
        "dtype": "float32",
        "compute": demo_compute(),
        # Generations scaled down from the method's (512 new tokens, 5 samples, 12 search
        # steps over [0, 100] with 10 samples) so the demo finishes in minutes on 2 cores;
        # the demo model breaks down well below alpha 10.
        "generation": {"samples": 2, "max_tokens": 64,
                       "search": {"high": 10.0, "steps": 6, "samples": 4, "max_tokens": 32}},
        # Perplexity of the demo's own fluent text under its finetuned model runs to a few
        # hundred (it is a 5-block model), so the coherence bar sits higher than for real LLMs.
        "grader": {"kind": "offline", "threshold": 5000},
        # Patchscope, token relevance (skipped with a recorded reason: the offline grader
        # cannot judge relevance) and the embedding evaluation, at the method's defaults.
        "analyses": {},
    }
    if num_documents is not None:
        spec["corpus"]["num_documents"] = num_documents
    return spec


def _gemma_demo_spec(root: str, num_documents: int | None) -> dict:
    """`adl demo --model gemma-3-270m`: the Gemma 3 270M pair (built once, cached beside
    the demo pair), the full default job scaled for 2 cores."""
    from workers.gemma_pair import PLANTED_DESCRIPTION, build_gemma_pair
    pair = build_gemma_pair(progress=lambda m: print(f"[adl demo] {m}", file=sys.stderr, flush=True))
    return {
        "name": "demo-gemma",
        "pairs": [{"name": "gemma-3-270m", "base": str(pair.base_dir),
                   "finetuned": str(pair.finetuned_dir), "description": PLANTED_DESCRIPTION,
                   "finetune_data": str(pair.finetune_texts)}],
        # 1,000 documents rather than the method's 10,000: minutes, not an hour, on 2 cores.
        "corpus": {"kind": "demo", "num_documents": num_documents or 1000},
        "storage": {"root": root},
        "dtype": "float32",   # CPUs without native bf16 (see demo_spec)
        "compute": demo_compute(),
        # Relative depth 0.75 (block 12 of 18), not the method's 0.5: in this 270M model the
        # logit lens of delta at block 8 reads unrelated tokens, from block 12 on it reads
        # " volcano" first at positions 1..3 (measured over 200 demo documents).
        "method": {"layers": [0.75]},
        # The method's generation settings, scaled down for 2 cores (a real model: the
        # perplexity grader keeps its default threshold).
        # max_model_len: Gemma's own 32,768 tokens would not fit vLLM's 1 GiB CPU KV cache
        # (36 KiB a token); prompts and samples here are far shorter.
        "generation": {"samples": 2, "max_tokens": 64, "max_model_len": 1024,
                       "search": {"high": 8.0, "steps": 6, "samples": 4, "max_tokens": 32}},
        "grader": {"kind": "offline"},
        "analyses": {},
    }


def _run(spec, report: bool = False) -> int:
    """Runs the job; exit code 1 when any pair failed (the others still ran)."""
    from jobs.driver import RunStats, StorageFault, Terminated, run_job
    from jobs.summary import run_summary
    from storage.store import Store
    stats = RunStats()
    try:
        record = run_job(spec, stats)
    except StorageFault as e:   # not the input's fault: exit 1, the failure recorded where it could be
        print(f"adl: error: {terminal_safe(one_line(e, typed=False))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:   # Ctrl-C or SIGTERM: run_job said what is complete
        # and stopped the job's actors and Ray; threads of the job may still be waiting
        # inside Ray, so the process ends now rather than wait for them at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143 if isinstance(e, Terminated) else 130)
    store = Store.from_uri(spec.storage.root, spec.storage.options)
    logger.info(f"done: {store.uri(record)}")
    print(run_summary(store, record))
    if report:
        from jobs.report import write_report
        print(f"report: {write_report(store, record)}")
    for name, error in sorted(stats.failed.items()):
        print(f"adl: pair {name} failed: {error}", file=sys.stderr)
    return 1 if stats.failed else 0


def _spec_from_env(name: str):
    """A submitted job's spec: validated and path-resolved by `adl submit`, carried in
    the job's environment."""
    if not os.environ.get(name):
        raise SpecError(f"${name}: not set (adl submit sets it for the cluster's entrypoint)")
    from common.redact import register
    from jobs.submit import FORWARDED_ENV
    names = [n for n in os.environ.get(FORWARDED_ENV, "").split(",") if os.environ.get(n)]
    for n in names:   # masked in every log line and error of this job from now on
        register(os.environ[n])
    if names:
        logger.info(f"forwarded by adl submit: {', '.join(names)}")
    from jobs.uploads import fetch_env
    return parse_spec(fetch_env(json.loads(os.environ[name])))


def main(argv: list[str] | None = None) -> int:
    """The `adl` command. Output cut short by its reader (`adl inspect ... | head`) ends
    quietly with exit code 141, as a command killed by SIGPIPE does in a shell."""
    try:
        code = _main(argv)
        sys.stdout.flush()   # a closed pipe shows here, while it can still be handled
        return code
    except BrokenPipeError:
        # Python would flush stdout again at exit and print an error: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _rows(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adl", description="Activation Difference Lens batch jobs")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="the least severe log lines shown on stderr (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a job spec on an embedded local Ray (or compute.ray_address)")
    p_run.add_argument("spec", nargs="?", help="job spec (YAML)")
    p_run.add_argument("--spec-env", default=None, help=argparse.SUPPRESS)   # set by adl submit
    address_help = "the cluster's Jobs API (default: $RAY_ADDRESS if http://..., else http://127.0.0.1:8265)"
    p_submit = sub.add_parser("submit", help="submit a job spec to a running Ray cluster; prints the job id")
    p_submit.add_argument("spec", help="job spec (YAML)")
    p_submit.add_argument("--address", default=None, help=address_help)
    p_submit.add_argument("--env", action="append", default=[], metavar="NAME",
                          help="forward this environment variable's value to the job (repeatable), "
                               "e.g. HF_TOKEN; masked in its logs and errors")
    p_validate = sub.add_parser("validate", help="check a job spec as `adl run` does before it writes "
                                                 "anything; writes nothing")
    p_validate.add_argument("spec", help="job spec (YAML)")
    p_status = sub.add_parser("status", help="a job's state and progress: a submitted job's id, or a local "
                                             "run (runs/<job>/status.json, run.json, or a storage root)")
    p_logs = sub.add_parser("logs", help="a submitted job's logs")
    p_logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p_stop = sub.add_parser("stop", help="stop a submitted job")
    for p in (p_status, p_logs, p_stop):
        p.add_argument("job_id")
        p.add_argument("--address", default=None, help=address_help)
    p_status.add_argument("--endpoint-url", default=None)
    p_status.add_argument("--region", default=None)
    p_demo = sub.add_parser("demo", help="build the demo pair if needed and run the default job on it")
    p_demo.add_argument("--root", default="./adl-output", help="storage root (default ./adl-output)")
    p_demo.add_argument("--num-documents", type=int, default=None)
    p_demo.add_argument("--model", choices=DEMO_MODELS, default="demo",
                        help="demo: the 5-block demo pair (fast); gemma-3-270m: Gemma 3 270M and a "
                             "narrow finetune of it (needs pip install -e '.[gemma]')")
    p_demo.add_argument("--print-spec", action="store_true",
                        help="print the demo's job spec (YAML) and run nothing; a start for one's own spec")
    p_inspect = sub.add_parser("inspect", help="print what a run produced")
    p_inspect.add_argument("path", help="storage root, runs/<job>/run.json, pairs/<pair>, or a .parquet table")
    p_inspect.add_argument("--rows", type=_rows, default=None, metavar="N",
                           help="a table's rows to show (default 5; 0: all)")
    p_inspect.add_argument("--columns", default=None, metavar="A,B",
                           help="a table's columns to show, comma-separated (default: all)")
    p_inspect.add_argument("--json", action="store_true", help="a table's rows as JSON Lines, one object a row")
    p_inspect.add_argument("--endpoint-url", default=None)
    p_inspect.add_argument("--region", default=None)
    p_report = sub.add_parser("report", help="write a run's HTML report (one self-contained page per job)")
    p_report.add_argument("run", help="runs/<job>/run.json, or a storage root holding one job")
    p_report.add_argument("--out", default=None, help="where to write the page (default: runs/<job>/report.html)")
    p_report.add_argument("--endpoint-url", default=None)
    p_report.add_argument("--region", default=None)
    p_project = sub.add_parser("project", help="per-token projections of a text onto a pair's delta_hat")
    p_project.add_argument("run", help="runs/<job>/run.json (or status.json), or a storage root holding one job")
    p_project.add_argument("pair", help="the pair's name")
    p_project.add_argument("text", help="the text, or a file holding it")
    p_project.add_argument("--layer", type=int, default=None, help="block index (default: the pair's first layer)")
    p_project.add_argument("--out", default=None, help="the HTML snippet (default: ./adl-project-<pair>.html)")
    p_project.add_argument("--endpoint-url", default=None)
    p_project.add_argument("--region", default=None)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "run":
            if args.spec_env:
                return _run(_spec_from_env(args.spec_env))
            if not args.spec:
                parser.error("run: a job spec is required")
            return _run(load_spec(args.spec))
        if args.command == "validate":
            return _validate(args.spec)
        if args.command == "status" and _is_path(args.job_id):
            from jobs.summary import local_status
            print(terminal_safe(local_status(args.job_id, StorageOptions(args.endpoint_url, args.region))))
            return 0
        if args.command in ("submit", "status", "logs", "stop"):
            return _cluster(args)
        if args.command == "demo":
            if args.print_spec:
                import yaml
                # A local root as an absolute path: a spec file's relative paths are read
                # relative to its own folder, `adl demo`'s --root relative to the current one.
                root = args.root if "://" in args.root else os.path.abspath(args.root)
                spec = demo_spec(root, args.num_documents, args.model)
                parse_spec(spec)   # what is printed is what `adl demo` would run
                print(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), end="")
                return 0
            return _run(parse_spec(demo_spec(args.root, args.num_documents, args.model)), report=True)
        if args.command == "report":
            from jobs.report import locate_run, write_report
            store, record = locate_run(args.run, StorageOptions(args.endpoint_url, args.region))
            print(write_report(store, record, args.out))
            return 0
        if args.command == "project":
            return _project(args)
        from jobs.summary import TableView, inspect
        view = None
        if args.json or args.rows is not None or args.columns is not None:
            columns = None if args.columns is None else tuple(c.strip() for c in args.columns.split(",") if c.strip())
            view = TableView(5 if args.rows is None else args.rows, columns, args.json)
        print(terminal_safe(inspect(args.path, StorageOptions(args.endpoint_url, args.region), view)))
        return 0
    except INPUT_ERRORS as e:
        # Masked here, at the edge: storage's messages may quote an endpoint with its key.
        print(f"adl: error: {terminal_safe(one_line(e, typed=False))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise   # the reader of stdout went away (main)
    except OSError as e:   # reading what PATH names: an endpoint that does not answer, a network down
        if args.command not in ("inspect", "report", "project"):
            raise
        print(f"adl: error: {terminal_safe(args.path if args.command == 'inspect' else args.run)}: cannot read: "
              f"{terminal_safe(one_line(e, typed=False))}", file=sys.stderr)
        return 2


def _is_path(job: str) -> bool:
    """`adl status` names a local run (or a storage URI) rather than a Ray job id: Ray's ids
    hold no "/" and no ".json" (a bare name: a local folder holding runs/)."""
    return "/" in job or job.endswith(".json") or job in (".", "..") or os.path.isdir(os.path.join(job, "runs"))


def _validate(path: str) -> int:
    """`adl validate`: the spec and every check `adl run` makes before its first write
    (jobs/driver.preflight); one line, exit 0."""
    from jobs.driver import preflight
    spec = load_spec(path)
    store, plan = preflight(spec)
    layers = sorted({layer for p in plan.pairs for layer in p.layers})
    print(terminal_safe(f"{path}: valid: job {spec.name!r}, {len(plan.pairs)} pair{'s' * (len(plan.pairs) != 1)}, "
          f"{len(plan.sets)} activation sets, layers {', '.join(map(str, layers))}; storage {store.uri()}"))
    return 0


def _project(args) -> int:
    from jobs.project import SNIPPET_SIGNATURE, lines, project, read_text, snippet
    from jobs.report import locate_run
    from storage import layout
    text = read_text(args.text)
    options = StorageOptions(args.endpoint_url, args.region)
    store, record = locate_run(args.run, options)
    result = project(store, record, args.pair, text, args.layer)
    print("\n".join(lines(result)))
    out = args.out if args.out is not None else f"adl-project-{layout.slug(args.pair)}.html"
    print(f"snippet: {write_file(out, snippet(result).encode(), options, SNIPPET_SIGNATURE, 'an adl projection snippet')}")
    return 0


def _cluster(args) -> int:
    from jobs import submit
    addr = submit.address(args.address)
    if args.command == "submit":
        from jobs.uploads import UPLOADS_ENV, ship
        spec = load_spec(args.spec)   # bad input fails here, before anything is sent
        env = submit.forwarded(args.env)
        submit.check_storage_reach(spec.storage.root, submit.node_ips(addr), submit.this_machine())
        spec, files = ship(spec)      # local files and folders travel through the storage root
        print(submit.submit(spec, addr, {**env, **({UPLOADS_ENV: json.dumps(files)} if files else {})}))
    elif args.command == "status":
        print(submit.status_text(args.job_id, addr))
    elif args.command == "logs":
        submit.logs(args.job_id, addr, follow=args.follow)
    else:
        submit.stop(args.job_id, addr)
        print(f"{args.job_id}: stop requested")
    return 0


if __name__ == "__main__":
    sys.exit(main())
