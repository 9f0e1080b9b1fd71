"""Readable summaries of what a run produced, for the end of `adl run` and `adl inspect`."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass

from common.errors import one_line
from jobs.attempts import history, history_lines
from storage import layout
from storage.store import StorageError, StorageOptions, Store, key_problem, shown
from storage.tables import CATALOG, DIFFERENCE, GENERATIONS, SIMILARITY, table_kind

TOP = 10
DEFAULT_POSITIONS = [0, 1, 2, 3, 4]


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def read_run_record(store: Store, key: str) -> dict:
    """A run record (runs/<job>/run.json) with the fields its readers use: "job", "spec"
    and "pairs" (each with "name" and "dir"). Anything else is a StorageError naming the
    file, one line."""
    record = store.read_json(key)
    where = store.uri(key)
    if not isinstance(record, dict):
        raise StorageError(f"{where}: not an adl run record (a JSON object), got {_json_type(record)}")
    for field, kind, what in (("job", str, "a string"), ("spec", dict, "an object"), ("pairs", list, "an array")):
        if field not in record:
            raise StorageError(f"{where}: not an adl run record: no {field!r}")
        if not isinstance(record[field], kind):
            raise StorageError(f"{where}: {field!r} must be {what}, got {_json_type(record[field])}")
    for i, pair in enumerate(record["pairs"]):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) for k in ("name", "dir")):
            raise StorageError(f"{where}: pairs[{i}] must be an object with \"name\" and \"dir\" strings")
        if not pair["dir"].startswith("pairs/") or key_problem(pair["dir"].rstrip("/")):
            raise StorageError(f"{where}: pairs[{i}].dir must be a folder under pairs/ of this root, "
                               f"got {shown(pair['dir'])}")
    spec = record["spec"]
    for section in ("method", "generation", "analyses", "agent"):
        if not isinstance(spec.get(section, {}), dict):
            raise StorageError(f"{where}: spec.{section} must be an object, got {_json_type(spec[section])}")
    if not isinstance(spec.get("pairs", []), list) or not all(isinstance(p, dict) for p in spec.get("pairs", [])):
        raise StorageError(f"{where}: spec.pairs must be an array of objects")
    positions = spec.get("method", {}).get("positions", DEFAULT_POSITIONS)
    if not isinstance(positions, list) or not all(isinstance(p, int) for p in positions):
        raise StorageError(f"{where}: spec.method.positions must be an array of integers")
    return record


def read_status_record(store: Store, key: str) -> dict:
    """A status record (runs/<job>/status.json): an object with a "state" string, and
    "counts" and "pairs" objects where present."""
    status = store.read_json(key)
    where = store.uri(key)
    if not isinstance(status, dict):
        raise StorageError(f"{where}: not an adl status record (a JSON object), got {_json_type(status)}")
    if not isinstance(status.get("state"), str):
        raise StorageError(f"{where}: not an adl status record: no \"state\" string")
    for field in ("counts", "pairs", "work"):
        if not isinstance(status.get(field, {}), dict):
            raise StorageError(f"{where}: {field!r} must be an object, got {_json_type(status[field])}")
    for name, pair in status.get("pairs", {}).items():
        if not isinstance(pair, dict) or not isinstance(pair.get("state"), str) \
                or not isinstance(pair.get("stages", {}), dict):
            raise StorageError(f"{where}: pairs[{name!r}] must be an object with a \"state\"")
    return status


def _token(t: str) -> str:
    return repr(t)[1:-1] if t.strip() == t and t else repr(t)


def pair_summary(store: Store, pair: dict, positions: list[int], top: int = TOP) -> list[str]:
    from jobs.results import PairResults
    lines = [f"pair {pair['name']}  ({store.uri(pair['dir'])})"]
    results = PairResults(store, pair["dir"])
    if not results.complete:
        return lines + ["  incomplete: no results yet"]
    d = results.norms()
    lens = results.lens_top("delta", top)
    for layer in sorted(d.layer.unique()):
        at_layer = d[d.layer == layer]
        lines.append(f"  layer {layer}: {int(at_layer.num_documents.iloc[0])} documents, "
                     f"finetuned norm {at_layer.finetuned_norm.iloc[0]:.2f}")
        for pos in positions:
            row = at_layer[at_layer.position == pos]
            if row.empty:
                continue
            toks = lens[(lens.layer == layer) & (lens.position == pos)]
            words = " ".join(_token(t) for t in toks.token)
            lines.append(f"    pos {pos} |delta| {row.delta_norm.iloc[0]:8.3f}  lens: {words}")
    gens = results.table(GENERATIONS)
    if gens is not None:
        lines += _generation_lines(gens)
    lines += [f"  NO RESULT layer {layer} pos {pos}: {what}"
              for (layer, pos), whats in results.no_results().items() for what in whats]
    lines += _analyses_lines(results, top)
    return lines


def _analyses_lines(results, top: int) -> list[str]:
    """Patchscope of delta at the grader's scale, the relevance metrics, and the
    similarities to the finetuning data, where the run has them."""
    lines = []
    chosen = results.chosen_patchscope("delta", top)
    if chosen is not None:
        lines.append("  patchscope of delta at the grader's scale:")
        for (layer, pos), group in chosen.groupby(["layer", "position"]):
            words = " ".join(_token(t) for t in group.sort_values("rank").token)
            lines.append(f"    layer {layer} pos {pos} scale {group.scale.iloc[0]:g}: {words}")
    relevance = results.json(layout.TOKEN_RELEVANCE_JSON)
    if relevance is not None and relevance["status"] == "skipped":
        lines.append(f"  token relevance: skipped ({relevance['reason']})")
    elif relevance is not None:
        lines.append("  token relevance (fraction relevant / probability-weighted / already frequent):")
        for m in relevance["metrics"]:
            two = lambda v: "none labelled" if v is None else f"{v:.2f}"
            lines.append(f"    layer {m['layer']} pos {m['position']} {m['source']:10s} "
                         f"{two(m['fraction_relevant'])} / {two(m['weighted_fraction_relevant'])} / "
                         f"{m['fraction_frequent']:.2f}")
    sim = results.table(SIMILARITY)
    if sim is not None:
        to_ft = sim[sim.set_b == "finetune_data"]
        lines.append("  embedding similarity to the finetuning data:")
        for (layer, pos), group in to_ft.groupby(["layer", "position"]):
            values = "  ".join(f"{r.set_a} {r.similarity:.3f}" for r in group.itertuples())
            lines.append(f"    layer {layer} pos {pos}: {values}")
    groups = results.agent_groups()
    if groups is not None:
        lines.append("  interpretability agent, mean grade 1-5 (graded/runs): " + ", ".join(
            f"{g['agent']} budget {g['budget']} "
            f"{'-' if g['mean_grade'] is None else format(g['mean_grade'], '.2f')} ({g['graded']}/{g['runs']})"
            for g in groups))
    return lines


def _clip(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _generation_lines(gens) -> list[str]:
    """Per steered (layer, position): alpha, and the first prompt's first steered sample
    beside the finetuned model's unsteered sample of the same prompt."""
    lines = ["  steered vs unsteered (finetuned model, first prompt, first sample):"]
    unsteered = gens[(gens.kind == "baseline") & (gens.model_role == "finetuned")]
    steered = gens[gens.kind == "steered"]
    if steered.empty:
        return ["  no steered samples"]
    first = steered.prompt_id.min()
    plain = unsteered[(unsteered.prompt_id == first) & (unsteered.sample_index == 0)].text
    lines.append(f"    prompt: {_clip(steered[steered.prompt_id == first].prompt.iloc[0])}")
    lines.append(f"    unsteered:           {_clip(plain.iloc[0]) if len(plain) else '-'}")
    for (layer, pos), group in steered[steered.prompt_id == first].groupby(["layer", "position"]):
        sample = group.sort_values("sample_index").iloc[0]
        lines.append(f"    layer {int(layer)} pos {int(pos)} a={sample.alpha:5.2f}: {_clip(sample.text)}")
    return lines


def status_lines(status: dict, where: str = "") -> list[str]:
    """The status record (runs/<job>/status.json) in a few lines: counts, then any pair
    that is not done, with its error."""
    c = status.get("counts", {})
    lines = [f"status {status['state']}: {c.get('done', 0)}/{c.get('pairs', 0)} pairs done "
             f"({c.get('skipped', 0)} from earlier runs), {c.get('failed', 0)} failed, "
             f"{c.get('running', 0)} running, {c.get('pending', 0)} pending; activation sets "
             f"{c.get('activation_sets_done', 0)}/{c.get('activation_sets', 0)}; "
             f"{status.get('seconds', 0):.0f} s, {status.get('gpu_hours', 0):.4f} GPU-hours"
             + (f"  ({where})" if where else "")]
    work = status.get("work") or {}
    if work:
        lines.append("  work: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(work.items())))
    loads = status.get("loads") or []
    if loads:
        runtimes: dict[str, int] = {}
        for entry in loads:
            runtimes[entry["runtime"]] = runtimes.get(entry["runtime"], 0) + entry["loads"]
        lines.append("  model loads by runtime: " + ", ".join(f"{r} {n}" for r, n in sorted(runtimes.items()))
                     + f" ({len(loads)} distinct model and runtime pairs)")
    llm = status.get("llm") or {}
    if llm:
        lines.append(f"  LLM endpoint (agent stages): {llm.get('calls', 0)} calls "
                     f"({llm.get('grader_calls', 0)} grading), {llm.get('total_tokens', 0)} tokens")
    for reload in status.get("reloads") or []:
        lines.append(f"  reloaded {reload['model']}: it had been {reload['why']}")
    for name, pair in status.get("pairs", {}).items():
        if pair["state"] == "done":
            continue
        stages = ", ".join(f"{s} {v.get('state') if isinstance(v, dict) else v}"
                           for s, v in pair.get("stages", {}).items())
        lines.append(f"  pair {name}: {pair['state']}" + (f": {pair['error']}" if pair.get("error") else "")
                     + f"  [{stages}]")
    if status.get("error"):
        lines.append(f"  job error: {status['error']}")
    return lines


def run_summary(store: Store, record_key: str, top: int = TOP) -> str:
    record = read_run_record(store, record_key)
    positions = record["spec"].get("method", {}).get("positions", DEFAULT_POSITIONS)
    lines = [f"job {record['job']}  ({store.uri(record_key)})"]
    status_key = layout.run_status(record["job"])
    try:
        status = read_status_record(store, status_key) if store.exists(status_key) else None
    except StorageError as e:   # the rest of the run is still worth showing
        status = None
        lines.append(f"status: damaged, not shown: {one_line(e, typed=False)}")
    if status:
        lines += status_lines(status)
    attempts = history(store, record["job"])
    if attempts:
        lines.append(f"run history ({len(attempts)} attempts, newest first; status above: the latest that did work):")
        lines += history_lines(attempts)
    catalog = layout.run_catalog(record["job"])
    if store.exists(catalog):
        rows = store.read_table(catalog, CATALOG, ["pair"]).num_rows
        lines.append(f"catalog: {store.uri(catalog)} ({rows} rows: pair x layer x position)")
    lines.append(f"logit lens of delta (finetuned - base), top {top} tokens per position:")
    for pair in record["pairs"]:
        try:
            lines += pair_summary(store, pair, positions, top)
        except StorageError as e:   # one damaged pair: the others are still shown
            lines += [f"pair {pair['name']}  ({store.uri(pair['dir'])})",
                      f"  damaged, not shown: {one_line(e, typed=False)}; a rerun of the job repairs it"]
    return "\n".join(lines)


def _local(path: str) -> str:
    """A local path made absolute (so "pairs/<dir>", "." or "run.json" read the same from
    any folder); a URI (s3://...) as it is."""
    return path if "://" in path else os.path.abspath(path)


@dataclass(frozen=True)
class TableView:
    """How `adl inspect` dumps a table: rows (0: all), columns (None: all), JSON Lines."""
    rows: int = 5
    columns: tuple[str, ...] | None = None
    json: bool = False


_C1 = re.compile(r"[\x7f-\x9f]")


def _jsonable(value):
    """A row's value for JSON: NaN and infinities as null (JSON has neither), bytes as hex,
    dates and the like as their text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _json_line(row: dict) -> str:
    """One row as one line of JSON: tokens readable as they are, with every control
    character escaped (json escapes those below 0x20; DEL and C1 here), so that the line
    is safe on a terminal and stays valid JSON."""
    text = json.dumps(_jsonable(row), ensure_ascii=False, allow_nan=False)
    return _C1.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def table_dump(path: str, options: StorageOptions | None = None, view: TableView = TableView()) -> str:
    """A .parquet table: its kind, row count, schema, metadata and first rows, in lines no
    wider than the terminal; or, with view.json, its rows as JSON Lines (one object a row)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    table = Store.from_uri(parent or ".", options).read_table(name)
    if view.columns is not None:
        unknown = [c for c in view.columns if c not in table.schema.names]
        if unknown:
            raise StorageError(f"--columns: {path} has no column {unknown[0]!r} "
                               f"(it has {', '.join(table.schema.names)})")
        table = table.select(list(view.columns))
    shown_rows = table if view.rows == 0 else table.slice(0, view.rows)
    if view.json:
        return "\n".join(_json_line(row) for row in shown_rows.to_pylist())
    meta = {k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in (table.schema.metadata or {}).items()}
    width = shutil.get_terminal_size((120, 24)).columns
    head = shown_rows.to_pandas().to_string(max_colwidth=40, line_width=width)
    more = f"\n({table.num_rows - shown_rows.num_rows} more rows; --rows N, or --rows 0 for all)" \
        if shown_rows.num_rows < table.num_rows else ""
    return (f"{path}: {table_kind(table)} table, {table.num_rows} rows\n"
            f"{table.schema.to_string(show_schema_metadata=False)}\nmetadata: {_clip(str(meta), width)}\n{head}{more}")


def inspect(path: str, options: StorageOptions | None = None, view: TableView | None = None) -> str:
    """What lives at path: a storage root (its runs), a run.json, a pair folder, or one table.
    view: how to dump a table (only a .parquet path takes one)."""
    if path.endswith(".parquet"):
        return table_dump(path, options, view or TableView())
    if view is not None:
        raise StorageError(f"{path}: --json, --rows and --columns dump a table (a .parquet path)")
    path = _local(path)
    store = Store.from_uri(path, options)
    if path.endswith("/status.json"):
        return "\n".join(status_lines(read_status_record(Store.from_uri(path.rpartition("/")[0] or ".", options),
                                                 "status.json"), path))
    if path.endswith("run.json"):   # <root>/runs/<job>/run.json; "runs/..." has the current folder as root
        root, sep, rel = path.rpartition("/runs/")
        if not sep or rel.count("/") != 1:
            raise StorageError(f"{path}: a run record lives at <root>/runs/<job>/run.json")
        return run_summary(Store.from_uri(root, options), f"runs/{rel}")
    if store.exists("manifest.json") and store.exists(DIFFERENCE.file):
        root, sep, rel = path.rstrip("/").rpartition("/pairs/")
        if not sep or "/" in rel:
            raise StorageError(f"{path}: a pair's results live at <root>/pairs/<pair folder>")
        manifest = store.read_json("manifest.json")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("pair"), str):
            raise StorageError(f"{store.uri('manifest.json')}: not an adl pair manifest (no \"pair\" name)")
        return "\n".join(pair_summary(Store.from_uri(root, options),
                                      {"name": manifest["pair"], "dir": f"pairs/{rel}"}, [0, 1, 2, 3, 4]))
    records = [k for k in store.list("runs") if k.endswith("/run.json")]
    if not records:
        raise FileNotFoundError(f"{path}: no adl runs, pair results or tables here")
    return "\n\n".join(run_summary(store, k) for k in records)


def local_status(path: str, options: StorageOptions | None = None) -> str:
    """`adl status` for a run on storage, as it reads a submitted job's record: a
    status.json path, a run.json path (the status record beside it), or a storage root
    (each of its jobs)."""
    clean = _local(path).rstrip("/")
    if clean.endswith(("/status.json", "/run.json")):
        folder = clean.rpartition("/")[0]
        store, keys = Store.from_uri(folder, options), ["status.json"]
    else:
        store = Store.from_uri(clean, options)
        folders = {k.rpartition("/")[0] for k in store.list("runs")
                   if k.count("/") == 2 and k.endswith(("/run.json", "/status.json"))}
        if not folders:
            raise FileNotFoundError(f"{path}: no adl run here (runs/<job>/status.json)")
        keys = [f"{f}/status.json" for f in sorted(folders)]
    out = []
    for key in keys:
        if not store.exists(key):
            if len(keys) == 1:
                raise FileNotFoundError(f"{store.uri(key)}: no status record")
            out.append(f"status not written yet  ({store.uri(key)})")
            continue
        out += status_lines(read_status_record(store, key), store.uri(key))
    return "\n".join(out)
