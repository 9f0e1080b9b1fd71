"""The corpus: `num_documents` counts kept documents, read lazily in corpus order until
that many pass the method's filters (adl-method.md, section 1), as the reference does."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.driver import run_job
from jobs.plan import make_plan
from jobs.spec import parse_spec
from storage import layout
from storage.store import Store
from storage.tables import DIFFERENCE
from workers.demo_pair import generic_documents
from workers.tokenization import keep_documents

N = 10          # tokens_per_document
KEPT = 30       # num_documents
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def texts():
    """Documents of the demo's kind on one line each; all long enough to keep."""
    return [d.replace("\n", " ") for d in generic_documents(KEPT + 10, seed=99)]


@pytest.fixture(scope="module")
def tokenizer(demo_pair):
    return AutoTokenizer.from_pretrained(demo_pair.base_dir)


def corpus_file(kind: str, texts: list[str], tmp_path):
    """Dropped documents at the head and one among the kept ones; the KEPT-th kept
    document is texts[KEPT - 1]. Returns the file, how many documents precede the
    KEPT-th kept one (inclusive) and the dropped counts."""
    if kind == "text":
        head = ["", "   ", "\t\t", "hi"]
        lines = head + texts[:10] + ["ok"] + texts[10:]
        dropped = {"non_text": 0, "empty": 1, "whitespace": 2, "too_short": 2}
        path = tmp_path / "corpus.txt"
        path.write_text("".join(line + "\n" for line in lines))
    else:
        # (a line without the column, or whose value is not text, is an input error:
        # tests/test_bad_inputs.py)
        head = [{"text": ""}, {"text": "  \n "}, {"text": "hi"}]
        rows = head + [{"text": t} for t in texts[:10]] + [{"text": "ok"}] + [{"text": t} for t in texts[10:KEPT]]
        dropped = {"non_text": 0, "empty": 1, "whitespace": 1, "too_short": 2}
        path = tmp_path / "corpus.jsonl"
        # a line past the last document needed must never be read
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not JSON\n"
                        + "".join(json.dumps({"text": t}) + "\n" for t in texts[KEPT:]))
    return path, len(head) + 1 + KEPT, dropped


def test_kept_documents_are_read_lazily_and_in_any_chunks(tokenizer, texts):
    def documents():
        yield from ["", None, "hi"] + texts[:KEPT]
        raise AssertionError("read past the last document needed")

    kept = [keep_documents(tokenizer, documents(), N, KEPT, chunk_size=c) for c in (1, 7, 4096)]
    for k in kept:
        assert k.read == 3 + KEPT and k.dropped == {"non_text": 1, "empty": 1, "whitespace": 0, "too_short": 1}
        assert list(k.doc_ids) == list(range(3, 3 + KEPT))
        np.testing.assert_array_equal(k.token_ids, kept[0].token_ids)
    expected = [tokenizer(t[: N * 10], add_special_tokens=True)["input_ids"][:N] for t in texts[:KEPT]]
    np.testing.assert_array_equal(kept[0].token_ids, np.array(expected))


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_num_documents_kept_and_their_delta(kind, texts, tmp_path, ray_cluster, make_spec, demo_pair):
    path, read, dropped = corpus_file(kind, texts, tmp_path)
    spec = parse_spec(make_spec(tmp_path / "out", corpus={"kind": kind, "path": str(path), "num_documents": KEPT},
                                method={"layers": LAYERS}))
    store = Store(str(tmp_path / "out"))
    pair = store.read_json(run_job(spec))["pairs"][0]
    difference = store.read_table(f"{pair['dir']}/{DIFFERENCE.file}").to_pandas()
    assert (difference.num_documents == KEPT).all()

    # The same delta, computed directly: the kept documents are texts[:KEPT] by construction.
    tok = AutoTokenizer.from_pretrained(demo_pair.base_dir)
    ids = [tok(t[: N * 10], add_special_tokens=True)["input_ids"] for t in texts[:KEPT]]
    assert min(map(len, ids)) >= N
    ids = torch.tensor([x[:N] for x in ids])
    hidden = {}
    for role, folder in (("base", demo_pair.base_dir), ("finetuned", demo_pair.finetuned_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            hidden[role] = [h.numpy().astype(np.float64) for h in model(input_ids=ids, output_hidden_states=True).hidden_states]
    for r in difference.itertuples():
        delta = (hidden["finetuned"][r.layer + 1][:, r.position] - hidden["base"][r.layer + 1][:, r.position]).mean(0)
        np.testing.assert_allclose(np.asarray(r.delta), delta, atol=1e-5, rtol=0)

    # How many were read and dropped, for each reason: the status record and the manifest.
    status = store.read_json(layout.run_status(spec.name))
    for prefix in (pair["base_activations"], pair["finetuned_activations"]):
        entry = status["activation_sets"][prefix]
        assert (entry["documents"], entry["documents_read"], entry["documents_dropped"]) == (KEPT, read, dropped)
        manifest = store.read_json(layout.manifest(prefix))
        assert (manifest["documents"], manifest["documents_read"]) == (KEPT, read)


def test_a_corpus_that_ends_early_is_one_log_line(tmp_path, make_spec, texts, caplog):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(["hi", ""] + texts[:5]) + "\n")
    spec = parse_spec(make_spec(tmp_path / "out", corpus={"kind": "text", "path": str(path), "num_documents": 10}))
    with caplog.at_level(logging.INFO, logger="adl"):
        plan = make_plan(spec)
    docs = plan.sets[0].documents
    assert (len(docs.doc_ids), docs.read) == (5, 7) and list(docs.doc_ids) == [2, 3, 4, 5, 6]
    assert [r.getMessage() for r in caplog.records] == [
        f"corpus: {path} ended after 7 documents, 5 kept of num_documents=10 "
        f"(1 empty, 1 shorter than tokens_per_document=10 tokens)"]


def test_a_bad_json_line_among_the_documents_needed_names_its_line(tmp_path, make_spec, texts):
    from jobs.spec import SpecError
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]) + "[1, 2]\n")
    spec = parse_spec(make_spec(tmp_path / "out", corpus={"kind": "jsonl", "path": str(path), "num_documents": 10}))
    with pytest.raises(SpecError, match=r"^corpus.path: .*corpus.jsonl line 4 is not a JSON object$"):
        make_plan(spec)
