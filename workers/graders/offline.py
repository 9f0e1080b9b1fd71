"""The grader without network, so that a whole job runs offline: coherence by perplexity
under a reference causal LM, best scale by that model's input-embedding similarity; token
relevance cannot be judged honestly without an LLM and raises `GraderError`."""
from __future__ import annotations

import math
from dataclasses import dataclass

from common.types import OfflineGrading
from workers.causal import next_token_nll
from workers.graders.base import OFFLINE_RELEVANCE, GraderError, Judgement, candidates, failed, scale_label
from workers.models import text_config


class PerplexityCoherenceGrader:
    """Coherence without an LLM grader: a text is coherent when
    - it has at least `min_tokens` tokens (special tokens not counted), and
    - at least `min_distinct_ratio` of its tokens are distinct (looping or one-token spam,
      which a language model predicts well, fails here), and
    - its per-token perplexity under the reference causal LM is at most `threshold`.
    Empty text is incoherent.

    Perplexity is exp(mean next-token NLL) over the text's tokens as the tokenizer encodes
    them with special tokens (so with a BOS, the first token is scored too), truncated to
    `max_length` tokens. The logits of a batch are computed a bounded chunk of positions at
    a time (workers/causal.next_token_nll): whole, 8 x 1024 x 128k in the model's dtype,
    float32 and log-softmax would be 10 GB.

    How the defaults were chosen. Fluent English sits at a per-token perplexity of roughly
    10-40 under small base models (GPT-2 small about 30-40 on WikiText/PTB, 1B-class
    Llama/Qwen models about 10-15), text sampled at the method's temperatures (1.1-1.2)
    somewhat above that; shuffled real tokens (word salad) land near the model's unigram
    perplexity, in the high hundreds to thousands. 200 sits about an order of magnitude
    from each side in log space. Natural text of the length of the method's steering
    samples (128 tokens) has a distinct-token ratio of about 0.5-0.7; loops fall far below
    0.3. This is a stand-in for the reference's LLM grader, not calibrated against it:
    borderline texts will be judged differently; set `threshold` per model where it matters.

    Which model is the reference matters. Measured on the demo pair (vocabulary 3,000,
    64-128 sampled tokens at temperature 1.2): the base model scored its own samples 7.6-15
    and the same tokens shuffled 72,000-94,000, but it scored the FINETUNED model's
    unsteered samples 73,000-144,000: a toy base model is overconfident and has never seen
    the finetuning domain's words, so with it as the reference every steered sample is
    incoherent. With the finetuned model as the reference, its unsteered chat answers
    scored 61-356, steered at 0.5 x the typical activation norm 490-1,600, at 1 x or more
    above 5,000.
    """

    def __init__(self, settings: OfflineGrading, model_dir: str | None = None, device: str = "cpu",
                 model=None, tokenizer=None):
        """Loads model_dir, or (model_dir None) grades with an already loaded model and
        tokenizer: a job's model actor lends its own (dtype and device are then its)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.batch_size = settings.batch_size
        if model is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, settings.dtype or "float32")).to(device).eval().requires_grad_(False)
        self.tokenizer, self.model = tokenizer, model
        self.device = next(model.parameters()).device
        self.rule = CoherenceRule.of(settings, getattr(text_config(self.model.config), "max_position_embeddings", None))
        self.threshold, self.min_tokens, self.min_distinct_ratio, self.max_length = \
            self.rule.threshold, self.rule.min_tokens, self.rule.min_distinct_ratio, self.rule.max_length

    def _encode(self, text: str) -> tuple[list[int], list[int]]:
        return self.rule.encode(self.tokenizer, text)

    def perplexities(self, texts: list[str]) -> list[float | None]:
        """Per-token perplexity of each text; None where no token can be scored."""
        import torch
        encoded = [self._encode(t)[0] if t.strip() else [] for t in texts]
        out: list[float | None] = [None] * len(texts)
        scorable = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
        for start in range(0, len(scorable), self.batch_size):
            rows = scorable[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in rows)
            # Right padding with id 0 under a zero mask: positions stay 0..len-1 per row.
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, :len(encoded[i])] = 1
            with torch.inference_mode():   # logits a bounded chunk of positions at a time
                nll = next_token_nll(self.model, ids, mask)
            scored = mask[:, 1:].double()
            mean_nll = (nll * scored).sum(1) / scored.sum(1)
            for r, i in enumerate(rows):
                out[i] = math.exp(float(mean_nll[r]))
        return out

    def coherence(self, texts: list[str]) -> list[Judgement]:
        return self.rule.judge(self.tokenizer, texts, self.perplexities(texts))


@dataclass(frozen=True)
class CoherenceRule:
    """The offline grader's coherence rule (PerplexityCoherenceGrader says why), apart from
    the model that scores the texts: a transformers forward there, the pair's vLLM engine
    in the steering search (workers/generation.py `GenerationEngine.perplexities`), which
    then needs no second copy of the model on the GPUs while it generates."""
    threshold: float
    min_tokens: int
    min_distinct_ratio: float
    max_length: int                  # tokens scored, at most

    @classmethod
    def of(cls, settings: OfflineGrading, max_positions: int | None = None) -> "CoherenceRule":
        """The rule of the offline grader's settings, for a model of max_positions."""
        return cls(float(settings.threshold), settings.min_tokens, float(settings.min_distinct_ratio),
                   min(settings.max_length, max_positions or settings.max_length))

    def encode(self, tokenizer, text: str) -> tuple[list[int], list[int]]:
        """(ids with special tokens, the text's own ids), truncated to max_length."""
        enc = tokenizer(text, add_special_tokens=True, truncation=True,
                        max_length=self.max_length, return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        own = [i for i, special in zip(ids, enc["special_tokens_mask"]) if not special]
        return ids, own

    def judge(self, tokenizer, texts: list[str], perplexities: list[float | None]) -> list[Judgement]:
        out = []
        for text, p in zip(texts, perplexities):
            own = self.encode(tokenizer, text)[1] if text.strip() else []
            distinct = len(set(own)) / len(own) if own else 0.0
            coherent = (len(own) >= self.min_tokens and distinct >= self.min_distinct_ratio
                        and p is not None and p <= self.threshold)
            record = (f"tokens={len(own)} distinct_ratio={distinct:.3f} perplexity="
                      f"{'n/a' if p is None else f'{p:.2f}'} (coherent: tokens>="
                      f"{self.min_tokens}, distinct_ratio>={self.min_distinct_ratio:g}, "
                      f"perplexity<={self.threshold:g})")
            out.append(Judgement(value=coherent, ok=True, error=None, raw=record))
        return out


class OfflineGrader:
    """The Grader without network: everything from one reference causal LM.

    - coherence: `PerplexityCoherenceGrader` (see there for the rule and thresholds).
    - best_scale: each token is embedded by the reference model's input embedding (its
      vocabulary entry if the string is one, else the mean over its pieces); a scale's
      score is the mean pairwise cosine similarity of its non-trivial tokens (scales with
      fewer than two are not candidates); the highest score wins, ties to the smallest
      scale. The coherent subset: tokens whose mean similarity to the others is at least
      the list's mean pairwise similarity. A crude stand-in for the LLM's judgement of
      meaning: it rewards lists of related tokens, nothing more.
    - token_relevance: raises GraderError; relevance to a described domain needs an LLM.
    """

    def __init__(self, settings: OfflineGrading, model_dir: str | None = None, device: str = "cpu",
                 model=None, tokenizer=None):
        self.perplexity = PerplexityCoherenceGrader(settings, model_dir, device, model=model, tokenizer=tokenizer)
        self.name = f"offline:perplexity<={settings.threshold:g}"
        self._vocab = self.perplexity.tokenizer.get_vocab()

    def coherence(self, texts: list[str]) -> list[Judgement]:
        return self.perplexity.coherence(texts)

    def _embed(self, token: str):
        tokenizer = self.perplexity.tokenizer
        ids = [self._vocab[token]] if token in self._vocab else \
            tokenizer.encode(token, add_special_tokens=False)
        if not ids:
            return None
        table = self.perplexity.model.get_input_embeddings().weight
        return table[ids].float().mean(0).cpu()

    def best_scale(self, token_lists: dict[float, list[str]]) -> Judgement:
        import torch
        best = None
        for scale, tokens in candidates(token_lists).items():
            pairs = [(t, v) for t in tokens if (v := self._embed(t)) is not None]
            if len(pairs) < 2:
                continue
            vectors = torch.nn.functional.normalize(torch.stack([v for _, v in pairs]), dim=-1)
            sim = vectors @ vectors.T
            n = len(pairs)
            off_diagonal = sim.sum() - sim.diagonal().sum()
            score = float(off_diagonal) / (n * (n - 1))
            if best is None or score > best[1]:  # strict: ties keep the smaller scale
                per_token = (sim.sum(1) - sim.diagonal()) / (n - 1)
                kept = [t for (t, _), s in zip(pairs, per_token.tolist()) if s >= score]
                best = (scale, score, kept)
        if best is None:
            return failed("best_scale: no scale has two or more non-trivial tokens")
        scale, score, kept = best
        return Judgement(value={"scale": scale, "tokens": kept}, ok=True, error=None,
                         raw=f"embedding similarity: scale {scale_label(scale)} scored "
                             f"{score:.4f}")

    def token_relevance(self, tokens: list[str], description: str,
                        frequent_tokens: list[str]) -> list[Judgement]:
        raise GraderError(OFFLINE_RELEVANCE)
