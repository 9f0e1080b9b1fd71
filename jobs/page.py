"""The report page's building blocks, shared by jobs/report.py, jobs/report_agent.py and
jobs/views_html.py: escaping (every string a model produced or a user wrote goes through
esc: a token may be '<', '&' or '</script>'), anchors, token chips, notes, number
formats, and the page's one stylesheet."""
from __future__ import annotations

import html
import math

import pandas as pd

from storage import layout


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def anchor(*parts) -> str:
    return "-".join(layout.slug(str(p)) for p in parts)


def tok(token: str) -> str:
    """A token, escaped, with its invisible characters made visible."""
    shown = str(token).replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    if shown == "":
        shown = "∅"
    elif shown.strip() == "":
        shown = shown.replace(" ", "␣")
    return f'<code class="tok">{esc(shown)}</code>'


def chips(rows: pd.DataFrame, marks=None, name: str = "") -> str:
    """Tokens with probabilities, in rank order; marks(row) adds classes and a suffix;
    name (data-list) lets readers and tests find one list."""
    out = []
    for row in rows.sort_values("rank").itertuples():
        cls, suffix = marks(row) if marks else ("", "")
        out.append(f'<span class="chip{cls}">{tok(row.token)} <small>{row.probability:.3f}</small>{suffix}</span>')
    attr = f' data-list="{esc(name)}"' if name else ""
    return f'<div class="chips"{attr}>{"".join(out)}</div>' if out else '<p class="none">no tokens</p>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:1em 2em;color:#1d232a;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:2em}
h3{margin:1.2em 0 .4em}h3 small{font-weight:normal;color:#57606a;margin-left:.5em}h4{margin:.8em 0 .3em}h5{margin:.6em 0 .2em;color:#57606a}
table{border-collapse:collapse;margin:.3em 0}td,th{border:1px solid #d0d7de;padding:.25em .5em;vertical-align:top;text-align:left}
th{background:#f6f8fa}.index td{max-width:34em}
.chips{display:flex;flex-wrap:wrap;gap:.25em}.chip{border:1px solid #d0d7de;border-radius:4px;padding:0 .35em;background:#f6f8fa;white-space:nowrap}
.chip small{color:#57606a}.chip.coherent,.chip.relevant{background:#dafbe1;border-color:#4ac26b}.chip.frequent{outline:2px solid #d4a72c}
.mark{color:#1a7f37;font-weight:bold}code.tok{white-space:pre;font:13px ui-monospace,SFMono-Regular,Menlo,monospace}
.target{border:1px solid #d0d7de;border-radius:6px;padding:.2em 1em 1em;margin:1em 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(30em,1fr));gap:1.5em}
.samples td{width:42%;white-space:pre-wrap}.samples td.prompt{width:16%;color:#57606a}
.sample{border-left:3px solid #d0d7de;padding-left:.5em;margin:.2em 0 .6em;white-space:pre-wrap;word-break:break-word}
details>summary{cursor:pointer;color:#0969da}details.sample>summary{color:inherit}
.note{color:#9a6700;background:#fff8c5;border:1px solid #d4a72c;border-radius:4px;padding:.3em .6em;display:inline-block}
.none{color:#8c959f}.no-result{color:#cf222e}ul.no-result{font-weight:600}.legend{color:#57606a;font-size:.9em;margin:.3em 0}.uri{color:#57606a;font-size:.9em;word-break:break-all}ul.stages{color:#57606a}
svg.chart{display:block;font:12px system-ui,sans-serif;margin:.4em 0}svg .bar{fill:#8c959f}svg .bar.key{fill:#0969da}
svg .axis{stroke:#57606a;stroke-width:1}svg .pass{stroke:#cf222e;stroke-dasharray:4 3}
svg .grid{stroke:#d0d7de}svg .bar.adl{fill:#0969da}svg .bar.blackbox{fill:#8c959f}svg .whisker{stroke:#1d232a;stroke-width:2}
.runs td{max-width:50em}.transcript pre{white-space:pre-wrap;word-break:break-word;margin:.2em 0;font:12px ui-monospace,monospace}
.msg{border-left:3px solid #d0d7de;padding-left:.5em;margin:.4em 0}.msg.assistant{border-color:#0969da}.msg.system{border-color:#8c959f}
.state.failed{color:#cf222e;font-weight:bold}.state.running{color:#9a6700}.state.done{color:#1a7f37}
.control{color:#57606a;font-style:italic}svg.heat text{font:11px system-ui,sans-serif}
svg .p0{fill:#0969da}svg .p1{fill:#1a7f37}svg .p2{fill:#bf8700}svg .p3{fill:#8250df}
"""
