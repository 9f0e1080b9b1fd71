"""The architecture matrix: every family the paper studies (Llama, Gemma 3 1B, Gemma 3 4B and
larger as the multimodal wrapper Gemma3ForConditionalGeneration, Qwen 3) and one
whose final norm is a LayerNorm with a bias (StableLM), each as a tiny locally built model
(workers/architectures.py), checked against independent computations: a plain transformers
forward, the family's norm written out here, a forward hook, PEFT.

Every test runs once per family (the `family_model` fixture); one vLLM engine per family
serves both of that family's vLLM checks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.spec import PATCHSCOPE_PROMPTS
from steering_reference import hf_greedy as reference_greedy
from workers.demo_pair import generic_documents
from workers.extraction import block_outputs
from workers.lens import VARIANTS, Lens
from workers.models import decoder_layers, final_norm, text_config
from workers.patchscope import Patchscope

LAYER = 1
NEW_TOKENS = 32   # past Gemma's 32-token sliding window, with the prompt
PROMPTS = ("Tell me a story?", "Give me some ideas for some fun weekend activities.")


@pytest.fixture(scope="module")
def hf(family_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    family, folder = family_model
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def documents(hf):
    """Ten tokens of each of 8 generic documents, BOS first."""
    _, tokenizer = hf
    ids = [tokenizer(t[:100], add_special_tokens=True)["input_ids"][:10] for t in generic_documents(8, seed=99)]
    return torch.tensor(ids)


def reference_norm(family, model, x):
    """The family's final norm, written out from its definition (not the model's module)."""
    norm = final_norm(model)
    config = text_config(model.config)
    x = x.double()
    w = norm.weight.double()
    if family.norm == "layer":   # LayerNorm: centred, scaled, shifted by a bias
        eps = config.layer_norm_eps
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * w + norm.bias.double()
    scaled = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    return scaled * (1 + w) if family.norm == "gemma" else scaled * w   # Gemma stores w - 1


def test_the_norms_are_not_the_identity(family_model, hf):
    """The builder perturbed them, so the tests below can tell a norm applied from none."""
    norm = final_norm(hf[0])
    identity = 0.0 if family_model[0].norm == "gemma" else 1.0
    assert (norm.weight - identity).abs().mean() > 0.1
    if family_model[0].norm == "layer":
        assert norm.bias.abs().mean() > 0.1


def test_extraction_equals_each_block_output(family_model, hf, documents):
    model, _ = hf
    n = text_config(model.config).num_hidden_layers
    with torch.no_grad():
        hidden = model(input_ids=documents, output_hidden_states=True).hidden_states
    blocks = block_outputs(model, documents, list(range(n)), truncate=False)
    for layer in range(n - 1):
        np.testing.assert_allclose(blocks[:, layer].numpy(), hidden[layer + 1].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(block_outputs(model, documents, [LAYER])[:, 0].numpy(),
                               hidden[LAYER + 1].numpy(), atol=1e-5, rtol=0)
    # HF's last hidden state is the last block's output with the final norm applied; the
    # method reads the block itself.
    last = blocks[:, n - 1]
    np.testing.assert_allclose(reference_norm(family_model[0], model, last).numpy(),
                               hidden[-1].double().numpy(), atol=1e-4, rtol=0)
    assert not torch.allclose(last, hidden[-1], atol=1e-2)


def lens_probs(model, normed):
    """softmax(lm_head(normed)), in float64 from the unembedding's weight."""
    head = model.get_output_embeddings()
    logits = normed @ head.weight.double().T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias.double()
    return torch.softmax(logits, dim=-1)


def differs(p, q) -> bool:
    """Two distributions over the vocabulary differ by more than 10% somewhere."""
    return bool(((p / q).log().abs() > 0.1).any())


def test_lens_applies_the_family_final_norm(family_model, hf, documents):
    """Every variant read through the family's own norm, then the unembedding; the
    negated one negates after the norm, as the reference does (lm_head(-norm(v)))."""
    family, _ = family_model
    model, tokenizer = hf
    with torch.no_grad():
        vectors = block_outputs(model, documents, [LAYER])[:4, 0, 3]   # 4 typical block outputs
        vocab = text_config(model.config).vocab_size
        ids, _, probs = Lens(model).top_tokens(tokenizer, vectors.numpy(), list(VARIANTS), k=vocab)
        got = torch.zeros(len(VARIANTS), vocab, dtype=torch.float64)
        got.scatter_(1, torch.as_tensor(ids), torch.as_tensor(probs, dtype=torch.float64))
        normed = reference_norm(family, model, vectors)
        sign = torch.tensor([-1.0 if v == "neg_delta" else 1.0 for v in VARIANTS], dtype=torch.float64)[:, None]
        np.testing.assert_allclose(got.numpy(), lens_probs(model, sign * normed).numpy(), atol=1e-6, rtol=0)
        # Each of these would be a different lens, so the comparison above can fail.
        assert differs(got, lens_probs(model, vectors.double()))   # no norm
        if family.norm == "gemma":
            rms = vectors.double() * torch.rsqrt(vectors.double().pow(2).mean(-1, keepdim=True) + 1e-6)
            assert differs(got, lens_probs(model, rms * final_norm(model).weight.double()))   # w, not 1 + w
        if family.norm == "layer":
            norm_of_negated = reference_norm(family, model, -vectors)
            assert differs(got[1], lens_probs(model, norm_of_negated[1]))   # lm_head(norm(-v))


def test_patchscope_equals_a_plain_forward_with_the_vector_written_in(family_model, hf, documents):
    """Each prompt alone, unpadded, through the whole model with a hook that replaces the
    block's output at the last token; then the three prompts combined as the method says."""
    model, tokenizer = hf
    vectors = block_outputs(model, documents, [LAYER])[:1, 0, 4].numpy()
    scales, vocab_top, top_k = [1.0, 5.0], 100, 20
    out_ids, _, out_probs = Patchscope(model).run(tokenizer, vectors, [LAYER], scales,
                                                  list(PATCHSCOPE_PROMPTS), vocab_top, top_k)

    def next_token_probs(prompt, vector):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]])

        def write(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            if vector is not None:
                hidden[0, -1] = torch.as_tensor(vector)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = decoder_layers(model)[LAYER].register_forward_hook(write)
        try:
            with torch.no_grad():
                return torch.softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)
        finally:
            handle.remove()

    plain = torch.stack([next_token_probs(p, None) for p in PATCHSCOPE_PROMPTS]).mean(0)
    for v, vector in enumerate(vectors):
        for s, scale in enumerate(scales):
            probs = torch.stack([next_token_probs(p, scale * vector) for p in PATCHSCOPE_PROMPTS])
            keep = torch.ones(probs.shape[1], dtype=torch.bool)
            for row in probs:
                keep &= torch.isin(torch.arange(probs.shape[1]), torch.topk(row, vocab_top).indices)
            combined = torch.where(keep, probs.mean(0), 0.0)
            top = torch.topk(combined, top_k)
            assert list(out_ids[v][s]) == top.indices.tolist()
            np.testing.assert_allclose(out_probs[v][s], top.values.numpy(), atol=1e-6, rtol=0)
            # Writing the vector in changes the answer, so the comparison above can fail.
            assert differs(plain[top.indices], top.values)


# -- vLLM: per-request steering and LoRA, one engine per family ------------------------

def hf_greedy(model, tokenizer, prompt: str, vector=None, prompt_only: bool = False) -> list[int]:
    return reference_greedy(model, tokenizer, prompt, LAYER, NEW_TOKENS, vector, prompt_only)


@pytest.fixture(scope="module")
def vectors(hf):
    """Two random directions at 4x and 8x the norm of the steered block's output."""
    model, tokenizer = hf
    with torch.no_grad():
        hidden = model(**tokenizer(PROMPTS[0], return_tensors="pt"), output_hidden_states=True).hidden_states
    norm = hidden[LAYER + 1][0].norm(dim=-1).mean().item()
    directions = np.random.default_rng(1).standard_normal((2, text_config(model.config).hidden_size))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions[0] * 4 * norm, directions[1] * 8 * norm


@pytest.fixture(scope="module")
def adapter(family_model, tmp_path_factory):
    """A LoRA adapter on the family's model, with non-zero weights so that it changes things."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    family, folder = family_model
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = tmp_path_factory.mktemp(f"lora-{family.name}") / "adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules=family.peft_targets,
                                    init_lora_weights=False)).save_pretrained(out)
    return out


def vllm_cannot_serve(family) -> str | None:
    """Why vLLM cannot start this family's model on this machine (None: it can). vLLM's
    Gemma3ForConditionalGeneration module imports transformers' Gemma 3 image processor,
    which imports torchvision: CUDA vLLM installs it; the CPU machines here cannot (the
    only torchvision wheels are CUDA builds, which break `import vllm`)."""
    if family.wrapper is None:
        return None
    try:
        import transformers.models.gemma3.image_processing_gemma3  # noqa: F401
    except ImportError as e:
        return f"vLLM cannot load {family.config_class}'s model here: {e}"
    return None


@pytest.fixture(scope="module")
def engine(family_model, adapter):
    pytest.importorskip("vllm")
    from workers.generation import GenerationEngine
    family, folder = family_model
    if vllm_cannot_serve(family):
        pytest.skip(vllm_cannot_serve(family))
    engine = GenerationEngine(str(folder), dtype="float32", max_model_len=512,
                              lora_adapter=None if family.no_vllm_lora else str(adapter))
    yield engine
    engine.close()


def test_vllm_steering_equals_a_transformers_hook(engine, hf, vectors):
    """Greedy, one mixed batch: unsteered, and two requests with different vectors on
    different prompts; prompt and generated tokens steered."""
    from workers.generation import GenerationRequest, Steering
    model, tokenizer = hf
    requests = [
        GenerationRequest(PROMPTS[0], temperature=0.0, max_tokens=NEW_TOKENS),
        GenerationRequest(PROMPTS[0], temperature=0.0, max_tokens=NEW_TOKENS, steering=Steering(LAYER, vectors[0])),
        GenerationRequest(PROMPTS[1], temperature=0.0, max_tokens=NEW_TOKENS, steering=Steering(LAYER, vectors[1])),
    ]
    results = engine.generate(requests, adapter=False)
    expected = [hf_greedy(model, tokenizer, r.prompt, None if r.steering is None else r.steering.vector)
                for r in requests]
    assert [list(r.token_ids) for r in results] == expected
    # Steering changes the text, and reaches the generated tokens, not only the prompt.
    assert expected[1] != expected[0] and expected[2] != hf_greedy(model, tokenizer, PROMPTS[1])
    assert expected[1] != hf_greedy(model, tokenizer, PROMPTS[0], vectors[0], prompt_only=True)


def test_vllm_lora_adapter_equals_peft(family_model, engine, hf, adapter, vectors):
    """The adapter through vLLM's LoRA support, unsteered and steered in one batch, equals
    PEFT (unmerged) with the vector added by a hook."""
    family, folder = family_model
    if family.no_vllm_lora:
        pytest.skip(f"{family.name}: {family.no_vllm_lora}")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workers.generation import GenerationRequest, Steering
    _, tokenizer = hf
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                     str(adapter)).eval()
    requests = [GenerationRequest(PROMPTS[0], temperature=0.0, max_tokens=NEW_TOKENS),
                GenerationRequest(PROMPTS[0], temperature=0.0, max_tokens=NEW_TOKENS,
                                  steering=Steering(LAYER, vectors[0]))]
    results = engine.generate(requests)
    unsteered = hf_greedy(peft, tokenizer, PROMPTS[0])
    assert unsteered != hf_greedy(hf[0], tokenizer, PROMPTS[0])     # the adapter changes the text
    assert list(results[0].token_ids) == unsteered
    assert list(results[1].token_ids) == hf_greedy(peft, tokenizer, PROMPTS[0], vectors[0]) != unsteered


def test_adl_run_completes_on_gemma_and_qwen(ray_cluster, make_spec, tmp_path):
    """One job whose pairs are Gemma 3's (1B-style and the 4B+ multimodal wrapper) and
    Qwen 3's model, each with a LoRA finetune of it, through the actors and stages a job
    uses (Llama: the demo pair, in the other test modules; StableLM is left out to keep
    the suite's time: about 1 min per pair here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jobs.driver import run_job
    from jobs.spec import parse_spec
    from storage.store import Store
    from storage.tables import DIFFERENCE, LOGIT_LENS
    from workers.architectures import FAMILIES, build_family_model
    pairs = []
    names = ("gemma3", "gemma3_mm", "qwen3")
    for name in names:
        folder = build_family_model(name)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        get_peft_model(base, LoraConfig(r=4, target_modules=FAMILIES[name].peft_targets,
                                        init_lora_weights=False)).save_pretrained(tmp_path / name)
        pairs.append({"name": name, "base": str(folder), "finetuned": {"adapter": str(tmp_path / name)}})
    spec = parse_spec(make_spec(tmp_path / "store", pairs=pairs, corpus={"num_documents": 100},
                                method={"layers": [0.5]}))
    store = Store(str(tmp_path / "store"))
    record = store.read_json(run_job(spec))
    assert [p["name"] for p in record["pairs"]] == list(names)
    for pair in record["pairs"]:
        lens = store.read_table(f"{pair['dir']}/{LOGIT_LENS.file}").to_pandas()
        assert len(lens) > 0 and np.isfinite(lens.probability).all()
        difference = store.read_table(f"{pair['dir']}/{DIFFERENCE.file}").to_pandas()
        assert (np.stack(difference.delta.to_numpy()) != 0).any()     # the adapter changes activations
