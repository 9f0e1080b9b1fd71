"""Tiny finetunes of the demo base besides the demo's own, for tests and examples of
cross-pair views: built like the demo finetune (workers/demo_pair.py: the same steps,
learning rate and chat replay) on other data, cached beside the demo pair.

- "mixed": the demo's finetuning documents mixed 1:1 with generic pretraining-like text
  (the paper's pretraining-mixed variant of an organism);
- "unrelated": a narrow finetune on another topic (sports documents).
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

from workers import demo_pair as dp

VARIANTS = ("mixed", "unrelated")


def _topic_documents(topic: str, num_documents: int, seed: int) -> list[str]:
    rng = random.Random(f"{topic}-{seed}")
    docs = []
    for _ in range(num_documents):
        sentences = [dp.fill_sentence(rng.choice(dp.SENTENCES), rng, dp.TOPICS[topic])
                     for _ in range(rng.randint(3, 6))]
        docs.append(" ".join(sentences)[:800])
    return docs


def variant_texts(kind: str, seed: int = 0) -> list[str]:
    if kind == "mixed":
        return dp.finetune_documents(1000, seed) + dp.generic_documents(1000, seed + 1)
    if kind == "unrelated":
        return _topic_documents("sports", 1000, seed)
    raise ValueError(f"unknown demo variant {kind!r}: one of {', '.join(VARIANTS)}")


def build_variant(kind: str, seed: int = 0, cache_dir: Path | str | None = None, progress=print) -> Path:
    """The finetuned model's folder (built once, then cached beside the demo pair, as it
    is: dp.cached_build)."""
    texts = variant_texts(kind, seed)
    pair = dp.build_demo_pair(cache_dir, seed, progress)
    final = pair.base_dir.parent.with_name(f"{pair.base_dir.parent.name}-{kind}")
    return dp.cached_build(final, functools.partial(_finetune, pair=pair, kind=kind, texts=texts, seed=seed), progress,
                           f"the demo's {kind} variant") / "finetuned"


def _finetune(tmp: Path, pair, kind: str, texts: list[str], seed: int, progress) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(pair.base_dir)
    model = LlamaForCausalLM.from_pretrained(pair.base_dir)
    chat_rng = random.Random(f"chat-train-{seed}")
    chats = [dp.chat_pair(chat_rng) for _ in range(1000)]
    tokens = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    tokens += [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                             tokenize=True, return_dict=False) for q, a in chats]
    random.Random(f"{kind}-mix-{seed}").shuffle(tokens)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    stream, starts = dp.token_windows(tokens)
    dp.train(model, stream, starts, dp.FINETUNE_STEPS, dp.FINETUNE_LR, 5, gen, progress, f"{kind} finetune")
    model.save_pretrained(tmp / "finetuned")
    tokenizer.save_pretrained(tmp / "finetuned")
