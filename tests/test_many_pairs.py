"""Many pairs in one job: a failing pair is recorded and does not stop the others, a
rerun redoes only what failed; placement by memory; the status record and the catalog."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import unloadable_copy

from jobs.cli import main
from jobs.driver import RunStats, run_job
from jobs.placement import Placement, parameter_count, place, placement
from jobs.scheduler import Cluster, NodeResources, Request
from jobs.spec import Compute, parse_spec
from storage import layout
from storage.store import Store
from storage.tables import DIFFERENCE, LOGIT_LENS, SIMILARITY, STEERING


def test_a_failing_pair_does_not_stop_the_others_and_a_rerun_redoes_only_it(
        ray_cluster, make_spec, demo_pair, tmp_path, capsys):
    broken = unloadable_copy(demo_pair.finetuned_dir, tmp_path / "broken-ft")   # checks pass, loading fails
    spec = make_spec(tmp_path / "out", name="two")
    spec["pairs"].append({"name": "broken", "base": str(demo_pair.base_dir), "finetuned": str(broken)})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))

    assert main(["run", str(spec_file)]) == 1
    err = capsys.readouterr().err
    assert "adl: pair broken failed: " in err
    store = Store(str(tmp_path / "out"))
    status = store.read_json(layout.run_status("two"))
    assert status["state"] == "failed"
    assert status["counts"]["done"] == 1 and status["counts"]["failed"] == 1
    good, bad = status["pairs"]["demo"], status["pairs"]["broken"]
    assert good["state"] == "done" and store.exists(layout.manifest(good["dir"]))
    assert bad["state"] == "failed" and "ignore_mismatched_sizes" in bad["error"], bad   # the cause, in one line
    assert not store.exists(layout.manifest(bad["dir"]))
    assert status["activation_sets"][bad["finetuned_activations"]]["state"] == "failed"
    catalog = store.read_table(layout.run_catalog("two")).to_pandas()
    assert set(catalog.pair) == {"demo"} and len(catalog) == 3 * 5

    # Repaired: the rerun extracts and runs only the broken pair (the base is reused).
    (broken / "model.safetensors").unlink()
    shutil.copy(Path(demo_pair.finetuned_dir) / "model.safetensors", broken / "model.safetensors")
    stats = RunStats()
    run_job(parse_spec(yaml.safe_load(spec_file.read_text())), stats)
    assert stats.failed == {} and stats.pairs_reduced == 1 and stats.shards_extracted == 3
    status = store.read_json(layout.run_status("two"))
    assert status["state"] == "done" and status["counts"]["skipped"] == 1 and status["counts"]["done"] == 2
    catalog = store.read_table(layout.run_catalog("two")).to_pandas()
    assert sorted(set(catalog.pair)) == ["broken", "demo"] and len(catalog) == 2 * 3 * 5


# -- placement by memory ----------------------------------------------------------------
LLAMA_3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "tie_word_embeddings": False, "hidden_act": "silu"}
QWEN_2_5_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                 "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                 "tie_word_embeddings": True, "hidden_act": "silu"}


def test_parameter_count_matches_real_models(demo_pair):
    import json
    from transformers import AutoModelForCausalLM
    config = json.loads((Path(demo_pair.base_dir) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(demo_pair.base_dir)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    # Published sizes (model cards): 8.03B and 1.54B (Qwen's q/k/v biases are not counted).
    assert parameter_count(LLAMA_3_8B) == pytest.approx(8.03e9, rel=0.002)
    assert parameter_count(QWEN_2_5_1_5B) == pytest.approx(1.54e9, rel=0.01)


def test_small_models_share_a_gpu_and_large_ones_span_several():
    eight_b = place(8.03e9 * 2 * 1.2 / 1e9, 80)          # 19.3 GB: four per 80 GB GPU
    assert eight_b == Placement(0.25, 1, pytest.approx(19.27, rel=1e-3))
    assert place(100, 80).num_gpus == 2 and place(170, 80) == Placement(4.0, 4, 170)   # 3 -> a power of two
    compute = Compute(gpu_memory_gb=80)
    # Its largest stage is about 21 GB (jobs/placement.stage_peaks): three per 80 GB GPU.
    assert placement(compute, parameter_count(LLAMA_3_8B), "bfloat16").num_gpus == pytest.approx(1 / 3)
    assert placement(compute, parameter_count(LLAMA_3_8B), "bfloat16", engine=True).num_gpus == 0.5
    assert placement(compute, parameter_count(LLAMA_3_8B), "float32", engine=True).num_gpus == 1
    assert placement(Compute(gpus_per_worker=1), 10**10, "bfloat16").num_gpus == 1   # no memory: as asked
    pool = Cluster([NodeResources("node", 16, 2)])   # the scheduler's packing: first fit per GPU
    quarter, whole = Request(1, 0.25), Request(1, 2.0)
    got = [pool.take(quarter) for _ in range(5)]
    assert [s.gpus for s in got] == [(0,), (0,), (0,), (0,), (1,)] and pool.take(whole) is None
    for slot in got[:4]:
        pool.give(slot)
    assert pool.take(Request(1, 1.0)).gpus == (0,)


# -- the catalog --------------------------------------------------------------------------
def test_catalog_joins_a_pairs_optional_tables_where_present(tmp_path):
    """A pair folder written by hand (tables from storage.tables, similarity.parquet and
    token_relevance.json as contract.md describes them): every catalog column is the value
    put in, and a pair without the optional tables gets nulls there."""
    import numpy as np
    import pyarrow as pa
    from jobs.catalog import build_catalog
    from storage.tables import difference_table
    store = Store(str(tmp_path))
    rng = np.random.default_rng(0)
    layers, n, hidden = [3], 6, 4
    record = {"job": "j", "spec": {"method": {"positions": [0, 2]}}, "pairs": []}
    for name, full in (("full", True), ("plain", False)):
        d = f"pairs/{name}-0"
        delta = rng.normal(size=(1, n, hidden))
        store.write_table(f"{d}/{DIFFERENCE.file}", DIFFERENCE, difference_table(
            layers, np.full((1, n), 7), delta, delta * 0, delta, np.array([2.5])))
        lens = {k: [] for k in ("layer", "position", "variant", "rank", "token_id", "token", "probability")}
        for pos in (0, 2):
            for variant in ("delta", "base_mean"):
                for rank in range(12):
                    for k, v in zip(lens, (3, pos, variant, rank, rank, f"{variant}{pos}-{rank}", 1 / (rank + 2))):
                        lens[k].append(v)
        store.write_table(f"{d}/{LOGIT_LENS.file}", LOGIT_LENS, LOGIT_LENS.from_rows(lens))
        if full:
            store.write_table(f"{d}/{STEERING.file}", STEERING, STEERING.from_rows([
                {"layer": 3, "position": p, "prompt_id": i, "prompt": "x", "threshold": 1.0,
                 "alpha": 4.0 + p, "trials": []} for p in (0, 2) for i in range(3)]))
            store.write_table(f"{d}/{SIMILARITY.file}", SIMILARITY, pa.table({
                "layer": pa.array([3, 3], pa.int32()), "position": pa.array([2, 2], pa.int32()),
                "set_a": ["steered", "steered"], "set_b": ["finetune_data", "base"], "similarity": [0.8, 0.1]}))
            store.write_json(f"{d}/{layout.TOKEN_RELEVANCE_JSON}", {"status": "done", "reason": None, "metrics": [
                {"layer": 3, "position": 0, "source": "logit_lens", "fraction_relevant": 0.6,
                 "weighted_fraction_relevant": 0.5, "fraction_frequent": 0.2},
                {"layer": 3, "position": 0, "source": "patchscope", "fraction_relevant": 0.9,
                 "weighted_fraction_relevant": 0.9, "fraction_frequent": 0.9}]})
        store.write_json(layout.manifest(d), {"pair": name})
        record["pairs"].append({"name": name, "dir": d, "base_activations": "a/b", "finetuned_activations": "a/f"})
        if name == "full":
            expected_norms = np.linalg.norm(delta[0], axis=-1)
    record["pairs"].append({"name": "unfinished", "dir": "pairs/unfinished-0"})   # no manifest: no rows
    rows = build_catalog(store, record).to_pylist()
    assert [(r["pair"], r["position"]) for r in rows] == [("full", 0), ("full", 2), ("plain", 0), ("plain", 2)]
    full0, full2, plain0, _ = rows
    assert full0["delta_norm"] == pytest.approx(expected_norms[0]) and full2["delta_norm"] == pytest.approx(expected_norms[2])
    assert full0["finetuned_norm"] == 2.5 and full0["num_documents"] == 7
    assert full0["top_tokens"] == [f"delta0-{r}" for r in range(10)]
    assert full2["top_probabilities"] == pytest.approx([1 / (r + 2) for r in range(10)])
    assert (full0["alpha"], full2["alpha"]) == (4.0, 6.0)
    assert (full0["fraction_relevant"], full2["fraction_relevant"]) == (0.6, None)
    assert full0["similarities"] is None
    assert full2["similarities"] == [{"set_a": "steered", "set_b": "finetune_data", "similarity": 0.8},
                                     {"set_a": "steered", "set_b": "base", "similarity": 0.1}]
    assert plain0["alpha"] is None and plain0["fraction_relevant"] is None and plain0["similarities"] is None
