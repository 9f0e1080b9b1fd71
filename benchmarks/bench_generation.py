"""Generation throughput: vLLM steered vs unsteered (target: steered >= 0.9x), seeded vs
unseeded sampling (every request its own seed, as the job's generations are, against none:
vLLM samples seeded requests one by one), vLLM vs
transformers `generate` for the same prompts and token budget, and (--compiled) what eager
mode, which steering needs, costs against vLLM's default compiled mode (CUDA graphs on a
GPU, torch.compile on both), unsteered.

Runs on a small random-weight Llama built here (nothing is downloaded), in float32:
    python benchmarks/bench_generation.py [--prompts 64] [--new-tokens 64] [--repeats 5] [--compiled]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.generation import GenerationEngine, GenerationRequest, Steering  # noqa: E402

WORDS = ("tell me a story about the quick fox who ran over dark hills and found some fun ideas "
         "for weekend activities with friends near the river while rain fell on old stone").split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LAYER = 2


def build_model(folder: Path) -> None:
    """A byte-level BPE tokenizer and a random Llama: hidden 512, 8 heads of 64, 4 blocks."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        (" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(2000)),
        trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>",
                                      pad_token="<|eos|>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(wrapped), hidden_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
        intermediate_size=1024, num_hidden_layers=4, max_position_embeddings=512,
        bos_token_id=wrapped.bos_token_id, eos_token_id=wrapped.eos_token_id, tie_word_embeddings=False,
    )).save_pretrained(folder)


def transformers_tokens_per_s(folder: Path, prompts: list[str], new_tokens: int) -> float:
    """Greedy batched `generate` (left padding) over the chat-wrapped prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    inputs = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.eos_token_id)  # warm-up
        start = time.perf_counter()
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                             pad_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
    generated = out[:, inputs["input_ids"].shape[1]:]
    # Rows that stopped early are padded with EOS after their own EOS: count up to it.
    count = sum(int((row == tokenizer.eos_token_id).nonzero()[0, 0]) + 1
                if (row == tokenizer.eos_token_id).any() else len(row) for row in generated)
    return count / seconds


def vllm_tokens_per_s(engine: GenerationEngine, requests: list[GenerationRequest]) -> float:
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    return sum(len(r.token_ids) for r in results) / seconds


def compiled_tokens_per_s(folder: Path, prompts: list[str], new_tokens: int, repeats: int) -> list[float]:
    """vLLM in its default mode (no steering hooks, compilation and CUDA graphs on), greedy,
    the same chat-wrapped prompts; chunked prefill off as in GenerationEngine."""
    from vllm import LLM, SamplingParams
    llm = LLM(model=str(folder), dtype="float32", max_model_len=512, seed=0, enable_chunked_prefill=False)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(chats[:8], params, use_tqdm=False)   # warm-up (and compilation)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.chat(chats, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiled", action="store_true",
                        help="also run vLLM's default compiled mode, unsteered, after our eager engine")
    args = parser.parse_args()

    rng = random.Random(1)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_model(folder)
        # Before vLLM starts: its CPU worker takes over this process's torch threading.
        # transformers at one thread and at torch's default, since on a busy machine
        # more threads can be slower (threads spin waiting for each other).
        import torch

        default_threads = torch.get_num_threads()
        hf_rates = {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            hf_rates[threads] = transformers_tokens_per_s(folder, prompts, args.new_tokens)
        torch.set_num_threads(default_threads)
        engine = GenerationEngine(str(folder), dtype="float32", max_model_len=512)
        try:
            vectors = np.random.default_rng(0).standard_normal((len(prompts), engine.hidden_size))
            plain = [GenerationRequest(p, temperature=0.0, max_tokens=args.new_tokens) for p in prompts]
            # Every request steered with its own vector: the most work for the hooks.
            steered = [GenerationRequest(p, temperature=0.0, max_tokens=args.new_tokens,
                                         steering=Steering(LAYER, v)) for p, v in zip(prompts, vectors)]
            # Sampling at temperature 1: every request seeded (its own seed) or none.
            seeded = [GenerationRequest(p, temperature=1.0, max_tokens=args.new_tokens, seed=1000 + i)
                      for i, p in enumerate(prompts)]
            unseeded = [GenerationRequest(p, temperature=1.0, max_tokens=args.new_tokens) for p in prompts]
            engine.generate(plain[:4] + steered[:4] + seeded[:4] + unseeded[:4])  # warm-up
            plain_rates, steered_rates, seeded_rates, unseeded_rates = [], [], [], []
            for _ in range(args.repeats):  # interleaved, so drifts in machine load hit all alike
                plain_rates.append(vllm_tokens_per_s(engine, plain))
                steered_rates.append(vllm_tokens_per_s(engine, steered))
                seeded_rates.append(vllm_tokens_per_s(engine, seeded))
                unseeded_rates.append(vllm_tokens_per_s(engine, unseeded))
        finally:
            engine.close()
        compiled_rates = compiled_tokens_per_s(folder, prompts, args.new_tokens, args.repeats) \
            if args.compiled else None
    plain_rate, steered_rate = statistics.median(plain_rates), statistics.median(steered_rates)
    hf_rate = max(hf_rates.values())
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, greedy, float32, "
          f"median of {args.repeats} runs")
    print(f"vLLM unsteered:         {plain_rate:9.1f} tokens/s  {[round(r) for r in plain_rates]}")
    print(f"vLLM steered:           {steered_rate:9.1f} tokens/s  {[round(r) for r in steered_rates]}")
    for threads, rate in hf_rates.items():
        print(f"transformers, {threads} thread(s): {rate:7.1f} tokens/s")
    ratios = [s / p for s, p in zip(steered_rates, plain_rates)]
    print(f"steered / unsteered:    {statistics.median(ratios):9.2f}x  (median of pairs; target >= 0.9x)")
    print(f"vLLM / transformers:    {plain_rate / hf_rate:9.2f}x  (unsteered vLLM vs the faster transformers)")
    print(f"vLLM sampled, seeded:   {statistics.median(seeded_rates):9.1f} tokens/s  {[round(r) for r in seeded_rates]}")
    print(f"vLLM sampled, unseeded: {statistics.median(unseeded_rates):9.1f} tokens/s  "
          f"{[round(r) for r in unseeded_rates]}")
    print(f"seeded / unseeded:      {statistics.median(s / u for s, u in zip(seeded_rates, unseeded_rates)):9.2f}x  "
          f"(median of pairs; tokens/s, so texts of other lengths compare fairly)")
    if compiled_rates:
        compiled_rate = statistics.median(compiled_rates)
        print(f"vLLM compiled:          {compiled_rate:9.1f} tokens/s  {[round(r) for r in compiled_rates]}")
        print(f"eager / compiled:       {plain_rate / compiled_rate:9.2f}x  (unsteered: what eager mode costs)")


if __name__ == "__main__":
    main()
