"""Shared setup for the benchmarks: a random-weight Llama saved to a temp folder, random
token documents, interleaved timing with medians, and uniform printing.

Benchmarks are run as scripts (`.venv/bin/python benchmarks/NAME.py`); this module puts
the repository root on sys.path so that they import the project as the workers do.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

# The method default: relative depth 0.5 -> block int(0.5 * (num_layers - 1)).
RELATIVE_DEPTH = 0.5


def method_layer(num_layers: int) -> int:
    return int(RELATIVE_DEPTH * (num_layers - 1))


# -- models ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchModel:
    folder: Path
    config: dict
    parameters: int

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]


def build_llama(folder: Path, *, hidden: int = 768, layers: int = 8, intermediate: int = 2048,
                vocab: int = 8000, heads: int = 12, seed: int = 0) -> BenchModel:
    """A random-init LlamaForCausalLM (untied LM head, float32) saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    return BenchModel(folder, config.to_dict(), params)


def block_linear_params(model, index: int = 0) -> int:
    """Weights of one decoder block that take part in matmuls (norm weights excluded)."""
    import torch
    from workers.models import decoder_layers
    block = decoder_layers(model)[index]
    return sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))


def plain_truncated_forward(model, input_ids, last_block: int):
    """The bare baseline: embeddings, rotary tables, then blocks 0..last_block called
    directly (causal SDPA, no mask tensor), no hooks, no cache. Returns the last block's
    raw output (batch, seq, hidden)."""
    import torch
    core = model.model
    with torch.inference_mode():
        h = core.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        pe = core.rotary_emb(h, position_ids=pos)
        for block in core.layers[: last_block + 1]:
            out = block(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
    return h


# -- data -----------------------------------------------------------------------------
def make_documents(num_docs: int, length: int, vocab: int, seed: int = 0, bos: int = 1):
    """(doc_ids int64, token_ids int64 (num_docs, length)): random tokens, BOS first."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(num_docs, length), dtype=np.int64)
    tokens[:, 0] = bos
    return np.arange(num_docs, dtype=np.int64), tokens


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"adl-bench-{prefix}-", dir=os.environ.get("TMPDIR", "/tmp"))


# -- timing ---------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Timings:
    """Per-call seconds of each fn: wall clock, and this process's CPU time (all its
    threads), which other work on the machine disturbs much less than wall time."""
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def __getitem__(self, name: str) -> list[float]:
        return self.wall[name]


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                inner: dict[str, int] | None = None) -> Timings:
    """Every fn is warmed up first, then the fns take turns (A B C A B C ...) so that
    background load hits them alike; fn `k` runs inner[k] times per turn (for cheap fns,
    to get more samples)."""
    inner = inner or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
    out = Timings({name: [] for name in fns}, {name: [] for name in fns})
    for _ in range(reps):
        for name, fn in fns.items():
            for _ in range(inner.get(name, 1)):
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                out.cpu[name].append(time.process_time() - cpu)
                out.wall[name].append(time.perf_counter() - wall)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# -- printing -------------------------------------------------------------------------
def machine_line() -> str:
    import torch
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, load average {load} (other work on the machine skews absolute numbers; "
            f"measurements are interleaved so ratios are fairer)")


def header(title: str) -> None:
    print(f"== {title} ==")
    print(machine_line())


def fmt_times(t: "Timings | list[float]", name: str | None = None) -> str:
    """Wall median and runs, and (for Timings) the CPU-time median."""
    wall = t.wall[name] if isinstance(t, Timings) else t
    text = f"wall median {median(wall):.3f} s (runs: {', '.join(f'{x:.3f}' for x in wall)})"
    if isinstance(t, Timings):
        text += f", CPU median {median(t.cpu[name]):.3f} s"
    return text


def verdict(value: float, target: float, lower_is_better: bool) -> str:
    ok = value <= target if lower_is_better else value >= target
    sign = "<=" if lower_is_better else ">="
    return f"target {sign} {target:g}x: {'MET' if ok else 'MISSED'}"


def si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def matmul_gflops(dtype: str, m: int = 1024, k: int = 768, n: int = 768, seconds: float = 0.5) -> float:
    """Achieved GFLOP/s of a plain torch matmul in dtype (a probe of the CPU, not our code)."""
    import torch
    a = torch.randn(m, k).to(getattr(torch, dtype))
    b = torch.randn(k, n).to(getattr(torch, dtype))
    a @ b
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    return 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9


def sync() -> None:
    """Wait for queued GPU work (a no-op on CPU), so that timings cover it."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
