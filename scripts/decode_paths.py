"""Where one reply's decode time goes (issue 16): the same greedy reply, one stream, timed four ways
and alternated round by round, so a slow spell of the machine hits every way alike:

- ``daemon``: our daemon over HTTP (OpenAI streaming), as ``qwen-edge bench http`` times it;
- ``llama-server``: llama.cpp's server over HTTP, the same client (only with ``--peer-server``);
- ``engine``: our engine in this process (`Engine.chat_stream`): no HTTP, no threads;
- ``raw``: bare greedy ``llama_decode`` calls on the engine's weights (raw_llama.py): no engine.

Prints one JSON object: tok/s per way (median and per round) and the ratios daemon ÷ engine (what
serving costs), engine ÷ raw (what the engine's per-token work costs) and daemon ÷ llama-server.

    .venv/bin/python scripts/decode_paths.py MODEL.gguf [--peer-server llama-server] [--rounds 12]

Both servers stay loaded for the whole run (an idle one computes nothing); the two ways in this
process share one model. Settings come from the usual sources (``QWEN_EDGE_CONFIG``, the
environment). Decode speed is (content events - 1) / (last - first event) for HTTP, the engine's
own ChatStats for ``engine``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from edge.engine.engine import Engine
from edge.engine.types import ChatMessage, ChatStats, SamplingParams
from edge.evaluation.http_servers import (
    OursSpec,
    PeerSpec,
    Server,
    ServerError,
    physical_cores,
    run_ours,
    run_peer,
    served_model,
    stream_chat,
)
from edge.evaluation.raw_llama import RawContext
from edge.settings import load_settings

PROMPT = ("Write a Python module that implements an LRU cache, with docstrings, comments and tests, "
          "then explain step by step how it works.")


def http_way(server: Server, max_tokens: int) -> Callable[[], float]:
    def tps() -> float:
        with server.client() as client:
            r = stream_chat(client, server, [{"role": "user", "content": PROMPT}], max_tokens)
        if r.first is None or r.last is None or r.last <= r.first:
            raise SystemExit(f"{server.name} sent fewer than two tokens")
        return (r.chunks - 1) / (r.last - r.first)
    return tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--peer-server", type=Path, help="llama.cpp llama-server binary (scripts/build_llama_server.sh)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"no model file at {args.model}")
    if args.peer_server and not args.peer_server.is_file():
        raise SystemExit(f"no llama-server binary at {args.peer_server}")
    settings = load_settings()
    with ExitStack() as stack:
        ways: dict[str, Callable[[], float]] = {}
        try:
            ours = stack.enter_context(run_ours(OursSpec(model=args.model)))
        except ServerError as exc:  # the daemon refused the model, or did not come up
            raise SystemExit(str(exc)) from None
        ways["daemon"] = http_way(ours, args.max_tokens)
        if args.peer_server:
            # as bench http starts it: the daemon's context, thread count and resolved KV type
            spec = PeerSpec(args.peer_server, args.model, settings.model.n_ctx,
                            settings.model.n_threads or physical_cores(), served_model(ours)["kv_cache_type"],
                            settings.prompts.dir)
            ways["llama-server"] = http_way(stack.enter_context(run_peer(spec, 1, False)), args.max_tokens)
        engine = Engine.load(args.model, settings)
        stack.callback(engine.close)
        raw = RawContext(engine.rt)
        stack.callback(raw.close)
        messages = [ChatMessage("user", PROMPT)]

        def engine_tps() -> float:
            stats = ChatStats()
            for _ in engine.chat_stream(messages, SamplingParams(max_tokens=args.max_tokens, temperature=0), stats):
                pass
            return stats.decode_tps

        def raw_tps() -> float:
            return raw.decode_tps(engine.chat.prompt(messages, args.max_tokens).tokens, args.max_tokens - 1)
        ways |= {"engine": engine_tps, "raw": raw_tps}
        for way in ways.values():
            way()  # warm: first allocations, the chat system prompt cached
        rounds: dict[str, list[float]] = {name: [] for name in ways}
        for i in range(args.rounds):
            for name in (list(ways) if i % 2 == 0 else list(reversed(ways))):
                rounds[name].append(round(ways[name](), 2))
    median = {name: round(statistics.median(v), 2) for name, v in rounds.items()}
    ratios = {"daemon_vs_engine": ("daemon", "engine"), "engine_vs_raw": ("engine", "raw"),
              "daemon_vs_llama_server": ("daemon", "llama-server")}
    report = {"model": str(args.model), "max_tokens": args.max_tokens, "median_tps": median,
              "ratios": {k: round(median[a] / median[b], 3) for k, (a, b) in ratios.items()
                         if a in median and b in median},
              "rounds_tps": rounds}
    sys.stdout.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
