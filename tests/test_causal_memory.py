"""The causal-effect stage's loss holds at most a bounded chunk of logits, whatever the
vocabulary (workers/causal.py LOGIT_ELEMENTS), and equals the plain forward's
log-softmax. Every tensor any operation produces is recorded (a TorchDispatchMode), so the
largest one is measured, not assumed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import workers.causal as causal


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():   # sharpen it, so that the log-softmax is far from uniform
        model.lm_head.weight.mul_(20)
    return model


@pytest.mark.parametrize("vocab", [4096, 32768])
def test_the_loss_holds_a_bounded_chunk_of_logits_and_equals_the_plain_log_softmax(vocab, monkeypatch):
    monkeypatch.setattr(causal, "LOGIT_ELEMENTS", 2 ** 16)
    model = tiny_llama(vocab)
    ids = torch.randint(3, vocab, (4, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    with torch.inference_mode():
        with LargestTensor() as seen:
            got = causal.next_token_nll(model, ids, mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
    plain = -torch.log_softmax(logits.double(), -1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(-1)
    np.testing.assert_allclose(got.numpy(), plain.numpy(), rtol=1e-5, atol=1e-4)
    assert plain.std() > 0.5                          # far from uniform: the comparison can fail
    whole = ids.shape[0] * (ids.shape[1] - 1) * vocab     # what one forward's logits would hold
    assert seen.largest <= 2 ** 16 + vocab            # one chunk: at most a row over the budget
    assert seen.largest < whole / 3
