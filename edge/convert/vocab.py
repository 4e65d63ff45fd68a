"""The byte-level BPE vocabulary of a Qwen2-family folder, as llama.cpp wants it in the GGUF.

Sources, first found wins: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (+ the added
tokens of ``tokenizer_config.json``). Merges and the chat template come from gguf-py's
``SpecialVocab``. Rows of the embedding beyond the tokenizer (Qwen pads 151,646 tokens to 151,936
rows) become ``[PAD<id>]`` tokens of type UNUSED, as llama.cpp's converter writes them.

End of generation: Qwen1.5 revisions disagree on the EOS token (``<|endoftext|>`` or
``<|im_end|>``). We keep the folder's EOS as ``eos``, make ``<|im_end|>`` the end-of-turn token and
``<|endoftext|>`` the padding token; llama.cpp treats eos, eot and both of these texts as
end-of-generation, so a chat always ends whichever one the model emits (``verify`` checks it).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from edge.convert.errors import ConversionError

logger = logging.getLogger(__name__)

PRE_TOKENIZER = "qwen2"          # llama.cpp's name for Qwen2's split regex
TOKENIZER_MODEL = "gpt2"         # llama.cpp's name for byte-level BPE
END_OF_TEXT = "<|endoftext|>"
END_OF_TURN = "<|im_end|>"
STOP_TOKENS = (END_OF_TEXT, END_OF_TURN)


@dataclass
class BpeVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]          # "bos"/"eos"/"eot"/"pad" -> id
    chat_template: str | Sequence[Mapping[str, str]] | None  # as gguf.SpecialVocab reads it (one or named ones)
    source: Path                         # the file the tokens came from (for messages)
    n_tokenizer: int                     # tokens the tokenizer itself defines (without padding)
    stop_ids: dict[str, int] = field(default_factory=dict)

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(TOKENIZER_MODEL)
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(False)  # Qwen prompts start without BOS
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None


def _base_and_added(folder: Path) -> tuple[dict[str, int], dict[int, tuple[str, bool]], Path]:
    """(learned vocab token -> id, added id -> (text, special), file read)."""
    tokenizer_json, vocab_json = folder / "tokenizer.json", folder / "vocab.json"
    if tokenizer_json.is_file():
        data = _read_json(tokenizer_json)
        model = data.get("model") or {}
        if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ConversionError(f"{tokenizer_json}: not a BPE tokenizer (model type {model.get('type')})")
        added = {int(t["id"]): (t["content"], bool(t.get("special"))) for t in data.get("added_tokens", [])}
        return model["vocab"], added, tokenizer_json
    if vocab_json.is_file() and (folder / "merges.txt").is_file():
        config_path = folder / "tokenizer_config.json"
        decoder = _read_json(config_path).get("added_tokens_decoder", {}) if config_path.is_file() else {}
        added = {int(i): (t["content"], bool(t.get("special"))) for i, t in decoder.items()}
        return _read_json(vocab_json), added, vocab_json
    raise ConversionError(f"{folder}: no tokenizer (need tokenizer.json, or vocab.json and merges.txt)")


def _special_ids(folder: Path, ids: dict[str, int]) -> dict[str, int]:
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}

    def text(key: str) -> str | None:
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    eos = text("eos_token") or (END_OF_TURN if END_OF_TURN in ids else END_OF_TEXT)
    wanted = {"bos": text("bos_token") or END_OF_TEXT, "eos": eos, "eot": END_OF_TURN,
              "pad": text("pad_token") or END_OF_TEXT}
    found = {kind: ids[t] for kind, t in wanted.items() if t in ids}
    if "eos" not in found:
        raise ConversionError(f"{config_path}: eos token {eos!r} is not in the vocabulary")
    return found


def load_vocab(folder: Path, n_vocab: int) -> BpeVocab:
    """Read the tokenizer of `folder` for a model whose embedding has `n_vocab` rows."""
    base, added, source = _base_and_added(folder)
    ids = dict(base) | {text: i for i, (text, _) in added.items()}
    n_tokenizer = max(ids.values()) + 1 if ids else 0
    if n_tokenizer > n_vocab or len(ids) > n_vocab:
        raise ConversionError(f"{source}: tokenizer has {max(n_tokenizer, len(ids))} tokens but the model's "
                              f"embedding has {n_vocab} rows (vocab_size in config.json)")
    by_id = {i: t for t, i in base.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            text, special = added[i]
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, special_token_types=())
    if not special_vocab.merges:
        raise ConversionError(f"{source}: no BPE merges found")
    return BpeVocab(tokens=tokens, token_types=[int(t) for t in types], merges=special_vocab.merges,
                    special_ids=_special_ids(folder, ids), chat_template=special_vocab.chat_template,
                    source=source, n_tokenizer=n_tokenizer,
                    stop_ids={t: ids[t] for t in STOP_TOKENS if t in ids})
