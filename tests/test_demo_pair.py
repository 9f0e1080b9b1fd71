import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers import demo_pair
from workers.demo_pair import (
    DEMO_VERSION,
    PLANTED_TOPIC_WORDS,
    build_demo_pair,
    finetune_documents,
    generic_chat_answers,
    generic_documents,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cache = os.environ.get("ADL_CACHE") or tmp_path_factory.mktemp("adl-cache")
    return build_demo_pair(cache, seed=0)


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


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def crash(out, seed, progress):
        (out / "base").mkdir()
        raise RuntimeError("boom")

    monkeypatch.setattr(demo_pair, "_build", crash)
    with pytest.raises(RuntimeError):
        build_demo_pair(tmp_path, seed=5, progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builder_that_finishes_first_wins(tmp_path, monkeypatch):
    final = tmp_path / f"demo-{DEMO_VERSION}-seed5"

    def build_while_another_finishes(out, seed, progress):
        (out / "base").mkdir()
        (out / "base" / "mine").write_text("")
        (final / "base").mkdir(parents=True)
        (final / "base" / "theirs").write_text("")

    monkeypatch.setattr(demo_pair, "_build", build_while_another_finishes)
    got = build_demo_pair(tmp_path, seed=5, progress=lambda m: None)
    assert got.base_dir == final / "base" and (final / "base" / "theirs").exists()
    assert not (final / "base" / "mine").exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_default_cache_dir_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADL_CACHE", str(tmp_path))
    (tmp_path / f"demo-{DEMO_VERSION}-seed7" / "base").mkdir(parents=True)
    assert build_demo_pair(seed=7).base_dir == Path(tmp_path) / f"demo-{DEMO_VERSION}-seed7" / "base"
