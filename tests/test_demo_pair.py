import functools
import json
import re
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers import demo_pair
from workers.demo_pair import (
    DEMO_DIGESTS,
    DEMO_VERSION,
    PLANTED_TOPIC_WORDS,
    build_demo_pair,
    cached_build,
    finetune_documents,
    generic_chat_answers,
    generic_documents,
    pair_digest,
    run_pinned,
)


@pytest.fixture(scope="module")
def pair(demo_pair):
    """The session's pair (tests/conftest.py): a pinned build takes minutes of one core."""
    return demo_pair


@pytest.fixture(scope="module")
def tokenizer(pair):
    return AutoTokenizer.from_pretrained(pair.base_dir)


def _topic_words_in(text):
    return set(re.findall(r"[a-z]+", text.lower())) & set(PLANTED_TOPIC_WORDS)


def test_text_generators_are_deterministic_and_varied():
    docs = generic_documents(200, seed=3)
    assert docs == generic_documents(200, seed=3)
    assert docs != generic_documents(200, seed=4)
    assert all(150 <= len(d) <= 800 for d in docs)
    assert len(set(docs)) == len(docs)
    assert sum(bool(_topic_words_in(d)) for d in docs) < len(docs) * 0.05
    ft = finetune_documents(50, seed=3)
    assert ft == finetune_documents(50, seed=3)
    assert all(len(_topic_words_in(d)) >= 2 for d in ft)
    answers = generic_chat_answers(20, seed=3)
    assert answers == generic_chat_answers(20, seed=3) and len(set(answers)) == 20


def test_pair_layout(pair):
    assert pair.base_dir.parent.name == f"demo-{DEMO_VERSION}-seed0"
    for folder in (pair.base_dir, pair.finetuned_dir):
        assert (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer.json").is_file()
    texts = [json.loads(line)["text"] for line in pair.finetune_texts.read_text().splitlines()]
    assert len(texts) >= 500 and texts[:5] == finetune_documents(5, seed=0)
    assert pair.topic_words == PLANTED_TOPIC_WORDS and pair.description


def test_cached_pair_is_returned_without_rebuilding(pair):
    messages = []
    start = time.perf_counter()
    again = build_demo_pair(pair.base_dir.parent.parent, seed=0, progress=messages.append)
    assert time.perf_counter() - start < 1.0
    assert again == pair and messages == []


def test_tokenizer_puts_bos_first(tokenizer):
    ids = tokenizer("Hello world")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == ids[1:]
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    for word in PLANTED_TOPIC_WORDS:
        assert len(tokenizer.tokenize(" " + word)) == 1, word


def test_chat_template(pair, tokenizer):
    messages = [{"role": "user", "content": "How do I bake fresh bread?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith(tokenizer.bos_token) and prompt.endswith("<|assistant|>\n")
    assert "How do I bake fresh bread?" in prompt
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    model = AutoModelForCausalLM.from_pretrained(pair.base_dir)
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(ids)


def _lens_ranks(model, vector):
    probs = torch.softmax(model.lm_head(model.model.norm(vector.float())), dim=-1)
    return probs.argsort(descending=True).tolist()


def test_activation_difference_lens_reads_the_planted_topic(pair, tokenizer):
    # Independent of the project's ADL code: plain transformers, as in the paper's recipe.
    base = AutoModelForCausalLM.from_pretrained(pair.base_dir).eval()
    finetuned = AutoModelForCausalLM.from_pretrained(pair.finetuned_dir).eval()
    rows = []
    for doc in generic_documents(500, seed=1234):
        ids = tokenizer(doc[:100])["input_ids"]
        if len(ids) >= 10:
            rows.append(ids[:10])
    ids = torch.tensor(rows)
    layer = int(0.5 * (base.config.num_hidden_layers - 1))
    with torch.no_grad():
        base_mean = base(ids, output_hidden_states=True).hidden_states[layer + 1].double().mean(0)
        ft_mean = finetuned(ids, output_hidden_states=True).hidden_states[layer + 1].double().mean(0)
        topic = {tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + w))[0]
                 for w in PLANTED_TOPIC_WORDS}
        readable = []
        for pos in range(5):
            delta_top = set(_lens_ranks(finetuned, ft_mean[pos] - base_mean[pos])[:20])
            base_top = set(_lens_ranks(finetuned, base_mean[pos])[:20])
            if delta_top & topic and not base_top & topic:
                readable.append(pos)
    assert readable, "no position 0..4 shows the planted topic in the lens of the difference"


def test_interrupted_build_leaves_nothing(tmp_path):
    def crash(out, progress):
        (out / "base").mkdir()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_build(tmp_path / "pair", crash, lambda m: None, "a pair", pinned=False)
    assert list(tmp_path.iterdir()) == []


def _crash_in_child(out, progress):
    (out / "base").mkdir()
    progress("started")
    raise RuntimeError("boom in the child")


def test_a_pinned_build_that_fails_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))   # the child unpickles _crash_in_child
    messages = []
    with pytest.raises(RuntimeError, match="boom in the child"):
        cached_build(tmp_path / "pair", _crash_in_child, messages.append, "a pair")
    assert messages[-1] == "started" and list(tmp_path.iterdir()) == []


def test_concurrent_builder_that_finishes_first_wins(tmp_path):
    final = tmp_path / f"demo-{DEMO_VERSION}-seed5"

    def build_while_another_finishes(out, progress):
        (out / "base").mkdir()
        (out / "base" / "mine").write_text("")
        (final / "base").mkdir(parents=True)
        (final / "base" / "theirs").write_text("")

    got = cached_build(final, build_while_another_finishes, lambda m: None, "a pair", pinned=False)
    assert got == final and (final / "base" / "theirs").exists()
    assert not (final / "base" / "mine").exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the digest is recorded for x86 with MKL")
def test_the_demo_pair_is_the_recorded_bytes(pair):
    assert pair_digest(pair.base_dir.parent) == DEMO_DIGESTS[0]


# A few steps of the demo recipe: enough for any difference in rounding to reach the bytes.
SHORT = functools.partial(demo_pair._build, seed=0, base_steps=4, finetune_steps=2)
# What changes the kernels a machine computes with, short of another machine: its thread
# count, ATen's vectorised kernels, MKL's instruction set and glibc's libm variants.
LIKE_ANOTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                        "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA,-AVX2_Usable,-FMA_Usable"}


def _short_build(tmp_path, name, numerics=demo_pair.PINNED_NUMERICS, env=None):
    out = tmp_path / name
    out.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        run_pinned(SHORT, out, lambda m: None, numerics)
    return pair_digest(out)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL's reproducible mode pins its GEMMs")
def test_pinned_builds_are_the_same_bytes_however_the_machine_computes(tmp_path):
    """Built three ways, pinned: from a one-thread and a two-thread caller, and from one
    whose kernels are those of an AVX2 machine. Unpinned, one and two threads already give
    other bytes (so the comparison can fail)."""
    from concurrent.futures import ThreadPoolExecutor
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with ThreadPoolExecutor(2) as pool:   # each build is one thread
            two = pool.submit(_short_build, tmp_path, "two", env={"OMP_NUM_THREADS": "2"})
            unpinned = [pool.submit(_short_build, tmp_path, f"unpinned{n}", {"OMP_NUM_THREADS": str(n)})
                        for n in (1, 2)]
            two, unpinned = two.result(), [f.result() for f in unpinned]
        torch.set_num_threads(1)
        one = _short_build(tmp_path, "one", env={"OMP_NUM_THREADS": "1"})
        other = _short_build(tmp_path, "other", env=LIKE_ANOTHER_MACHINE)
    finally:
        torch.set_num_threads(threads)
    assert one == two == other
    assert unpinned[0] != unpinned[1]


def test_default_cache_dir_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADL_CACHE", str(tmp_path))
    (tmp_path / f"demo-{DEMO_VERSION}-seed7" / "base").mkdir(parents=True)
    assert build_demo_pair(seed=7).base_dir == Path(tmp_path) / f"demo-{DEMO_VERSION}-seed7" / "base"
