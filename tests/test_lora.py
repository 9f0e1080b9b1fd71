"""LoRA finetunes (workers/lora.py): an adapter pair runs its generations with the default
steering search, and one vLLM engine per base serves the base and several adapters in
mixed batches, each request exactly as its own model (PEFT merge_and_unload) runs it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from jobs.driver import RunStats, run_job  # noqa: E402
from jobs.spec import parse_spec  # noqa: E402
from storage.store import Store  # noqa: E402
from storage.tables import GENERATIONS, STEERING  # noqa: E402


def make_adapter(base_dir: Path, folder: Path, rank: int, targets: list[str], seed: int) -> Path:
    """A PEFT LoRA adapter with random weights strong enough to change greedy text."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    if (folder / "adapter_config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(30.0 / rank ** 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def adapters(demo_pair, tmp_path_factory) -> list[Path]:
    """Adapters of ranks 8 and 64 on the demo base, on different modules."""
    root = tmp_path_factory.mktemp("adapters")
    kinds = [(8, ["q_proj", "v_proj", "o_proj", "down_proj"]), (64, ["q_proj", "v_proj"]),
             (8, ["gate_proj", "up_proj"]), (64, ["o_proj", "down_proj"]),
             (8, ["k_proj", "v_proj", "down_proj"]), (64, ["q_proj", "v_proj", "o_proj", "down_proj"])]
    return [make_adapter(demo_pair.base_dir, root / f"a{i}-r{r}", r, t, seed=10 + i)
            for i, (r, t) in enumerate(kinds)]


def test_adapter_pair_generates_with_the_default_search(ray_cluster, make_spec, demo_pair, adapters, tmp_path):
    """The steering search at its default settings sends 90 LoRA requests a round, then
    scores them by prompt logprobs on the same engine (the offline grader). That failed
    in vLLM's LoRA logits processor (`einsum(): subscript b has size 90 ... 18`) while the
    engine wrapped lm_head; it now wraps only the modules the adapter adapts."""
    # A grader that finds every sample coherent: the search then chooses a strength, and
    # the final steered samples run through the adapter too (a random adapter's steered
    # text loops, which the default rules judge incoherent: no steered rows at all).
    spec = make_spec(tmp_path, method={"layers": [0.5], "positions": [0]},
                     generation={"samples": 1, "max_tokens": 16},
                     grader={"kind": "offline", "threshold": 1e9, "min_tokens": 1, "min_distinct_ratio": 0.0})
    spec["pairs"] = [{"name": "lora", "base": str(demo_pair.base_dir), "finetuned": {"adapter": str(adapters[0])}}]
    parsed = parse_spec(spec)
    assert parsed.generation.search == type(parsed.generation.search)()   # the defaults
    stats = RunStats()
    store = Store(str(tmp_path))
    record = store.read_json(run_job(parsed, stats))
    assert not stats.failed, record
    [pair] = record["pairs"]
    from jobs.results import PairResults
    results = PairResults(store, pair["dir"])
    steering = results.arrow(STEERING).to_pylist()
    generations = results.arrow(GENERATIONS).to_pylist()
    search = parsed.generation.search
    assert len(steering) == len(search.prompts)
    levels = [min(search.lookahead, search.steps - k) for k in range(0, search.steps, search.lookahead)]
    trials = sum(2 ** n - 1 for n in levels)                 # every round ran, and all was graded
    for row in steering:
        assert len(row["trials"]) == trials
        assert sum(t["graded"] for t in row["trials"]) == trials * search.samples
    assert all(row["strength_found"] for row in steering)
    assert {r["kind"] for r in generations} == {"baseline", "steered"}


def merged(base_dir: Path, adapter: Path | None):
    """The adapter merged into the base (PEFT merge_and_unload): a plain model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


def test_one_engine_serves_the_base_and_its_adapters_in_one_batch(demo_pair, adapters):
    """Three adapters and the base, steered and unsteered, greedy, in one batch: each
    request's text equals that adapter's requests run alone on the engine, and a
    transformers hook on the merged model."""
    from steering_reference import hf_greedy
    from transformers import AutoTokenizer

    from workers.generation import GenerationEngine, GenerationRequest, Steering
    layer, tokens, prompt = 1, 24, "Tell me a story?"
    chosen = [None, str(adapters[0]), str(adapters[1]), str(adapters[3])]
    tokenizer = AutoTokenizer.from_pretrained(demo_pair.base_dir)
    models = {a: merged(demo_pair.base_dir, a and Path(a)) for a in chosen}
    rng = np.random.default_rng(3)
    vector = rng.standard_normal(models[None].config.hidden_size)
    with torch.no_grad():
        hidden = models[None](**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True).hidden_states
    vector *= 4 * hidden[layer + 1][0].norm(dim=-1).mean().item() / np.linalg.norm(vector)
    expected = {(a, s): hf_greedy(models[a], tokenizer, prompt, layer, tokens, vector if s else None)
                for a in chosen for s in (False, True)}
    assert len({tuple(v) for (a, s), v in expected.items() if not s}) == len(chosen)   # each adapter tells
    assert all(expected[(a, True)] != expected[(a, False)] for a in chosen)           # steering tells

    engine = GenerationEngine(str(demo_pair.base_dir), dtype="float32", max_model_len=512,
                              lora_adapters=tuple(a for a in chosen if a), max_loras=3)
    try:
        request = lambda a, s: GenerationRequest(prompt, temperature=0.0, max_tokens=tokens, adapter=a,
                                                 steering=Steering(layer, vector) if s else None)
        keys = [(a, s) for a in chosen for s in (False, True)]
        mixed = engine.generate([request(a, s) for a, s in keys])
        alone = {a: engine.generate([request(a, s) for s in (False, True)]) for a in chosen}
        with pytest.raises(ValueError, match="not one this engine was started with"):
            engine.generate([GenerationRequest(prompt, adapter=str(adapters[2]))])
    finally:
        engine.close()
    for (a, s), result in zip(keys, mixed):
        assert list(result.token_ids) == expected[(a, s)], (a, s)
        assert result.token_ids == alone[a][int(s)].token_ids, (a, s)


def _job(make_spec, demo_pair, root, pairs, generation: bool) -> dict:
    spec = make_spec(root, method={"layers": [0.5], "positions": [0, 1]}, analyses={},
                     grader={"kind": "offline", "threshold": 5000})
    if generation:
        spec["generation"] = {"samples": 1, "max_tokens": 12,
                              "search": {"steps": 2, "samples": 2, "max_tokens": 12}}
    spec["pairs"] = pairs
    return spec


def test_six_adapters_ride_on_one_base_and_equal_their_merged_models(ray_cluster, make_spec, demo_pair, adapters,
                                                                     tmp_path):
    """Six adapters (ranks 8 and 64) on the demo base, generation and analyses on: the
    base is loaded once per runtime and each adapter once onto it; each adapter's
    activations, lens and patchscope lists equal those of the same job with the adapter
    merged into a plain model (PEFT merge_and_unload), which loads a model per adapter."""
    from jobs.results import PairResults
    from storage import layout
    from storage.tables import LOGIT_LENS, PATCHSCOPE
    base = str(demo_pair.base_dir)
    names = [f"a{i}" for i in range(len(adapters))]
    spec = parse_spec(_job(make_spec, demo_pair, tmp_path / "adapters",
                           [{"name": n, "base": base, "finetuned": {"adapter": str(a)}}
                            for n, a in zip(names, adapters)], generation=True))
    stats = RunStats()
    store = Store(str(tmp_path / "adapters"))
    record = store.read_json(run_job(spec, stats))
    assert not stats.failed, stats.failed
    assert sorted((k.runtime, n) for k, n in stats.loads.items()) == [
        ("embedder", 1), ("transformers", 1), ("vllm", 1)]                        # the base, once
    assert sorted((k.runtime, a) for (k, a), n in stats.adapter_loads.items() if n == 1) == sorted(
        (runtime, str(a)) for runtime in ("transformers", "vllm") for a in adapters)   # each adapter, once

    for i, a in enumerate(adapters):
        folder = tmp_path / "merged" / names[i]
        merged(demo_pair.base_dir, a).save_pretrained(folder)
    from transformers import AutoTokenizer
    for n in names:
        AutoTokenizer.from_pretrained(demo_pair.base_dir).save_pretrained(tmp_path / "merged" / n)
    plain = parse_spec(_job(make_spec, demo_pair, tmp_path / "plain",
                            [{"name": n, "base": base, "finetuned": str(tmp_path / "merged" / n)} for n in names],
                            generation=False))
    plain_stats = RunStats()
    plain_store = Store(str(tmp_path / "plain"))
    plain_record = plain_store.read_json(run_job(plain, plain_stats))
    assert not plain_stats.failed, plain_stats.failed
    assert plain_stats.loads_by_runtime()["transformers"] == 1 + len(adapters) > stats.model_loads - 2

    for ours, theirs in zip(record["pairs"], plain_record["pairs"]):
        assert ours["name"] == theirs["name"]
        for shard in range(spec.corpus.num_documents // spec.shard_size):
            got = store.read_table(layout.shard(ours["finetuned_activations"], shard)).to_pydict()
            want = plain_store.read_table(layout.shard(theirs["finetuned_activations"], shard)).to_pydict()
            assert got["doc_id"] == want["doc_id"]
            # float32 LoRA on the side and merged weights round differently: activations of
            # magnitude ~30 differ by up to ~2e-4 after a few blocks (a wrong adapter: by ~1)
            np.testing.assert_allclose(np.asarray(got["act"]), np.asarray(want["act"]), rtol=1e-4, atol=1e-3)
        ours_r, theirs_r = PairResults(store, ours["dir"]), PairResults(plain_store, theirs["dir"])
        for kind, keys in ((LOGIT_LENS, ["layer", "position", "variant", "rank", "token_id"]),
                           (PATCHSCOPE, ["layer", "position", "variant", "scale", "rank", "token_id"])):
            got, want = ours_r.arrow(kind).to_pydict(), theirs_r.arrow(kind).to_pydict()
            assert [got[k] for k in keys] == [want[k] for k in keys], (ours["name"], kind.name)
            np.testing.assert_allclose(got["probability"], want["probability"], rtol=1e-3, atol=1e-6)
    # The adapters' activations differ from the base's, so the comparison above can fail.
    first = record["pairs"][0]
    a0 = store.read_table(layout.shard(first["finetuned_activations"], 0)).column("act").to_numpy(False)
    b0 = store.read_table(layout.shard(first["base_activations"], 0)).column("act").to_numpy(False)
    assert not np.allclose(np.stack(a0), np.stack(b0), atol=1e-3)
