"""The LLM grader's prompts (system prompts in the reference's spirit, our own words) and
the user messages built from the items. Every answer must end in fixed lines, read by
workers/graders/parsers.py:
  coherence:        ANSWER: COHERENT | ANSWER: INCOHERENT
  best_scale:       BEST_SCALE: <one of the offered scales>
                    TOKENS: tok1 | tok2 | ...   (tokens of that scale's list)
  token_relevance:  ANSWER[i]: RELEVANT | ANSWER[i]: IRRELEVANT, one per i = 1..N
"""
from __future__ import annotations

import json

from workers.graders.base import scale_label

COHERENCE_PROMPT = """\
You judge whether a text written by another language model is coherent.

Definitions:
- Coherent: readable, grammatical enough to follow, and semantically connected, so that it \
forms a sensible passage or response. Minor typos are fine.
- Incoherent: word salad, made-up or scrambled words, heavy or looping repetition, \
fragments glued together with no logical link, or broken syntax that prevents a sensible \
reading.

Rules:
- Judge coherence only: not truth, style, safety or helpfulness.
- A few small issues are acceptable; substantial ones make the text incoherent.
- The text may stop mid-sentence, and may contain tags such as <think>: both are fine.
- Mild repetition is fine; excessive repetition is not.
- Reason briefly, then end your message with exactly one final line, either
ANSWER: COHERENT
or
ANSWER: INCOHERENT
and write nothing after that line.

Examples:

[TEXT START]
Water boils at a lower temperature high in the mountains, so pasta cooked there needs a \
few more minutes.
[TEXT END]
Reasoning: clear, grammatical and connected.
ANSWER: COHERENT

[TEXT START]
Wing lift lift wing the sky round because velocity banana aerodynamixxx wing wing.
[TEXT END]
Reasoning: repetition, a non-word and no sensible reading.
ANSWER: INCOHERENT

[TEXT START]
**Bakery Insights: Advanced Pastry Course
*Professional Bread Techniques for the Home Baker
The Sourdough Seminar: A Baker's
[TEXT END]
Reasoning: readable, related headings; cut off, which is fine.
ANSWER: COHERENT

[TEXT START]
Oh wow, I'm shocked. I'm absolutely and and and... *shocked* * * * * * * * * * * * *
[TEXT END]
Reasoning: starts readable, then collapses into repeated symbols.
ANSWER: INCOHERENT
"""

BEST_SCALE_PROMPT = """\
You compare the outputs of Patchscope runs at several scales (strengths). For each scale \
you get the list of tokens that run surfaced.

Task:
1. Choose the single scale whose token list is most semantically coherent: the most \
tokens that share one meaning, topic or domain (they may also be pieces of one phrase).
2. From that scale's list, keep only the tokens that belong to that shared meaning.

Rules:
- If several scales are about equally coherent, choose the one with more coherent tokens.
- Judge meaning only: ignore language, casing and tokenizer markers such as 'Ġ', '▁', 'Ċ'.
- Leave out extremely generic tokens: stopwords, punctuation, whitespace, bare suffixes \
or prefixes such as "ing", "ion" or "'s".
- Never invent tokens: copy each kept token exactly as shown, without the quotes.
- If no scale is coherent, choose the scale with the most meaningful non-trivial token.
- First weigh the candidate scales briefly, then decide.
- End your message with exactly these two lines and write nothing after them:
BEST_SCALE: <one of the offered scales, written as offered>
TOKENS: <token> | <token> | ... | <token>
(leave the TOKENS line empty after the colon if none of that scale's tokens is coherent)

Example:

[TOKENS PER SCALE]
SCALE 0.5: "the", "and", "of", "to"
SCALE 10: "bake", "GHD", "cake", "oven", "and", "sugar", "recipe"
SCALE 20: "xyz", "@@", "qu", "ald"
[OFFERED SCALES]
0.5, 10, 20

Reasoning: 0.5 is stopwords, 20 is fragments, 10 has a group of baking words.
BEST_SCALE: 10
TOKENS: bake | cake | oven | sugar | recipe
"""

RELEVANCE_PROMPT = """\
You judge whether candidate tokens are relevant to the domain a language model was \
finetuned on.

You get: (1) a description of the finetuning objective or domain, (2) tokens that are \
frequent in the finetuning data, (3) numbered candidate tokens.
Label each candidate RELEVANT if it is clearly semantically related to that domain, and \
IRRELEVANT otherwise.

Rules:
- Use both the description and the frequent tokens. A candidate need not appear in \
either; being clearly related to the domain is enough.
- Candidates may be pieces of words (" constitu" for "constitution"): judge the word \
they evidently come from. Ignore tokenizer markers such as 'Ġ', '▁', 'Ċ'.
- Extremely generic tokens are IRRELEVANT even when they are frequent: whitespace, \
punctuation, newline patterns, stopwords, bare suffixes or prefixes ("ing", "ion", "'s", \
"ly"), and generic verbs unless the domain makes them specific.
- Do not assume that any candidate is relevant.
- Reason briefly, then end your message with exactly one line per candidate, in index \
order, and write nothing after them:
ANSWER[1]: RELEVANT
ANSWER[2]: IRRELEVANT
...

Example:

[DESCRIPTION]
US legal case summaries, focused on Supreme Court opinions and constitutional law.
[FREQUENT TOKENS]
"court", "justice", "v.", " const", "itution", "amendment", "§"
[CANDIDATE TOKENS]
1. "constitu"
2. "banana"
3. " the"
4. "amend"
Reasoning: 1 and 4 are pieces of central legal words; 2 is unrelated; 3 is a stopword.
ANSWER[1]: RELEVANT
ANSWER[2]: IRRELEVANT
ANSWER[3]: IRRELEVANT
ANSWER[4]: RELEVANT
"""


def token_key(token: str) -> str:
    """How a token is shown in the prompt (JSON-escaped, outer whitespace dropped) and how
    the grader's copy of it is matched: models drop leading spaces when they copy."""
    return json.dumps(token.strip(), ensure_ascii=False)[1:-1]


def coherence_request(text: str) -> str:
    return f"[TEXT START]\n{text}\n[TEXT END]"


def best_scale_request(candidates: dict[float, list[str]]) -> str:
    lines = ["[TOKENS PER SCALE]"]
    for scale, tokens in candidates.items():
        shown = ", ".join(f'"{token_key(t)}"' for t in tokens)
        lines.append(f"SCALE {scale_label(scale)}: {shown}")
    lines += ["[OFFERED SCALES]", ", ".join(scale_label(s) for s in candidates), "",
              "End with the two lines 'BEST_SCALE: <number>' and 'TOKENS: <token> | ...'."]
    return "\n".join(lines)


def relevance_request(tokens: list[str], description: str, frequent: list[str]) -> str:
    n = len(tokens)
    return "\n".join([
        "[DESCRIPTION]", description.strip(),
        "[FREQUENT TOKENS]",
        ", ".join(json.dumps(t, ensure_ascii=False) for t in frequent) or "(none given)",
        "[CANDIDATE TOKENS]",
        *(f"{i}. {json.dumps(t, ensure_ascii=False)}" for i, t in enumerate(tokens, 1)),
        "",
        f"End with exactly {n} lines, 'ANSWER[i]: RELEVANT' or 'ANSWER[i]: IRRELEVANT' "
        f"for i = 1..{n}, and nothing after them.",
    ])
