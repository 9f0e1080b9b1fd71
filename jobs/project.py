"""`adl project RUN PAIR TEXT-or-FILE`: per token of a text, the projection of the
finetuned model's activation at the pair's layer onto delta_hat (delta / |delta|) of each
analysed position, printed and written as an HTML snippet whose tokens are coloured by it
(red along delta, blue against; every token escaped). Loads the pair's finetuned model
only (workers/projection.py), never the job."""
from __future__ import annotations

import html
import os
from dataclasses import dataclass

import numpy as np

from jobs.results import PairResults
from jobs.spec import ModelSource
from storage.store import StorageError, StorageOptions

_PATHLIKE = (".txt", ".md", ".json", ".jsonl", ".html", ".text")


class ProjectError(ValueError):
    """Bad input to `adl project`: one line naming it."""


@dataclass
class Projection:
    pair: str
    layer: int
    positions: list[int]
    token_ids: list[int]
    tokens: list[str]
    values: np.ndarray          # (tokens, positions)


def read_text(arg: str) -> str:
    """TEXT-or-FILE: a file that exists is read; something shaped like a path that does
    not exist is an error (a typo), not text."""
    if os.path.isfile(arg):
        with open(arg, encoding="utf-8") as f:
            return f.read()
    if not any(c.isspace() for c in arg) and (arg.lower().endswith(_PATHLIKE) or arg.startswith(("./", "/", "~"))):
        raise FileNotFoundError(f"{arg}: no such file (pass the text itself, or an existing file)")
    return arg


def _source(raw, where: str) -> ModelSource:
    if isinstance(raw, str):
        return ModelSource(raw)
    if isinstance(raw, dict) and isinstance(raw.get("model"), str):
        return ModelSource(raw["model"], raw.get("revision"), raw.get("adapter"))
    raise StorageError(f"{where}: not a model location in the run record")


def project(store, record_key: str, pair_name: str, text: str, layer: int | None = None) -> Projection:
    from jobs.summary import read_run_record
    from workers.projection import project_text
    record = read_run_record(store, record_key)
    entry = next((p for p in record["pairs"] if p["name"] == pair_name), None)
    if entry is None:
        known = ", ".join(p["name"] for p in record["pairs"]) or "none"
        raise ProjectError(f"{pair_name}: no such pair in job {record['job']} (pairs: {known})")
    results = PairResults(store, entry["dir"])
    found = results.delta()
    if found is None:
        raise ProjectError(f"pair {pair_name}: no difference table yet ({store.uri(results.key('difference.parquet'))})")
    keys, vectors = found
    layers = sorted({l for l, _ in keys})
    layer = layers[0] if layer is None else layer
    if layer not in layers:
        raise ProjectError(f"--layer {layer}: pair {pair_name} was analysed at layers {layers}")
    spec = record["spec"]
    analysed = spec.get("method", {}).get("positions", [0, 1, 2, 3, 4])
    rows = [(p, i) for i, (l, p) in enumerate(keys) if l == layer and p in analysed]
    positions = [p for p, _ in rows]
    spec_pair = next((p for p in spec.get("pairs", []) if p.get("name") == pair_name), {})
    storage = spec.get("storage", {})
    ids, tokens, values = project_text(
        _source(spec_pair.get("finetuned"), f"spec.pairs[{pair_name}].finetuned"),
        _source(spec_pair.get("base"), f"spec.pairs[{pair_name}].base"), text, layer,
        vectors[[i for _, i in rows]], dtype=spec.get("dtype", "float32"),
        storage=StorageOptions(storage.get("endpoint_url"), storage.get("region")),
        trust_remote_code=bool(spec.get("trust_remote_code")))
    return Projection(pair_name, layer, positions, ids, tokens, values)


def lines(p: Projection) -> list[str]:
    head = f"pair {p.pair}, layer {p.layer}: finetuned activation · delta_hat per analysed position"
    cols = "".join(f"{'pos ' + str(q):>10}" for q in p.positions)
    out = [head, f"{'#':>4}  {'token':<20}{cols}"]
    for i, (tok, row) in enumerate(zip(p.tokens, p.values)):
        out.append(f"{i:>4}  {repr(tok)[1:-1][:20]:<20}" + "".join(f"{v:>10.3f}" for v in row))
    return out


def _colour(v: float, scale: float) -> str:
    a = min(abs(v) / scale, 1.0) if scale > 0 else 0.0
    return f"rgba(207,34,46,{a:.3f})" if v >= 0 else f"rgba(9,105,218,{a:.3f})"


# What a snippet starts with: `adl project --out` replaces only a file holding it.
SNIPPET_SIGNATURE = b'<div class="adl-projection"'


def snippet(p: Projection) -> str:
    """One block per analysed position, each token a span coloured by its projection
    (scaled to the position's largest magnitude), with the value in its title."""
    esc = lambda s: html.escape(str(s), quote=True)
    out = [f'{SNIPPET_SIGNATURE.decode()} data-pair="{esc(p.pair)}" data-layer="{p.layer}">']
    for j, pos in enumerate(p.positions):
        column = p.values[:, j]
        scale = float(np.max(np.abs(column))) if len(column) else 0.0
        spans = "".join(f'<span class="tok" style="background:{_colour(float(v), scale)}" '
                        f'title="{float(v):.4f}">{esc(tok)}</span>' for tok, v in zip(p.tokens, column))
        out.append(f'<p data-position="{pos}"><b>delta_hat of position {pos}</b> '
                   f'<small>(max |projection| {scale:.3f})</small><br>'
                   f'<span style="white-space:pre-wrap">{spans}</span></p>')
    out.append("</div>\n")
    return "".join(out)
