"""The engine: one loaded model serving every role from the same weights and the same KV cache.

KV sequence layout (llama.cpp seq ids, one unified cache of n_ctx cells), from the settings:
    0 .. B-1            task work sequences (engine.task_batch): a text being processed
    B .. B+C-1          chat slots (engine.chat_slots): conversations
    B+C .. n_seq-1      cached prefixes: task prompts, personas, client system prompts (prefixes.py)
All work runs as jobs of one batcher (batcher.py): each step is one llama_decode for every job.
The methods here drive the batcher from the calling thread, under `lock`; the scheduler
(scheduler.py) drives it from its own thread for the daemon.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge.engine.batcher import Batcher, StepPlanner
from edge.engine.chat import ChatSessions, with_notes
from edge.engine.chat_template import ChatTemplate
from edge.engine.config import runtime_config
from edge.engine.jobs import Job, PrefixJob
from edge.engine.prefixes import Prefix, PrefixCache
from edge.engine.reply import GenerateJob, ReplyFormat
from edge.engine.runtime import LlamaRuntime
from edge.engine.task_runner import CompiledTask, InputError, Resources, TaskJob, TaskResult
from edge.engine.tasks import GrammarError, PromptError, Prompts, load_prompts
from edge.engine.tool_rules import load_rules
from edge.engine.tools import load_routing, routed, routed_message
from edge.engine.types import ChatMessage, ChatStats, SamplingParams
from edge.model.gguf_check import check_gguf
from edge.settings import Settings, cache_dir

log = logging.getLogger(__name__)
SENTIMENT = "sentiment"  # the task behind /v1/sentiment, `classify` and the chat's sentiment line
EMOTION = "emotion"      # the task behind the chat's emotion hints (chat.emotion_hints)
EMOTION_MEMO = 512       # texts whose emotion label is remembered


def own_state_dir() -> Path:
    """This process's folder for saved prefix states, in the cache directory; folders left by
    processes that are gone (a crash, a kill) are removed on the way."""
    root = cache_dir() / "kv-states"
    for folder in root.glob("*") if root.is_dir() else []:
        if folder.name.isdigit() and not _alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
    return root / str(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class TaskUnavailable(LookupError):
    """No such task, or its files were refused (the message says why)."""


class Engine:
    def __init__(self, runtime: LlamaRuntime, settings: Settings) -> None:
        self.rt = runtime
        self.settings = settings
        self.template = ChatTemplate(runtime.chat_template(), runtime.tokenize)
        if self.template.fallback_reason:
            log.warning("model chat template unusable (%s); using ChatML", self.template.fallback_reason)
        e = settings.engine
        n_seq = runtime.config.n_seq_max
        if n_seq < e.task_batch + e.chat_slots + 2:
            raise ValueError(f"model.n_seq_max must be at least engine.task_batch + engine.chat_slots + 2 "
                             f"= {e.task_batch + e.chat_slots + 2}")
        self.work_seqs = list(range(e.task_batch))
        self.chat_seqs = list(range(e.task_batch, e.task_batch + e.chat_slots))
        self.state_dir = Path(e.kv_state_dir) if e.kv_state_dir else own_state_dir()
        self.prefixes = PrefixCache(runtime, list(range(e.task_batch + e.chat_slots, n_seq)), e.prefix_tokens,
                                    self.state_dir, str(runtime.path))
        self.batcher = Batcher(runtime, StepPlanner(runtime.n_batch, e.reply_share, e.prompt_burst_s), self._make_room)
        self.lock = threading.RLock()  # the runtime is single-threaded: whoever steps holds this
        self.resources = Resources(runtime, self.prefixes, list(self.work_seqs), self._evaluate_prefix)
        self.tasks: dict[str, CompiledTask] = {}
        self.task_errors: dict[str, str] = {}
        self._emotions: dict[str, str] = {}  # text -> emotion label, for the hints
        self.chat: ChatSessions
        self._build(self._load_prompts())

    @classmethod
    def load(cls, model_path: Path | str, settings: Settings) -> "Engine":
        info = check_gguf(model_path)  # a hostile or broken file is refused here, before llama.cpp parses it
        rt = LlamaRuntime(model_path, runtime_config(info, settings))
        try:
            return cls(rt, settings)
        except Exception:
            rt.close()
            raise

    # -- prompts and tasks ----------------------------------------------------------------------
    def _load_prompts(self) -> Prompts:
        p = self.settings.prompts
        return load_prompts(p.dir, p.neutral, p.few_shot, p.max_text_tokens)

    def _build(self, prompts: Prompts) -> None:
        """Compile every task; a task that fails keeps its running version (reload) or stays out
        (start-up), with one error line naming the file."""
        # read before anything running is replaced: a broken rules file refuses the reload whole
        rules = load_rules(Path(self.settings.prompts.dir) / "tools" / "argument_values.toml")
        errors = dict(prompts.errors)
        compiled: dict[str, CompiledTask] = {}
        for name, spec in prompts.tasks.items():
            try:
                compiled[name] = CompiledTask(self.rt, self.template, spec, self.settings.prompts.language)
            except (PromptError, GrammarError) as exc:
                errors[name] = str(exc)
        for name, message in errors.items():
            if name in self.tasks:
                compiled[name] = self.tasks[name]  # the old version stays in force
                log.error("task %s not reloaded, the running version stays: %s", name, message)
            else:
                log.error("task %s refused: %s", name, message)
        if not compiled:
            raise PromptError(next(iter(errors.values()), f"no tasks in {prompts.source_dir / 'tasks'}"))
        for name, old in self.tasks.items():
            if compiled.get(name) is not old:
                old.close()
        label_tasks = {name: t.spec.label_ids for name, t in compiled.items() if t.spec.output == "label"}
        try:
            self.routing = load_routing(Path(self.settings.prompts.dir) / "tools" / "routing.toml", label_tasks)
        except GrammarError as exc:  # e.g. its task was refused: replies go unrouted, the rest serves
            log.error("tool routing is off: %s", exc)
            self.routing = None
        self.prefixes.clear()  # prefixes of the old prompts are stale
        old_chat = getattr(self, "chat", None)
        if old_chat is not None:
            old_chat.drop_idle()
        self.chat = ChatSessions(self.rt, self.template, prompts.chat_system, self.chat_seqs, self.settings.chat,
                                 self.prefixes, self.chat_budget(), rules)
        self.prompts, self.tasks, self.task_errors = prompts, compiled, errors

    def chat_budget(self) -> int:
        """KV cells one conversation may occupy: the context less the prefixes' share and one text."""
        reserved = self.settings.engine.prefix_tokens + self.settings.prompts.max_text_tokens + 16
        return max(64, self.rt.n_ctx - reserved)

    def reload_prompts(self) -> None:
        """Re-read prompts/ (SIGHUP). Broken tasks keep their old version; a broken persona raises."""
        with self.lock:
            if self.batcher.busy:
                raise RuntimeError("reload while work is running")
            self._build(self._load_prompts())

    def task(self, name: str) -> CompiledTask:
        found = self.tasks.get(name)
        if found is None:
            why = self.task_errors.get(name)
            raise TaskUnavailable(f"task {name!r} is not available: {why}" if why else
                                  f"no task named {name!r} (tasks: {', '.join(sorted(self.tasks))})")
        return found

    # -- driving the batcher from this thread ---------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.lock:
            self.batcher.submit(job)

    def run(self, jobs: list[Job]) -> None:
        """Submit `jobs` and step until all have ended."""
        with self.lock:
            for job in jobs:
                self.batcher.submit(job)
            while not all(j.released for j in jobs):
                self.batcher.step()

    def step(self) -> bool:
        with self.lock:
            return self.batcher.step()

    def warm_up(self) -> int:
        """Evaluate every prefix now (the daemon, before it reports ready), so no first request
        pays for one; those that do not fit the prefix share are saved and restored on use. The
        sentiment prompts go last: they stay resident. Returns the tokens evaluated."""
        before = self.rt.n_evaluated
        chat = self.chat.persona_prefixes()
        tasks = sorted(self.tasks.values(), key=lambda t: t.name == SENTIMENT)
        wanted = [*chat, *((lang.prefix_key, lang.prefix) for t in tasks for lang in t.langs.values())]
        with self.lock:
            for key, tokens in wanted:
                prefix = self.prefixes.get(key, tokens)
                while not self.prefixes.ensure(prefix, self._evaluate_prefix):
                    self.batcher.step()
        return self.rt.n_evaluated - before

    def _evaluate_prefix(self, prefix: Prefix) -> None:
        self.batcher.submit(PrefixJob(prefix, self.prefixes))

    def _make_room(self) -> bool:
        """The KV cache is full: forget the least recently used idle conversation, else evict an
        idle prefix (its state is saved)."""
        if self.chat.evict_one():
            return True
        idle = [p for p in self.prefixes.entries.values() if p.seq is not None and p.readers == 0 and not p.evaluating]
        if idle:
            self.prefixes.evict(min(idle, key=lambda p: p.last_used))
            return True
        return False

    # -- tasks ----------------------------------------------------------------------------------
    def task_jobs(self, name: str, texts: list[str], language: str | None = None,
                  reference: bool = False) -> list[TaskJob]:
        """Jobs for `texts` (every text checked before any work: InputError names the problem)."""
        task = self.task(name)
        return [task.job(self.resources, text, language, reference) for text in texts]

    def run_task(self, name: str, texts: list[str], language: str | None = None,
                 reference: bool = False) -> list[TaskResult]:
        jobs = self.task_jobs(name, texts, language, reference)
        self.run(list(jobs))
        for job in jobs:
            if job.error is not None:
                raise job.error
        return [job.result for job in jobs]  # type: ignore[misc]

    def classify(self, text: str, language: str | None = None) -> TaskResult:
        return self.run_task(SENTIMENT, [text], language)[0]

    def classify_many(self, texts: list[str], language: str | None = None) -> list[TaskResult]:
        return self.run_task(SENTIMENT, texts, language)

    def classify_reference(self, text: str, language: str | None = None, task: str = SENTIMENT) -> TaskResult:
        """The plain grammar-constrained greedy path (no first-token shortcut), for tests and benchmarks."""
        return self.run_task(task, [text], language, reference=True)[0]

    @property
    def sentiment(self) -> CompiledTask:
        return self.task(SENTIMENT)

    # -- chat -----------------------------------------------------------------------------------
    def chat_job(self, messages: list[ChatMessage], params: SamplingParams, stats: ChatStats, emit,
                 on_end=None, fmt: ReplyFormat = ReplyFormat()) -> GenerateJob:
        with self.lock:
            return self.chat.job(messages, params, stats, emit, on_end, fmt)

    def route(self, messages: list[ChatMessage], fmt: ReplyFormat) -> ReplyFormat:
        """`fmt` with the tool choice the routing task gives the user's latest message
        (prompts/tools/routing.toml; unchanged where it does not apply). The HTTP API does the same
        with the task run asynchronously (api/common.py)."""
        message = routed_message(self.routing, fmt.tools, messages)
        if message is None or fmt.tools is None or self.routing is None:
            return fmt
        result = self.run_task(self.routing.task, [message])[0]
        return replace(fmt, tools=routed(fmt.tools, self.routing, result.label, result.probability))

    def chat_stream(self, messages: list[ChatMessage], params: SamplingParams = SamplingParams(),
                    stats: ChatStats | None = None, fmt: ReplyFormat = ReplyFormat()) -> Generator[str, None, None]:
        """The reply piece by piece, generated as this generator is stepped (one engine step per
        piece at most). Closing it early stops the reply and frees its slot."""
        stats = stats if stats is not None else ChatStats()
        pieces: deque[str] = deque()
        job = self.chat_job(messages, params, stats, pieces.append, None, fmt)
        self.submit(job)
        try:
            while True:
                while pieces:
                    yield pieces.popleft()
                if job.released:
                    break
                self.step()
            while pieces:
                yield pieces.popleft()
            if job.error is not None:
                raise job.error
        finally:
            if not job.released:
                job.cancel_requested = True
                self.step()  # ends it and frees the slot

    def emotion_labels(self, texts: list[str]) -> dict[str, str]:
        """The emotion task's label of each text (remembered: a conversation's earlier messages
        are not classified again); empty when the emotion task is not available."""
        missing = self.unknown_emotions(texts)
        if missing:
            for text, result in zip(missing, self.run_task(EMOTION, missing), strict=True):
                self.remember_emotion(text, result.label or "")
        return self.known_emotions(texts)

    def unknown_emotions(self, texts: list[str]) -> list[str]:
        """Of `texts`, those the hints still need the emotion task for (none without that task)."""
        if EMOTION not in self.tasks:
            return []
        return [t for t in dict.fromkeys(texts) if t not in self._emotions and t.strip()]

    def known_emotions(self, texts: list[str]) -> dict[str, str]:
        return {t: self._emotions[t] for t in texts if t in self._emotions}

    def remember_emotion(self, text: str, label: str) -> None:
        self._emotions[text] = label
        while len(self._emotions) > EMOTION_MEMO:
            self._emotions.pop(next(iter(self._emotions)))

    def hinted(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """`messages` with the emotion hints (chat.emotion_hints; off: unchanged)."""
        if not self.settings.chat.emotion_hints:
            return messages
        labels = self.emotion_labels([m.content for m in messages if m.role == "user"])
        return with_notes(messages, labels, self.prompts.emotion_hints)

    def conversation(self) -> "Conversation":
        return Conversation(self)

    def drop_idle(self) -> int:
        """Memory pressure: forget idle conversations and evict idle prefixes (saved to disk)."""
        with self.lock:
            return self.chat.drop_idle() + self.prefixes.evict_idle()

    @property
    def n_chat_slots(self) -> int:
        return len(self.chat_seqs)

    def info(self) -> dict:
        return {"path": str(self.rt.path), "n_ctx": self.rt.n_ctx, "n_vocab": self.rt.n_vocab,
                "kv_cache_type": self.rt.config.kv_cache_type, "chat_slots": len(self.chat_seqs),
                "file_type": self.rt.meta("general.file_type"), "name": self.rt.meta("general.name"),
                "evaluated_tokens": self.rt.n_evaluated, "tasks": sorted(self.tasks)}

    def close(self) -> None:
        with self.lock:
            self.batcher.cancel_all(RuntimeError("engine closed"))
            for task in self.tasks.values():
                task.close()
            self.prefixes.clear()
        self.rt.close()
        if not self.settings.engine.kv_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)


@dataclass
class Conversation:
    """A local multi-turn chat (CLI, tests): sentiment first, then the streamed reply."""
    engine: Engine
    history: list[ChatMessage] = field(default_factory=list)
    last_stats: ChatStats | None = None

    def respond(self, text: str, params: SamplingParams = SamplingParams()) -> tuple[TaskResult, Iterator[str]]:
        label = self.engine.classify(text)
        self.history.append(ChatMessage("user", text))
        return label, self._reply(params)

    def _reply(self, params: SamplingParams) -> Iterator[str]:
        stats = ChatStats()
        parts: list[str] = []
        for piece in self.engine.chat_stream(self.engine.hinted(self.history), params, stats):
            parts.append(piece)
            yield piece
        self.history.append(ChatMessage("assistant", "".join(parts)))
        self.last_stats = stats

    def reset(self) -> None:
        self.history.clear()


__all__ = ["Conversation", "Engine", "InputError", "TaskUnavailable", "SENTIMENT"]
