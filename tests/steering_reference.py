"""The independent side of every vLLM steering check: transformers' own greedy `generate`
with the vector added by a plain forward hook (tests/test_generation.py for the demo
model, tests/test_architectures.py for each architecture family)."""
from __future__ import annotations

import numpy as np
import torch

from workers.models import decoder_layers


def hf_greedy(model, tokenizer, prompt: str, layer: int, new_tokens: int, vector: np.ndarray | None = None,
              prompt_only: bool = False) -> list[int]:
    """The greedy continuation of the chat-wrapped prompt, with `vector` added to block
    `layer`'s output: at every position, or (prompt_only) only in the first forward pass,
    which runs the prompt (later passes run one new token each)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    passes = []

    def add(module, args, output):
        passes.append(1)
        if vector is None or (prompt_only and len(passes) > 1):
            return None
        delta = torch.as_tensor(vector, dtype=torch.float32)
        return (output[0] + delta, *output[1:]) if isinstance(output, tuple) else output + delta

    handle = decoder_layers(model)[layer].register_forward_hook(add)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.eos_token_id)
    finally:
        handle.remove()
    return out[0, inputs["input_ids"].shape[1]:].tolist()
