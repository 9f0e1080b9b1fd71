"""Many pairs with generation and the analyses on a cluster with room for few model
actors: every job finishes, each pair's tables equal the same pair run alone, and a
model shared by many pairs is loaded once per runtime."""
from __future__ import annotations

import shutil

import pytest

from conftest import generation_spec
from jobs.driver import RunStats, run_job
from jobs.spec import parse_spec
from storage import layout
from storage.store import Store
from storage.tables import DIFFERENCE, GENERATIONS, LOGIT_LENS, PATCHSCOPE, SIMILARITY, STEERING
from workers.demo_pair import DEMO_VERSION

DEMO = f"demo-{DEMO_VERSION}-seed0"   # the demo pair's folder, which labels its models

PAIR_TABLES = (DIFFERENCE.file, LOGIT_LENS.file, GENERATIONS.file, STEERING.file, PATCHSCOPE.file,
               SIMILARITY.file)
# What does not depend on the pair's name (its samples' seeds do): the same weights give
# the same difference, lens and patchscope.
SEEDLESS = (DIFFERENCE.file, LOGIT_LENS.file, PATCHSCOPE.file)


@pytest.fixture(scope="module")
def twins(demo_pair, tmp_path_factory):
    """Seven copies of the demo's finetuned model: distinct models (their own folders,
    activation sets and actors) with the same weights."""
    folder = tmp_path_factory.mktemp("twins")
    out = []
    for i in range(7):
        shutil.copytree(demo_pair.finetuned_dir, folder / f"twin{i}" / "finetuned")
        out.append(folder / f"twin{i}" / "finetuned")
    return out


def cheap_spec(make_spec, demo_pair, root) -> dict:
    """generation_spec made cheaper still: the eight-pair job starts nine vLLM engines."""
    raw = generation_spec(make_spec, demo_pair, root)
    raw.update(corpus={"kind": "demo", "num_documents": 300}, shard_size=300)
    raw["method"]["positions"] = [0, 1]
    raw["generation"] = {"samples": 1, "max_tokens": 16,
                         "search": {"high": 10.0, "steps": 2, "samples": 2, "max_tokens": 16}}
    raw["analyses"] = {"patchscope_scales": [1.0, 10.0, 40.0], "embedding_texts": 50}
    return raw


def spec_with_twins(raw: dict, twins, cpus_per_worker):
    raw["compute"] = {"cpus_per_worker": cpus_per_worker}
    demo = raw["pairs"][0]
    raw["pairs"] += [{**demo, "name": f"twin{i}", "finetuned": str(folder)} for i, folder in enumerate(twins)]
    return raw


def pair_table(store: Store, record: dict, name: str, table: str):
    entry = next(p for p in record["pairs"] if p["name"] == name)
    return store.read_table(f"{entry['dir']}/{table}")


def check_job(alone_store, alone, stats, root, names):
    """Every pair done; the demo pair's tables equal the demo pair run alone (its run
    record entry `alone` on alone_store); each twin's seedless tables equal the demo
    pair's; every load accounted for."""
    store = Store(str(root))
    record = store.read_json(layout.run_record("test"))
    status = store.read_json(layout.run_status("test"))
    assert stats.failed == {} and status["state"] == "done", status.get("error")
    assert [p["name"] for p in record["pairs"]] == names
    for table in PAIR_TABLES:
        got = pair_table(store, record, "demo", table)
        assert got.equals(alone_store.read_table(f"{alone['dir']}/{table}")), table
    for name in names[1:]:
        for table in SEEDLESS:
            assert pair_table(store, record, name, table).equals(pair_table(store, record, "demo", table)), (name, table)
    distinct = {(key.runtime, key.label) for key in stats.loads}
    assert len(distinct) == 2 * (len(names) + 1) + 1   # every model in both runtimes, one embedder
    assert stats.model_loads == len(distinct) + len(stats.reloads)
    assert all("released to make room for" in why for _, why in stats.reloads)
    assert status["loads"] and sum(e["loads"] for e in status["loads"]) == stats.model_loads


def test_two_pairs_with_generation_on_the_default_compute(ray_cluster, make_spec, demo_pair, twins,
                                                          generation_run, tmp_path):
    """compute.cpus_per_worker 1 (the default): room for 2 actors on 2 CPUs."""
    root = tmp_path / "out"
    stats = RunStats()
    run_job(parse_spec(spec_with_twins(generation_spec(make_spec, demo_pair, root), twins[:1], 1)), stats)
    _, alone_store, alone, _ = generation_run
    check_job(alone_store, alone, stats, root, ["demo", "twin0"])
    assert stats.max_alive == 2


def test_eight_pairs_over_nine_models_on_four_slots(ray_cluster, make_spec, demo_pair, twins, tmp_path):
    """8 pairs, 9 models, generation and analyses; cpus_per_worker 0.5: room for 4 actors.
    The base, shared by all 8 pairs, is loaded once in each runtime."""
    alone_store = Store(str(tmp_path / "alone"))
    alone = alone_store.read_json(run_job(parse_spec(cheap_spec(make_spec, demo_pair, tmp_path / "alone"))))
    root = tmp_path / "out"
    stats = RunStats()
    run_job(parse_spec(spec_with_twins(cheap_spec(make_spec, demo_pair, root), twins, 0.5)), stats)
    check_job(alone_store, alone["pairs"][0], stats, root, ["demo"] + [f"twin{i}" for i in range(7)])
    assert stats.max_alive <= 4
    base = {key.runtime: n for key, n in stats.loads.items() if key.label == f"{DEMO}/base"}
    assert base == {"transformers": 1, "vllm": 1}
    assert stats.reloads == []
