"""The agent stage's request throughput against a slow chat endpoint.

A scripted OpenAI-compatible server on loopback (tests/test_graders.py ChatServer, a real
HTTP server) answers every request after `--latency` seconds (1 s by default). Each
pair's agent stage core (jobs/agent_stage.py PairAgents.run_all, the code `adl run` runs)
does its runs: 2 agents x `--runs` runs, each run one `ask_model` call and then a FINAL
(2 agent turns), the black-box and the ADL agent alike. Pairs' stages run as the executor
runs units, one thread each, at most `--pairs-at-once` of them at a time (their engines
must fit the cluster: 4 pairs = 8 vLLM engines by default); all share one ChatEndpoint.

NOT measured here: the models. `ask_model` is answered by a stub that returns fixed
texts at once (no vLLM), and the ADL agent gets only `ask_model` (no tables); the first
message is a 20 kB placeholder of an overview's size. Grading is off (no description),
so every request is an agent turn.

Reported: agent turns per second, against the target 0.8 x concurrency / latency, and the
requests the server had in flight (the most at once, and the time average).

    .venv/bin/python benchmarks/bench_agent.py [--pairs 100] [--runs 5] [--concurrency 32]
                                               [--latency 1.0] [--pairs-at-once 4]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import harness  # noqa: F401  (puts the repository root on sys.path)

sys.path.insert(0, str(harness.ROOT / "tests"))
from test_graders import ChatServer, Reply  # noqa: E402

from jobs.agent_stage import PairAgents, runs_of  # noqa: E402
from jobs.agent_tools import ask_model_tool  # noqa: E402
from jobs.spec import parse_spec  # noqa: E402


class StubModels:
    """ask_model without models: fixed texts, at once."""

    def ask(self, prompts, context):
        return {"base": ["a base answer"] * len(prompts), "finetuned": ["a finetuned answer"] * len(prompts)}


def responder(latency: float):
    def reply(body):
        turn = sum(m["role"] == "assistant" for m in body["messages"])
        text = ('Let me ask.\nCALL(ask_model: {"prompts": ["What do you like to talk about?"]})' if turn == 0
                else 'FINAL(description: "A finetune about something.")')
        return Reply(content=text, delay=latency)
    return reply


def main() -> None:
    import http.server
    # socketserver listens with a backlog of 5: more connections at once are refused.
    http.server.ThreadingHTTPServer.request_queue_size = 1024
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--pairs-at-once", type=int, default=4)
    args = ap.parse_args()
    harness.header("agent stage: chat requests in flight against a slow endpoint")
    with ChatServer() as server:
        state = server.respond(responder(args.latency))
        settings = parse_spec({
            "name": "bench", "pairs": [{"name": "p", "base": "b", "finetuned": "f"}], "generation": {}, "analyses": {},
            "agent": {"base_url": server.url, "model": "scripted", "api_key_env": "ADL_BENCH_NO_KEY",
                      "budgets": [5], "baseline_budgets": [5], "runs": args.runs, "concurrency": args.concurrency,
                      "max_retries": 0, "timeout_s": 60}}).agent
        overview = "OVERVIEW:\n" + "x" * 20_000
        tools = [ask_model_tool(StubModels())]
        keys = runs_of(settings)
        records: list = []
        lock = threading.Lock()

        def pair_stage(i: int) -> None:
            agents = PairAgents(f"pair-{i}", settings, {"adl": overview, "blackbox": "examples"},
                                {"adl": tools, "blackbox": tools}, None, None)
            out = agents.run_all(keys)
            with lock:
                records.extend(out)

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.pairs_at_once) as units:
            list(units.map(pair_stage, range(args.pairs)))
        wall = time.perf_counter() - start
        seen = list(state.seen)
    turns = len(seen)
    busy = sum(s.done - s.arrived for s in seen if s.done is not None)
    done = sum(r["status"] == "done" for r in records)
    rate, target = turns / wall, 0.8 * args.concurrency / args.latency
    print(f"{args.pairs} pairs x 2 agents x {args.runs} runs = {len(records)} runs ({done} done), "
          f"{turns} agent turns in {wall:.1f} s")
    print(f"endpoint latency {args.latency:g} s, concurrency {args.concurrency}, {args.pairs_at_once} pairs' stages at once")
    print(f"requests in flight at the server: at most {state.max_in_flight}, on average {busy / wall:.1f}")
    print(f"agent turns per second: {rate:.2f} (ideal {args.concurrency / args.latency:.1f}); "
          f"target >= 0.8 x concurrency / latency = {target:.1f}: {'MET' if rate >= target else 'MISSED'}")


if __name__ == "__main__":
    main()
