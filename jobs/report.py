"""The analysts' report: one self-contained HTML page per job, built from its tables.

The page opens offline: CSS inline, charts as inline SVG, no script, no external fetch;
`<details>` expands what is long. Every string that a model produced (tokens, samples)
or a user wrote (names, prompts, descriptions) goes through esc (jobs/page.py): a token may be
'<', '&' or '</script>'. It reads tables only and never touches a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from common.errors import one_line
from jobs.page import CSS, anchor, chips, esc, fmt, note, tok
from jobs.report_agent import agent_index_section, agent_pair_section
from jobs.results import PairResults
from jobs.triage import RATIO_POSITIONS, pair_triage
from jobs.summary import read_run_record
from storage import layout
from storage.store import StorageError, StorageOptions, Store, write_file
from storage.tables import AGENT, GENERATIONS, LOGIT_LENS, PATCHSCOPE, SIMILARITY, STEERING, TOKEN_RELEVANCE

TOP = 20                # tokens shown per list (the method grades the top 20)
HEADLINE_TOKENS = 8     # tokens per layer in the index
SAMPLES_SHOWN = 2       # samples per prompt and side
CLIP = 280              # characters of a sample shown before it expands
# What every report page holds in its first bytes: `--out` replaces only a file holding it.
PAGE_SIGNATURE = b"<title>adl report: "


class ReportError(ValueError):
    """RUN names no single job's run record."""


# -- finding the run --------------------------------------------------------------------
def locate_run(path: str, options: StorageOptions | None = None) -> tuple[Store, str]:
    """(store at the storage root, run record key) for a run.json path or URI, or for a
    storage root that holds exactly one job."""
    clean = path.rstrip("/") or "."
    if clean.endswith("/status.json") or clean == "status.json":
        # a running job's status record: its run record lies beside it (written first)
        beside = clean[: -len("status.json")] + "run.json"
        try:
            return locate_run(beside, options)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no run record beside this status record ({beside})") from None
    try:
        if clean.endswith("run.json"):
            # <root>/runs/<job>/run.json; a relative "runs/..." has the current folder as root
            root, sep, rel = ("./" + clean if clean.startswith("runs/") else clean).rpartition("/runs/")
            if not sep or rel.count("/") != 1:
                raise ReportError(f"{path}: a run record lives at <root>/runs/<job>/run.json")
            store, key = Store.from_uri(root, options), f"runs/{rel}"
            if not store.exists(key):
                raise FileNotFoundError(f"{path}: no such run record")
            read_run_record(store, key)
            return store, key
        store = Store.from_uri(clean, options)
        records = [k for k in store.list("runs") if k.endswith("/run.json") and k.count("/") == 2]
    except (ReportError, FileNotFoundError, StorageError):
        raise
    except OSError as e:
        raise StorageError(f"{path}: cannot read: {one_line(e, typed=False)}") from None
    if not records:
        raise FileNotFoundError(f"{path}: no adl run record here (runs/<job>/run.json)")
    if len(records) > 1:
        jobs = ", ".join(k.split("/")[1] for k in records)
        raise ReportError(f"{path}: holds {len(records)} jobs ({jobs}); name one: {clean}/{records[0]}")
    read_run_record(store, records[0])
    return store, records[0]


# -- reading a pair's tables ------------------------------------------------------------
@dataclass
class PairData:
    name: str
    dir: str
    uri: str
    spec: dict                       # the pair's entry in the spec
    complete: bool
    lens: pd.DataFrame | None = None
    difference: pd.DataFrame | None = None
    patchscope: pd.DataFrame | None = None
    generations: pd.DataFrame | None = None
    steering: pd.DataFrame | None = None
    similarity: pd.DataFrame | None = None
    relevance: pd.DataFrame | None = None
    relevance_status: dict | None = None
    agent: pd.DataFrame | None = None
    transcripts: dict = field(default_factory=dict)   # transcript path -> its record (or None)
    results: PairResults | None = None
    state: dict = field(default_factory=lambda: {"state": "pending", "error": None})   # the job's view of it
    notes: dict = field(default_factory=dict)    # stage -> why it is not shown
    no_results: dict = field(default_factory=dict)   # (layer, position) -> what ran but found nothing


def load_pair(store: Store, pair: dict, spec: dict) -> PairData:
    d = pair["dir"]
    spec_pair = next((p for p in spec.get("pairs", []) if p.get("name") == pair["name"]), {})
    results = PairResults(store, d)
    data = PairData(pair["name"], d, store.uri(d), spec_pair, results.complete)
    data.results = results
    data.lens = results.table(LOGIT_LENS)
    data.difference = results.norms()
    data.patchscope = results.table(PATCHSCOPE)
    data.generations = results.table(GENERATIONS)
    data.steering = results.table(STEERING)
    data.similarity = results.table(SIMILARITY)
    data.relevance = results.table(TOKEN_RELEVANCE)
    data.relevance_status = results.json(layout.TOKEN_RELEVANCE_JSON)
    data.agent = results.table(AGENT)
    data.no_results = results.no_results()
    if data.agent is not None:
        data.agent = data.agent.astype(object).where(data.agent.notna(), None)   # nulls as None, not NaN
        for path in data.agent.transcript.dropna():
            data.transcripts[path] = store.read_json_or_none(f"{d}/{path}")
    elif spec.get("agent", {}).get("enabled"):
        data.notes["agent"] = f"did not run: no {AGENT.file} for this pair"

    generation_on = bool(spec.get("generation", {}).get("enabled"))
    no_generation = "did not run: the job spec has no generation section"
    if data.lens is None:
        data.notes["logit lens"] = "not written yet: the pair's results are incomplete"
    if data.patchscope is None:
        data.notes["patchscope"] = f"did not run: no {PATCHSCOPE.file} for this pair"
    if data.generations is None:
        data.notes["generations"] = no_generation if not generation_on else f"did not run: no {GENERATIONS.file}"
    if data.steering is None:
        data.notes["steering"] = no_generation if not generation_on else f"did not run: no {STEERING.file}"
    if data.similarity is None:
        data.notes["similarity"] = (no_generation + " (similarity embeds the generations)" if not generation_on
                                    else f"did not run: no {SIMILARITY.file} for this pair")
    status = data.relevance_status
    if status and status.get("status") == "skipped":
        data.notes["token relevance"] = f"skipped: {status.get('reason') or 'no reason recorded'}"
    elif data.relevance is None:
        data.notes["token relevance"] = f"did not run: no {TOKEN_RELEVANCE.file} for this pair"
    return data


def _load_or_damaged(store: Store, pair: dict, spec: dict) -> PairData:
    """The pair's data; a pair whose files cannot be read is shown as damaged, naming the
    file and why, and the page goes on with the others."""
    try:
        return load_pair(store, pair, spec)
    except (StorageError, OSError) as e:
        spec_pair = next((p for p in spec.get("pairs", []) if p.get("name") == pair["name"]), {})
        data = PairData(pair["name"], pair["dir"], store.uri(pair["dir"]), spec_pair, False)
        data.notes["damaged"] = f"not shown: {one_line(e, typed=False)}; a rerun of the job repairs it"
        return data


def _targets(data: PairData) -> list[tuple[int, int]]:
    """The (layer, position)s the pair was analysed at, from its logit lens."""
    if data.lens is None:
        return []
    keys = data.lens[["layer", "position"]].drop_duplicates()
    return sorted((int(r.layer), int(r.position)) for r in keys.itertuples())


def _at(df: pd.DataFrame | None, layer: int, position: int) -> pd.DataFrame | None:
    if df is None:
        return None
    return df[(df.layer == layer) & (df.position == position)]


# -- charts (inline SVG) --------------------------------------------------------------------
SET_LABELS = {"steered": "steered", "unsteered": "unsteered (finetuned)", "base": "base model",
              "finetune_data": "finetuning data", "generic_chat": "generic chat"}


SET_ORDER = ("steered", "unsteered", "base", "generic_chat", "finetune_data")


def _set_pair_order(row) -> tuple:
    """Comparisons with the finetuning data first (steered, unsteered, base, generic):
    they carry the method's claim."""
    rank = lambda name: SET_ORDER.index(name) if name in SET_ORDER else len(SET_ORDER)
    sets = {row.set_a, row.set_b}
    return (0 if "finetune_data" in sets else 1, sorted(rank(n) for n in sets), row.set_a, row.set_b)


def similarity_chart(rows: pd.DataFrame) -> str:
    rows = sorted(rows.itertuples(), key=_set_pair_order)
    if not rows:
        return '<p class="none">no similarities at this layer and position</p>'
    values = [float(r.similarity) for r in rows]
    lo, hi = min(0.0, min(values)), max(1.0, max(values))
    label_w, bar_w, row_h = 260, 320, 22
    width, height = label_w + bar_w + 60, row_h * len(rows) + 10
    x = lambda v: label_w + (v - lo) / (hi - lo) * bar_w
    parts = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>embedding similarity of generation sets</title>']
    for i, (r, v) in enumerate(zip(rows, values)):
        y = 5 + i * row_h
        key = "finetune_data" in (r.set_a, r.set_b) and bool({"steered", "unsteered"} & {r.set_a, r.set_b})
        label = f"{SET_LABELS.get(r.set_a, r.set_a)} · {SET_LABELS.get(r.set_b, r.set_b)}"
        x0, x1 = sorted((x(0.0), x(v)))
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{esc(label)}</text>'
                     f'<rect class="{"bar key" if key else "bar"}" x="{x0:.1f}" y="{y + 3}" '
                     f'width="{max(x1 - x0, 0.5):.1f}" height="{row_h - 6}"><title>{esc(label)}: {v:.4f}</title></rect>'
                     f'<text x="{max(x1, x(0.0)) + 4:.1f}" y="{y + 15}">{v:.3f}</text>')
    parts.append(f'<line class="axis" x1="{x(0.0):.1f}" y1="0" x2="{x(0.0):.1f}" y2="{height}"/></svg>')
    return "".join(parts)


def steering_chart(rows: pd.DataFrame, pass_fraction: float | None) -> str:
    """The strength search: coherent fraction of every strength tried, per prompt."""
    trials = [(i, t["strength"], t["coherent_fraction"]) for i, r in enumerate(rows.itertuples())
              for t in (r.trials if r.trials is not None else [])]
    if not trials:
        return ""
    width, height, pad = 420, 160, 34
    top = max(s for _, s, _ in trials) or 1.0
    x = lambda s: pad + s / top * (width - pad - 10)
    y = lambda f: height - pad + 10 - f * (height - pad - 10)
    parts = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>strength search: coherent fraction per strength</title>',
             f'<line class="axis" x1="{pad}" y1="{y(0)}" x2="{width - 10}" y2="{y(0)}"/>'
             f'<line class="axis" x1="{pad}" y1="{y(0)}" x2="{pad}" y2="{y(1)}"/>'
             f'<text x="{pad - 4}" y="{y(1) + 4}" text-anchor="end">1</text>'
             f'<text x="{pad - 4}" y="{y(0) + 4}" text-anchor="end">0</text>'
             f'<text x="{width - 10}" y="{height - 4}" text-anchor="end">strength (max {top:g})</text>']
    if pass_fraction is not None:
        parts.append(f'<line class="pass" x1="{pad}" y1="{y(pass_fraction):.1f}" x2="{width - 10}" '
                     f'y2="{y(pass_fraction):.1f}"><title>pass fraction {pass_fraction:g}</title></line>'
                     f'<text x="{width - 10}" y="{y(pass_fraction) - 4:.1f}" text-anchor="end">pass {pass_fraction:g}</text>')
    for i, s, f in trials:
        parts.append(f'<circle class="p{i % 4}" cx="{x(s):.1f}" cy="{y(f):.1f}" r="3.5">'
                     f'<title>prompt {i + 1}: strength {s:.3f}, coherent {f:.2f}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


# -- sections -------------------------------------------------------------------------------
def lens_section(data: PairData, layer: int, position: int) -> str:
    rows = _at(data.lens, layer, position)
    top = rows[rows["rank"] < TOP]
    controls = "".join(
        f"<h5>{esc(label)}</h5>{chips(top[top.variant == variant])}"
        for variant, label in (("neg_delta", "−delta"), ("base_mean", "base mean"),
                               ("finetuned_mean", "finetuned mean"))
        if (top.variant == variant).any())
    return (f"<h4>Logit lens of delta (top {TOP})</h4>{chips(top[top.variant == 'delta'], name='lens-delta')}"
            f"<details><summary>controls: −delta and the models' mean activations</summary>{controls}</details>")


def patchscope_section(data: PairData, layer: int, position: int) -> str:
    head = "<h4>Patchscope</h4>"
    if data.patchscope is None:
        return head + note(data.notes["patchscope"])
    rows = _at(data.patchscope, layer, position)

    def chosen(variant):
        at = rows[(rows.variant == variant) & rows.chosen]
        return at[at["rank"] < TOP]

    coherent = lambda r: (" coherent", " <span class=\"mark\">✓</span>") if r.coherent else ("", "")
    delta = chosen("delta")
    if delta.empty:
        body = note("no scale was chosen for delta here (the grader gave no answer)")
    else:
        body = (f'<p>chosen scale <b>{float(delta.scale.iloc[0]):g}</b>; '
                f'<span class="chip coherent">✓</span> marks the grader\'s coherent tokens</p>'
                + chips(delta, coherent, name="patchscope-delta"))
    controls = "".join(
        f"<h5>{esc(label)} (scale {float(c.scale.iloc[0]):g})</h5>{chips(c, coherent)}"
        for variant, label in (("base_mean", "base mean"), ("finetuned_mean", "finetuned mean"))
        if not (c := chosen(variant)).empty)
    scales = rows[rows.variant == "delta"]
    table = "".join(
        f"<tr><td>{scale:g}</td><td>{chips(group[group['rank'] < 8])}</td></tr>"
        for scale, group in scales.groupby("scale"))
    return (head + body
            + (f"<details><summary>controls: the models' mean activations</summary>{controls}</details>"
               if controls else "")
            + (f"<details><summary>every scale (top 8)</summary><table class=\"scales\">"
               f"<tr><th>scale</th><th>tokens</th></tr>{table}</table></details>" if table else ""))


def steering_section(data: PairData, layer: int, position: int, spec: dict) -> str:
    head = "<h4>Steering strength</h4>"
    if data.steering is None:
        return head + note(data.notes["steering"])
    rows = _at(data.steering, layer, position).sort_values("prompt_id")
    if rows.empty:
        return head + note("no strength search at this layer and position")
    pass_fraction = spec.get("generation", {}).get("search", {}).get("pass_fraction")
    tried = _no_strength(data).get((layer, position))
    if tried is not None:
        return (head + note("no coherent strength found: no strength tried (" + ", ".join(f"{a:.3g}" for a in tried)
                            + ") passed for any prompt; this vector has no alpha and no steered samples")
                + steering_chart(rows, pass_fraction))
    table = "".join(f"<tr><td>{esc(r.prompt)}</td><td>{fmt(r.threshold)}</td>"
                    f"<td>{len(r.trials) if r.trials is not None else 0}</td></tr>"
                    for r in rows.itertuples())
    return (f"{head}<p>alpha <b>{fmt(float(rows.alpha.iloc[0]))}</b> (the mean of the thresholds)</p>"
            f"<table><tr><th>threshold prompt</th><th>threshold</th><th>strengths tried</th></tr>{table}</table>"
            f'<p class="legend">the search: coherent fraction of each strength tried, one colour per prompt</p>'
            f"{steering_chart(rows, pass_fraction)}")


def _no_strength(data: PairData) -> dict:
    """(layer, position) -> strengths tried, where the steering search found none."""
    return data.results.no_strength() if data.results is not None else {}


def sample(text: str) -> str:
    text = str(text).strip()   # leading newlines of a chat answer only push it down
    if len(text) <= CLIP:
        return f'<div class="sample">{esc(text)}</div>'
    return (f'<details class="sample"><summary>{esc(text[:CLIP])}…</summary>'
            f'<div class="full">{esc(text)}</div></details>')


def samples_section(data: PairData, layer: int, position: int) -> str:
    head = "<h4>Steered and unsteered samples</h4>"
    if data.generations is None:
        return head + note(data.notes["generations"])
    gens = data.generations
    steered = _at(gens[gens.kind == "steered"], layer, position)
    unsteered = gens[(gens.kind == "baseline") & (gens.model_role == "finetuned")]
    if steered.empty:
        if (layer, position) in _no_strength(data):
            return head + note("no steered samples: the steering search found no coherent strength here")
        return head + note("no steered samples at this layer and position")
    alpha = float(steered.alpha.iloc[0])
    rows = []
    for prompt_id, group in steered.groupby("prompt_id"):
        plain = unsteered[unsteered.prompt_id == prompt_id].sort_values("sample_index")
        cells = ["".join(sample(t) for t in g.sort_values("sample_index").text.iloc[:SAMPLES_SHOWN]) or "–"
                 for g in (group, plain)]
        rows.append(f'<tr><td class="prompt">{esc(group.prompt.iloc[0])}</td><td>{cells[0]}</td><td>{cells[1]}</td></tr>')
    return (f"{head}<details open><summary>{len(rows)} prompts, {SAMPLES_SHOWN} samples each; "
            f"longer samples expand</summary><table class=\"samples\"><tr><th>prompt</th>"
            f"<th>steered (alpha {alpha:.3g})</th><th>unsteered (finetuned model)</th></tr>{''.join(rows)}"
            f"</table></details>")


def similarity_section(data: PairData, layer: int, position: int) -> str:
    head = "<h4>Embedding similarity</h4>"
    if data.similarity is None:
        return head + note(data.notes["similarity"])
    return (head + '<p class="legend">dot product of the sets\' mean normalized embeddings; '
            'highlighted: steered and unsteered against the finetuning data</p>'
            + similarity_chart(_at(data.similarity, layer, position)))


def relevance_section(data: PairData, layer: int, position: int) -> str:
    head = "<h4>Token relevance</h4>"
    if "token relevance" in data.notes:
        return head + note(data.notes["token relevance"])
    metrics = [m for m in (data.relevance_status or {}).get("metrics", [])
               if m.get("layer") == layer and m.get("position") == position]
    table = "".join(f"<tr><td>{esc(m.get('source'))}</td><td>{fmt(m.get('fraction_relevant'), 2)}</td>"
                    f"<td>{fmt(m.get('weighted_fraction_relevant'), 2)}</td><td>{fmt(m.get('fraction_frequent'), 2)}</td></tr>"
                    for m in metrics)
    out = head + (f"<table><tr><th>tokens of</th><th>relevant</th><th>probability-weighted</th>"
                  f"<th>among frequent finetuning tokens</th></tr>{table}</table>" if table
                  else note("no metrics recorded at this layer and position"))
    if data.relevance is None:
        return out
    rows = _at(data.relevance, layer, position)
    marks = lambda r: ((" relevant" if r.relevant else "") + (" frequent" if r.frequent else ""),
                       (' <span class="mark">✓</span>' if r.relevant else "")
                       + (' <span class="mark">F</span>' if r.frequent else ""))
    for source, group in rows.groupby("source"):
        labels = "".join(f"<tr><td>{int(r.rank)}</td><td>{tok(r.token)}</td><td>{r.probability:.3f}</td>"
                         f"<td>{'yes' if r.relevant else 'no'}</td><td>{'yes' if r.frequent else 'no'}</td>"
                         f"<td>{esc(', '.join(r.labels if r.labels is not None else []))}</td></tr>"
                         for r in group.sort_values("rank").itertuples())
        out += (f"<h5>{esc(source)} tokens (✓ relevant by all three rotations, F frequent)</h5>"
                f"{chips(group, marks)}<details><summary>labels of the three rotations</summary>"
                f"<table><tr><th>rank</th><th>token</th><th>p</th><th>relevant</th><th>frequent</th>"
                f"<th>labels</th></tr>{labels}</table></details>")
    return out


def pair_section(data: PairData, spec: dict) -> str:
    models = _models(data.spec)
    desc = data.spec.get("description")
    stages = "".join(f"<li><b>{esc(stage)}</b>: {esc(why)}</li>" for stage, why in data.notes.items())
    out = [f'<section class="pair" id="{anchor("pair", data.name)}"><h2>pair {esc(data.name)}</h2>',
           f"<p>{esc(models)}</p>",
           f"<p>finetuning domain: {esc(desc)}</p>" if desc else "",
           f'<p class="uri">results: {esc(data.uri)}</p>']
    if data.state.get("state") in ("failed", "running", "pending") and data.state.get("state") != "done":
        out.append(f"<p>state: {_state(data)}</p>")
    if not data.complete:
        out.append(note("incomplete: the pair's manifest is missing, its results are not final"))
    if stages:
        out.append(f'<ul class="stages">{stages}</ul>')
    if data.no_results:
        out.append('<ul class="no-result">' + "".join(
            f'<li><a href="#{anchor("pair", data.name, "L", layer, "P", position)}">layer {layer}, position '
            f"{position}</a>: no result: {esc(what)}</li>"
            for (layer, position), whats in data.no_results.items() for what in whats) + "</ul>")
    norms = data.difference
    for layer in sorted({layer for layer, _ in _targets(data)}):
        out.append(f'<h3 id="{anchor("pair", data.name, "L", layer)}">layer {layer}</h3>')
        for l, position in _targets(data):
            if l != layer:
                continue
            info = _at(norms, layer, position)
            stats = (f" · |delta| {float(info.delta_norm.iloc[0]):.3f}, {int(info.num_documents.iloc[0])} documents"
                     if info is not None and not info.empty else "")
            out.append(
                f'<article class="target" id="{anchor("pair", data.name, "L", layer, "P", position)}">'
                f"<h3>layer {layer}, position {position}<small>{stats}</small></h3>"
                f'<div class="grid"><div>{lens_section(data, layer, position)}</div>'
                f"<div>{patchscope_section(data, layer, position)}</div></div>"
                f'<div class="grid"><div>{steering_section(data, layer, position, spec)}</div>'
                f"<div>{similarity_section(data, layer, position)}</div></div>"
                f"{samples_section(data, layer, position)}"
                f"{relevance_section(data, layer, position)}</article>")
    if not _targets(data):
        out.append(note("no logit lens yet: nothing to show"))
    from jobs.views_html import causal_section
    out.append(causal_section(data.results))
    out.append(agent_pair_section(data))
    out.append("</section>")
    return "".join(out)


def _model_name(source) -> str:
    if isinstance(source, str):
        return source
    if not isinstance(source, dict):
        return "?"
    name = source.get("model") or "?"
    if source.get("revision"):
        name += f"@{source['revision']}"
    if source.get("adapter"):
        name += f" + adapter {source['adapter']}"
    return name


def _models(spec_pair: dict) -> str:
    return f"base {_model_name(spec_pair.get('base'))} → finetuned {_model_name(spec_pair.get('finetuned'))}"


# -- the index ------------------------------------------------------------------------------
def _headline_tokens(data: PairData, layer: int) -> str:
    """The delta lens tokens with the most probability summed over the layer's positions."""
    lens = data.lens
    rows = lens[(lens.layer == layer) & (lens.variant == "delta") & (lens["rank"] < TOP)]
    mass = rows.groupby("token").probability.sum().sort_values(ascending=False).head(HEADLINE_TOKENS)
    return " ".join(tok(t) for t in mass.index)


def _headline_alpha(data: PairData, layer: int) -> str:
    if data.steering is None:
        return '<span class="none">–</span>'
    alphas = data.steering[data.steering.layer == layer].groupby("position").alpha.first().dropna()
    missing = sorted(p for l, p in _no_strength(data) if l == layer)
    marker = (f'<br><span class="no-result">no coherent strength at position{"s" if len(missing) > 1 else ""} '
              f'{", ".join(map(str, missing))}</span>' if missing else "")
    if alphas.empty:
        return '<span class="none">–</span>' + marker
    span = f"{alphas.min():.3g}" if alphas.min() == alphas.max() else f"{alphas.min():.3g} – {alphas.max():.3g}"
    return span + marker


def _headline_similarity(data: PairData, layer: int) -> str:
    by_position = data.results.similarity_to_data() if data.results is not None else None
    at = [v for (l, _), v in (by_position or {}).items() if l == layer]

    def mean(i):
        values = [v[i] for v in at if v[i] is not None]
        return sum(values) / len(values) if values else None

    steered, unsteered = mean(0), mean(1)
    if steered is None and unsteered is None:
        return '<span class="none">–</span>'
    return f"steered {fmt(steered)} vs unsteered {fmt(unsteered)}"


def _triage_cells(t: dict) -> str:
    ratios = " ".join(f"{t['delta_ratio'][p]:.3g}" if p in t.get("delta_ratio", {}) else "–"
                      for p in RATIO_POSITIONS)
    return (f"<td><b>{fmt(t.get('trace_strength'))}</b></td><td><small>{ratios}</small></td>"
            f"<td>{fmt(t.get('mean_steering_uplift'))}</td><td>{fmt(t.get('best_grade'), 2)}</td>")


def _state(data: PairData) -> str:
    state, error = data.state.get("state"), data.state.get("error")
    return f'<span class="state {esc(state)}">{esc(state)}</span>' + (f"<br><small>{esc(error)}</small>"
                                                                          if error else "")


def index_section(pairs: list[PairData]) -> str:
    """One row per (pair, layer), sorted by trace strength (strongest first), a control
    pair first for reference, pairs without results (pending, running, failed) last."""
    entries = []
    for data in pairs:
        triage = pair_triage(data.results) if data.results is not None and data.difference is not None else {}
        layers = sorted({layer for layer, _ in _targets(data)})
        if not layers:
            entries.append((2, 0.0, data, None, {}))
        for layer in layers:
            t = triage.get(layer, {})
            strength = t.get("trace_strength")
            control = bool(data.spec.get("control"))
            entries.append((0 if control else 1, -(strength if strength is not None else -math.inf), data, layer, t))
    entries.sort(key=lambda e: (e[0], e[1]))
    rows = []
    for group, _, data, layer, t in entries:
        name = f'<a href="#{anchor("pair", data.name)}">{esc(data.name)}</a>' + (
            ' <span class="control">control</span>' if data.spec.get("control") else "")
        if layer is None:
            rows.append(f"<tr><td>{name}</td><td>{_state(data)}</td><td>{esc(_models(data.spec))}</td>"
                        f'<td colspan="9" class="none">no results yet</td></tr>')
            continue
        links = " ".join(f'<a href="#{anchor("pair", data.name, "L", layer, "P", p)}">{p}</a>'
                         for l, p in _targets(data) if l == layer)
        rows.append(f'<tr{" class=control" if group == 0 else ""}><td>{name}</td><td>{_state(data)}</td>'
                    f"<td>{esc(_models(data.spec))}</td><td>{layer}</td>{_triage_cells(t)}"
                    f"<td>{_headline_tokens(data, layer)}</td><td>{_headline_alpha(data, layer)}</td>"
                    f"<td>{_headline_similarity(data, layer)}</td><td>{links}</td></tr>")
    return (f'<section id="index"><h2>Pairs</h2>'
            f'<p class="legend">sorted by trace strength (the mean of |delta| / finetuned norm over positions '
            f'1–4; position 0 is often BOS), strongest first; a control pair (finetuned on pretraining-like '
            f'text) first, for reference; steering uplift: similarity of steered minus unsteered samples to '
            f'the finetuning data; best grade: the ADL agent\'s best mean grade over budgets (README, Triage)</p>'
            f'<table class="index"><tr><th>pair</th><th>state</th><th>models</th>'
            f"<th>layer</th><th>trace strength</th><th>|delta| / norm at positions 0–4</th><th>steering uplift</th>"
            f"<th>best grade</th><th>top logit-lens tokens of delta (over positions)</th><th>steering alpha</th>"
            f"<th>similarity to finetuning data (mean over positions)</th><th>positions</th></tr>"
            f"{''.join(rows)}</table></section>")


def build_report(store: Store, record_key: str) -> str:
    """The whole page for the job whose run record is record_key."""
    from jobs.catalog import pair_states
    from jobs.views_html import pair_similarity_section, progress_section
    record = read_run_record(store, record_key)
    spec = record["spec"]
    pairs = [_load_or_damaged(store, p, spec) for p in record["pairs"]]
    states = pair_states(store, record)
    for data in pairs:
        data.state = states.get(data.name, {"state": "pending", "error": None})
    title = f"adl report: {record.get('job', '?')}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1>"
            f'<p class="uri">run record {esc(store.uri(record_key))}</p>'
            f"<p>The Activation Difference Lens: tokens read from the difference delta = mean(finetuned) − "
            f"mean(base) of the models' activations on the first tokens of unrelated text, through the logit "
            f"lens and patchscope, and text generated while adding it (steering).</p>"
            f"{progress_section(store, record)}"
            f"{index_section(pairs)}{pair_similarity_section(store, record)}{agent_index_section(pairs, spec)}"
            f"{''.join(pair_section(p, spec) for p in pairs)}</body></html>\n")


def write_report(store: Store, record_key: str, out: str | None = None) -> str:
    """Writes the page (atomically) to runs/<job>/report.html beside the run record, or
    to out (a local path or an s3:// URI); returns where it went."""
    page = build_report(store, record_key).encode()
    if out is None:
        key = layout.report(record_key)
        store.write_bytes(key, page)
        return store.uri(key)
    return write_file(out, page, store.options, PAGE_SIGNATURE, "an adl report page")
