"""One llama.cpp model + context, driven through llama-cpp-python's low-level API.

Why not `llama_cpp.Llama`: it keeps a single token sequence per context, so sentiment and chat
would evict each other's prompt cache on every switch, and it reserves an n_batch × n_vocab score
array. Here the KV cache holds several *sequences* (llama.cpp's seq ids, unified cache): the
sentiment prefix, the chat system prefix and chat sessions live side by side, and `seq_cp` shares a
cached prefix with a new sequence without copying or re-evaluating it.

Not thread-safe: the scheduler owns the runtime and calls it from one thread.
"""
from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import numpy as np

from edge.engine.config import RuntimeConfig
from edge.engine.process_memory import drop_mapped_pages, keep_heap_small, release_free_heap

log = logging.getLogger(__name__)
_llama_log = logging.getLogger("edge.llama_cpp")


TOP_STRIDE = 16  # top_ids: every 16th logit estimates the threshold


def top_ids(logits: np.ndarray, k: int, scratch: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Ids of the k best logits (more when several tie with the k-th), in id order, without
    allocating vocabulary-sized arrays (`scratch` and `above` are reused, one float and one bool
    per logit) and mostly without partitioning the whole vocabulary (1 ms a token per reply on a
    150k vocabulary): the k-th best of every TOP_STRIDE-th logit is a threshold that at least k
    logits reach, so the k best are among the few that reach it, and only those are partitioned
    (0.1 ms)."""
    sample = logits[::TOP_STRIDE]
    if 4 * k > len(sample):  # too few samples to narrow much: partition everything
        np.copyto(scratch, logits)
        kth = len(logits) - k
        scratch.partition(kth)
        np.greater_equal(logits, scratch[kth], out=above)
        return np.flatnonzero(above).astype(np.int32)
    threshold = np.partition(sample, len(sample) - k)[len(sample) - k]
    np.greater_equal(logits, threshold, out=above)
    ids = np.flatnonzero(above)
    values = logits[ids]
    kth = np.partition(values, len(values) - k)[len(values) - k]
    return ids[values >= kth].astype(np.int32)


@llama_cpp.llama_log_callback
def _route_llama_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp writes straight to stderr by default. Route it into logging at debug level (-vv):
    # what it reports is about the file or the build, and our own checks report real problems.
    _llama_log.debug("%s", text.decode("utf-8", errors="replace").rstrip())


llama_cpp.llama_log_set(_route_llama_log, ctypes.c_void_p(0))

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
_BACKEND_READY = False


class RuntimeError_(RuntimeError):
    """llama.cpp refused an operation (load, decode)."""


class KVCacheFull(RuntimeError_):
    """No room left in the KV cache for this batch; the caller may evict sequences and retry."""


def context_params(config: RuntimeConfig) -> llama_cpp.llama_context_params:
    """llama.cpp's context parameters for `config`: its defaults except what the config says."""
    threads = config.n_threads or physical_cores()
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = config.n_ctx
    cparams.n_batch = config.n_batch
    cparams.n_ubatch = min(config.n_ubatch, config.n_batch)
    cparams.n_seq_max = config.n_seq_max
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.kv_unified = True  # one pool of cells shared by all sequences; seq_cp shares cells
    cparams.type_k = KV_CACHE_TYPES[config.kv_cache_type]
    cparams.type_v = KV_CACHE_TYPES[config.kv_cache_type]
    if config.flash_attn is not None:
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    cparams.no_perf = True
    return cparams


def init_backend() -> None:
    """Once per process, before the first model load."""
    global _BACKEND_READY
    if not _BACKEND_READY:
        keep_heap_small()  # before the model load frees its big read buffers
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True


def load_model(path: Path, mmap: bool) -> llama_cpp.llama_model_p:
    """Load the weights of `path` (read, or mapped and then `drop_mapped_pages`); RuntimeError_ when
    llama.cpp refuses the file."""
    init_backend()
    mparams = llama_cpp.llama_model_default_params()
    mparams.load_mode = load_mode(mmap)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError_(f"llama.cpp could not load {path}")
    if mmap:
        drop_mapped_pages(path)
    return model


def load_mode(mmap: bool) -> int:
    """llama.cpp's load mode: map the file (then `drop_mapped_pages`), or read it into buffers."""
    return llama_cpp.LLAMA_LOAD_MODE_MMAP if mmap else llama_cpp.LLAMA_LOAD_MODE_NONE


def physical_cores() -> int:
    try:
        import psutil
        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:  # psutil can fail inside odd containers
        return max(1, os.cpu_count() or 1)


def _whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class LlamaRuntime:
    def __init__(self, model_path: Path | str, config: RuntimeConfig = RuntimeConfig()) -> None:
        self.path = Path(model_path)
        self.config = config
        self.model = load_model(self.path, config.mmap)
        self.ctx = llama_cpp.llama_init_from_model(self.model, context_params(config))
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError_(f"llama.cpp could not create a context (n_ctx={config.n_ctx}) for {self.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = config.n_batch
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_evaluated = 0  # tokens pushed through the model, for tests and metrics
        self._piece_cache: dict[int, bytes] = {}
        self.end_tokens = self._find_end_tokens()
        # control tokens that do not end generation (<|im_start|>...): never part of constrained output
        self._control_ids = np.array(
            sorted(t for t in self.end_tokens if not llama_cpp.llama_vocab_is_eog(self.vocab, t)), dtype=np.int64)
        self._end_ids = np.array(sorted(self.end_tokens), dtype=np.int64)
        self._candidates: np.ndarray | None = None  # full-vocabulary sampling, built on first use
        self._partial_ids: np.ndarray | None = None  # tokens that are not whole characters, on first use
        self._all_ids = np.arange(self.n_vocab, dtype=np.int32)
        self._scratch = np.empty(self.n_vocab, dtype=np.float32)  # top-k selection, reused per token
        self._above = np.empty(self.n_vocab, dtype=bool)
        release_free_heap()

    # -- vocabulary -----------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Tokenize; with special=False, `<|im_start|>` in user text stays plain text."""
        data = text.encode("utf-8", errors="replace")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        if n < 0:  # buffer too small (cannot happen for byte-level BPE, kept for safety)
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        cached = self._piece_cache.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, True)
            cached = self._piece_cache[token] = buf.raw[:n]
        return cached

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        return token in self.end_tokens

    def without_end(self, logits: np.ndarray) -> np.ndarray:
        """`logits` (changed in place) with every token that ends a reply made impossible."""
        logits[self._end_ids] = -np.inf
        return logits

    def without_control(self, logits: np.ndarray) -> np.ndarray:
        """`logits` (changed in place) with every control token that does not end a reply made
        impossible: a grammar that allows '<' inside a JSON string must not pick <|im_start|>."""
        logits[self._control_ids] = -np.inf
        return logits

    def whole_chars_only(self, logits: np.ndarray) -> np.ndarray:
        """`without_control`, and tokens that are not whole UTF-8 characters (byte pieces) made
        impossible too: under a JSON grammar, a string of byte pieces could decode to replacement
        characters and outgrow the schema's maxLength. Every common character has whole tokens."""
        if self._partial_ids is None:
            self._partial_ids = np.array([t for t in range(self.n_vocab) if not _whole_utf8(self.piece(t))],
                                         dtype=np.int64)
        logits[self._partial_ids] = -np.inf
        return self.without_control(logits)

    def _find_end_tokens(self) -> frozenset[int]:
        # A control token (e.g. <|im_start|>) never belongs in a reply: it ends it, so a model coaxed
        # into opening a turn cannot put a marker into text that clients send back as history.
        ends = {t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)
                or llama_cpp.llama_vocab_is_control(self.vocab, t)}
        # Qwen1.5 revisions disagree on EOS; whatever the file says, both end a reply.
        for marker in ("<|im_end|>", "<|endoftext|>"):
            ids = self.tokenize(marker, special=True)
            if len(ids) == 1:
                ends.add(ids[0])
        return frozenset(ends)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    # -- KV cache sequences ---------------------------------------------------------------------
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, p1)

    def seq_cp(self, src: int, dst: int) -> None:
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_len(self, seq: int) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self.memory, seq) + 1

    def seq_cp_range(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Share cells [p0, p1) of `src` with `dst` (nothing is copied or computed)."""
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def seq_state(self, seq: int) -> bytes:
        """The KV state of one sequence, for `set_seq_state` later (llama.cpp's per-sequence state)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq)
        return bytes(memoryview(buf)[:n])

    def set_seq_state(self, seq: int, data: bytes) -> bool:
        """Restore a state from `seq_state` into `seq` (emptied first); False when llama.cpp refuses
        it (no room in the cache, or a state from another model or cache type)."""
        self.seq_rm(seq)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), seq) > 0

    # -- evaluation -----------------------------------------------------------------------------
    def decode(self, jobs: list[tuple[int, list[int], int]]) -> dict[int, np.ndarray]:
        """Evaluate `(seq_id, tokens, start_pos)` jobs packed into n_batch-sized llama_decode calls.

        Returns a copy of each job's last-token logits, keyed by seq id. The logits of the very
        last token evaluated also stay in the context, for `sample()`.
        """
        flat = [(seq, tok, pos + i) for seq, toks, pos in jobs for i, tok in enumerate(toks)]
        wanted: dict[int, int] = {}  # flat index of each job's last token -> seq
        offset = 0
        for seq, toks, _ in jobs:
            offset += len(toks)
            if toks:
                wanted[offset - 1] = seq
        # copies: a later chunk's llama_decode would overwrite an earlier chunk's logits
        return {wanted[index]: self.logits(row).copy() for index, row in self._evaluate(flat, set(wanted))}

    def decode_one(self, seq: int, tokens: list[int], pos: int) -> np.ndarray:
        """Evaluate one sequence's tokens from `pos`; its last token's logits as a *view* that is
        valid only until the next decode. The chat loop samples from it at once, and not copying
        keeps a 600 KB allocation per token out of the hot path."""
        if not tokens:
            raise ValueError("decode_one needs at least one token")
        flat = [(seq, tok, pos + i) for i, tok in enumerate(tokens)]
        (_, row), = self._evaluate(flat, {len(flat) - 1})
        return self.logits(row)

    def decode_step(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of `(seq, token, pos, wants_logits)` entries (at most n_batch of them).
        Afterwards `logits(i)` is the i-th entry's logits, for the entries that asked for them."""
        if not entries or len(entries) > self.n_batch:
            raise ValueError(f"a step holds 1..{self.n_batch} tokens, not {len(entries)}")
        self._fill_batch([(s, t, p) for s, t, p, _ in entries], [w for *_, w in entries])
        self._run_batch()

    def _evaluate(self, flat: list[tuple[int, int, int]], wanted: set[int]) -> Iterator[tuple[int, int]]:
        """Run `(seq, token, pos)` entries through llama_decode in n_batch-sized chunks, asking for
        logits at the `wanted` flat indices; yields (flat index, batch row) for each of them right
        after its chunk ran, while its logits are still in the context."""
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start:start + self.n_batch]
            self._fill_batch(chunk, [start + i in wanted for i in range(len(chunk))])
            self._run_batch()
            for i in range(len(chunk)):
                if start + i in wanted:
                    yield start + i, i

    def _fill_batch(self, chunk: list[tuple[int, int, int]], outputs: list[bool]) -> None:
        b = self._batch
        b.n_tokens = len(chunk)
        for i, (seq, tok, pos) in enumerate(chunk):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = outputs[i]

    def _run_batch(self) -> None:
        rc = llama_cpp.llama_decode(self.ctx, self._batch)
        if rc == 1:
            raise KVCacheFull("KV cache full")
        if rc != 0:
            raise RuntimeError_(f"llama_decode failed ({rc})")
        self.n_evaluated += self._batch.n_tokens

    def sample(self, sampler: "llama_cpp.llama_sampler_p", logits: np.ndarray, preselect: int | None = None,
               allow: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
        """Pick a token from the given logits with a llama.cpp sampler chain, and accept it.

        The chain works on our own candidate array, never on the context's last output, which is
        what lets other sequences' work run between two steps of a reply without disturbing it;
        `logits` itself is left unchanged. With `preselect`, only that many best-scoring tokens
        are handed to the chain; the caller guarantees the chain could not pick outside them
        (top-k plus every token a penalty can demote), so the choice is the same and the
        per-token cost of filling a 150k-entry array is gone. `allow(ids)` (a grammar) keeps the
        ids that may come next; when none of the preselected ones may, the whole vocabulary is
        offered to it, so a constrained reply never gets stuck.
        """
        if self._candidates is None:
            self._candidates = np.zeros(self.n_vocab, dtype=TOKEN_DATA)
        top = preselect if preselect is not None and preselect < self.n_vocab else None
        ids = self._top(logits, top) if top is not None else None
        if allow is not None:
            ids = self.best_allowed(logits, allow, top if top is not None else self.n_vocab)
        if ids is not None:
            cand = np.empty(len(ids), dtype=TOKEN_DATA)
            cand["id"] = ids
            cand["logit"] = logits[ids]
        else:
            cand = self._candidates
            cand["id"] = self._all_ids  # the chain may have reordered the array last time
            cand["logit"] = logits
        cand["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=len(cand), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
        token = int(cand["id"][arr.selected])
        llama_cpp.llama_sampler_accept(sampler, token)
        return token

    def best_allowed(self, logits: np.ndarray, allow: Callable[[np.ndarray], np.ndarray], first: int) -> np.ndarray:
        """What `allow` (a grammar) keeps of the `first` best-scoring tokens, widening the search
        (x16 each time, then the whole vocabulary) while it keeps none: masking 150k candidates
        with a grammar of long enums costs seconds, and the allowed token is nearly always near
        the top. Greedy decoding picks the same token either way."""
        width = first
        while width < self.n_vocab:
            ids = allow(self._top(logits, width))
            if len(ids):
                return ids
            width *= 16
        ids = allow(self._all_ids)
        if not len(ids):
            raise RuntimeError_("the grammar allows no token here")
        return ids

    def _top(self, logits: np.ndarray, k: int) -> np.ndarray:
        return top_ids(logits, k, self._scratch, self._above)

    def logits(self, row: int) -> np.ndarray:
        """Logits of batch position `row` of the last decode, a numpy view valid until the next decode."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None  # type: ignore[assignment]  # closed: nothing uses it after close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
