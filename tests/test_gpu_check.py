"""benchmarks/gpu_check.py, the GPU check, runs here on toy shapes of the same four
families (CPU, no peak memory to compare) so that it cannot rot between GPU sessions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("extraction", "lens", "patchscope", "causal", "grader")


def test_the_gpu_check_runs_every_stage_of_every_model_on_tiny_configs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                          "--json", str(tmp_path / "rows.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["model"], r["stage"]) for r in rows] == [
        (m, s) for m in ("llama-3.2-1b", "llama-3.1-8b", "gemma-3-4b", "qwen3-8b") for s in STAGES]
    # The estimate is the placement's for the real (not the toy) model, per stage: at least
    # a CUDA context, the bf16 weights and the lens's float32 unembedding.
    estimates = {(r["model"], r["stage"]): r["estimate_gb"] for r in rows}
    assert all(4.0 < estimates["llama-3.2-1b", s] < 8 for s in STAGES)
    assert all(18.6 < estimates["llama-3.1-8b", s] < 24 for s in STAGES)
    assert estimates["llama-3.1-8b", "causal"] > estimates["llama-3.1-8b", "lens"]
    assert all(r["seconds"] > 0 for r in rows)
    assert rows[0]["vs_bare_forward"] > 0
