"""The graders: the OpenAI-compatible backend against a real Chat Completions server on
loopback (scripted per test), the offline backend on a tiny Llama trained here, and the
`grader` config section."""
from __future__ import annotations

import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

import pytest
from helpers import LoopbackServer

from common.types import OfflineGrading, OpenAIGrading
from jobs.spec import SpecError, grader_settings, parse_spec
from workers.graders import GraderError, OfflineGrader, OpenAIGrader, make_grader
from workers.graders.parsers import Malformed as _Malformed
from workers.graders.parsers import parse_best_scale as _parse_best_scale
from workers.graders.parsers import parse_coherence as _parse_coherence
from workers.graders.parsers import parse_relevance as _parse_relevance
from workers.graders.prompts import COHERENCE_PROMPT

MODEL = "grader-model"


# -- a scripted Chat Completions server ---------------------------------------------------

@dataclass
class Reply:
    content: str | None = None   # the answer text, wrapped in a chat completion
    status: int = 200
    headers: dict = field(default_factory=dict)
    body: bytes | None = None    # sent as is instead of a chat completion
    delay: float = 0.0           # seconds before answering (past the client's timeout)


def answer(text: str) -> Reply:
    return Reply(content=text)


@dataclass
class Seen:
    body: dict
    headers: dict
    arrived: float
    done: float | None = None

    @property
    def user(self) -> str:
        return self.body["messages"][1]["content"]


class _State:
    """One test's script and what the server saw; a handler still sleeping from an earlier
    test updates its own state, not the current one."""

    def __init__(self, responder):
        self.responder = responder
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0


class ChatServer(LoopbackServer):
    def __init__(self, port: int = 0):
        """On a free loopback port, or on `port` (an endpoint that comes back)."""
        self.lock = threading.Lock()
        self.state = _State(lambda body: answer("ANSWER: COHERENT"))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                arrived = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    state = server.state
                    seen = Seen(body, {k.title(): v for k, v in self.headers.items()}, arrived)  # HTTP header names are case-insensitive
                    state.seen.append(seen)
                    state.in_flight += 1
                    state.max_in_flight = max(state.max_in_flight, state.in_flight)
                answered = False

                def answering():
                    # Counted out of flight before any byte of the answer goes back: the
                    # client cannot send its next request before that, so the count is exact.
                    nonlocal answered
                    if not answered:
                        answered = True
                        with server.lock:
                            state.in_flight -= 1
                            seen.done = time.monotonic()
                try:
                    reply = state.responder(body) if self.path == "/v1/chat/completions" \
                        else Reply(status=404, body=b"not found")
                    time.sleep(reply.delay)
                    payload = reply.body if reply.body is not None else json.dumps({
                        "id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": reply.content}}],
                    }).encode()
                    answering()
                    self.send_response(reply.status)
                    for key, value in {"Content-Type": "application/json", **reply.headers}.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected
                finally:
                    answering()

            def log_message(self, *args):
                pass

        super().__init__(Handler, port, "/v1")

    def respond(self, responder) -> _State:
        with self.lock:
            self.state = _State(responder)
        return self.state

    def script(self, *replies: Reply) -> _State:
        """Replies in order of arrival (for one request at a time)."""
        queue = list(replies)
        lock = threading.Lock()

        def next_reply(body):
            with lock:
                return queue.pop(0) if queue else Reply(status=418, body=b"script exhausted")
        return self.respond(next_reply)


@pytest.fixture(scope="module")
def server():
    with ChatServer() as s:
        yield s


def grader(server, **kw) -> OpenAIGrader:
    kw = {"concurrency": 1, "max_retries": 2, "timeout_s": 0.5, "backoff_base_s": 0.01, **kw}
    return OpenAIGrader(OpenAIGrading(server.url, MODEL, **kw))


# -- coherence over HTTP ------------------------------------------------------------------

def test_well_formed_answers_parse_and_the_key_comes_from_the_env(server, monkeypatch):
    monkeypatch.setenv("ADL_TEST_GRADER_KEY", "sk-test-123")
    state = server.respond(lambda body: answer(
        "Reasoning: reads well.\nANSWER: COHERENT" if "good" in body["messages"][1]["content"]
        else "Reasoning: word salad.\n  answer:  incoherent  \n"))
    g = grader(server, api_key_env="ADL_TEST_GRADER_KEY", concurrency=4)
    texts = ["a good text", "lava lava blue ice", "another good one", "   "]
    out = g.coherence(texts)
    assert [j.value for j in out] == [True, False, True, False]
    assert all(j.ok and j.error is None for j in out)
    assert out[0].raw == "Reasoning: reads well.\nANSWER: COHERENT"
    assert out[3].raw is None  # empty text is incoherent without asking
    assert len(state.seen) == 3
    for seen in state.seen:
        assert seen.headers["Authorization"] == "Bearer sk-test-123"
        assert seen.body["model"] == MODEL and seen.body["temperature"] == 0
        assert [m["role"] for m in seen.body["messages"]] == ["system", "user"]
        assert seen.body["messages"][0]["content"] == COHERENCE_PROMPT
    assert sorted(s.user for s in state.seen) == sorted(
        f"[TEXT START]\n{t}\n[TEXT END]" for t in texts[:3])
    assert g.name == f"openai:{MODEL}"


def test_no_key_variable_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv("ADL_TEST_GRADER_KEY", raising=False)
    state = server.script(answer("ANSWER: COHERENT"))
    assert grader(server, api_key_env="ADL_TEST_GRADER_KEY").coherence(["fine"])[0].value is True
    assert "Authorization" not in state.seen[0].headers


def test_malformed_answers_are_retried_then_recorded_as_failures(server):
    state = server.script(answer("I think it is fine."), answer("No label here either."),
                          answer("Still none."))
    [j] = grader(server, max_retries=2).coherence(["some text"])
    assert (j.ok, j.value) == (False, None)
    assert "malformed answer" in j.error and "ANSWER: COHERENT" in j.error
    assert "after 3 attempts" in j.error
    assert j.raw == "Still none."
    assert len(state.seen) == 3


def test_malformed_answers_then_a_good_one_pass(server):
    state = server.script(answer("ANSWER: COHERENT\nHope that helps!"),  # text after the label
                          Reply(body=b"<html>gateway</html>"),              # not JSON
                          Reply(body=b'{"choices": []}'),                    # no choice
                          answer("ANSWER: MAYBE"),
                          answer("Fine.\nANSWER: INCOHERENT"))
    [j] = grader(server, max_retries=4).coherence(["some text"])
    assert (j.ok, j.value, j.raw) == (True, False, "Fine.\nANSWER: INCOHERENT")
    assert len(state.seen) == 5


def test_timeouts_429_and_5xx_are_retried_then_succeed(server):
    state = server.script(Reply(delay=1.0, content="ANSWER: COHERENT"),  # past timeout_s
                          Reply(status=429, headers={"Retry-After": "1"}, body=b"slow down"),
                          Reply(status=503, body=b"overloaded"),
                          answer("ANSWER: COHERENT"))
    [j] = grader(server, max_retries=3, timeout_s=0.3).coherence(["some text"])
    assert (j.ok, j.value) == (True, True)
    assert len(state.seen) == 4
    # Retry-After honoured: the third request came at least 1 s after the 429.
    assert state.seen[2].arrived - state.seen[1].done >= 0.95
    # The timed-out request was abandoned after about timeout_s, not after the reply.
    assert state.seen[1].arrived - state.seen[0].arrived < 0.9


@pytest.mark.parametrize("reply, reason", [
    (Reply(status=500, body=b"boom"), "HTTP 500"),
    (Reply(status=429, body=b"rate limited"), "HTTP 429"),
    (Reply(delay=0.6, content="ANSWER: COHERENT"), "timed out"),
])
def test_exhausted_retries_are_recorded_failures(server, reply, reason):
    state = server.respond(lambda body: reply)
    out = grader(server, max_retries=2, timeout_s=0.3).coherence(["a", "b"])
    assert [j.ok for j in out] == [False, False] and [j.value for j in out] == [None, None]
    assert all(reason in j.error and "after 3 attempts" in j.error for j in out)
    assert len(state.seen) == 6


def test_other_4xx_fail_at_once(server):
    state = server.respond(lambda body: Reply(status=401, body=b'{"error": "bad key"}'))
    [j] = grader(server, max_retries=3).coherence(["text"])
    assert not j.ok and "HTTP 401" in j.error and "bad key" in j.error and "not retried" in j.error
    assert len(state.seen) == 1


def test_concurrency_overlaps_requests_up_to_the_bound(server):
    state = server.respond(lambda body: Reply(delay=0.25, content="ANSWER: COHERENT"))
    out = grader(server, concurrency=4, timeout_s=2).coherence([f"text {i}" for i in range(8)])
    assert all(j.ok and j.value for j in out)
    assert 2 <= state.max_in_flight <= 4


def test_rate_limit_holds_on_the_server_side(server):
    state = server.respond(lambda body: answer("ANSWER: COHERENT"))
    rate, n = 10.0, 10
    out = grader(server, concurrency=8, requests_per_second=rate).coherence(
        [f"text {i}" for i in range(n)])
    assert all(j.ok for j in out)
    arrived = sorted(s.arrived for s in state.seen)
    assert len(arrived) == n
    # No window holds more than rate x its length + 1 requests; one request of slack for
    # the server's scheduling jitter (unlimited, all ten would arrive within milliseconds).
    assert arrived[-1] - arrived[0] >= (n - 1) / rate - 0.05
    for i in range(n):
        for k in range(2, n - i):
            assert arrived[i + k] - arrived[i] >= (k - 1) / rate


# -- token relevance over HTTP ------------------------------------------------------------

TOKENS = [" cake", " oven", " flour", " river"]


def candidates_of(prompt: str) -> list[str]:
    block = prompt.split("[CANDIDATE TOKENS]\n", 1)[1]
    return [json.loads(m.group(1)) for m in re.finditer(r"^\d+\. (.*)$", block, re.MULTILINE)]


def label_lines(cands: list[str], relevant: set[str], skip: set[str] = frozenset()) -> str:
    return "Reasoning: baking words.\n" + "\n".join(
        f"ANSWER[{i}]: {'RELEVANT' if t in relevant else 'IRRELEVANT'}"
        for i, t in enumerate(cands, 1) if t not in skip)


def test_three_rotations_and_all_agreement(server):
    def respond(body):
        cands = candidates_of(body["messages"][1]["content"])
        relevant = {" cake", " oven", " flour"}
        if cands[0] == " flour":  # the third rotation disagrees about " oven"
            relevant = relevant - {" oven"}
        return answer(label_lines(cands, relevant))
    state = server.respond(respond)
    out = grader(server, concurrency=3).token_relevance(TOKENS, "Baking recipes and advice",
                                                        [" bake", " sugar"])
    assert [j.value for j in out] == [True, False, True, False]
    assert all(j.ok for j in out)
    assert out[1].labels == ("RELEVANT", "RELEVANT", "IRRELEVANT")   # per rotation
    assert sorted(candidates_of(s.user) for s in state.seen) == sorted([
        [" cake", " oven", " flour", " river"], [" oven", " flour", " river", " cake"],
        [" flour", " river", " cake", " oven"]])
    assert all("Baking recipes and advice" in s.user and '" bake", " sugar"' in s.user
               for s in state.seen)
    assert "[rotation 2]" in out[0].raw


def test_unlabelled_tokens_are_retried_then_recorded_as_failures(server):
    def respond(body):
        cands = candidates_of(body["messages"][1]["content"])
        # The second rotation never labels " river".
        skip = {" river"} if cands[0] == " oven" else set()
        return answer(label_lines(cands, {" cake", " oven", " flour"}, skip))
    state = server.respond(respond)
    out = grader(server, max_retries=2).token_relevance(TOKENS, "Baking", [" bake"])
    assert [j.value for j in out[:3]] == [True, True, True] and all(j.ok for j in out[:3])
    river = out[3]
    assert (river.ok, river.value) == (False, None)
    assert "rotation 1" in river.error and "unlabelled" in river.error
    assert "after 3 attempts" in river.error
    assert len(state.seen) == 1 + 3 + 1


def test_malformed_relevance_answers_are_retried_then_recorded_as_failures(server):
    # Prose, a label out of range, a token labelled both ways: never parsed, never guessed.
    bad = ["They all look relevant to me.", "ANSWER[1]: RELEVANT\nANSWER[9]: RELEVANT",
           "ANSWER[1]: RELEVANT\nANSWER[1]: IRRELEVANT"]
    state = server.respond(lambda body: answer(bad[len(state.seen) % 3]))
    out = grader(server, max_retries=2).token_relevance(TOKENS, "Baking", [" bake"])
    assert all((j.ok, j.value) == (False, None) for j in out)
    assert all("malformed answer" in j.error and "after 3 attempts" in j.error for j in out)
    assert all(j.labels == ("UNLABELLED",) * 3 for j in out)
    assert len(state.seen) == 3 * 3   # three rotations, three attempts each


def test_an_unlabelled_token_retried_once_then_labelled_passes(server):
    tries = {"n": 0}

    def respond(body):
        cands = candidates_of(body["messages"][1]["content"])
        skip = set()
        if cands[0] == " cake":
            tries["n"] += 1
            skip = {" flour"} if tries["n"] == 1 else set()
        return answer(label_lines(cands, {" cake", " flour"}, skip))
    state = server.respond(respond)
    out = grader(server).token_relevance(TOKENS, "Baking", [" bake"])
    assert [j.value for j in out] == [True, False, True, False] and all(j.ok for j in out)
    assert len(state.seen) == 4


# -- best scale over HTTP -----------------------------------------------------------------

def offered_scales(prompt: str) -> list[str]:
    return prompt.split("[OFFERED SCALES]\n", 1)[1].splitlines()[0].split(", ")


def test_best_scale_parses_and_hides_trivial_tokens(server):
    token_lists = {0.5: [" the", " and", " of"],
                   0.6000000000000001: [" cake", " oven", ",", " sugar", " the"],
                   2.0: ["xyz", "@@", " qu"],
                   20.0: ["->", " ", "\n\n"]}

    def respond(body):
        assert offered_scales(body["messages"][1]["content"]) == ["0.5", "0.6", "2"]
        return answer('Reasoning: 0.6 is about baking.\nBEST_SCALE: 0.60\n'
                      'TOKENS: cake | oven | "sugar"')
    state = server.respond(respond)
    j = grader(server).best_scale(token_lists)
    assert j.ok, j.error
    assert j.value == {"scale": 0.6000000000000001, "tokens": [" cake", " oven", " sugar"]}
    prompt = state.seen[0].user
    assert 'SCALE 0.6: "cake", "oven", "sugar", "the"' in prompt
    assert '"@@"' not in prompt and "->" not in prompt and "SCALE 20" not in prompt


def test_best_scale_rejects_unoffered_scales_and_invented_tokens(server):
    token_lists = {1.0: [" cake", " oven"], 2.0: [" the", " a"]}
    state = server.script(answer("BEST_SCALE: 3\nTOKENS: cake"),
                          answer("BEST_SCALE: 1\nTOKENS: cake | banana"),
                          answer("BEST_SCALE: 1"))
    j = grader(server, max_retries=2).best_scale(token_lists)
    assert not j.ok and j.value is None and len(state.seen) == 3
    assert "malformed answer" in j.error and "after 3 attempts" in j.error
    assert j.raw == "BEST_SCALE: 1"
    with pytest.raises(_Malformed, match="not one of the offered scales"):
        _parse_best_scale("BEST_SCALE: 3\nTOKENS: cake", {1.0: [" cake"]})
    with pytest.raises(_Malformed, match="'banana' is not in scale 1's list"):
        _parse_best_scale("BEST_SCALE: 1\nTOKENS: cake | banana", {1.0: [" cake"]})
    assert _parse_best_scale("BEST_SCALE: 1.0\nTOKENS:", {1.0: [" cake"]}) == (1.0, [])


def test_best_scale_runs_a_tournament_over_the_methods_scales(server):
    scales = sorted({round(0.5 + 0.1 * i, 10) for i in range(16)} | {3, 4, 5, 10, 20}
                    | {20 + 20 * i for i in range(10)})
    assert len(scales) == 30  # 20 is listed twice
    token_lists = {float(s): [f" noise{i}", f" junk{i}"] for i, s in enumerate(scales)}
    token_lists[60.0] = [" cake", " oven", " the"]

    def respond(body):
        prompt = body["messages"][1]["content"]
        offered = offered_scales(prompt)
        best = "60" if "60" in offered else offered[0]
        tokens = "cake | oven" if best == "60" else ""
        return answer(f"BEST_SCALE: {best}\nTOKENS: {tokens}")
    state = server.respond(respond)
    j = grader(server, concurrency=3).best_scale(token_lists)
    assert j.ok, j.error
    assert j.value == {"scale": 60.0, "tokens": [" cake", " oven"]}
    groups = sorted(len(offered_scales(s.user)) for s in state.seen)
    assert groups == [3, 10, 10, 10]  # three groups, then the final of their winners


def test_parsers_are_strict():
    assert _parse_coherence("why\nANSWER: COHERENT\n\n") is True
    for bad in ["", "ANSWER: COHERENT\nmore", "ANSWER: COHERENT!", "ANSWER:COHERENT-ish",
                "Final answer: coherent"]:
        with pytest.raises(_Malformed):
            _parse_coherence(bad)
    assert _parse_relevance("ok\nANSWER[2]: IRRELEVANT\nANSWER[1]: relevant", 2) == \
        {1: True, 2: False}
    with pytest.raises(_Malformed, match="out of range"):
        _parse_relevance("ANSWER[1]: RELEVANT\nANSWER[3]: RELEVANT", 2)
    with pytest.raises(_Malformed, match="both"):
        _parse_relevance("ANSWER[1]: RELEVANT\nANSWER[1]: IRRELEVANT", 1)
    with pytest.raises(_Malformed, match="does not end in"):
        _parse_relevance("ANSWER[1]: RELEVANT\nthanks", 1)
    with pytest.raises(_Malformed, match=r"\[2\] are unlabelled") as caught:
        _parse_relevance("ANSWER[1]: RELEVANT", 2)
    assert caught.value.partial == {1: True}


# -- the offline grader on a tiny trained Llama -------------------------------------------

def _passage(rng: random.Random) -> str:
    subjects = ["the baker", "a farmer", "my sister", "the old captain", "our teacher",
                "a young doctor"]
    verbs = ["carried", "painted", "found", "sold", "repaired", "watched"]
    objects = ["a red boat", "the wooden door", "six green apples", "the broken clock",
               "a small garden", "the long river"]
    tails = ["before dinner", "in the morning", "near the harbor", "after the storm",
             "with great care", "for the market"]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} "
                    f"{rng.choice(tails)} ." for _ in range(14))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A Llama that has memorised one generated passage: its greedy text is fluent to it,
    the same tokens shuffled are not."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    passage = _passage(random.Random(0))
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([passage], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[BOS]"]))
    raw.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", raw.token_to_id("[BOS]"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="[BOS]",
                                        unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None))
    ids = tokenizer(passage, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses to thread contention
    try:
        for _ in range(150):
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1, loss.item()
    folder = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with torch.no_grad():
        out = model.generate(ids[:, :4], max_new_tokens=40, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    greedy = tokenizer.decode(out[0, 1:], skip_special_tokens=True)
    return str(folder), greedy


@pytest.fixture(scope="module")
def offline(tiny_lm):
    return OfflineGrader(OfflineGrading(batch_size=2), tiny_lm[0])


def test_offline_coherence(offline, tiny_lm):
    greedy = tiny_lm[1]
    words = greedy.split()
    shuffled = " ".join(random.Random(1).sample(words, len(words)))
    spam = " ".join(["apples"] * 30)
    texts = [greedy, spam, "", "   ", "the baker", shuffled]
    out = offline.coherence(texts)
    assert [j.value for j in out] == [True, False, False, False, False, False]
    assert all(j.ok for j in out)
    assert "perplexity=" in out[0].raw and "distinct_ratio=" in out[1].raw
    ppl = offline.perplexity.perplexities(texts)
    assert ppl[0] < 5 < 200 < ppl[5]  # fluent to the model; its own tokens shuffled are not
    assert ppl[2] is None and ppl[3] is None
    # Batched with padding and a mask equals one text at a time.
    alone = [offline.perplexity.perplexities([t])[0] for t in texts]
    assert [p is None for p in alone] == [p is None for p in ppl]
    assert all(a == pytest.approx(b, rel=1e-4) for a, b in zip(alone, ppl) if a is not None)


def test_offline_perplexity_holds_a_bounded_chunk_of_logits(offline, tiny_lm, monkeypatch):
    """The grader scores through the causal stage's chunked loss (what placement counts):
    equal to a plain forward's cross-entropy, with no tensor of a whole batch's logits."""
    import math

    import torch
    import torch.nn.functional as F
    import workers.causal as causal
    from test_causal_memory import LargestTensor
    grader = offline.perplexity
    vocab = grader.model.config.vocab_size
    texts = [tiny_lm[1], " ".join(random.Random(2).sample(tiny_lm[1].split(), 20))]
    monkeypatch.setattr(causal, "LOGIT_ELEMENTS", 4 * vocab)

    class LargestLogits(LargestTensor):   # tensors over the vocabulary only (the model is tiny)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == vocab:
                    self.largest = max(self.largest, t.numel())
            return out

    with LargestLogits() as seen:
        got = grader.perplexities(texts)
    want = []
    for text in texts:
        ids = torch.tensor([grader._encode(text)[0]])
        with torch.inference_mode():
            logits = grader.model(input_ids=ids).logits[0, :-1].double()
        want.append(math.exp(float(F.cross_entropy(logits, ids[0, 1:]))))
    assert got == pytest.approx(want, rel=1e-4) and want[1] > 2 * want[0]   # the comparison can fail
    whole = 2 * (len(grader._encode(texts[0])[0]) - 1) * vocab    # one batch of two texts, whole
    assert 0 < seen.largest <= 5 * vocab < whole / 3


def test_offline_best_scale_prefers_mutually_similar_tokens(offline):
    import torch
    model, tokenizer = offline.perplexity.model, offline.perplexity.tokenizer
    table = model.get_input_embeddings().weight
    group = ["boat", "river", "harbor"]
    saved = table.detach().clone()
    try:
        with torch.no_grad():  # make one group of words near-identical in embedding space
            direction = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(3))
            for k, word in enumerate(group):
                table[tokenizer.convert_tokens_to_ids(word)] = direction + 0.01 * k
        token_lists = {0.5: [" sold", " clock", " morning", " doctor"],
                       1.0: [" boat", " river", ",", " harbor", " sold"],
                       2.0: [" boat", " river", "->", " harbor", " sold"],  # a tie: 1.0 wins
                       3.0: [" the"]}
        j = offline.best_scale(token_lists)
        assert j.ok and j.value == {"scale": 1.0, "tokens": [" boat", " river", " harbor"]}
        assert offline.best_scale(token_lists) == j  # deterministic
        assert not offline.best_scale({1.0: ["->", "."]}).ok
    finally:
        with torch.no_grad():
            table.copy_(saved)


def test_offline_token_relevance_needs_an_llm(offline):
    with pytest.raises(GraderError, match="token relevance needs an LLM grader"):
        offline.token_relevance([" boat"], "Boats", [" sail"])


# -- the grader config section ------------------------------------------------------------

def test_make_grader_builds_both_kinds(tiny_lm, server):
    assert isinstance(make_grader(None, tiny_lm[0]), OfflineGrader)
    g = make_grader(grader_settings({"kind": "offline", "threshold": 50, "min_tokens": 3}), tiny_lm[0])
    assert (g.perplexity.threshold, g.perplexity.min_tokens) == (50, 3)
    g = make_grader(grader_settings({"kind": "openai", "base_url": server.url + "/", "model": MODEL,
                                     "api_key_env": "ADL_TEST_GRADER_KEY", "concurrency": 3,
                                     "requests_per_second": 2.5, "max_retries": 1, "timeout_s": 5,
                                     "backoff_base_s": 0.1}), "/nonexistent/model")
    assert isinstance(g, OpenAIGrader)
    assert (g.url, g.concurrency, g.max_retries, g.timeout_s) == (
        server.url + "/chat/completions", 3, 1, 5)
    assert g._limiter.interval == pytest.approx(0.4)


@pytest.mark.parametrize("config, message", [
    ({"kind": "openai", "base_url": "http://x", "model": "m", "concurency": 3},
     "grader.concurency: unknown key"),
    ({"kind": "offline", "base_url": "http://x"}, "grader.base_url: unknown key"),
    ({"threshold": 10, "temperature": 0}, "grader.temperature: unknown key"),
    ({"kind": "openai", "base_url": "http://x"}, "grader.model: required"),
    ({"kind": "anthropic"}, "grader.kind: expected one of offline, openai"),
    ({"kind": "openai", "base_url": "http://x", "model": "m", "concurrency": 0},
     "grader.concurrency: expected an integer >= 1"),
    ({"kind": "openai", "base_url": "http://x", "model": "m", "requests_per_second": -1},
     "grader.requests_per_second: expected a number > 0"),
    ({"kind": "openai", "base_url": "http://x", "model": "m", "max_retries": True},
     "grader.max_retries: expected an integer >= 0"),
    ({"threshold": "high"}, "grader.threshold: expected a number > 0"),
    ({"dtype": "int8"}, "grader.dtype: expected bfloat16 | float16 | float32"),
    (["openai"], "grader: expected a mapping"),
])
def test_grader_config_errors_name_the_key(config, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        grader_settings(config)
    with pytest.raises(ValueError, match=re.escape(message)):  # the whole spec, before any model loads
        parse_spec({"name": "job", "pairs": [{"name": "p", "base": "b", "finetuned": "f"}], "grader": config})


def test_the_spec_checks_the_graders_settings():
    # One validator: the workers' graders receive settings jobs/spec.py built and checked.
    with pytest.raises(ValueError, match="concurrency: expected an integer >= 1"):
        grader_settings({"kind": "openai", "base_url": "http://127.0.0.1:9", "model": MODEL, "concurrency": 0})
    assert grader_settings({"kind": "openai", "base_url": "http://x", "model": "m",
                            "requests_per_second": None}).requests_per_second is None
