"""The placement's memory estimate (jobs/placement.stage_peaks) against per-stage peaks
written out here from first principles for the public configs of Llama-3.2-1B,
Llama-3.1-8B, Gemma-3-27B and Qwen3-32B (benchmarks/configs): the weights are counted from
the real transformers model built on the meta device, not from the estimate's own
parameter count; and the causal stage's peak stays bounded as the vocabulary grows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.placement import ModelShape, Workload, model_memory_gb, placement, stage_peaks
from jobs.spec import Compute

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
GB = 1e9
BF16, F32, F64 = 2, 4, 8


def real_weights(config: dict, engine: bool) -> int:
    """Bytes of the bf16 model transformers builds (an engine: the language model only)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    named = dict(model.named_parameters())
    if engine:
        named = {n: p for n, p in named.items() if "vision" not in n and "multi_modal" not in n}
    return BF16 * sum(p.numel() for p in named.values())


def analytic(config: dict) -> dict[str, float]:
    """GB per stage at the default workload (jobs/spec defaults: 256 documents x 10 tokens,
    4 captured blocks, 64 lens rows, 256 patchscope rows x 32 tokens, causal 8 x 1024
    tokens with 2**24 logits per chunk, grader 8 x 1024 tokens; an engine of 32 sequences
    x 4096 tokens stepping 8192 tokens)."""
    t = config.get("text_config", config)
    h, inter, vocab, layers = t["hidden_size"], t["intermediate_size"], t["vocab_size"], t["num_hidden_layers"]
    kv, hd, heads = t["num_key_value_heads"], t["head_dim"], t["num_attention_heads"]
    context = 0.5 * GB
    held = real_weights(config, engine=False) + F32 * vocab * h        # + the lens's float32 unembedding
    # One decoder block's live tensors per token: residual, its norm, attention output,
    # q, k, v, and the MLP's gate, up and their product.
    block = lambda tokens: tokens * BF16 * (3 * h + heads * hd + 2 * kv * hd + 3 * inter)
    chunk_rows = min(8 * 1024, 2 ** 24 // vocab)
    logit_bytes = lambda rows, width: rows * vocab * (width + F32 + F32)   # logits, float32, softmax
    slack = 1.1
    stages = {
        "extraction": block(2560) + 2 * 4 * 2560 * h * BF16,
        "lens": logit_bytes(64, F32),
        "patchscope": block(256 * 32) + logit_bytes(256, BF16),
        # + the last hidden states and the hook's float64 x, x.v and the patched x
        "causal": block(8192) + 8192 * h * (BF16 + 3 * F64) + logit_bytes(chunk_rows, BF16),
        "grader": block(8192) + 8192 * h * BF16 + logit_bytes(chunk_rows, BF16),
    }
    peaks = {s: (context + held + slack * b) / GB for s, b in stages.items()}
    kv_cache = 2 * layers * kv * hd * BF16 * 4096 * 32
    peaks["engine"] = (context + real_weights(config, engine=True) + kv_cache
                       + slack * (block(8192) + 32 * vocab * F32)) / GB
    return peaks


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "gemma-3-27b", "qwen3-32b"])
def test_the_estimate_equals_the_analytic_peak_of_every_stage(name):
    config = json.loads((CONFIGS / name / "config.json").read_text())
    shape = ModelShape.of_config(config)
    want = analytic(config)
    got = {**stage_peaks(shape, "bfloat16"), **stage_peaks(shape, "bfloat16", engine=True)}
    assert got.keys() == want.keys()
    for stage in want:
        assert got[stage] == pytest.approx(want[stage], rel=0.10), stage
    # The actor's estimate is its largest stage, well above the old 1.2 x weights for small
    # models (the lens's copy and the logits are a large share of them).
    weights = real_weights(config, engine=False) / GB
    assert model_memory_gb(shape, "bfloat16") == pytest.approx(max(want[s] for s in want if s != "engine"), rel=0.10)
    if name == "llama-3.2-1b":
        assert model_memory_gb(shape, "bfloat16") > 1.6 * weights


def test_the_causal_stage_stays_bounded_as_the_vocabulary_grows():
    import workers.causal
    assert Workload().causal_logit_elements == workers.causal.LOGIT_ELEMENTS   # the code's own bound
    base = dict(parameters=8 * 10 ** 9, hidden=4096, layers=32, kv_heads=8, head_dim=128, intermediate=14336)
    transient = {}
    for vocab in (32_000, 128_256, 262_208, 1_048_576):
        shape = ModelShape(vocab=vocab, **base)
        peaks = stage_peaks(shape, "bfloat16")
        lens_stage_less_its_logits = peaks["lens"] - 1.1 * 64 * vocab * 12 / GB   # context, weights, lens copy
        transient[vocab] = peaks["causal"] - lens_stage_less_its_logits
    # Whole logits of 8 x 1024 tokens would grow by 8192 x 10 bytes per token of vocabulary
    # (2.7 GB at 32k, 86 GB at 1M); the chunked loss adds at most one chunk (2**24 x 10
    # bytes) and one row.
    assert max(transient.values()) - min(transient.values()) < 1.1 * (2 ** 24 * 10 + 1_048_576 * 10) / GB
    assert max(transient.values()) < 3.0


def test_placement_packs_by_the_largest_stage():
    config = json.loads((CONFIGS / "llama-3.1-8b" / "config.json").read_text())
    shape = ModelShape.of_config(config)
    compute = Compute(gpu_memory_gb=80)
    need = model_memory_gb(shape, "bfloat16")
    assert 20 < need < 26
    assert placement(compute, shape, "bfloat16").num_gpus == pytest.approx(1 / int(80 // need))
    # A known parameter count alone is read in Llama 3's proportions: the same 8B model.
    assert model_memory_gb(shape.parameters, "bfloat16") == pytest.approx(need, rel=0.02)
    # An engine's KV grows with the job's max_model_len x sequences.
    short, long = (placement(compute, shape, "bfloat16", engine=True, work=Workload(max_model_len=n)).memory_gb
                   for n in (1024, 16384))
    assert long - short == pytest.approx(2 * 32 * 8 * 128 * 2 * (16384 - 1024) * 32 / GB, rel=1e-6)


def test_a_jobs_actors_are_placed_by_their_models_shape_and_the_jobs_batches(make_spec, demo_pair, tmp_path):
    """The plan carries each model's shape; the executor's requests estimate with the
    job's own batch sizes, grader and engine length."""
    from jobs.executor import ActorRequests, job_workload
    from jobs.plan import make_plan
    from jobs.scheduler import ModelKey
    from jobs.spec import parse_spec
    raw = make_spec(tmp_path, compute={"gpu_memory_gb": 1.0}, batch_size=64,
                    causal_effect={"batch_size": 4, "max_tokens": 512},
                    generation={"enabled": True, "max_tokens": 100, "max_model_len": 2048})
    spec = parse_spec(raw)
    plan = make_plan(spec)
    base = plan.pairs[0].base
    config = json.loads((Path(demo_pair.base_dir) / "config.json").read_text())
    assert base.shape == ModelShape.of_config(config)
    work = job_workload(spec)
    assert (work.extraction_tokens, work.causal, work.causal_batch, work.causal_tokens, work.max_model_len) == \
        (64 * spec.method.tokens_per_document, True, 4, 512, 2048)
    requests = ActorRequests(plan)
    assert requests.placed(ModelKey("transformers", base.source)).memory_gb == \
        pytest.approx(model_memory_gb(base.shape, "float32", work=work))
    engine = requests.placed(ModelKey("vllm", base.source)).memory_gb
    assert engine == pytest.approx(model_memory_gb(base.shape, "float32", engine=True, work=work))
    longer = model_memory_gb(base.shape, "float32", engine=True, work=Workload(max_model_len=4096))
    assert engine < longer
