"""Stored activations and differences against an independent plain transformers forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.driver import run_job
from jobs.spec import parse_spec
from storage import layout
from storage.store import Store
from storage.tables import ACTIVATIONS, DIFFERENCE, activation_dtype, activation_table, decode_vectors
from workers.demo_pair import generic_documents
from workers.extraction import block_outputs, stored_bits

N = 10
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def run(ray_cluster, make_spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    spec = parse_spec(make_spec(root))
    record = Store(str(root)).read_json(run_job(spec))
    return spec, Store(str(root)), record["pairs"][0]


@pytest.fixture(scope="module")
def plain(demo_pair):
    """The method's inputs and hidden states computed directly with transformers."""
    tok = AutoTokenizer.from_pretrained(demo_pair.base_dir)
    texts = generic_documents(300, seed=1234)
    kept = [(i, ids[:N]) for i, t in enumerate(texts) if t.strip()
            for ids in [tok(t[: N * 10], add_special_tokens=True)["input_ids"]] if len(ids) >= N]
    doc_ids = np.array([i for i, _ in kept])
    ids = torch.tensor([x for _, x in kept])
    out = {}
    for role, folder in (("base", demo_pair.base_dir), ("finetuned", demo_pair.finetuned_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            out[role] = model(input_ids=ids, output_hidden_states=True).hidden_states
        out[f"{role}_model"] = model
    return doc_ids, ids, texts, out


def stored(store: Store, prefix: str):
    keys = sorted(k for k in store.list(prefix) if k.endswith(".parquet"))
    tables = [store.read_table(k) for k in keys]
    acts = np.concatenate([decode_vectors(t.column("act"), activation_dtype(t)) for t in tables])
    doc = np.concatenate([t.column("doc_id").to_numpy() for t in tables])
    layer = np.concatenate([t.column("layer").to_numpy() for t in tables])
    pos = np.concatenate([t.column("position").to_numpy() for t in tables])
    return doc, layer, pos, acts


def test_stored_activations_equal_plain_forward(run, plain):
    _, store, pair = run
    doc_ids, _, _, hs = plain
    for role in ("base", "finetuned"):
        doc, layer, pos, acts = stored(store, pair[f"{role}_activations"])
        assert sorted(set(doc)) == list(doc_ids)
        row = {d: i for i, d in enumerate(doc_ids)}
        expected = np.stack([hs[role][l + 1][row[d], p].numpy() for d, l, p in zip(doc, layer, pos)])
        np.testing.assert_allclose(acts, expected, atol=1e-5, rtol=0)
        assert acts.shape[0] == len(doc_ids) * len(LAYERS) * N


def test_delta_means_and_norm_equal_direct_computation(run, plain):
    spec, store, pair = run
    _, _, _, hs = plain
    table = store.read_table(f"{pair['dir']}/{DIFFERENCE.file}").to_pandas()
    assert len(table) == len(LAYERS) * N
    for _, r in table.iterrows():
        base = hs["base"][r.layer + 1][:, r.position].double()
        ft = hs["finetuned"][r.layer + 1][:, r.position].double()
        np.testing.assert_allclose(r.delta, (ft - base).mean(0).numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(r.base_mean, base.mean(0).numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(r.finetuned_mean, ft.mean(0).numpy(), atol=1e-5, rtol=0)
        norm = hs["finetuned"][r.layer + 1][:, spec.method.norm_skip_positions:].double().norm(dim=-1).mean()
        assert r.finetuned_norm == pytest.approx(float(norm), abs=1e-5)
        assert r.num_documents == hs["base"][0].shape[0]


def test_safetensors_hold_the_same_delta(run):
    from safetensors.numpy import load
    _, store, pair = run
    tensors = load(store.read_bytes(f"{pair['dir']}/{layout.DIFFERENCE_SAFETENSORS}"))
    table = store.read_table(f"{pair['dir']}/{DIFFERENCE.file}").to_pandas()
    assert tensors["delta"].shape == (len(LAYERS), N, len(table.delta[0]))
    assert list(tensors["layers"]) == LAYERS
    np.testing.assert_allclose(tensors["delta"][1, 3], table.delta[1 * N + 3], rtol=1e-6)


def test_the_safetensors_file_is_the_same_bytes_every_time():
    """safetensors writes its metadata in a hash map's order (measured: 18 different files
    in 50 saves of the same tensors); a rerun must write the same bytes."""
    from safetensors.numpy import load, save
    from storage.tables import difference_safetensors
    tensors = {"delta": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "layers": np.asarray([2])}
    meta = {"pair": "p", "base": "activations/b", "finetuned": "activations/f", "x": "y"}
    assert len({save(tensors, metadata=meta) for _ in range(50)}) > 1   # what needs mending
    blobs = {difference_safetensors(tensors, meta) for _ in range(50)}
    assert len(blobs) == 1
    loaded = load(blobs.pop())
    assert set(loaded) == set(tensors) and all(np.array_equal(loaded[k], v) for k, v in tensors.items())


def test_truncated_forward_equals_full_document_through_every_layer(plain):
    _, ids, texts, hs = plain
    model = hs["finetuned_model"]
    tok = AutoTokenizer.from_pretrained(model.name_or_path)
    full = [tok(t, add_special_tokens=True)["input_ids"] for t in texts[:40] if t.strip()]
    full = [f for f in full if len(f) >= 3 * N][:16]
    longest = torch.tensor([f[: 3 * N] for f in full])     # whole documents, much longer than n
    with torch.no_grad():
        everything = model(input_ids=longest, output_hidden_states=True).hidden_states
    truncated = block_outputs(model, longest[:, :N], LAYERS, truncate=True)
    for j, layer in enumerate(LAYERS):
        np.testing.assert_allclose(truncated[:, j].numpy(), everything[layer + 1][:, :N].numpy(),
                                   atol=1e-5, rtol=0)


def test_last_block_is_read_before_the_final_norm(plain):
    """HF's last hidden state has the final norm applied; the method reads the block."""
    _, ids, _, hs = plain
    model = hs["base_model"]
    last = model.config.num_hidden_layers - 1
    block = block_outputs(model, ids[:8], [last])[:, 0]
    with torch.no_grad():
        np.testing.assert_allclose(model.model.norm(block).numpy(), hs["base"][-1][:8].numpy(), atol=1e-5)
    assert not torch.allclose(block, hs["base"][-1][:8], atol=1e-3)


def test_bf16_activations_are_stored_bit_exact(demo_pair, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(demo_pair.base_dir, dtype=torch.bfloat16).eval()
    ids = torch.randint(5, 100, (4, N))
    acts = block_outputs(model, ids, [1])
    table = activation_table(np.arange(4), [1], stored_bits(acts, "bfloat16"), "bfloat16")
    store = Store(str(tmp_path))
    store.write_table("a.parquet", ACTIVATIONS, table)
    back = store.read_table("a.parquet")
    decoded = torch.from_numpy(decode_vectors(back.column("act"), activation_dtype(back)))
    assert torch.equal(decoded, acts.float().reshape(-1, acts.shape[-1]))
