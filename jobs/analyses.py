"""The analyses after the logit lens and the generations (adl-method.md, section 3):
patchscope, token relevance and the embedding evaluation, when the spec has an
`analyses` section.

Each stage decides what to compute and writes one table; the models (the pair's
transformers actors, the embedder) and the grader are actors that the executor hands it
in a StageRun (jobs/stages.py declares the stages). A stage whose marker records its
content key for this spec, and whose output verifies against it, is not run again: what is
there was computed with these settings and inputs.

A stage whose work failed raises (GradingFailed): it writes nothing and its pair fails.
Patchscope fails when the grader chose a best scale for no (layer, position, variant);
where it failed on some, those have no chosen row and the log counts them. Token
relevance fails when the grader labelled no token at all; tokens it failed on count as
not relevant and are counted per list (`failed`).
"""
from __future__ import annotations

import logging
from itertools import combinations
from typing import Callable

import numpy as np

from jobs.plan import PairPlan
from storage import layout
from storage.store import Store
from storage.tables import DIFFERENCE, GENERATIONS, LOGIT_LENS, PATCHSCOPE, SIMILARITY, TOKEN_RELEVANCE, decode_vectors
from workers.graders import GradingFailed
from workers.vectors import similarity as similarity_of, unit_scaled

# Patchscope's vectors, and the model each is read in (the controls as in the reference:
# the base mean in the base model, both scaled to the finetuned norm).
PATCHSCOPE_VARIANTS = {"delta": "finetuned", "base_mean": "base", "finetuned_mean": "finetuned"}
# The text sets of the embedding evaluation, in the order similarity rows name them.
SETS = ("steered", "unsteered", "base", "finetune_data", "generic_chat")
PACKAGED_EMBEDDER = "all-MiniLM-L6-v2 (packaged)"

logger = logging.getLogger("adl.analyses")


def _judged(judgements: list, none: Callable[[int], str], some: Callable[[int, int], str]) -> None:
    """The grader's judgements of a stage's work: none of them made (an unreachable
    grader, say) is the stage's failure, GradingFailed with none(total) and the first
    error (no table: the pair fails); some failed is a log line, some(failed, total)."""
    failed = [j for j in judgements if not j.ok]
    if judgements and len(failed) == len(judgements):
        raise GradingFailed(f"{none(len(judgements))}: {failed[0].error}")
    if failed:
        logger.info(some(len(failed), len(judgements)))


# -- patchscope -------------------------------------------------------------------------
def patchscope(ctx) -> None:
    import ray
    pair, spec = ctx.pair, ctx.spec
    a = spec.analyses
    table = ctx.read_table(DIFFERENCE)
    layers = table.column("layer").to_numpy()
    positions = table.column("position").to_numpy()
    norms = table.column("finetuned_norm").to_numpy()
    rows = [r for r in range(table.num_rows) if positions[r] in spec.method.positions]
    targets = {role: [] for role in ("finetuned", "base")}   # role -> [(row, variant)]
    for variant, role in PATCHSCOPE_VARIANTS.items():
        targets[role] += [(r, variant) for r in rows]
    vectors = {v: decode_vectors(table.column(v), "float64") for v in PATCHSCOPE_VARIANTS}
    logger.info(f"{pair.pair.name}: patchscope, {len(rows) * len(PATCHSCOPE_VARIANTS)} vectors x "
                f"{len(a.patchscope_scales)} scales x {len(a.patchscope_prompts)} prompts")
    calls = {}
    for role, items in targets.items():   # both models at once, each on its own actor
        batch = np.stack([unit_scaled(vectors[v][r].astype(np.float64), float(norms[r])) for r, v in items])
        calls[role] = ctx.model("transformers", getattr(pair.pair, role)).patchscope.remote(
            pair.pair.base, batch, [int(layers[r]) for r, _ in items], list(a.patchscope_scales),
            list(a.patchscope_prompts), a.patchscope_vocab_top, a.patchscope_top_k)
    results = {role: ray.get(ref) for role, ref in calls.items()}

    groups = []   # (layer, position, variant, ids[scale], tokens[scale], probs[scale])
    for role, items in targets.items():
        ids, tokens, probs = results[role]
        for k, (r, variant) in enumerate(items):
            groups.append((int(layers[r]), int(positions[r]), variant, ids[k], tokens[k], probs[k]))
    scales = list(a.patchscope_scales)
    judgements = ray.get(ctx.grader_handle().best_scales.remote(
        [{s: list(g[4][i]) for i, s in enumerate(scales)} for g in groups]))
    _judged(judgements,
            lambda n: f"patchscope: the grader chose no best scale for any of the {n} (layer, position, variant)",
            lambda failed, n: f"{pair.pair.name}: patchscope: {failed} of {n} (layer, position, variant) "
                              f"have no best scale (the grader failed on them; no row of theirs is chosen)")
    out_rows = []
    for (layer, pos, variant, ids, tokens, probs), j in zip(groups, judgements):
        chosen = j.value["scale"] if j.ok else None
        coherent = set(j.value["tokens"]) if j.ok else set()
        if not j.ok:
            logger.warning(f"{pair.pair.name}: patchscope layer {layer} pos {pos} {variant}: no best scale "
                           f"({j.error}); no row of it is chosen")
        for i, scale in enumerate(scales):
            is_chosen = chosen is not None and scale == chosen
            for rank, (tid, tok, p) in enumerate(zip(ids[i], tokens[i], probs[i])):
                out_rows.append({"layer": layer, "position": pos, "variant": variant, "scale": float(scale),
                                 "rank": rank, "token_id": int(tid), "token": tok, "probability": float(p),
                                 "chosen": is_chosen, "coherent": is_chosen and tok in coherent})
    ctx.write_table(PATCHSCOPE, PATCHSCOPE.from_rows(out_rows))


# -- token relevance --------------------------------------------------------------------
def _skip_relevance(store: Store, pair: PairPlan, reason: str) -> None:
    logger.info(f"{pair.pair.name}: token relevance skipped: {reason}")
    store.write_json(f"{pair.out_dir}/{layout.TOKEN_RELEVANCE_JSON}",
                     {"status": "skipped", "reason": reason, "metrics": []})


def token_relevance(ctx) -> None:
    """The grader labels the logit lens's and patchscope's (best scale) top tokens of delta;
    without a grader able to, a recorded skip, never a guess. token_relevance.json is
    written last: it marks the stage complete."""
    import ray
    from jobs.corpus import read_texts
    from workers.graders import OFFLINE_RELEVANCE, GraderError
    from workers.models import load_tokenizer
    from workers.tokenization import frequent_tokens
    pair, spec, store = ctx.pair, ctx.spec, ctx.store
    marker = ctx.path(layout.TOKEN_RELEVANCE_JSON)
    where = f"pair {pair.pair.name}"
    if not pair.pair.description:
        return _skip_relevance(store, pair, f"{where} has no description of its finetuning domain")
    if not pair.pair.finetune_data:
        return _skip_relevance(store, pair, f"{where} has no finetune_data to take frequent tokens from")
    if ctx.grader is None:   # the offline grader: no model can judge relevance to a description
        return _skip_relevance(store, pair, OFFLINE_RELEVANCE)
    grader = ctx.grader
    a = spec.analyses
    tokenizer = load_tokenizer(pair.pair.base, spec.storage.options, spec.trust_remote_code)
    texts = read_texts(pair.pair.finetune_data, 10_000, f"{where}: finetune_data")
    frequent = frequent_tokens(tokenizer, texts, pair.base.documents.token_ids, a.frequent_tokens,
                               a.min_generic_ratio)
    frequent_ids = {i for i, _ in frequent}

    lens = ctx.read_table(LOGIT_LENS).to_pandas()
    lens = lens[(lens.variant == "delta") & (lens["rank"] < a.relevance_top_k)]
    scope = ctx.read_table(PATCHSCOPE).to_pandas()
    scope = scope[(scope.variant == "delta") & scope.chosen & (scope["rank"] < a.relevance_top_k)]
    lists = []   # (layer, position, source, rows sorted by rank)
    for source, df in (("logit_lens", lens), ("patchscope", scope)):
        for (layer, pos), group in df.groupby(["layer", "position"]):
            lists.append((int(layer), int(pos), source, group.sort_values("rank")))
    lists.sort(key=lambda x: (x[0], x[1], x[2]))
    logger.info(f"{pair.pair.name}: token relevance, {len(lists)} token lists")
    try:
        judged = ray.get(grader.token_relevances.remote([list(g.token) for *_, g in lists], pair.pair.description,
                                                        [t for _, t in frequent]))
    except GraderError as e:   # raised in the actor: Ray's message carries the remote traceback
        reason = str(e).strip().splitlines()[-1].split("GraderError: ", 1)[-1]
        return _skip_relevance(store, pair, reason)
    _judged([j for judgements in judged for j in judgements],
            lambda n: f"token_relevance: the grader labelled none of the {n} tokens",
            lambda failed, n: f"{pair.pair.name}: token relevance: the grader failed on {failed} of {n} tokens "
                              f"(counted as not relevant, recorded per list as 'failed')")

    rows, metrics = [], []
    for (layer, pos, source, group), judgements in zip(lists, judged):
        relevant = np.array([bool(j.ok and j.value) for j in judgements])
        is_frequent = np.array([int(t) in frequent_ids for t in group.token_id])
        probs = group.probability.to_numpy(np.float64)
        for (rank, tok, p), rel, freq, j in zip(zip(group["rank"], group.token, probs), relevant, is_frequent,
                                                judgements):
            rows.append({"layer": layer, "position": pos, "source": source, "rank": int(rank), "token": tok,
                         "probability": float(p), "relevant": bool(rel), "frequent": bool(freq),
                         "labels": list(j.labels) if j.labels else ["FAILED"] * 3})
        # A list the grader labelled no token of has no fraction: 0 would read as "none relevant".
        labelled = any(j.ok for j in judgements)
        if not labelled:
            logger.warning(f"{pair.pair.name}: token relevance layer {layer} pos {pos} {source}: the grader "
                           f"labelled none of its {len(judgements)} tokens; no fraction relevant")
        metrics.append({"layer": layer, "position": pos, "source": source,
                        "fraction_relevant": float(relevant.mean()) if labelled else None,
                        "weighted_fraction_relevant": float((probs * relevant).sum() / probs.sum())
                        if labelled else None,
                        "fraction_frequent": float(is_frequent.mean()),
                        # tokens the grader failed on count as not relevant
                        "tokens": len(judgements), "failed": sum(not j.ok for j in judgements)})
    ctx.write_table(TOKEN_RELEVANCE, TOKEN_RELEVANCE.from_rows(rows))
    store.write_json(marker, {"status": "done", "reason": None, "metrics": metrics,
                              "frequent_tokens": [t for _, t in frequent]})


# -- embedding evaluation ---------------------------------------------------------------
def generic_chat_texts(pair: PairPlan, limit: int) -> list[str]:
    """The pair's generic_chat file, else adl's packaged generic assistant answers."""
    from jobs.corpus import read_texts
    if pair.pair.generic_chat:
        return read_texts(pair.pair.generic_chat, limit, f"pair {pair.pair.name}: generic_chat")
    from workers.demo_pair import generic_chat_answers
    return generic_chat_answers(limit, seed=0)


def similarity(ctx) -> None:
    import ray
    from jobs.corpus import read_texts
    pair, spec = ctx.pair, ctx.spec
    a = spec.analyses
    gens = ctx.read_table(GENERATIONS).to_pandas()
    baseline = gens[gens.kind == "baseline"]
    sets = {"unsteered": list(baseline[baseline.model_role == "finetuned"].text),
            "base": list(baseline[baseline.model_role == "base"].text),
            "generic_chat": generic_chat_texts(pair, a.embedding_texts)}
    if pair.pair.finetune_data:
        sets["finetune_data"] = read_texts(pair.pair.finetune_data, a.embedding_texts,
                                           f"pair {pair.pair.name}: finetune_data")
    steered = gens[gens.kind == "steered"]
    keys = sorted({(int(l), int(p)) for l, p in zip(steered.layer, steered.position)})
    for layer, pos in keys:
        mine = steered[(steered.layer == layer) & (steered.position == pos)]
        sets[f"steered/{layer}/{pos}"] = list(mine.text)
    logger.info(f"{pair.pair.name}: embedding {sum(map(len, sets.values()))} texts in {len(sets)} sets")
    embedder = ctx.model("embedder", a.embedding_model or PACKAGED_EMBEDDER)
    summaries = ray.get(embedder.summaries.remote(sets))
    rows = []
    for layer, pos in keys:
        named = {name: summaries.get(f"steered/{layer}/{pos}" if name == "steered" else name) for name in SETS}
        present = [name for name in SETS if named[name] is not None]
        for x, y in combinations(present, 2):
            rows.append({"layer": layer, "position": pos, "set_a": x, "set_b": y,
                         "similarity": similarity_of(named[x], named[y])})
    ctx.write_table(SIMILARITY, SIMILARITY.from_rows(rows, **{"adl.embedding_model": a.embedding_model or
                                                                PACKAGED_EMBEDDER}))
