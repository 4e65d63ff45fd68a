"""`qwen-edge bench http`: the daemon measured over loopback, side by side with llama.cpp's
`llama-server` on the same model file (issue 16's measuring instrument).

Phases (each optional):
1. **sentiment** (needs a labelled TSV): texts classified one by one while ``chat_streams`` replies
   stream in the background, latency p50/p90 and accuracy; one reply alone for the decode speed;
   the server's RSS, peak and at the end. On llama-server the sentiment runs with our GBNF grammar
   and few-shot prompt on a dedicated, prompt-cached slot, chat on the other slot(s).
2. **concurrency** N (``bench_streams.concurrency_turn``): N concurrent streamed replies;
   aggregate tok/s, per-stream tok/s, TTFT p50/p90. llama-server runs with ``-np N``.
3. **mixed** (``bench_streams.mixed_turn``): 2 chat streams while one client classifies back to
   back for a fixed window; chat aggregate tok/s, classifications, p50/p90.

Every measurement is a *turn*: one server started (unless ours is already running at a URL),
warmed up, measured, stopped; the other server then does the same work. Turns alternate
(ours-peer, peer-ours, ...) so drifting background load hits both alike, and each ratio
ours/peer is taken from the two turns of one repetition, never across repetitions.
"""
from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edge.evaluation import bench_streams as streams
from edge.evaluation.http_servers import (
    OtherCpu,
    OursSpec,
    PeerSpec,
    RssSampler,
    Server,
    ServerError,
    classify_timed,
    physical_cores,
    run_ours,
    run_peer,
    served_model,
)
from edge.evaluation.load import percentile

log = logging.getLogger(__name__)

OURS, PEER = "qwen-edge", "llama-server"
MIXED_CHATS = 2                           # chat streams of the mixed load (issue 16)
TARGETS = {"p50_ms": "below peer", "p90_ms": "below peer", "decode_tps": ">= 0.95 x peer", "rss_peak_mb": "<= peer"}


@dataclass(frozen=True)
class PeerOptions:
    """llama-server as given on the command line; completed from the daemon's /health."""
    binary: Path
    ctx_per_slot: int | None = None       # None: the daemon's n_ctx
    threads: int | None = None            # None: as the daemon resolves model.n_threads
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class HttpBenchOptions:
    ours: OursSpec
    peer: PeerOptions | None
    prompts_dir: Path
    chat_system: str
    n_threads: int = 0                    # the daemon's model.n_threads (0: physical cores)
    texts: tuple[tuple[str, str], ...] = ()  # labelled texts: the sentiment phase runs when given
    chat_streams: int = 1                 # sentiment phase: replies streaming meanwhile
    chat_tokens: int = 128                # reply length of every measured reply
    rounds: int = 5                       # sentiment phase: rounds alternating between the servers
    concurrency: tuple[int, ...] = ()     # concurrency phase: stream counts
    mixed: bool = False
    mixed_window_s: float = 30.0
    mixed_texts: tuple[str, ...] = streams.SHORT_TEXTS
    repeat: int = 1                       # concurrency and mixed phases: repetitions


class Servers:
    """Starts one server per turn. The peer's model, KV type and context come from the daemon's
    /health, so the first turn of a run is always ours."""

    def __init__(self, opts: HttpBenchOptions) -> None:
        self.opts = opts
        self.peer_spec: PeerSpec | None = None
        self.served: dict = {}
        if opts.peer and opts.ours.model is None:
            log.warning("the daemon at %s stays loaded while llama-server runs: start it with --model "
                        "instead to measure each server alone", opts.ours.url)

    @property
    def names(self) -> list[str]:
        return [OURS, PEER] if self.opts.peer else [OURS]

    def order(self, repetition: int) -> list[str]:
        """ours-peer, then peer-ours, ...; the very first turn is ours (the peer needs its facts)."""
        names = self.names
        return names if repetition % 2 == 0 or self.peer_spec is None else names[::-1]

    @contextmanager
    def turn(self, name: str, chat_slots: int, sentiment_slot: bool) -> Iterator[Server]:
        if name == OURS:
            with run_ours(self.opts.ours) as server:
                if not self.served:
                    self.served = served_model(server)
                    self.peer_spec = self._peer_spec()
                yield server
            return
        if self.peer_spec is None:
            raise ServerError("llama-server needs the daemon's model facts: run a turn of ours first")
        with run_peer(self.peer_spec, chat_slots, sentiment_slot) as server:
            yield server

    def _peer_spec(self) -> PeerSpec | None:
        p = self.opts.peer
        if p is None:
            return None
        return PeerSpec(p.binary, Path(self.served["path"]), p.ctx_per_slot or int(self.served["n_ctx"]),
                        p.threads or self.opts.n_threads or physical_cores(), self.served["kv_cache_type"],
                        self.opts.prompts_dir, p.extra_args)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class _Turns:
    """Every turn's record, by phase; what was started and the machine's load around each."""
    records: list[dict] = field(default_factory=list)

    def run(self, servers: Servers, name: str, phase: str, chat_slots: int, sentiment_slot: bool,
            work: Callable[[Server], dict], **tags: object) -> dict:
        before = _load()
        with servers.turn(name, chat_slots, sentiment_slot) as server, RssSampler(server.pid) as rss, \
                OtherCpu(server.pid) as others:
            figures = work(server)
            command, pid = server.command, server.pid
        record = {"phase": phase, "server": name, **tags, **figures, "load_before": before, "load_after": _load(),
                  "other_cpu_share": others.share,
                  "command": command, "pid": pid,
                  "rss_peak_mb": round(rss.peak / 1e6) if rss.peak else None,
                  "rss_end_mb": round(rss.last / 1e6) if rss.last else None}
        log.info("%s", record)
        self.records.append(record)
        return record


# -- phase 1: sentiment latency under chat, decode speed, RSS -----------------------------------

def _sentiment_work(opts: HttpBenchOptions, part: list[tuple[str, str]]) -> Callable[[Server], dict]:
    def work(server: Server) -> dict:
        with server.client() as client:
            for text, _ in opts.texts[:5]:                          # prompt caches, first allocations
                server.classify(client, text)
        streams.warm_up_streams(server, opts.chat_system, 1)
        alone = streams.concurrency_turn(server, opts.chat_system, 1, opts.chat_tokens)
        latencies, correct = _classify_under_chat(server, opts, part)
        return {"decode_tps": alone["per_stream_tps"][0], "latencies_ms": latencies, "correct": correct}
    return work


def _classify_under_chat(server: Server, opts: HttpBenchOptions,
                         part: list[tuple[str, str]]) -> tuple[list[float], int]:
    latencies, correct = [], 0
    with streams.BackgroundChats(server, opts.chat_system, opts.chat_streams, 256), server.client() as client:
        for text, label in part:
            got, ms = classify_timed(server, client, text)
            latencies.append(ms)
            correct += got == label
    return latencies, correct


def sentiment_phase(servers: Servers, turns: _Turns, opts: HttpBenchOptions) -> list[dict]:
    """The texts split over ``rounds``; each round classifies its part on every server in turn."""
    chunk = -(-len(opts.texts) // opts.rounds)
    by_server: dict[str, list[dict]] = {n: [] for n in servers.names}
    for r in range(opts.rounds):
        part = list(opts.texts[r * chunk:(r + 1) * chunk])
        if not part:
            break
        for name in servers.order(r):
            rec = turns.run(servers, name, "sentiment", opts.chat_streams, True, _sentiment_work(opts, part), round=r)
            by_server[name].append(rec)
    return [_sentiment_row(name, recs) for name, recs in by_server.items()]


def _sentiment_row(name: str, recs: list[dict]) -> dict:
    lat = [ms for rec in recs for ms in rec["latencies_ms"]]
    q = statistics.quantiles(lat, n=10) if len(lat) > 1 else lat * 9
    peaks = [rec["rss_peak_mb"] for rec in recs if rec["rss_peak_mb"]]
    return {"server": name, "texts": len(lat), "p50_ms": round(statistics.median(lat), 1), "p90_ms": round(q[8], 1),
            "accuracy": round(sum(rec["correct"] for rec in recs) / len(lat), 3),
            "decode_tps": round(statistics.median(rec["decode_tps"] for rec in recs), 1),
            "rss_peak_mb": max(peaks) if peaks else None, "rss_end_mb": recs[-1]["rss_end_mb"]}


def sentiment_verdict(mine: dict, theirs: dict) -> dict[str, bool | None]:
    return {"p50_ms": mine["p50_ms"] < theirs["p50_ms"], "p90_ms": mine["p90_ms"] < theirs["p90_ms"],
            "decode_tps": mine["decode_tps"] >= 0.95 * theirs["decode_tps"],
            "rss_peak_mb": None if not (mine["rss_peak_mb"] and theirs["rss_peak_mb"])
            else mine["rss_peak_mb"] <= theirs["rss_peak_mb"]}


# -- phases 2 and 3: concurrent streams, mixed load ------------------------------------------------

def _concurrency_work(opts: HttpBenchOptions, n: int) -> Callable[[Server], dict]:
    def work(server: Server) -> dict:
        streams.warm_up_streams(server, opts.chat_system, n)
        return streams.concurrency_turn(server, opts.chat_system, n, opts.chat_tokens)
    return work


def _mixed_work(opts: HttpBenchOptions) -> Callable[[Server], dict]:
    def work(server: Server) -> dict:
        with server.client() as client:
            for text in opts.mixed_texts[:3]:
                server.classify(client, text)
        streams.warm_up_streams(server, opts.chat_system, MIXED_CHATS)
        return streams.mixed_turn(server, opts.chat_system, list(opts.mixed_texts), opts.mixed_window_s,
                                  MIXED_CHATS, opts.chat_tokens)
    return work


def concurrency_phase(servers: Servers, turns: _Turns, opts: HttpBenchOptions) -> list[dict]:
    rows = []
    for n in opts.concurrency:
        recs: dict[str, list[dict]] = {name: [] for name in servers.names}
        for rep in range(opts.repeat):
            for name in servers.order(rep):
                recs[name].append(turns.run(servers, name, "concurrency", n, False, _concurrency_work(opts, n),
                                            streams=n, repetition=rep))
        rows.append({"streams": n, **_side_by_side(recs, _concurrency_summary, CONCURRENCY_RATIOS)})
    return rows


def mixed_phase(servers: Servers, turns: _Turns, opts: HttpBenchOptions) -> dict:
    recs: dict[str, list[dict]] = {name: [] for name in servers.names}
    for rep in range(opts.repeat):
        for name in servers.order(rep):
            recs[name].append(turns.run(servers, name, "mixed", MIXED_CHATS, True, _mixed_work(opts), repetition=rep))
    return _side_by_side(recs, _mixed_summary, MIXED_RATIOS)


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}


def _concurrency_summary(recs: list[dict]) -> dict:
    ttft = [ms for rec in recs for ms in rec["ttft_ms"] if ms is not None]
    return {"aggregate_tps": _spread([rec["aggregate_tps"] for rec in recs]),
            "per_stream_tps_median": round(statistics.median(t for rec in recs for t in rec["per_stream_tps"]), 2),
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90),
            "tokens_per_stream": round(statistics.mean(rec["tokens"] / rec["streams"] for rec in recs), 1),
            **_turn_facts(recs)}


def _mixed_summary(recs: list[dict]) -> dict:
    return {"chat_aggregate_tps": _spread([rec["chat_aggregate_tps"] for rec in recs]),
            "classifications": _spread([rec["classifications"] for rec in recs]),
            "classify_p50_ms": _spread([rec["classify_p50_ms"] for rec in recs if rec["classify_p50_ms"] is not None]
                                       or [0.0]),
            "classify_p90_ms": _spread([rec["classify_p90_ms"] for rec in recs if rec["classify_p90_ms"] is not None]
                                       or [0.0]),
            "errors": sum(len(rec["errors"]) for rec in recs), **_turn_facts(recs)}


def _turn_facts(recs: list[dict]) -> dict:
    shares = [rec["other_cpu_share"] for rec in recs if rec["other_cpu_share"] is not None]
    return {"rss_peak_mb": max((rec["rss_peak_mb"] or 0 for rec in recs), default=None) or None,
            "other_cpu_share": _spread(shares) if shares else None}


# figure of one turn -> how ours/peer is read: a ratio per repetition (the two turns of one repetition)
CONCURRENCY_RATIOS = ("aggregate_tps", "ttft_p50")
MIXED_RATIOS = ("chat_aggregate_tps", "classifications", "classify_p50_ms", "classify_p90_ms")


def _turn_figure(rec: dict, name: str) -> float | None:
    if name == "ttft_p50":
        return percentile([ms for ms in rec["ttft_ms"] if ms is not None], 50)
    return rec.get(name)


def _side_by_side(recs: dict[str, list[dict]], summary: Callable[[list[dict]], dict],
                  ratio_names: tuple[str, ...]) -> dict:
    out: dict = {"servers": {name: summary(r) for name, r in recs.items()}}
    if PEER in recs:
        out["ratio_ours_over_peer"] = {name: _ratios(recs[OURS], recs[PEER], name) for name in ratio_names}
    return out


def _ratios(ours: list[dict], peer: list[dict], name: str) -> dict | None:
    pairs = [(_turn_figure(a, name), _turn_figure(b, name)) for a, b in zip(ours, peer, strict=True)]
    ratios = [round(a / b, 3) for a, b in pairs if a is not None and b]
    return {"per_repetition": ratios, "median": round(statistics.median(ratios), 3)} if ratios else None


# -- the run ---------------------------------------------------------------------------------------

def run_http_bench(opts: HttpBenchOptions) -> dict:
    """Every phase asked for, side by side; the figures, each turn's record and how the servers ran."""
    if not (opts.texts or opts.concurrency or opts.mixed):
        raise ValueError("nothing to measure: give labelled texts, a concurrency or the mixed load")
    servers, turns = Servers(opts), _Turns()
    report: dict = {"cpu_count": os.cpu_count(), "load_start": _load(), "chat_tokens": opts.chat_tokens}
    if opts.texts:
        rows = sentiment_phase(servers, turns, opts)
        report["results"] = rows
        report["targets_met"] = sentiment_verdict(rows[0], rows[1]) if len(rows) == 2 else None
    if opts.concurrency:
        report["concurrency"] = concurrency_phase(servers, turns, opts)
    if opts.mixed:
        report["mixed"] = {"chat_streams": MIXED_CHATS, "window_s": opts.mixed_window_s,
                           **mixed_phase(servers, turns, opts)}
    report.update(model=servers.served.get("path"), served=servers.served, load_end=_load(),
                  peer_command=next((r["command"] for r in turns.records if r["server"] == PEER), None),
                  turns=turns.records)
    return report
