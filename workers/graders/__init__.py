"""Graders: the judgements the method leaves to an LLM (adl-method.md, section 3).

Three questions, one interface (`base.Grader`):
- coherence: is a steered generation coherent text? (steering's binary search)
- best_scale: which patchscope scale gives the most semantically coherent token list, and
  which of its tokens form that coherent group?
- token_relevance: is each top token relevant to the finetuning domain? (three rotations
  of the list; a token counts only if all three say RELEVANT)

One module per responsibility:
- base.py: the interface, `Judgement`, the errors, which tokens are candidates;
- prompts.py and parsers.py: what the LLM is asked, and the strict reading of its answer;
- transport.py: OpenAI-compatible endpoints through the `openai` client (shared with the
  agent), with the job's concurrency and rate limit;
- openai_grader.py: the LLM grader; offline.py: the grader without network;
- service.py: `make_grader` from the spec's validated settings (common/types.py), and
  `GraderService`, the questions over lists of items.
"""
from workers.graders.base import (OFFLINE_RELEVANCE, Grader, GraderError, GradingFailed, Judgement,
                                  is_trivial_token)
from workers.graders.offline import OfflineGrader, PerplexityCoherenceGrader
from workers.graders.openai_grader import OpenAIGrader
from workers.graders.service import GraderService, is_offline, make_grader

__all__ = ["OFFLINE_RELEVANCE", "Grader", "GraderError", "GradingFailed", "Judgement", "is_trivial_token",
           "OfflineGrader", "PerplexityCoherenceGrader", "OpenAIGrader", "GraderService", "is_offline",
           "make_grader"]
