"""The causal-effect stage (off by default; spec section `causal_effect`): does delta
matter to the finetuned model's predictions? For each layer of the pair and analysed
position, the change in next-token cross-entropy when the component of every token's
activation along delta_hat is patched to the base model's value (or projected out), on
finetuning texts and, as the control, on the job's corpus; against the same for random
Gaussian directions and random differences of base activations. The math runs in the
pair's transformers actors (workers/causal.py); this stage picks texts and writes the
table `causal_effect.parquet` (README).
"""
from __future__ import annotations

import itertools
import logging

import numpy as np

from storage.tables import CAUSAL_EFFECT, DIFFERENCE, decode_vectors

logger = logging.getLogger("adl.causal")


def eval_texts(ctx) -> dict[str, list[str]]:
    from jobs.corpus import iter_documents, read_texts
    c, pair = ctx.spec.causal_effect, ctx.pair.pair
    sets = {}
    if pair.finetune_data:
        sets["finetune_data"] = read_texts(pair.finetune_data, c.texts, f"pair {pair.name}: finetune_data")
    sets["corpus"] = list(itertools.islice((t for t in iter_documents(ctx.spec.corpus)
                                            if isinstance(t, str) and t.strip()), c.corpus_texts))
    return sets


def _row(layer, position, eval_set, intervention, index, sums, none) -> dict:
    ce = sums[0] / sums[1] if sums[1] else None
    after = sums[2] / sums[3] if sums[3] else None
    base_ce = none[0] / none[1] if none[1] else None
    base_after = none[2] / none[3] if none[3] else None
    return {"layer": layer, "position": position, "eval_set": eval_set, "intervention": intervention,
            "index": index, "ce": ce, "ce_after_k": after,
            "delta_ce": None if ce is None or base_ce is None else ce - base_ce,
            "delta_ce_after_k": None if after is None or base_after is None else after - base_after,
            "tokens": int(sums[1]), "tokens_after_k": int(sums[3])}


def causal_effect(ctx) -> None:
    import ray
    from workers.causal import random_directions
    pair, spec, c = ctx.pair, ctx.spec, ctx.spec.causal_effect
    table = ctx.read_table(DIFFERENCE, ["layer", "position", "delta"])
    layers, positions = table.column("layer").to_numpy(), table.column("position").to_numpy()
    delta = decode_vectors(table.column("delta"), "float64")
    sets = eval_texts(ctx)
    ft = ctx.model("transformers", pair.pair.finetuned)
    base = ctx.model("transformers", pair.pair.base) if needs_base(spec) else None
    tok = pair.pair.base   # the pair reads every text through its base tokenizer
    rows = []
    for layer in pair.layers:
        at = [(int(p), r) for r, (l, p) in enumerate(zip(layers, positions))
              if l == layer and p in spec.method.positions and np.linalg.norm(delta[r]) > 0]
        kinds = [("delta", p, None) for p, _ in at]
        directions = [delta[r] for _, r in at]
        if c.random_directions:
            directions += list(random_directions(delta.shape[1], c.random_directions, c.seed + layer))
            kinds += [("random", None, i) for i in range(c.random_directions)]
        if c.random_differences:
            diffs = ray.get(base.causal_random_differences.remote(tok, sets["corpus"], layer, c.random_differences,
                                                                  c.max_tokens, c.batch_size, c.seed + layer))
            directions += list(diffs)
            kinds += [("random_difference", None, i) for i in range(len(diffs))]
        directions = np.stack(directions)
        logger.info(f"{pair.pair.name}: causal effect at layer {layer}, {len(directions)} directions "
                    f"({c.mode}) on {', '.join(f'{len(t)} {n}' for n, t in sets.items())} texts")
        for eval_set, texts in sets.items():
            targets = (base.causal_coefficients.remote(tok, texts, layer, directions, c.max_tokens, c.batch_size)
                       if c.mode == "patch" else None)
            out = ray.get(ft.causal_losses.remote(tok, texts, layer, directions, c.mode, targets, c.max_tokens,
                                                  c.batch_size, c.after_k))
            rows.append(_row(layer, None, eval_set, "none", None, out["none"], out["none"]))
            for (kind, position, index), sums in zip(kinds, out["directions"]):
                rows.append(_row(layer, position, eval_set, kind, index, sums, out["none"]))
    ctx.write_table(CAUSAL_EFFECT, CAUSAL_EFFECT.from_rows(rows, **{"adl.mode": c.mode, "adl.after_k": c.after_k}))


def needs_base(spec) -> bool:
    """The base model's actor: for patching to its values and for random differences."""
    return spec.causal_effect.mode == "patch" or spec.causal_effect.random_differences > 0


def summary(df, layer: int, eval_set: str) -> list[dict]:
    """Per position at (layer, eval_set): delta's change in cross-entropy, and the random
    directions' and random differences' largest and mean change."""
    at = df[(df.layer == layer) & (df.eval_set == eval_set)]
    rand, diffs = at[at.intervention == "random"], at[at.intervention == "random_difference"]
    none = at[at.intervention == "none"]
    out = []
    for r in at[at.intervention == "delta"].sort_values("position").itertuples():
        out.append({"position": int(r.position), "ce": r.ce, "base_ce": float(none.ce.iloc[0]) if len(none) else None,
                    "delta_ce": r.delta_ce,
                    "random_max": float(rand.delta_ce.max()) if len(rand) else None,
                    "random_mean": float(rand.delta_ce.mean()) if len(rand) else None,
                    "difference_max": float(diffs.delta_ce.max()) if len(diffs) else None,
                    "difference_mean": float(diffs.delta_ce.mean()) if len(diffs) else None})
    return out
