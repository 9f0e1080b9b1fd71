"""The report's job-level parts: how far the job is (from its status record, when the
page was written) and the cross-pair heatmap (from pair_similarity.parquet, or computed
from the pairs' tables when the table is not there yet). Same rules as jobs/report.py:
inline SVG, no script, every name escaped."""
from __future__ import annotations

import math
from datetime import datetime, timezone

from common.errors import one_line
from jobs.page import esc
from jobs.pair_similarity import cluster_order, matrix, pair_similarity_rows
from jobs.attempts import attempt_log, history, loads, units_done
from storage import layout
from storage.store import StorageError, Store
from storage.tables import CAUSAL_EFFECT, PAIR_SIMILARITY


def progress_section(store: Store, record: dict) -> str:
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    key = layout.run_status(record["job"])
    try:
        status, why = store.read_json_or_none(key), "no status record"
    except StorageError as e:   # the page shows the rest, and says so
        status, why = None, f"status record damaged: {one_line(e, typed=False)}"
    if not isinstance(status, dict):
        return (f'<p class="progress" data-state="unknown">written {esc(written)}; '
                f'{esc(why)} ({esc(store.uri(key))})</p>')
    c = status.get("counts") or {}
    state = status.get("state", "?")
    line = (f"job {esc(state)}: {c.get('done', 0)} of {c.get('pairs', len(record['pairs']))} pairs done, "
            f"{c.get('failed', 0)} failed, {c.get('running', 0)} running, {c.get('pending', 0)} pending; "
            f"activation sets {c.get('activation_sets_done', 0)}/{c.get('activation_sets', 0)}; "
            f"started {esc(status.get('started'))}, {float(status.get('seconds') or 0):.0f} s so far"
            + (f", finished {esc(status.get('finished'))}" if status.get("finished") else ""))
    error = f'<br><span class="state failed">job error: {esc(status["error"])}</span>' if status.get("error") else ""
    attempt = f" · attempt {esc(status['attempt'])}" if status.get("attempt") else ""
    return (f'<p class="progress" data-state="{esc(state)}">page written {esc(written)}{attempt} · {line}'
            f"{error}</p>{history_section(store, record)}")


def history_section(store: Store, record: dict) -> str:
    """Every attempt of the job, newest first, with its log (jobs/attempts.py)."""
    records = history(store, record["job"])
    if not records:
        return ""
    rows = []
    for r in reversed(records):
        log = attempt_log(record["job"], str(r.get("attempt")))
        rows.append(f'<tr data-attempt="{esc(r.get("attempt"))}"><td>{esc(r.get("attempt"))}</td>'
                    f"<td>{esc(r.get('state'))}" + (f"<br><small>{esc(r['error'])}</small>" if r.get("error") else "")
                    + f"</td><td>{esc(r.get('started'))}</td><td>{esc(r.get('finished') or '–')}</td>"
                    f"<td>{float(r.get('seconds') or 0):.0f}</td><td>{units_done(r)}</td><td>{loads(r)}</td>"
                    f"<td>{float(r.get('gpu_hours') or 0):.4f}</td>"
                    f"<td>{'yes' if r.get('did_work', True) else 'nothing to do'}</td>"
                    f'<td class="uri">{esc(store.uri(log))}</td></tr>')
    return (f'<details class="history"><summary>run history: {len(records)} attempt'
            f'{"s" if len(records) != 1 else ""} (the line above is the latest that did work)</summary>'
            f"<table><tr><th>attempt</th><th>exit</th><th>started</th><th>ended</th><th>seconds</th>"
            f"<th>units done</th><th>model loads</th><th>GPU-hours</th><th>work</th><th>log</th></tr>"
            f"{''.join(rows)}</table></details>")


def _colour(v: float) -> str:
    """-1 blue, 0 white, 1 red."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "#eeeeee"
    v = max(-1.0, min(1.0, v))
    r, g, b = (255, int(255 * (1 - v)), int(255 * (1 - v))) if v >= 0 else (int(255 * (1 + v)), int(255 * (1 + v)), 255)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(names: list[str], sim, layer: int) -> str:
    order = cluster_order(sim)
    names = [names[i] for i in order]
    sim = sim[order][:, order]
    cell, label_w = 28, max(80, 7 * max(len(n) for n in names) + 10)
    width, height = label_w + cell * len(names) + 10, label_w + cell * len(names) + 10
    parts = [f'<svg class="chart heat" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg" data-layer="{layer}" data-order="{esc(",".join(names))}">'
             f"<title>cosine of delta between pairs, layer {layer}</title>"]
    for i, n in enumerate(names):
        y = label_w + i * cell
        parts.append(f'<text x="{label_w - 4}" y="{y + cell * 0.65:.1f}" text-anchor="end">{esc(n)}</text>'
                     f'<text transform="translate({label_w + i * cell + cell * 0.65:.1f},{label_w - 4}) rotate(-60)">'
                     f"{esc(n)}</text>")
        for j, m in enumerate(names):
            v = float(sim[i, j])
            shown = "–" if math.isnan(v) else f"{v:.2f}"
            parts.append(f'<rect class="cell" x="{label_w + j * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="{_colour(v)}"><title>{esc(n)} · {esc(m)}: {shown}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def pair_similarity_section(store: Store, record: dict) -> str:
    key = layout.run_pair_similarity(record["job"])
    rows = (store.read_table(key, PAIR_SIMILARITY).to_pylist() if store.exists(key)
            else pair_similarity_rows(store, record))
    if len({r["pair_a"] for r in rows} | {r["pair_b"] for r in rows}) < 2:
        return ""
    out = ['<section id="pair-similarity"><h2>Pairs compared</h2>'
           '<p class="legend">cosine similarity of the pairs\' delta vectors, mean over the analysed positions, '
           'per layer (pairs of the same hidden size); ordered by average-linkage clustering, so that a family '
           'of finetunes sits together; red 1, white 0, blue −1 (table: '
           f'{esc(store.uri(key))})</p>']
    for layer in sorted({r["layer"] for r in rows}):
        names, sim = matrix(rows, layer)
        if len(names) >= 2:
            out.append(f"<h4>layer {layer}</h4>{heatmap(names, sim, layer)}")
    out.append("</section>")
    return "".join(out)


def causal_section(results) -> str:
    """A line per (layer, text set, position): delta's change in cross-entropy beside the
    random directions' and random differences' largest and mean."""
    from jobs.causal import summary
    df = results.table(CAUSAL_EFFECT) if results is not None else None
    if df is None:
        return ""
    f = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.4f}"
    out = ['<h3>Causal effect of delta</h3><p class="legend">change in next-token cross-entropy of the '
           "finetuned model when each token's component along delta_hat is changed at the layer "
           "(patched to the base model's, or projected out), against random directions and random "
           "differences of base activations (largest / mean)</p>"]
    for layer in sorted(df.layer.unique()):
        for eval_set in sorted(df.eval_set.unique(), key=lambda n: (n != "finetune_data", n)):
            lines = summary(df, int(layer), eval_set)
            if not lines:
                continue
            items = "".join(
                f'<li data-causal="{int(layer)}-{esc(eval_set)}-{l["position"]}">position {l["position"]}: '
                f'<b>{f(l["delta_ce"])}</b> (cross-entropy {l["base_ce"]:.4f} → {l["ce"]:.4f}); random directions '
                f'{f(l["random_max"])} / {f(l["random_mean"])}; random differences {f(l["difference_max"])} / '
                f'{f(l["difference_mean"])}</li>' for l in lines)
            out.append(f"<h4>layer {int(layer)}, {esc(eval_set)}</h4><ul>{items}</ul>")
    return "".join(out)
