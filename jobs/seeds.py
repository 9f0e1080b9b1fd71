"""The random seed of every generated sample (baselines, the strength search, steered).

Each sample is its own vLLM request (n=1) with its own seed, derived from the job's
seed (generation.seed) and the sample's full identity, so that no two samples share a
random stream and a rerun draws the same texts. Consecutive integer seeds would not do:
vLLM (V1) gives the k-th of a request's n samples the seed `seed + k`
(vllm/v1/engine/parallel_sampling.py), so requests seeded s and s + 1 share streams.
"""
from __future__ import annotations

import hashlib
import json

# Part of every generating pair's content key: bump when seeds are derived differently.
# 1: seed + prompt index per request (colliding); 2: one hashed seed per sample.
SEEDING_VERSION = 2


def sample_seed(job_seed: int, identity: dict) -> int:
    """The seed of one sample: the first 63 bits of the SHA-256 of the canonical JSON
    (sorted keys, no spaces) of {"job_seed": job_seed, **identity}.

    63 bits: vLLM seeds a torch.Generator with it (which takes integers below 2**64;
    -1 means unseeded), and the generations table stores it as int64."""
    canonical = json.dumps({"job_seed": job_seed, **identity}, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") >> 1


def model_location(source) -> dict | None:
    """A model as its location strings (model, revision, adapter); None when unknown."""
    if source is None:
        return None
    return {"model": source.model, "revision": source.revision, "adapter": source.adapter}


def baseline_identity(source, prompt_id: int, sample_index: int) -> dict:
    """An unsteered sample of one model. The executor generates each model's baselines
    once and shares them with every pair (and model role) that uses the model, so the
    identity names the model by its location and leaves out the pair and the role: a
    shared baseline keeps one seed wherever it appears. Two models of a pair have
    different locations, hence different streams; source None (a caller that does not
    say which model) gives every model the same streams."""
    return {"kind": "baseline", "model": model_location(source), "prompt_id": int(prompt_id),
            "sample_index": int(sample_index)}


def search_identity(pair: str, layer: int, position: int, prompt_id: int, strength: float,
                    sample_index: int) -> dict:
    """A sample of the strength search: threshold prompt prompt_id steered at strength."""
    return {"kind": "search", "pair": pair, "model_role": "finetuned", "layer": int(layer),
            "position": int(position), "prompt_id": int(prompt_id), "strength": float(strength),
            "sample_index": int(sample_index)}


def steered_identity(pair: str, layer: int, position: int, prompt_id: int, sample_index: int) -> dict:
    """A final steered sample of steering prompt prompt_id."""
    return {"kind": "steered", "pair": pair, "model_role": "finetuned", "layer": int(layer),
            "position": int(position), "prompt_id": int(prompt_id), "sample_index": int(sample_index)}
