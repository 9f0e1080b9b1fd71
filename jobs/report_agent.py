"""The report's interpretability-agent parts: the job's table and chart of hypothesis
grades per pair and (agent, budget), and each pair's runs with their descriptions, grades
and transcripts. Same rules as jobs/report.py: inline SVG, no script, every string escaped.
`data` and `pairs` are the report's PairData (jobs/report.py load_pair) of one pair, of all."""
from __future__ import annotations

import pandas as pd

from jobs.page import anchor, esc, fmt, note

AGENT_LABELS = {"adl": "ADL agent", "blackbox": "black-box agent"}
MESSAGE_CLIP = 4000     # characters shown of a group's system prompt and first message
TURN_CLIP = 1500        # ... of each later message of a transcript


def _agent_groups(df: pd.DataFrame) -> list[tuple[str, int, pd.DataFrame]]:
    order = {"adl": 0, "blackbox": 1}
    keys = sorted({(a, int(b)) for a, b in zip(df.agent, df.budget)}, key=lambda k: (order.get(k[0], 2), k))
    return [(a, b, df[(df.agent == a) & (df.budget == b)].sort_values("run")) for a, b in keys]


def _spread(group: pd.DataFrame) -> tuple[float | None, float | None, float | None, float | None, int]:
    """(mean, standard deviation, min, max) over a group's runs' mean grades, and how many."""
    grades = group.mean_grade.dropna().astype(float)
    if grades.empty:
        return None, None, None, None, 0
    return (float(grades.mean()), float(grades.std(ddof=0)), float(grades.min()), float(grades.max()),
            int(len(grades)))


def agent_chart(pairs: list) -> str:
    """Mean grade per pair and (agent, budget) on the 1..5 scale, with the runs' range."""
    rows = [(data.name, a, b, _spread(g)) for data in pairs if data.agent is not None
            for a, b, g in _agent_groups(data.agent)]
    if not rows:
        return ""
    label_w, bar_w, row_h = 300, 360, 20
    width, height = label_w + bar_w + 120, row_h * len(rows) + 40
    x = lambda v: label_w + (v - 1.0) / 4.0 * bar_w
    parts = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>hypothesis grades per pair, agent and budget</title>']
    for tick in range(1, 6):
        parts.append(f'<line class="grid" x1="{x(tick):.1f}" y1="0" x2="{x(tick):.1f}" y2="{height - 25}"/>'
                     f'<text x="{x(tick):.1f}" y="{height - 10}" text-anchor="middle">{tick}</text>')
    for i, (pair, agent, budget, (mean, sd, lo, hi, n)) in enumerate(rows):
        y = 5 + i * row_h
        label = f"{pair} · {AGENT_LABELS.get(agent, agent)} · budget {budget}"
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{esc(label)}</text>')
        if mean is None:
            parts.append(f'<text x="{label_w + 4}" y="{y + 14}" class="none">no grade</text>')
            continue
        parts.append(f'<rect class="bar {esc(agent)}" x="{x(1.0):.1f}" y="{y + 3}" width="{max(x(mean) - x(1.0), 1):.1f}" '
                     f'height="{row_h - 6}"><title>{esc(label)}: mean {mean:.2f}, sd {sd:.2f}, '
                     f'range {lo:.2f}–{hi:.2f} over {n} graded runs</title></rect>'
                     f'<line class="whisker" x1="{x(lo):.1f}" y1="{y + row_h / 2:.1f}" x2="{x(hi):.1f}" y2="{y + row_h / 2:.1f}"/>'
                     f'<text x="{x(5.0) + 6:.1f}" y="{y + 14}">{mean:.2f} ± {sd:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def agent_index_section(pairs: list, spec: dict) -> str:
    """The job's table of grades: pairs x (agent, budget), mean ± sd over runs (graded/runs)."""
    with_agent = [p for p in pairs if p.agent is not None]
    if not with_agent and not spec.get("agent", {}).get("enabled"):
        return ""
    head = '<section id="agent"><h2>Interpretability agent</h2>'
    if not with_agent:
        return head + note("no pair has agent results yet") + "</section>"
    columns = sorted({(a, b) for p in with_agent for a, b, _ in _agent_groups(p.agent)},
                     key=lambda k: ({"adl": 0, "blackbox": 1}.get(k[0], 2), k))
    header = "".join(f"<th>{esc(AGENT_LABELS.get(a, a))}<br><small>budget {b}</small></th>" for a, b in columns)
    rows = []
    for p in with_agent:
        groups = {(a, b): g for a, b, g in _agent_groups(p.agent)}
        cells = []
        for key in columns:
            if key not in groups:
                cells.append('<td class="none">–</td>')
                continue
            mean, sd, _, _, n = _spread(groups[key])
            cells.append(f'<td>{fmt(mean, 2)} ± {fmt(sd, 2)} <small>({n}/{len(groups[key])})</small></td>'
                         if mean is not None else f'<td class="none">– <small>(0/{len(groups[key])})</small></td>')
        rows.append(f'<tr><td><a href="#{anchor("pair", p.name, "agent")}">{esc(p.name)}</a></td>{"".join(cells)}</tr>')
    return (f'{head}<p class="legend">hypothesis grade 1–5 against the pair\'s description: mean ± standard '
            f'deviation over runs of each run\'s mean of its gradings (graded runs / runs)</p>'
            f'<table class="agents"><tr><th>pair</th>{header}</tr>{"".join(rows)}</table>'
            f"{agent_chart(with_agent)}</section>")


def _message(message: dict, clip: int = MESSAGE_CLIP) -> str:
    content = str(message.get("content", ""))
    more = (f'<p class="none">… {len(content) - clip} more characters in the transcript file</p>'
            if len(content) > clip else "")
    return (f'<div class="msg {esc(message.get("role", ""))}"><b>{esc(message.get("role", "?"))}</b>'
            f'<pre>{esc(content[:clip])}</pre>{more}</div>')


def _opening(record) -> list:
    """A transcript's system prompt and first message (the same for every run of an
    agent and budget of a pair): shown once per group."""
    messages = record.get("messages") if isinstance(record, dict) else None
    return messages[:2] if isinstance(messages, list) and len(messages) >= 2 else []


def transcript_section(data, path: str, opening: list) -> str:
    record = data.transcripts.get(path)
    uri = f"{data.uri}/{path}"
    if not isinstance(record, dict):
        return f'<p class="none">transcript not readable: {esc(uri)}</p>'
    messages = [m for m in record.get("messages") or [] if isinstance(m, dict)]
    shared = bool(opening) and messages[:2] == opening
    shown = messages[2:] if shared else messages
    grading = record.get("grading") or {}
    answers = "".join(f"<h5>grading {i + 1}</h5>" + "".join(
        f'<pre>{esc(a.get("answer") or "")}</pre>' + (note(a["error"]) if a.get("error") else "")
        for a in attempts if isinstance(a, dict)) for i, attempts in enumerate(grading.get("attempts") or []))
    return (f'<details class="transcript"><summary>transcript ({len(messages)} messages)</summary>'
            f'<p class="uri">{esc(uri)}</p>'
            + ('<p class="none">system prompt and first message: as shown above for this agent and budget</p>'
               if shared else "")
            + "".join(_message(m, TURN_CLIP) for m in shown)
            + (f"<details><summary>the grader's answers</summary>{answers}</details>" if answers else "")
            + "</details>")


def agent_pair_section(data) -> str:
    head = f'<h3 id="{anchor("pair", data.name, "agent")}">Interpretability agent</h3>'
    if data.agent is None:
        return head + note(data.notes["agent"]) if "agent" in data.notes else ""
    out = [head]
    for agent, budget, group in _agent_groups(data.agent):
        mean, sd, _, _, n = _spread(group)
        grade = f"mean grade {fmt(mean, 2)} ± {fmt(sd, 2)}" if mean is not None else "no grade"
        out.append(f"<h4>{esc(AGENT_LABELS.get(agent, agent))}, budget {budget}: {grade} "
                   f"<small>({n} of {len(group)} runs graded)</small></h4>")
        opening = next((o for o in (_opening(data.transcripts.get(p)) for p in group.transcript) if o), [])
        if opening:
            out.append("<details><summary>system prompt and first message</summary>"
                       + "".join(_message(m) for m in opening) + "</details>")
        rows = []
        for r in group.itertuples():
            grades = ", ".join("–" if g is None or g != g else str(int(g))   # g != g: NaN, a failed grading
                               for g in (r.grades if r.grades is not None else []))
            outcome = esc(r.status) + (f": {esc(r.reason)}" if r.reason else "")
            grading = esc(r.grading or "") + (f": {esc(r.grading_reason)}" if r.grading_reason else "")
            description = (f'<div class="sample">{esc(r.description)}</div>' if r.description
                           else '<p class="none">no description</p>')
            rows.append(f"<tr><td>{int(r.run)}</td><td>{outcome}</td><td>{description}"
                        f"{transcript_section(data, r.transcript, opening)}</td><td>{esc(grades) or '–'}<br><small>{grading}"
                        f"</small></td><td>{fmt(r.mean_grade, 2)}</td><td>{int(r.llm_calls)} calls, "
                        f"{int(r.interactions_used)} interactions, {int(r.total_tokens)} tokens</td></tr>")
        out.append('<table class="runs"><tr><th>run</th><th>outcome</th><th>description</th><th>grades</th>'
                   f'<th>mean</th><th>spent</th></tr>{"".join(rows)}</table>')
    return "".join(out)
