"""The job-level views (issue 13): the catalog and report rewritten as each pair ends and
read mid-job, the cross-pair similarity, the triage numbers recomputed by hand."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from helpers import unloadable_copy

from jobs.cli import main
from storage import layout
from storage.store import Store
from storage.tables import AGENT, DIFFERENCE, LOGIT_LENS, SIMILARITY
from tests.test_report import Page


def _catalog(store: Store, job: str):
    """(catalog rows, the pairs' states from its metadata), read as an analyst would."""
    table = store.read_table(layout.run_catalog(job))
    return table.to_pandas(), json.loads(table.schema.metadata[b"adl.pairs"])


HELD = ("slow", "mixed", "other")


@pytest.fixture(scope="module")
def five_pairs(ray_cluster, make_spec, demo_pair, tmp_path_factory):
    """A job of five pairs on the demo base: "quick" (the demo finetune) finishes, "broken"
    fails (its finetuned weights do not fit its config: found only when loaded), "slow" (the demo finetune
    again), "mixed" and "other" (workers/demo_variants.py: the demo documents mixed 1:1
    with generic text; another topic) wait in their reduce stage until the test has read
    the views mid-job. Returns (store, the mid-job snapshot, stats, the job's error or None)."""
    from workers.demo_variants import build_variant
    import jobs.executor as executor
    import jobs.stages as stages
    from jobs.driver import RunStats, run_job
    from jobs.spec import parse_spec
    tmp = tmp_path_factory.mktemp("views")
    broken = unloadable_copy(demo_pair.finetuned_dir, tmp / "broken-ft")
    spec = make_spec(tmp / "out", name="five", corpus={"num_documents": 200}, shard_size=200)
    spec["pairs"] = [{"name": "quick", "base": str(demo_pair.base_dir), "finetuned": str(demo_pair.finetuned_dir)},
                     {"name": "broken", "base": str(demo_pair.base_dir), "finetuned": str(broken)},
                     {"name": "slow", "base": str(demo_pair.base_dir), "finetuned": str(demo_pair.finetuned_dir)},
                     {"name": "mixed", "base": str(demo_pair.base_dir), "finetuned": str(build_variant("mixed"))},
                     {"name": "other", "base": str(demo_pair.base_dir), "finetuned": str(build_variant("unrelated"))}]
    gate = threading.Event()
    original = next(s for s in stages.PAIR_STAGES if s.name == "reduce")

    def held_reduce(ctx):
        if ctx.pair.pair.name in HELD:
            assert gate.wait(timeout=300), "the test never opened the gate"
        original.run(ctx)

    patched = tuple(s if s.name != "reduce" else stages.Stage(s.name, s.writes, s.enabled, s.after, s.needs,
                                                                 held_reduce) for s in stages.PAIR_STAGES)
    mp = pytest.MonkeyPatch()
    mp.setattr(executor, "PAIR_STAGES", patched)
    stats, outcome = RunStats(), {}

    def job():
        try:
            run_job(parse_spec(spec), stats)
        except BaseException as e:   # noqa: BLE001 (reported by the test)
            outcome["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    store = Store(str(tmp / "out"))
    snapshot = {}
    try:
        deadline = time.time() + 300
        while time.time() < deadline and thread.is_alive():
            # the views are rewritten one after the other when a pair ends: wait for both
            if store.exists(layout.run_catalog("five")) and store.exists("runs/five/report.html"):
                rows, states = _catalog(store, "five")
                page = store.read_bytes("runs/five/report.html").decode()
                if states["quick"]["state"] == "done" and states["broken"]["state"] == "failed" \
                        and "1 of 5 pairs done, 1 failed" in page:
                    break
            time.sleep(0.2)
        snapshot["alive"] = thread.is_alive()
        snapshot["catalog"], snapshot["states"] = _catalog(store, "five")
        snapshot["report"] = store.read_bytes("runs/five/report.html").decode()
        snapshot["status"] = store.read_json(layout.run_status("five"))
        # `adl report` on the running job's status record, to another file
        out = tmp / "mid.html"
        snapshot["cli"] = main(["report", str(tmp / "out/runs/five/status.json"), "--out", str(out)])
        snapshot["cli_page"] = out.read_text() if out.exists() else ""
    finally:
        gate.set()
        thread.join(timeout=300)
        mp.undo()
    return store, snapshot, stats, outcome.get("error")


def test_views_mid_job(five_pairs):
    store, mid, _, _ = five_pairs
    assert mid["alive"], "the job ended before the test read its views"
    assert mid["status"]["state"] == "running"
    assert all(mid["status"]["pairs"][n]["state"] in ("running", "pending") for n in HELD)
    # the catalog: the finished pair's rows only; every pair's state in its metadata
    assert set(mid["catalog"].pair) == {"quick"} and len(mid["catalog"]) == 3 * 5
    assert mid["states"]["quick"] == {"state": "done", "error": None}
    broken = mid["states"]["broken"]
    assert broken["state"] == "failed" and "ignore_mismatched_sizes" in broken["error"]
    assert all(mid["states"][n]["state"] in ("running", "pending") for n in HELD)
    # the page: written when, how far, the finished pair's results, the others' states
    for page in (mid["report"], mid["cli_page"]):
        text = Page(page).text
        assert "page written 20" in text and "job running: 1 of 5 pairs done, 1 failed" in text, text[:400]
        assert 'data-list="lens-delta"' in page and 'id="pair-quick-L-1-P-0"' in page
        assert "ignore_mismatched_sizes" in text
        index = Page(page[page.index('id="index"'):page.index("</section>", page.index('id="index"'))]).text
        assert "quickdone" in index.replace(" ", "") and "brokenfailed" in index.replace(" ", "")
        assert "slowrunning" in index.replace(" ", "") or "slowpending" in index.replace(" ", "")
    assert mid["cli"] == 0


def test_views_at_the_end(five_pairs):
    store, _, stats, error = five_pairs
    assert error is None and set(stats.failed) == {"broken"}
    rows, states = _catalog(store, "five")
    assert set(rows.pair) == {"quick", "slow", "mixed", "other"} and len(rows) == 4 * 3 * 5
    assert states["slow"]["state"] == "done" and states["broken"]["state"] == "failed"
    assert "ignore_mismatched_sizes" in states["broken"]["error"]
    page = store.read_bytes("runs/five/report.html").decode()
    text = Page(page).text
    assert "job failed: 4 of 5 pairs done, 1 failed, 0 running, 0 pending" in text
    assert 'id="pair-slow-L-2-P-4"' in page and "ignore_mismatched_sizes" in text


def test_pair_similarity_of_a_pair_with_itself_is_one(five_pairs):
    """quick and slow are the same models: their deltas are the same vectors."""
    store, *_ = five_pairs
    table = store.read_table(layout.run_pair_similarity("five"))
    every = table.to_pandas()
    assert len(every) == 10 * 3 * 5 and every.same_base.all()   # 4 finished pairs: 4 + 6 pairs of pairs
    rows = every[every.pair_a.isin(["quick", "slow"]) & every.pair_b.isin(["quick", "slow"])]
    assert set(zip(rows.pair_a, rows.pair_b)) == {("quick", "quick"), ("quick", "slow"), ("slow", "slow")}
    np.testing.assert_allclose(rows.cosine, 1.0, atol=1e-9)
    assert b"pair_similarity" == table.schema.metadata[b"adl.table"]


def test_the_publisher_rewrites_off_the_callers_thread_coalesced_and_closes_at_once(monkeypatch):
    """Pairs ending in a burst cost one rewrite after the first, not one each; asking never
    waits for a rewrite; close() does not sit out the interval."""
    from jobs import views
    calls = []

    def slow_publish(store, key):
        calls.append(time.monotonic())
        time.sleep(0.3)

    monkeypatch.setattr(views, "publish", slow_publish)
    publisher = views.Publisher(None, "runs/x/run.json", min_interval_s=1.0)
    waited = []
    for _ in range(10):   # within 0.5 s: all before the second rewrite may start (1.3 s)
        asked = time.monotonic()
        publisher.request()
        waited.append(time.monotonic() - asked)
        time.sleep(0.05)
    assert max(waited) < 0.1, waited        # none waited for the rewrite under way
    time.sleep(2.5)
    assert len(calls) == 2, calls            # the first at once, the other 9 together after
    assert calls[1] - calls[0] >= 1.0
    publisher.request()
    closing = time.monotonic()
    publisher.close()
    assert time.monotonic() - closing < 0.5 and len(calls) == 2


def test_bad_report_paths_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "runs/nojob/status.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run record beside this status record" in err and "nojob" in err


# -- triage -----------------------------------------------------------------------------------
def test_triage_recomputed_by_hand_from_the_real_tables(five_pairs):
    """The catalog's delta_ratio and trace_strength of one pair against its difference
    table's vectors, recomputed here."""
    store, *_ = five_pairs
    rows, _ = _catalog(store, "five")
    quick = rows[rows.pair == "quick"]
    diff = store.read_table(f"{quick.pair_dir.iloc[0]}/{DIFFERENCE.file}").to_pylist()
    for layer in (0, 1, 2):
        at = {r["position"]: r for r in diff if r["layer"] == layer}
        ratios = {p: float(np.linalg.norm(np.asarray(at[p]["delta"]))) / at[p]["finetuned_norm"] for p in range(5)}
        mine = quick[quick.layer == layer].set_index("position")
        for p in range(5):
            assert mine.delta_ratio[p] == pytest.approx(ratios[p], rel=1e-9)
        assert mine.trace_strength.iloc[0] == pytest.approx(np.mean([ratios[p] for p in (1, 2, 3, 4)]), rel=1e-9)
        assert mine.steering_uplift.isna().all() and mine.best_grade.isna().all() and not mine.control.any()


def _hand_pair(store: Store, name: str, scale: float, grades: dict) -> dict:
    """A finished pair written by hand at layer 3: delta at position p is scale * (p + 1)
    along one axis, finetuned norm 10; similarities and agent grades given."""
    from storage.tables import difference_table
    d = f"pairs/{name}-0000000000000000"
    delta = np.zeros((1, 6, 4))
    delta[0, :, 0] = [scale * (p + 1) for p in range(6)]
    table = difference_table([3], np.full((1, 6), 50), delta, np.zeros_like(delta), delta, np.array([10.0]))
    store.write_table(f"{d}/{DIFFERENCE.file}", DIFFERENCE, table)
    lens = {k: [] for k in ("layer", "position", "variant", "rank", "token_id", "token", "probability")}
    for p in range(5):
        for k, v in zip(lens, (3, p, "delta", 0, 1, "<tok>", 0.5)):
            lens[k].append(v)
    store.write_table(f"{d}/{LOGIT_LENS.file}", LOGIT_LENS, LOGIT_LENS.from_rows(lens))
    sims = [dict(layer=3, position=p, set_a=a, set_b="finetune_data", similarity=s)
            for p, (st, un) in ((0, (0.5, 0.2)), (1, (0.7, 0.3))) for a, s in (("steered", st), ("unsteered", un))]
    store.write_table(f"{d}/{SIMILARITY.file}", SIMILARITY, SIMILARITY.from_rows(sims))
    runs = [dict(agent=agent, budget=budget, run=run, status="done", mean_grade=grade, grading="done",
                 llm_calls=1, interactions_used=0, prompt_tokens=0, completion_tokens=0, total_tokens=0,
                 grader_calls=1, grader_tokens=0, seconds=1.0, transcript="t.json")
            for (agent, budget), values in grades.items() for run, grade in enumerate(values)]
    store.write_table(f"{d}/{AGENT.file}", AGENT, AGENT.from_rows(runs))
    store.write_json(layout.manifest(d), {"pair": name, "files": {}})
    return {"name": name, "dir": d, "layers": [3]}


def test_triage_by_hand_and_the_index_order(tmp_path):
    from jobs.catalog import build_catalog
    from jobs.report import build_report
    store = Store(str(tmp_path))
    grades = {("adl", 0): [2.0, 4.0], ("adl", 5): [4.0, 5.0, None], ("blackbox", 0): [5.0]}
    pairs = [_hand_pair(store, "weak", 0.1, grades), _hand_pair(store, "strong", 1.0, grades),
             _hand_pair(store, "ctl", 0.01, {("adl", 0): [1.0]})]
    spec = {"name": "hand", "method": {"positions": [0, 1, 2, 3, 4]},
            "pairs": [{"name": "weak"}, {"name": "strong"}, {"name": "ctl", "control": True}]}
    store.write_json(layout.run_record("hand"), {"job": "hand", "spec": spec, "pairs": pairs})
    rows = build_catalog(store, store.read_json(layout.run_record("hand"))).to_pandas()
    strong = rows[rows.pair == "strong"].set_index("position")
    # |delta| / finetuned norm = (p + 1) / 10; trace strength = mean over 1..4 = (2+3+4+5)/4/10
    assert list(strong.delta_ratio) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert list(strong.trace_strength) == pytest.approx([0.35] * 5)
    # uplift: steered minus unsteered similarity to the finetuning data, where measured
    assert strong.steering_uplift[0] == pytest.approx(0.3) and strong.steering_uplift[1] == pytest.approx(0.4)
    assert strong.steering_uplift[[2, 3, 4]].isna().all()
    # best grade: the ADL agent's best budget (mean of graded runs: budget 5 -> 4.5); black-box ignored
    assert (strong.best_grade == 4.5).all()
    assert rows[rows.pair == "ctl"].control.all() and not rows[rows.pair != "ctl"].control.any()
    # the index: the control first, then the strongest trace first
    page = build_report(store, layout.run_record("hand"))
    index = page[page.index('id="index"'):page.index("</table>", page.index('id="index"'))]
    order = [index.index(f'href="#pair-{n}"') for n in ("ctl", "strong", "weak")]
    assert order == sorted(order), order
    assert "0.350" in index and "0.0350" not in index and "4.50" in index


# -- adl project ------------------------------------------------------------------------------
MARKUP = 'Mount Veyra <script>alert("x")</script> & <b>lava</b> erupts'


def test_project_equals_a_plain_forward_dotted_with_delta_hat(five_pairs, demo_pair, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    store, *_ = five_pairs
    out = tmp_path / "snippet.html"
    run = str(store.uri(layout.run_record("five")))
    assert main(["project", run, "quick", MARKUP, "--layer", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # independently: a plain forward with every hidden state; block 1's output is hidden_states[2]
    tokenizer = AutoTokenizer.from_pretrained(demo_pair.base_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_pair.finetuned_dir, dtype=torch.float32).eval()
    ids = tokenizer(MARKUP, add_special_tokens=True, return_tensors="pt").input_ids
    with torch.no_grad():
        acts = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0].double().numpy()
    rows = _catalog(store, "five")[0]
    diff = store.read_table(f"{rows[rows.pair == 'quick'].pair_dir.iloc[0]}/{DIFFERENCE.file}").to_pylist()
    delta = np.stack([np.asarray(r["delta"]) for r in sorted(diff, key=lambda r: r["position"]) if r["layer"] == 1][:5])
    expected = acts @ (delta / np.linalg.norm(delta, axis=1, keepdims=True)).T
    table = [line.split() for line in printed.splitlines()[2:2 + len(ids[0])]]
    got = np.array([[float(x) for x in row[-5:]] for row in table])
    np.testing.assert_allclose(got, expected, atol=2e-3)    # printed to 3 decimals
    from jobs.project import project
    from jobs.report import locate_run
    result = project(*locate_run(run), "quick", MARKUP, 1)
    np.testing.assert_allclose(result.values, expected, rtol=1e-4, atol=1e-4)
    # the snippet: the text shown as text, no markup from it
    page = Page(out.read_text())
    assert {t for t, _ in page.tags} <= {"div", "p", "b", "small", "br", "span"}
    assert sum(1 for t, a in page.tags if t == "span" and a.get("class") == "tok") == 5 * len(ids[0])
    shown = page.text
    assert MARKUP in shown and "<script>" in shown and "&amp;" not in shown


def test_project_bad_input_is_one_line(five_pairs, tmp_path, capsys):
    store, *_ = five_pairs
    run = str(store.uri(layout.run_record("five")))
    for argv, words in ((["project", run, "nosuch", "text"], "nosuch: no such pair in job five"),
                        (["project", run, "quick", "./typo.txt"], "./typo.txt: no such file"),
                        (["project", run, "quick", "text", "--layer", "4"], "--layer 4"),
                        (["project", str(tmp_path / "runs/x/run.json"), "quick", "text"], "no such run record")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)


# -- the cross-pair view on a family of finetunes -----------------------------------------
def test_a_family_of_finetunes_is_more_alike_than_an_unrelated_one(five_pairs):
    """The demo finetune ("quick"; "slow" is the same model) and its variant on the same
    documents mixed 1:1 with generic text ("mixed"), against a finetune on another topic
    ("other"), at block 2 (relative depth 0.5)."""
    from jobs.pair_similarity import cluster_order, matrix
    store, *_ = five_pairs
    rows = store.read_table(layout.run_pair_similarity("five")).to_pylist()
    cos = {}
    for r in rows:
        if r["layer"] == 2:
            cos.setdefault(frozenset((r["pair_a"], r["pair_b"])), {})[r["position"]] = r["cosine"]
    family = cos[frozenset(("quick", "mixed"))]
    away = [cos[frozenset(("quick", "other"))], cos[frozenset(("mixed", "other"))]]
    numbers = f"family {family}, organism/other {away[0]}, mixed/other {away[1]}"
    print("pair similarity:", numbers)
    mean = lambda d: float(np.mean([d[p] for p in (1, 2, 3, 4)]))
    # measured: 0.91-0.94 within the family, 0.10-0.21 to the other topic
    assert mean(family) > max(mean(a) for a in away), numbers
    assert all(cos[frozenset((n,))][p] == pytest.approx(1.0) for n in ("quick", "other") for p in range(5))
    names, sim = matrix([r for r in rows if r["layer"] == 2], 2)
    order = [names[i] for i in cluster_order(sim)]
    assert order.index("other") in (0, len(order) - 1), order   # the family sits together
    page = store.read_bytes("runs/five/report.html").decode()
    heat = page[page.index('id="pair-similarity"'):]
    assert heat.count('class="cell"') == 3 * 16 and f'data-order="{",".join(order)}"' in heat


def test_report_of_a_running_job_from_s3(tmp_path, s3_endpoint, s3_bucket, capsys):
    """`adl report` on an S3 status record of a job still running: the page says so."""
    from tests.test_report import copy_to_s3, write_run
    local, _ = write_run(tmp_path)
    local.write_json(layout.run_status("toy"), {
        "job": "toy", "state": "running", "started": "2026-01-01T00:00:00+00:00", "seconds": 12.0,
        "counts": {"pairs": 1, "pending": 0, "running": 1, "done": 0, "failed": 0},
        "pairs": {"toy": {"state": "running", "error": None, "stages": {}}}})
    remote = copy_to_s3(local, f"s3://{s3_bucket}/p", s3_endpoint)
    assert main(["report", f"s3://{s3_bucket}/p/runs/toy/status.json", "--endpoint-url", s3_endpoint,
                 "--region", "us-east-1"]) == 0
    assert capsys.readouterr().out.strip() == f"s3://{s3_bucket}/p/runs/toy/report.html"
    text = Page(remote.read_bytes("runs/toy/report.html").decode()).text
    assert "job running: 0 of 1 pairs done, 0 failed, 1 running" in text and "toyrunning" in text.replace(" ", "")
