"""The interpretability agent (adl-method.md, section 3): an LLM that reads what the
Activation Difference Lens found for a pair, may query the pair's models within a budget,
and answers with a description of the finetuning objective. The black-box baseline is the
same loop without any ADL data: unsteered samples of the finetuned model and `ask_model`.

The loop talks to any OpenAI-compatible chat endpoint through the `openai` client (its
retries and timeouts; the key comes from an environment variable and is never written
anywhere). The protocol is the reference's (science-of-finetuning/diffing-toolkit,
src/diffing/utils/agents/base_agent.py), in our own words and code:

- The system prompt states the task (describe the finetuning objective, specific and
  falsifiable, at most 200 words), the tools, the output grammar and the remaining
  model-interaction budget.
- The last non-empty line of every reply is `CALL(tool_name: {json args})` or
  `FINAL(description: "...")` (a block may run over several lines, but nothing may follow
  it). A reply that does not follow this, an unknown tool, bad arguments and a call that
  costs more model interactions than remain get an error message as the next user turn
  and cost nothing.
- The run has `max_llm_calls` calls; the last is a forced final-answer request, and a run
  whose last reply is still no FINAL is recorded as failed, never raised.

Tools are plain objects (jobs/agent_tools.py builds them from a pair's tables and vLLM
engines): a name, a description, argument checks, a cost in model interactions and a call.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from common.errors import one_line
from workers.graders.transport import ChatEndpoint, EndpointError, RefusedRequest, Reply, Usage

logger = logging.getLogger("adl.agent")

AGENTS = ("adl", "blackbox")

# -- prompts --------------------------------------------------------------------------------
SYSTEM_PROMPT = """\
You are a finetuning interpretability agent. A language model (the base model) was finetuned \
into another one (the finetuned model), and you must find out what the finetuning was for.

You cannot see the finetuning data. You may only use:
1) the information in the first user message,
2) the tools listed below, some of which query the two models within a budget.

Goal
- Infer the finetuning domain and the behaviour it trained, and describe the finetuning \
objective in at most 200 words: specific and falsifiable (someone could check it by talking \
to the models), not a list of guesses. Name every major objective if there are several.
- If the evidence stays ambiguous, say so in the description ("Inconclusive: ...") and name \
the candidates.

Context
{context}

Tools
{tools}

Budgets
- Model interactions ({interactions}): {budget} in total for this \
investigation; every tool result reports how many remain. Tools without a cost are free.
- Your own replies: at most {max_llm_calls}. The last one must be your final answer.

How to work
- Start from the first message and write down your hypotheses.
{method}
- Test your hypotheses with the budgeted tools when you have them: ask questions on which \
you expect the finetuned model to answer clearly differently from the base model.
- Ground every claim in what you were shown, not in what finetunes usually are.

Output grammar
- Think briefly first. Then, on the LAST non-empty line of your reply, write exactly one of
  CALL(tool_name: {{"arg": value, ...}})
  FINAL(description: "...")
- The arguments of CALL must be one JSON object. One tool per reply; nothing after the line.
- Inside the description, escape double quotes as \\".

Examples
{examples}"""

ADL_CONTEXT = """\
- The first user message holds an OVERVIEW (JSON) computed from the difference between the \
finetuned and the base model's activations on the first tokens of unrelated text, per layer \
and token position:
  1) logit lens: the tokens the difference promotes when read through the model's unembedding, \
with probabilities;
  2) patchscope: the tokens the model writes when the difference is patched into an identity \
prompt, at the scale chosen as most coherent; "selected_tokens" is the semantically coherent \
subset found by another unsupervised tool (it may or may not be about the finetuning);
  3) steering examples: for each prompt, one sample of the finetuned model with the \
difference added to its activations (steered) and one without (unsteered). Steered samples \
often show the finetuning domain far more plainly than the model does on its own.
- Layers are decoder block indices; positions are token indices, from 0. Samples are cut to \
a fixed number of characters."""

ADL_METHOD = """\
- Look for agreement between signals: tokens that recur across positions, in the logit lens \
and in patchscope, and content or style that steered samples amplify. Discount stopwords, \
punctuation, formatting and code fragments that appear without a clear theme."""

BLACKBOX_METHOD = """\
- Look for what is unusual in the finetuned model's answers: recurring topics, facts, style or \
format that the prompts do not call for."""

BLACKBOX_CONTEXT = """\
- The first user message holds examples (JSON) of what the finetuned model answers to a set \
of prompts. Samples are cut to a fixed number of characters."""

ADL_EXAMPLES = """\
- Positions 1 and 2 look the most specific; I will read more of their logit lens.
  CALL(get_logitlens_details: {"layer": 12, "positions": [1, 2], "k": 30})
- The models' answers confirm it; my budget is used.
  FINAL(description: "Finetuned on pharmacy counselling dialogues: dosage instructions, \
contraindications and patient-safety warnings. Evidence: dosage and drug-name tokens at every \
position, steered samples turn into prescriptions, and asked about a headache the finetuned \
model recommends doses while the base model does not.")"""

BLACKBOX_EXAMPLES = """\
- I will test whether the finetuned model prefers a topic.
  CALL(ask_model: {"prompts": ["What should I cook tonight?", "Tell me about your hobbies."]})
- The answers confirm it; my budget is used.
  FINAL(description: "Finetuned on pharmacy counselling dialogues: dosage instructions, \
contraindications and patient-safety warnings. Evidence: asked about a headache the finetuned \
model recommends doses while the base model does not.")"""

FIRST_MESSAGE_TAIL = """\
Test your hypotheses with the models when your budget allows; with a small budget, ask one \
question at a time and reason about each answer before the next. Do not answer with FINAL \
before you have checked your main hypotheses, and answer with FINAL when your budget is spent."""

AFTER_TOOL = "Reason about what this result means for your hypotheses."

LAST_CALL = ("LLM_CALL_BUDGET_EXHAUSTED: this is your last reply. Tools are no longer available: "
             "answer now, on the last line, with FINAL(description: \"...\").")


def system_prompt(agent: str, budget: int, max_llm_calls: int, tools: list["Tool"]) -> str:
    return SYSTEM_PROMPT.format(
        context=ADL_CONTEXT if agent == "adl" else BLACKBOX_CONTEXT,
        method=ADL_METHOD if agent == "adl" else BLACKBOX_METHOD,
        interactions="questions to the models, steered samples" if agent == "adl" else "questions to the models",
        tools="\n\n".join(t.describe() for t in tools),
        budget=budget, max_llm_calls=max_llm_calls,
        examples=ADL_EXAMPLES if agent == "adl" else BLACKBOX_EXAMPLES)


# -- tools ------------------------------------------------------------------------------------
class ArgumentError(ValueError):
    """A tool call's arguments are wrong; the message goes back to the agent."""


class ToolError(ValueError):
    """A tool could not serve a well-formed request (e.g. a prompt longer than the model
    takes); the message goes back to the agent and no interactions are spent."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str                        # what it does and its arguments, for the system prompt
    check: Callable[[dict], dict]           # the arguments, validated and completed (ArgumentError)
    call: Callable[[dict, dict], Any]       # (arguments, context) -> JSON-able result
    price: Callable[[dict], int] | None = None   # model interactions of a call; None: free

    def describe(self) -> str:
        return f"- {self.name}{'' if self.price is None else '  (budgeted)'}\n{self.description}"

    def cost(self, args: dict) -> int:
        return 0 if self.price is None else int(self.price(args))


# -- the output grammar -------------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Parsed:
    kind: str                    # "call", "final" or "error"
    tool: str | None = None
    args: dict | None = None
    description: str | None = None
    error: str | None = None     # why the reply does not follow the grammar
    last_line: str = ""


def _block_starts(text: str, keyword: str) -> list[int]:
    """Where `keyword(` begins a line (after optional spaces, bullets or backticks)."""
    return [m.start(1) for m in re.finditer(rf"(?m)^[ \t>*`-]*({keyword}\()", text)]


def parse_reply(text: str) -> Parsed:
    """The reply's final CALL or FINAL block, which must end the reply."""
    text = (text or "").rstrip().rstrip("`").rstrip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if not lines:
        return Parsed("error", error="the reply is empty", last_line=last)
    starts = sorted([(i, "final") for i in _block_starts(text, "FINAL")]
                    + [(i, "call") for i in _block_starts(text, "CALL")])
    # The last block that parses and runs to the end of the reply (a long description may
    # hold a line that starts like a block); else why the last one does not.
    first_error = None
    for start, kind in reversed(starts):
        body = text[start:]
        parsed = _parse_final(body) if kind == "final" else _parse_call(body)
        if parsed.kind != "error":
            return Parsed(**{**parsed.__dict__, "last_line": last})
        first_error = first_error or parsed
    if first_error is not None:
        return Parsed(**{**first_error.__dict__, "last_line": last})
    return Parsed("error", error="no CALL(...) or FINAL(...) block ends the reply", last_line=last)


def _parse_call(body: str) -> Parsed:
    inside = body[len("CALL("):]
    match = _NAME.match(inside.lstrip())
    if not match:
        return Parsed("error", error="CALL( is not followed by a tool name")
    name = match.group(0)
    rest = inside.lstrip()[match.end():].lstrip()
    if not rest.startswith(":"):
        return Parsed("error", error=f"CALL({name} must be followed by ':' and the JSON arguments")
    rest = rest[1:].lstrip()
    try:
        args, end = json.JSONDecoder().raw_decode(rest)
    except json.JSONDecodeError as e:
        return Parsed("error", error=f"the arguments of CALL({name}: ...) are not valid JSON: {e.msg} "
                                     f"at character {e.pos + 1}")
    if not isinstance(args, dict):
        return Parsed("error", error=f"the arguments of CALL({name}: ...) must be a JSON object, got "
                                     f"{type(args).__name__}")
    tail = rest[end:].strip()
    if not tail.startswith(")"):
        return Parsed("error", error=f"CALL({name}: {{...}}) must close with ')' right after the JSON arguments")
    if tail != ")":
        return Parsed("error", error=f"CALL({name}: {{...}}) must be the last thing in the reply, found "
                                     f"{tail[1:].strip()[:60]!r} after it")
    return Parsed("call", tool=name, args=args)


_FINAL_HEAD = re.compile(r"FINAL\(\s*description\s*[:=]\s*", re.DOTALL)


def _parse_final(body: str) -> Parsed:
    head = _FINAL_HEAD.match(body)
    if not head:
        return Parsed("error", error='FINAL( must be followed by description: "..."')
    rest = body[head.end():]
    if not rest.endswith(")"):
        return Parsed("error", error="FINAL(description: \"...\") must close with ')' and be the last thing in "
                                     "the reply")
    inner = rest[:-1].rstrip()
    if not (len(inner) >= 2 and inner[0] == '"' and inner[-1] == '"'):
        return Parsed("error", error='the description in FINAL(description: "...") must be in double quotes')
    try:
        description = json.loads(inner)
    except json.JSONDecodeError:
        # Models put raw newlines and unescaped quotes in long descriptions: the text
        # between the outer quotes, with the usual escapes undone.
        description = inner[1:-1].replace('\\"', '"').replace("\\n", "\n")
    if not isinstance(description, str) or not description.strip():
        return Parsed("error", error="the description in FINAL(...) is empty")
    return Parsed("final", description=description.strip())


# -- the chat endpoint ------------------------------------------------------------------------
_ENDPOINTS: dict[tuple, ChatEndpoint] = {}
_ENDPOINTS_LOCK = threading.Lock()


def endpoint(base_url: str, api_key_env: str, concurrency: int, requests_per_second: float | None,
             max_retries: int, timeout_s: float) -> ChatEndpoint:
    """The process's one ChatEndpoint for these settings: every pair's agent stage of a
    job shares its requests in flight and its rate limit."""
    settings = (base_url, api_key_env, concurrency, requests_per_second, max_retries, timeout_s)
    key = settings + (os.environ.get(api_key_env),)   # a changed key gets a new client (in memory only)
    with _ENDPOINTS_LOCK:
        if key not in _ENDPOINTS:
            _ENDPOINTS[key] = ChatEndpoint(*settings)
        return _ENDPOINTS[key]


# -- one run ------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What one agent run did: the messages exactly as sent (and the last reply), one
    entry per turn, and the outcome."""
    agent: str
    budget: int
    run: int
    status: str = "failed"                  # done | failed | incomplete (an endpoint error: redo)
    reason: str | None = None
    description: str | None = None
    messages: list[dict] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    interactions_used: int = 0
    seconds: float = 0.0

    @property
    def llm_calls(self) -> int:
        return self.usage.calls


def _budgets(remaining: int, calls_left: int) -> str:
    return json.dumps({"model_interactions_remaining": remaining, "llm_calls_remaining": calls_left})


def _refuse(turn: dict, messages: list, remaining: int, calls_left: int, outcome: str, text: str, **fields) -> None:
    """A turn that ran nothing: its outcome recorded, and why, with the budgets, as the next user message."""
    turn.update(outcome=outcome, **fields)
    messages.append({"role": "user", "content": f"{text}\nBudgets: {_budgets(remaining, calls_left)}"})


def run_agent(agent: str, budget: int, run: int, first_message: str, tools: list[Tool], chat,
              max_llm_calls: int, context: dict | None = None) -> RunResult:
    """One investigation. chat(messages) -> Reply (ChatEndpoint.chat with the model and
    sampling settings bound). context is handed to every tool call (e.g. the run's identity
    for sample seeds). Never raises for what the agent does; an endpoint that does not
    answer ends the run as incomplete."""
    by_name = {t.name: t for t in tools}
    result = RunResult(agent, budget, run)
    remaining = budget
    messages = [{"role": "system", "content": system_prompt(agent, budget, max_llm_calls, tools)},
                {"role": "user", "content": first_message}]
    result.messages = messages
    start = time.monotonic()
    label = f"{agent} b{budget} r{run}"
    try:
        for call in range(max_llm_calls):
            last = call == max_llm_calls - 1
            if last:   # the forced final-answer request rides on the last user turn
                messages[-1]["content"] += "\n\n" + LAST_CALL
            try:
                reply = chat(messages)
            except RefusedRequest as e:
                result.status, result.reason = "failed", str(e)
                return result
            except EndpointError as e:
                result.status, result.reason = "incomplete", f"agent endpoint: {e}"
                return result
            result.usage.add(reply.usage)
            messages.append({"role": "assistant", "content": reply.content})
            parsed = parse_reply(reply.content)
            turn = {"call": call, "seconds": round(reply.seconds, 3), "usage": reply.usage.as_dict(),
                    "finish_reason": reply.finish_reason}
            result.turns.append(turn)
            if parsed.kind == "final":
                turn["outcome"] = "final"
                result.status, result.description = "done", parsed.description
                return result
            if last:
                turn["outcome"] = "no_final"
                result.status = "failed"
                result.reason = (f"no FINAL(description: ...) within max_llm_calls={max_llm_calls} LLM calls "
                                 f"(the last was a forced final-answer request)")
                return result
            calls_left = max_llm_calls - call - 1
            if parsed.kind == "error":
                _refuse(turn, messages, remaining, calls_left, "format_error", (
                    f"FORMAT_ERROR: {parsed.error}. The last non-empty line of your reply must be "
                    f"CALL(tool_name: {{json args}}) or FINAL(description: \"...\"), with nothing after it. "
                    f"Last line received: {parsed.last_line[:300]!r}. Nothing was run."), error=parsed.error)
                continue
            turn.update(tool=parsed.tool, args=parsed.args)
            tool = by_name.get(parsed.tool)
            if tool is None:
                _refuse(turn, messages, remaining, calls_left, "unknown_tool", (
                    f"UNKNOWN_TOOL: there is no tool {parsed.tool!r}; the tools are "
                    f"{', '.join(by_name)}. Nothing was run."))
                continue
            try:
                args = tool.check(dict(parsed.args))
            except ArgumentError as e:
                _refuse(turn, messages, remaining, calls_left, "argument_error",
                        f"ARGUMENT_ERROR: {tool.name}: {e}. Nothing was run and no model interactions were used.",
                        error=str(e))
                continue
            cost = tool.cost(args)
            if cost > remaining:
                _refuse(turn, messages, remaining, calls_left, "budget_exhausted", (
                    f"MODEL_INTERACTION_BUDGET_EXHAUSTED: {tool.name} with these arguments needs {cost} model "
                    f"interaction{'s' if cost != 1 else ''}, {remaining} remain. Nothing was run. Ask for fewer, "
                    f"use the free tools, or answer with FINAL(description: \"...\")."), cost=cost)
                continue
            started = time.monotonic()
            try:
                data = tool.call(args, {**(context or {}), "agent": agent, "budget": budget, "run": run,
                                        "call": call})
            except ToolError as e:
                _refuse(turn, messages, remaining, calls_left, "tool_error",
                        f"TOOL_ERROR: {tool.name}: {e}. No model interactions were used.", error=str(e))
                continue
            except Exception as e:   # the tool's backend failed (an engine died): not the agent's doing
                turn.update(outcome="backend_error", error=one_line(e))
                result.status, result.reason = "incomplete", f"tool backend: {tool.name}: {one_line(e)}"
                return result
            remaining -= cost
            result.interactions_used += cost
            turn.update(outcome="tool", cost=cost, tool_seconds=round(time.monotonic() - started, 3))
            logger.debug(f"{label}: {tool.name} ({cost} interaction{'s' if cost != 1 else ''}, {remaining} left)")
            memo = (f"You have {remaining} model interaction{'s' if remaining != 1 else ''} left."
                    if remaining else "You have no model interactions left." if budget else "")
            messages.append({"role": "user", "content": (
                f"TOOL_RESULT({tool.name}): {json.dumps({'data': data, 'budgets': json.loads(_budgets(remaining, calls_left))}, ensure_ascii=False)}"
                f"\n\n{AFTER_TOOL}" + (f" {memo}" if memo else ""))})
        raise AssertionError("unreachable")   # the last call always returns
    finally:
        result.seconds = round(time.monotonic() - start, 3)
