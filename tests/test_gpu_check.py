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
    # The estimate is the placement's for the real (not the toy) model: 1.2 x bf16 weights.
    estimates = {r["model"]: r["estimate_gb"] for r in rows}
    assert 2.5 < estimates["llama-3.2-1b"] < 3.5 and 18 < estimates["llama-3.1-8b"] < 21
    assert all(r["seconds"] > 0 for r in rows)
    assert rows[0]["vs_bare_forward"] > 0
