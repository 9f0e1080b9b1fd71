"""The values jobs/ builds and workers/ consume: model locations, dtypes and the grader's
settings. Defined here so that workers never import the spec; built and checked only in
jobs/spec.py (the one validator)."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelSource:
    model: str                    # hub id, local folder, or s3://bucket/prefix
    revision: str | None = None   # hub revision (branch, tag or commit)
    adapter: str | None = None    # a LoRA adapter (same kinds of location) applied to `model`
