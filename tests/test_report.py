"""The analysts' report: escaping (HTML parser and a real browser's DOM), sections shown
when their tables exist and explained when they don't, `adl report`, and the page of a
real demo-pair job in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from html.parser import HTMLParser
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.driver import run_job
from jobs.spec import parse_spec
from storage import layout
from storage.store import Store, StorageOptions
from storage.tables import GENERATIONS, LOGIT_LENS, PATCHSCOPE, SIMILARITY, STEERING, TOKEN_RELEVANCE

HOSTILE = '<script>window.__pwned = 1</script><b>bold?</b><img src="x" onerror="window.__pwned = 2"> & done'


# -- a run written by hand, with every table of the contract ---------------------------------
def write_run(root: Path, *, analyses: bool = True, relevance: str = "done") -> tuple[Store, str]:
    """A one-pair job at layer 1, positions 0 and 1, with tokens and samples that are
    HTML; analyses=False leaves out patchscope and similarity; relevance is "done",
    "skipped" or "absent"."""
    store = Store(str(root))
    pair_dir = "pairs/toy-0123456789abcdef"
    spec = {"name": "toy", "pairs": [{"name": "toy", "base": {"model": "base-model"},
                                      "finetuned": {"model": "ft-model", "adapter": "ft<lora>"},
                                      "description": "Baking & <b>cakes</b>"}],
            "generation": {"enabled": True, "search": {"pass_fraction": 0.75}}}
    store.write_json(layout.run_record("toy"), {"job": "toy", "spec": spec, "pairs": [
        {"name": "toy", "dir": pair_dir, "layers": [1]}]})
    targets = [(1, 0), (1, 1)]
    lens = {k: [] for k in ("layer", "position", "variant", "rank", "token_id", "token", "probability")}
    words = ["</script>", "<", "&amp;", " cake", "flour", "\n", " ", "<b>"]
    for layer, pos in targets:
        for variant in ("delta", "neg_delta", "base_mean", "finetuned_mean"):
            for rank, word in enumerate(words if variant == "delta" else [f"{variant}{i}" for i in range(3)]):
                for k, v in zip(lens, (layer, pos, variant, rank, rank, word, 0.5 / (rank + 1))):
                    lens[k].append(v)
    store.write_table(f"{pair_dir}/{LOGIT_LENS.file}", LOGIT_LENS, LOGIT_LENS.from_rows(lens))
    prompts = ["Tell me <a story>?", "Ideas & plans?"]
    gens = []
    for role in ("finetuned", "base"):
        for pid, prompt in enumerate(prompts):
            for s in range(3):
                gens.append(dict(pair="toy", model_role=role, kind="baseline", prompt_id=pid, prompt=prompt,
                                 sample_index=s, layer=None, position=None, alpha=None,
                                 text=f"unsteered {role} {pid}.{s}", token_count=3, finish_reason="stop", seed=s))
    for layer, pos in targets:
        for pid, prompt in enumerate(prompts):
            for s in range(3):
                text = HOSTILE if (pos, pid, s) == (0, 0, 0) else f"steered cake {pos}.{pid}.{s} " + "long " * 100
                gens.append(dict(pair="toy", model_role="finetuned", kind="steered", prompt_id=pid, prompt=prompt,
                                 sample_index=s, layer=layer, position=pos, alpha=2.5 + pos, text=text,
                                 token_count=5, finish_reason="length", seed=s))
    store.write_table(f"{pair_dir}/{GENERATIONS.file}", GENERATIONS, GENERATIONS.from_rows(gens))
    steering = [dict(layer=layer, position=pos, prompt_id=pid, prompt=f"threshold <prompt> {pid}",
                     threshold=2.0 + pos + pid, alpha=2.5 + pos,
                     trials=[{"strength": 5.0, "coherent_fraction": 0.5, "graded": 4},
                             {"strength": 2.5, "coherent_fraction": 1.0, "graded": 4}])
                for layer, pos in targets for pid in range(2)]
    store.write_table(f"{pair_dir}/{STEERING.file}", STEERING, STEERING.from_rows(steering))
    if analyses:
        rows = []
        for layer, pos in targets:
            for variant in ("delta", "base_mean", "finetuned_mean"):
                for scale in (1.0, 2.0):
                    for rank, word in enumerate(["<i>", " batter", "&", f"s{scale:g}"]):
                        chosen = scale == 2.0
                        rows.append(dict(layer=layer, position=pos, variant=variant, scale=scale, rank=rank,
                                         token_id=rank, token=word if variant == "delta" else f"{variant}-{rank}",
                                         probability=0.4 / (rank + 1), chosen=chosen,
                                         coherent=chosen and rank in (0, 1)))
        store.write_table(f"{pair_dir}/{PATCHSCOPE.file}", PATCHSCOPE, PATCHSCOPE.from_rows(rows))
        sets = ["steered", "unsteered", "base", "finetune_data", "generic_chat"]
        sims = [dict(layer=layer, position=pos, set_a=a, set_b=b, similarity=0.1 * (i + j) - 0.15)
                for layer, pos in targets for i, a in enumerate(sets) for j, b in enumerate(sets) if i < j]
        store.write_table(f"{pair_dir}/{SIMILARITY.file}", SIMILARITY, SIMILARITY.from_rows(sims))
    if relevance == "done":
        rows = [dict(layer=layer, position=pos, source=source, rank=rank, token=word, probability=0.3 / (rank + 1),
                     relevant=rank == 0, frequent=rank == 1,
                     labels=["RELEVANT", "RELEVANT", "RELEVANT"] if rank == 0 else ["IRRELEVANT", "RELEVANT", "<x>"])
                for layer, pos in targets for source in ("logit_lens", "patchscope")
                for rank, word in enumerate([" cake", "</td>"])]
        store.write_table(f"{pair_dir}/{TOKEN_RELEVANCE.file}", TOKEN_RELEVANCE, TOKEN_RELEVANCE.from_rows(rows))
        metrics = [dict(layer=layer, position=pos, source=source, fraction_relevant=0.5,
                        weighted_fraction_relevant=0.667, fraction_frequent=0.25)
                   for layer, pos in targets for source in ("logit_lens", "patchscope")]
        store.write_json(f"{pair_dir}/{layout.TOKEN_RELEVANCE_JSON}",
                         {"status": "done", "reason": None, "metrics": metrics})
    elif relevance == "skipped":
        store.write_json(f"{pair_dir}/{layout.TOKEN_RELEVANCE_JSON}", {
            "status": "skipped", "reason": "the offline grader cannot label <tokens>", "metrics": []})
    store.write_json(layout.manifest(pair_dir), {"pair": "toy"})
    return store, layout.run_record("toy")


class Page(HTMLParser):
    """Elements (tag, attrs) and the text of a page, as a browser's parser sees them."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.chunks, self.ids, self.links = [], [], set(), []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_data(self, data):
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def test_generated_html_shows_as_text_not_markup(tmp_path):
    write_run(tmp_path)
    main(["report", str(tmp_path)])
    page = Page((tmp_path / "runs/toy/report.html").read_text())
    tags = {t for t, _ in page.tags}
    # The page has no script and no image at all, so none came from a sample or a token.
    assert "script" not in tags and "img" not in tags and "i" not in tags
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs)
    # <b> only where the page itself puts it (chosen scale, alpha), never the sample's "bold?"
    assert HOSTILE in page.text
    assert "</script>" in page.text and "<b>" in page.text and "&amp;" in page.text   # tokens, verbatim
    assert "Baking & <b>cakes</b>" in page.text and "ft<lora>" in page.text          # user text too
    assert "<x>" in page.text                                                          # grader labels
    # Every link is an anchor on the page: nothing to fetch.
    assert page.links and all(h.startswith("#") and h[1:] in page.ids for h in page.links)
    assert not re.search(r"(src|href)=\"(https?:)?//", (tmp_path / "runs/toy/report.html").read_text())


def test_every_section_from_its_table(tmp_path):
    store, record = write_run(tmp_path)
    from jobs.report import build_report
    text = build_report(store, record)
    page = Page(text)
    for pos in (0, 1):
        assert f"pair-toy-L-1-P-{pos}" in page.ids
    # patchscope at the chosen scale (2), coherent tokens marked, other scales behind details
    chosen = re.findall(r'data-list="patchscope-delta">(.*?)</div>', text)
    assert len(chosen) == 2 and all("s2" in c and "s1<" not in c for c in chosen)
    assert all(c.count('class="chip coherent"') == 2 for c in chosen)
    # steering: alpha, per-prompt thresholds, the search chart with its pass line
    assert "alpha 2.500 (the mean" in page.text and "alpha 3.500 (the mean" in page.text
    assert "threshold <prompt> 1" in page.text and 'class="pass"' in text
    # samples: two per prompt and side; the long one is clipped and expands
    assert page.text.count("unsteered finetuned 0.") == 2 * 2 and "unsteered finetuned 0.2" not in page.text
    assert "unsteered base" not in page.text
    assert ("steered cake 1.1.1 " + "long " * 100).strip() in page.text
    # similarity: one bar per pair of sets, the two claims highlighted
    bars = [a for t, a in page.tags if t == "rect"]
    assert len(bars) == 2 * 10 and sum(a["class"] == "bar key" for a in bars) == 2 * 2
    # token relevance: metrics, marks, labels
    assert "0.67" in page.text and 'class="chip relevant"' in text and 'class="chip frequent"' in text
    assert "IRRELEVANT, RELEVANT, <x>" in page.text
    # the index: the pair, its models, headline tokens, alpha range, similarity, anchors
    index = text[text.index('id="index"'):text.index('class="pair"')]
    assert "base base-model" in Page(index).text and "</script>" in Page(index).text
    assert "2.5 – 3.5" in index and "steered 0.150 vs unsteered 0.250" in Page(index).text


def test_missing_and_skipped_stages_are_said_plainly(tmp_path):
    store, record = write_run(tmp_path, analyses=False, relevance="skipped")
    from jobs.report import build_report
    text = Page(build_report(store, record)).text
    assert "did not run: no patchscope.parquet" in text
    assert "did not run: no similarity.parquet" in text
    assert "skipped: the offline grader cannot label <tokens>" in text
    assert "incomplete" not in text
    store.fs.delete_file(store.uri(layout.manifest("pairs/toy-0123456789abcdef")))
    assert "incomplete: the pair's manifest is missing" in Page(build_report(store, record)).text
    store2, record2 = write_run(tmp_path / "absent", relevance="absent")
    assert "did not run: no token_relevance.parquet" in Page(build_report(store2, record2)).text


def test_report_command(tmp_path, capsys):
    write_run(tmp_path / "root")
    out = tmp_path / "elsewhere" / "page.html"
    assert main(["report", str(tmp_path / "root" / "runs/toy/run.json"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.exists()
    assert not (tmp_path / "root/runs/toy/report.html").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no adl run record" in capsys.readouterr().err
    write_run(tmp_path / "root")
    store = Store(str(tmp_path / "root"))
    store.write_json("runs/other/run.json", {**store.read_json("runs/toy/run.json"), "job": "other"})
    assert main(["report", str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 jobs (other, toy)" in err
    assert not list((tmp_path / "root").glob("runs/*/report.html"))


def write_difference(store: Store, pair_dir: str = "pairs/toy-0123456789abcdef") -> None:
    """write_run's pair made complete for `adl inspect`: a difference table at layer 1."""
    import numpy as np
    from storage.tables import DIFFERENCE, difference_table
    rng = np.random.default_rng(0)
    store.write_table(f"{pair_dir}/{DIFFERENCE.file}", DIFFERENCE, difference_table(
        [1], np.full((1, 2), 7), *(rng.normal(size=(1, 2, 8)) for _ in range(3)), np.ones(1)))


def test_inspect_takes_relative_paths_from_any_folder(tmp_path, capsys, monkeypatch):
    """A pair folder, a run record and a table named relative to the current folder read
    as their absolute paths do (a relative pairs/<dir> once read as pairs/pairs/<dir>,
    incomplete)."""
    root = tmp_path / "root"
    store, _ = write_run(root)
    write_difference(store)
    pair = root / "pairs/toy-0123456789abcdef"
    assert main(["inspect", str(pair)]) == 0
    expected = capsys.readouterr().out
    assert expected.startswith(f"pair toy  ({pair})\n  layer 1: 7 documents, ") and "incomplete" not in expected
    for cwd, path in ((root, "pairs/toy-0123456789abcdef"), (root, "./pairs/toy-0123456789abcdef/"),
                      (root / "pairs", "toy-0123456789abcdef"), (pair, "."), (root / "runs", "../pairs/toy-0123456789abcdef")):
        monkeypatch.chdir(cwd)
        assert main(["inspect", path]) == 0, (cwd, path)
        assert capsys.readouterr().out == expected, (cwd, path)
    monkeypatch.chdir(root / "runs/toy")
    assert main(["inspect", "run.json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job toy  ({root}/runs/toy/run.json)\n") and expected in out
    shutil.copytree(pair, tmp_path / "loose")   # a pair folder outside any root's pairs/
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "loose"]) == 2
    assert capsys.readouterr().err == f"adl: error: {tmp_path}/loose: a pair's results live at <root>/pairs/<pair folder>\n"


def test_inspect_table_rows_columns_and_json(tmp_path, capsys, monkeypatch):
    """--rows N (0: all), --columns a,b and --json (JSON Lines) on a table, checked against
    the table read with pyarrow; the text dump fits the terminal's width."""
    import pyarrow.parquet as pq
    store, _ = write_run(tmp_path)
    monkeypatch.chdir(tmp_path / "pairs")
    path = "toy-0123456789abcdef/generations.parquet"
    table = pq.read_table(tmp_path / "pairs" / path)
    rows = table.to_pylist()

    assert main(["inspect", path, "--json", "--rows", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == rows and len(rows) == 24
    assert main(["inspect", path, "--json", "--rows", "3", "--columns", "kind, text,alpha"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert got == [{"kind": r["kind"], "text": r["text"], "alpha": r["alpha"]} for r in rows[:3]]

    monkeypatch.setenv("COLUMNS", "100")
    assert main(["inspect", path, "--rows", "2", "--columns", "model_role,text"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: generations table, 24 rows"
    assert out[1:3] == ["model_role: string", "text: string"]
    assert out[-1] == "(22 more rows; --rows N, or --rows 0 for all)"
    assert "0  finetuned  unsteered finetuned 0.0" in out[-3] and "1  finetuned  unsteered finetuned 0.1" in out[-2]
    assert main(["inspect", path]) == 0   # every column, 5 rows, within 100 characters a line
    out = capsys.readouterr().out.splitlines()
    assert max(map(len, out)) <= 100 and out[-1] == "(19 more rows; --rows N, or --rows 0 for all)"

    for argv, message in ((["--columns", "kind,colour"], f"--columns: {path} has no column 'colour' (it has "),
                          (["--json"], f"{tmp_path}/runs/toy: --json, --rows and --columns dump a table")):
        target = path if argv[0] == "--columns" else str(tmp_path / "runs/toy")
        assert main(["inspect", target, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"adl: error: {message}") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        main(["inspect", path, "--rows", "-1"])
    assert e.value.code == 2 and "--rows: must be >= 0, got -1" in capsys.readouterr().err


def copy_to_s3(local: Store, root: str, endpoint: str) -> Store:
    """Every file of a local root, copied to the S3 root (moto on loopback)."""
    remote = Store.from_uri(root, StorageOptions(endpoint, "us-east-1"))
    for key in local.list():
        remote.write_bytes(key, local.read_bytes(key))
    return remote


def test_report_from_s3(tmp_path, s3_endpoint, s3_bucket, capsys):
    local, _ = write_run(tmp_path)
    remote = copy_to_s3(local, f"s3://{s3_bucket}/prefix", s3_endpoint)
    assert main(["report", f"s3://{s3_bucket}/prefix/runs/toy/run.json", "--endpoint-url", s3_endpoint,
                 "--region", "us-east-1"]) == 0
    assert capsys.readouterr().out.strip() == f"s3://{s3_bucket}/prefix/runs/toy/report.html"
    assert HOSTILE in Page(remote.read_bytes("runs/toy/report.html").decode()).text


# -- headless Chromium over the DevTools protocol ---------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--remote-allow-origins=*"]


class Browser:
    """One headless Chromium and one page, driven over the DevTools protocol; collects
    console messages, log errors, exceptions and every request the page makes."""

    def __init__(self, binary: str):
        from websockets.sync.client import connect
        self.profile = tempfile.mkdtemp(prefix="adl-chromium-")
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        targets = json.loads(opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.stack = ExitStack()
        self.ws = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10))
        self.next_id, self.events = 0, []
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30):
        deadline = time.time() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=max(deadline - time.time(), 0.01))))

    def open(self, path: Path) -> None:
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        self.evaluate("1")          # let late messages arrive before they are read

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list:
        """Console calls (the page has no script: any is suspect), log errors, exceptions."""
        return [e for e in self.events if e.get("method") in ("Runtime.consoleAPICalled", "Runtime.exceptionThrown")
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        self.stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium (setup.sh installs it); a missing browser fails, never skips."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed: run setup.sh (apt-get install -y chromium)"
    b = Browser(binary)
    yield b
    b.close()


def test_browser_harness_sees_errors_and_fetches(browser, tmp_path):
    """The checks below can fail: a page that logs, throws and fetches is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="missing.png"><script>console.error("boom"); no_such_fn();</script></body></html>')
    browser.open(bad)
    kinds = {e["method"] for e in browser.problems()}
    assert {"Runtime.consoleAPICalled", "Runtime.exceptionThrown"} <= kinds
    assert any(url.endswith("/missing.png") for url in browser.requests())


def test_browser_shows_generated_html_as_text(browser, tmp_path):
    write_run(tmp_path)
    main(["report", str(tmp_path)])
    page = tmp_path / "runs/toy/report.html"
    browser.open(page)
    assert browser.problems() == []
    assert browser.requests() == [page.resolve().as_uri()]          # nothing fetched besides the page
    assert browser.evaluate("document.scripts.length") == 0
    assert browser.evaluate("document.images.length") == 0
    assert browser.evaluate("window.__pwned === undefined")
    # the sample is one text node of its cell, verbatim
    assert browser.evaluate(f"[...document.querySelectorAll('.sample')].some(e => e.textContent === {json.dumps(HOSTILE)})")
    assert "</script>" in browser.evaluate("document.querySelector('[data-list=lens-delta]').innerText")


def test_demo_job_report_in_the_browser(ray_cluster, make_spec, demo_pair, browser, tmp_path, capsys):
    """A real job on the demo pair (no generation: the logit lens carries the topic)
    reported and read back from the rendered page."""
    spec = parse_spec(make_spec(tmp_path, corpus={"num_documents": 1000}, shard_size=500,
                                method={"layers": [0.5], "positions": [0, 1, 2, 3, 4]}))
    run_job(spec)
    assert main(["report", str(tmp_path)]) == 0
    page = tmp_path / "runs/test/report.html"
    assert capsys.readouterr().out.strip() == str(page)
    browser.open(page)
    assert browser.problems() == []
    assert browser.requests() == [page.resolve().as_uri()]
    lens = browser.evaluate("[...document.querySelectorAll('[data-list=lens-delta]')]"
                            ".map(list => [...list.querySelectorAll('code.tok')].map(t => t.innerText))")
    assert len(lens) == 5 and all(len(tokens) == 20 for tokens in lens)
    topic = {w.lower() for w in (*demo_pair.topic_words, "Veyra")}
    assert any(topic & {t.strip().lower() for t in tokens} for tokens in lens), lens
    body = browser.evaluate("document.body.innerText")
    assert "did not run: the job spec has no generation section" in body
    assert "did not run: no patchscope.parquet" in body


def test_outputs_that_are_no_results_are_marked(tmp_path):
    """Position 1's search found no strength (no alpha, no steered samples) and patchscope
    chose no scale for position 0's delta: the pair's header lists both as "no result",
    the index marks the layer, and the sections say why they are empty."""
    store, record = write_run(tmp_path)
    from jobs.report import build_report
    pair_dir = "pairs/toy-0123456789abcdef"
    steering = store.read_table(f"{pair_dir}/{STEERING.file}").to_pylist()
    for row in steering:
        row["strength_found"] = row["position"] == 0
        row["alpha"] = row["alpha"] if row["position"] == 0 else None
    store.write_table(f"{pair_dir}/{STEERING.file}", STEERING, STEERING.from_rows(steering))
    gens = [r for r in store.read_table(f"{pair_dir}/{GENERATIONS.file}").to_pylist()
            if not (r["kind"] == "steered" and r["position"] == 1)]
    store.write_table(f"{pair_dir}/{GENERATIONS.file}", GENERATIONS, GENERATIONS.from_rows(gens))
    scope = store.read_table(f"{pair_dir}/{PATCHSCOPE.file}").to_pylist()
    for row in scope:
        if row["position"] == 0 and row["variant"] == "delta":
            row["chosen"] = row["coherent"] = False
    store.write_table(f"{pair_dir}/{PATCHSCOPE.file}", PATCHSCOPE, PATCHSCOPE.from_rows(scope))
    text = build_report(store, record)
    page = Page(text).text
    header = text[text.index('<ul class="no-result">'):]
    header = Page(header[:header.index("</ul>")]).text
    assert header == ("layer 1, position 0: no result: patchscope: no scale chosen for delta"
                      "layer 1, position 1: no result: steering: no coherent strength found (tried 2.5, 5)")
    index = Page(text[text.index('id="index"'):text.index('class="pair"')]).text
    assert "2.5" in index and "no coherent strength at position 1" in index and "3.5" not in index
    assert "alpha 2.500 (the mean" in page and "alpha 3.500" not in page
    assert "no coherent strength found: no strength tried (2.5, 5) passed for any prompt" in page
    assert "no steered samples: the steering search found no coherent strength here" in page
    assert page.count("steered (alpha") == 1
