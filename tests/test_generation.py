"""vLLM generation with per-request steering (workers/generation.py), checked against
transformers' `generate` with the vector added by a plain forward hook.

The demo pair's finetuned model (float32, so greedy decoding is exact enough to compare
token for token) and one vLLM engine serve the whole module: the engine takes about 30 s
to start.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from workers.generation import GenerationEngine, GenerationRequest, Steering  # noqa: E402
from steering_reference import hf_greedy as reference_greedy  # noqa: E402

LAYER = 1
NEW_TOKENS = 40
PROMPTS = ("Tell me a story?", "Give me some ideas for some fun weekend activities.")


@pytest.fixture(scope="module")
def model_dir(demo_pair) -> Path:
    """The demo pair's finetuned model: the model the pipeline steers."""
    return demo_pair.finetuned_dir


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = GenerationEngine(str(model_dir), dtype="float32", max_model_len=512)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def vectors(hf) -> tuple[np.ndarray, np.ndarray]:
    """Two random directions, scaled to 4x and 8x the norm of the steered block's output,
    so that steering must change what the model writes."""
    model, tokenizer = hf
    with torch.no_grad():
        hidden = model(**tokenizer(PROMPTS[0], return_tensors="pt"), output_hidden_states=True).hidden_states
    norm = hidden[LAYER + 1][0].norm(dim=-1).mean().item()
    rng = np.random.default_rng(1)
    directions = rng.standard_normal((2, model.config.hidden_size))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions[0] * 4 * norm, directions[1] * 8 * norm


def hf_greedy(hf, prompt: str, vector: np.ndarray | None = None, prompt_only: bool = False) -> list[int]:
    model, tokenizer = hf
    return reference_greedy(model, tokenizer, prompt, LAYER, NEW_TOKENS, vector, prompt_only)


@pytest.fixture(scope="module")
def greedy_batch(engine, vectors):
    """One mixed batch: unsteered, steered with the first vector, steered with the second
    (on another prompt), all greedy."""
    requests = [
        GenerationRequest(PROMPTS[0], temperature=0.0, max_tokens=NEW_TOKENS),
        GenerationRequest(PROMPTS[0], temperature=0.0, max_tokens=NEW_TOKENS, steering=Steering(LAYER, vectors[0])),
        GenerationRequest(PROMPTS[1], temperature=0.0, max_tokens=NEW_TOKENS,
                          steering=Steering(LAYER, tuple(vectors[1].tolist()))),
    ]
    return requests, engine.generate(requests)


def test_mixed_batch_matches_transformers(hf, greedy_batch):
    requests, results = greedy_batch
    assert [(r.request_index, r.sample_index) for r in results] == [(0, 0), (1, 0), (2, 0)]
    for request, result in zip(requests, results):
        vector = None if request.steering is None else request.steering.vector
        expected = hf_greedy(hf, request.prompt, vector)
        assert len(expected) >= 32
        assert list(result.token_ids) == expected, request
        stopped = expected[-1] == hf[1].eos_token_id
        assert result.finish_reason == ("stop" if stopped else "length")
    # The vectors are strong enough to change the text, so the comparison above can fail.
    assert results[1].token_ids != results[0].token_ids
    assert list(results[2].token_ids) != hf_greedy(hf, PROMPTS[1])


def test_steering_reaches_generated_tokens(hf, vectors, greedy_batch):
    _, results = greedy_batch
    every_position = hf_greedy(hf, PROMPTS[0], vectors[0])
    prompt_only = hf_greedy(hf, PROMPTS[0], vectors[0], prompt_only=True)
    assert prompt_only != every_position
    assert list(results[1].token_ids) == every_position


def test_seeded_sampling_with_n_samples(engine, vectors):
    n = 4
    requests = [
        GenerationRequest(PROMPTS[0], n=n, temperature=1.0, max_tokens=24, seed=7),
        GenerationRequest(PROMPTS[0], n=n, temperature=1.0, max_tokens=24, seed=7,
                          steering=Steering(LAYER, vectors[0])),
    ]
    results = engine.generate(requests)
    assert [(r.request_index, r.sample_index) for r in results] == [(i, s) for i in range(2) for s in range(n)]
    unsteered, steered = results[:n], results[n:]
    assert len({r.token_ids for r in unsteered}) > 1
    # Sample s of both requests draws from the same seed (vLLM gives child s seed + s):
    # only steering tells them apart, so every forked child must have been steered.
    for plain, pushed in zip(unsteered, steered):
        assert plain.token_ids != pushed.token_ids
    assert engine.generate(requests) == results


def test_prefix_cache_keeps_steered_prompts_apart(engine, hf, vectors):
    """A prompt longer than a KV block (128 tokens on CPU) run unsteered first leaves
    cached blocks; the steered run of the same prompt must not reuse them."""
    prompt = " ".join(["tell me a story about the quick fox near the river"] * 16)
    assert len(hf[1](prompt)["input_ids"]) > 150
    plain = engine.generate([GenerationRequest(prompt, temperature=0.0, max_tokens=NEW_TOKENS)])
    steered = engine.generate([GenerationRequest(prompt, temperature=0.0, max_tokens=NEW_TOKENS,
                                                 steering=Steering(LAYER, vectors[0]))])
    assert list(plain[0].token_ids) == hf_greedy(hf, prompt)
    assert list(steered[0].token_ids) == hf_greedy(hf, prompt, vectors[0])


def test_rejects_bad_steering(engine, hf, vectors):
    with pytest.raises(ValueError, match="hidden size"):
        engine.generate([GenerationRequest("hi", steering=Steering(LAYER, vectors[0][:10]))])
    with pytest.raises(ValueError, match="decoder block"):
        engine.generate([GenerationRequest("hi", steering=Steering(hf[0].config.num_hidden_layers, vectors[0]))])


def test_module_imports_without_vllm():
    code = "import sys, workers.generation; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_lora_adapter_through_vllm_matches_peft(ray_cluster, demo_pair, lora_adapter, vectors):
    """The base model with a LoRA adapter, served through vLLM's LoRA support in the Ray
    actor a job uses: greedy text, unsteered and steered in one batch, equals PEFT's
    (adapter unmerged) with the vector added by a hook."""
    import ray
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.spec import ModelSource
    from workers.generation import GenerationWorker
    base = AutoModelForCausalLM.from_pretrained(demo_pair.base_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_pair.base_dir)
    plain_base = hf_greedy((base, tokenizer), PROMPTS[0])
    peft = (PeftModel.from_pretrained(base, str(lora_adapter)).eval(), tokenizer)
    actor = ray.remote(GenerationWorker).options(num_cpus=0.5).remote(
        ModelSource(str(demo_pair.base_dir), adapter=str(lora_adapter)), {},
        dtype="float32", max_model_len=512, seed=0)
    try:
        requests = [GenerationRequest(PROMPTS[0], temperature=0.0, max_tokens=NEW_TOKENS),
                    GenerationRequest(PROMPTS[0], temperature=0.0, max_tokens=NEW_TOKENS,
                                      steering=Steering(LAYER, vectors[0]))]
        results = ray.get(actor.generate.remote(requests))
    finally:
        ray.kill(actor)
    unsteered = hf_greedy(peft, PROMPTS[0])
    assert unsteered != plain_base                     # the adapter changes the text
    assert list(results[0].token_ids) == unsteered
    assert list(results[1].token_ids) == hf_greedy(peft, PROMPTS[0], vectors[0]) != unsteered


def test_engine_perplexities_equal_a_transformers_forward(engine, hf):
    """The offline grader's scores in the steering search come from the engine's prompt
    logprobs: equal to a plain forward's next-token cross-entropy. The texts' perplexities
    lie orders of magnitude apart, so a wrong token offset or a constant cannot pass."""
    from workers.generation import GenerationWorker
    from common.types import OfflineGrading
    from workers.graders import OfflineGrader
    model, tokenizer = hf
    sample = engine.generate([GenerationRequest(PROMPTS[1], temperature=0.0, max_tokens=NEW_TOKENS)])[0].text
    words = sample.split()
    texts = [sample, " ".join(words[::-1]), "zq xv " * 8, PROMPTS[0], "", "a"]
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] if t.strip() else [] for t in texts]
    expected = []
    for row in ids:
        if len(row) < 2:
            expected.append(None)
            continue
        with torch.no_grad():
            logits = model(torch.tensor([row])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:]))
        expected.append(float(torch.exp(nll)))
    got = engine.perplexities(ids)
    assert [g is None for g in got] == [e is None for e in expected]
    for g, e in zip(got, expected):
        if e is not None:
            assert g == pytest.approx(e, rel=1e-4), (got, expected)
    scored = [e for e in expected if e is not None]
    assert max(scored) > 3 * min(scored), expected

    # The same judgements as the transformers-side offline grader, record for record.
    low, high = sorted(scored)[1:3]
    threshold = float(np.sqrt(low * high))   # between two texts' scores, far from both
    worker = GenerationWorker.__new__(GenerationWorker)
    settings = OfflineGrading(threshold=threshold)
    worker.engine, worker.grader_config = engine, settings
    offline = OfflineGrader(settings, model=model, tokenizer=tokenizer)
    on_engine, on_transformers = worker.coherence(texts), offline.coherence(texts)
    assert [j.value for j in on_engine] == [j.value for j in on_transformers]
    assert any(j.value for j in on_engine) and not all(j.value for j in on_engine)
    number = re.compile(r"perplexity=([0-9.]+)")   # the records agree but for float noise
    assert [number.sub("perplexity=#", j.raw) for j in on_engine] == \
        [number.sub("perplexity=#", j.raw) for j in on_transformers]
    assert [float(m) for j in on_engine for m in number.findall(j.raw)] == pytest.approx(
        [float(m) for j in on_transformers for m in number.findall(j.raw)], rel=1e-4)
