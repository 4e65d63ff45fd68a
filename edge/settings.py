"""Every setting of qwen-edge, typed and documented once.

Sources, later wins: defaults here < the TOML file (``--config`` or ``QWEN_EDGE_CONFIG``) <
environment (``QWEN_EDGE_<SECTION>__<FIELD>``, e.g. ``QWEN_EDGE_SERVER__PORT=8080``) < CLI flags.
The README's configuration table is generated from these definitions (``qwen-edge config --docs``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

DEFAULT_REPO = "Qwen/Qwen1.5-0.5B-Chat"
# Pinned so a re-download can never silently change the weights the checksums were made for.
DEFAULT_REVISION = "4d14e384a4b037942bb3f3016665157c8bcb70ea"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _state_dir() -> Path:
    # systemd's StateDirectory= sets STATE_DIRECTORY; elsewhere follow XDG.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "qwen-edge"


def _default_prompts_dir() -> Path:
    return PROJECT_ROOT / "prompts"


def cache_dir() -> Path:
    """systemd's CacheDirectory= (CACHE_DIRECTORY) or the XDG cache folder."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen-edge"


# Home Assistant's prompt starts with "Current time is 13:49:27. Today's date is 2025-04-30."
VOLATILE_LINES = (r"^Current time is ", r"^Today's date is ")


_AUTO_OR_BOOL: dict[str, object] = {"auto": "auto", "true": True, "1": True, "yes": True, "on": True,
                                     "false": False, "0": False, "no": False, "off": False}


class ModelSettings(BaseModel):
    path: Path | None = Field(None, description="GGUF file to serve; empty: the best fitting file in `dir`")
    dir: Path = Field(default_factory=lambda: _state_dir() / "models", description="Folder of converted GGUF files")
    repo: str = Field(DEFAULT_REPO, description="Hugging Face repo fetched when `dir` is empty")
    revision: str = Field(DEFAULT_REVISION, description="Pinned revision of `repo`")
    quant: Literal["q4_k_m", "q8_0", "f32"] = Field("q4_k_m", description="Preferred file type in `dir`")
    n_ctx: int = Field(3072, ge=256, le=32768, description="Context size (tokens), shared by all sequences: "
                                                           "cached prefixes (engine.prefix_tokens), one task text and "
                                                           "a conversation of up to n_ctx - prefix_tokens - "
                                                           "max_text_tokens - 16 tokens (Home Assistant's prompts: "
                                                           "~1,000)")
    n_batch: int = Field(512, ge=32, le=4096, description="Prompt tokens evaluated per llama.cpp call")
    n_ubatch: int = Field(256, ge=32, le=4096, description="Tokens llama.cpp computes at once (capped at n_batch); "
                                                            "sizes the compute buffer. 256 needs 12-20 MB less "
                                                            "than 512 at the same prefill speed on CPU")
    n_threads: int = Field(0, ge=0, le=256, description="CPU threads; 0 = number of physical cores")
    kv_cache_type: Literal["auto", "f16", "q8_0"] = Field(
        "auto", description="KV cache type. auto: f16 (fastest attention on CPU) when the model stays under the "
                            "memory soft limit with it, else q8_0 (half the KV memory)")
    flash_attn: bool = Field(True, description="Flash attention (needed for a quantized V cache)")
    mmap: Literal["auto"] | bool = Field(
        "auto", description="Map the model file instead of reading it. Mapped, an untied token embedding is "
                            "resident only in the rows texts use, but pages of weights llama.cpp repacks can stay "
                            "resident too; auto maps when the embedding outweighs the repacked weights")
    n_seq_max: int = Field(32, ge=8, le=256, description="KV sequences: cached prefixes + engine.task_batch + "
                                                          "engine.chat_slots")

    @field_validator("mmap", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: object) -> object:
        # one clear message instead of one per member of the union
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _AUTO_OR_BOOL:
            return _AUTO_OR_BOOL[value.strip().lower()]
        raise ValueError(f"must be auto, true or false, not {value!r}")


class PromptSettings(BaseModel):
    dir: Path = Field(default_factory=_default_prompts_dir, description="Folder holding prompts and grammars")
    language: Literal["auto", "zh", "en"] = Field("auto", description="Task prompt language; auto = per text")
    neutral: bool = Field(False, description="Allow optional labels (sentiment's neutral)")
    few_shot: bool = Field(True, description="Prepend the few-shot examples to task prompts")
    max_text_tokens: int = Field(384, ge=16, le=8192, description="Longer texts keep head and tail, flagged "
                                                                   "truncated (a task.toml may set its own)")


class ChatSettings(BaseModel):
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    top_k: int = Field(20, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.05, ge=0.5, le=2.0)
    max_tokens: int = Field(512, ge=1, le=8192, description="Reply length limit")
    seed: int = Field(-1, description="-1 = random")
    client_system: Literal["prepend", "replace"] = Field(
        "prepend", description="A client's system message (Home Assistant's instructions) follows our persona "
                               "(prepend) or replaces it (replace)")
    volatile_lines: list[str] = Field(
        default_factory=lambda: list(VOLATILE_LINES),
        description="Regexes of system-prompt lines moved to the end of the system turn, so the stable part "
                    "before them is a reusable prefix (Home Assistant's current time)")
    tool_call_bias: float = Field(0.0, ge=-10, le=10, description="Added to the logits of the tokens that open "
                                                                  "a tool call at a reply's first token, when tools "
                                                                  "are offered (tool choice auto): >0 calls more")
    tool_rounds: int = Field(1, ge=0, le=16, description="Rounds of tool calls the model may make per user "
                                                         "message (tool choice auto); then it answers in text, "
                                                         "since a small model repeats a call after its result")
    emotion_hints: bool = Field(False, description="Tell the assistant the emotion task's label of each user "
                                                   "message (/v1/respond, `qwen-edge chat`)")
    no_copy_tokens: int = Field(6, ge=0, le=64, description="A text reply may not repeat this many tokens in a "
                                                            "row of the user's messages (their prose: code and "
                                                            "quotes are exempt), so it never parrots a clause; "
                                                            "0 = off, else at least 2")

    @field_validator("no_copy_tokens")
    @classmethod
    def _a_run_is_two_tokens_or_more(cls, value: int) -> int:
        if value == 1:
            raise ValueError("0 (off) or at least 2: one token in common with the user is not a copy")
        return value


class EngineSettings(BaseModel):
    chat_slots: int = Field(6, ge=1, le=64, description="Conversations kept in the KV cache (and replies "
                                                         "generated at once)")
    task_batch: int = Field(8, ge=1, le=64, description="Task texts evaluated at once")
    prefix_tokens: int = Field(624, ge=0, le=32768, description="KV cells kept for cached prefixes (task "
                                                                 "prompts, personas, client system prompts); the "
                                                                 "rest wait on disk. With n_ctx 3072 and one task "
                                                                 "text this leaves a conversation 2048 tokens")
    reply_share: float = Field(0.65, gt=0, le=1, description="While replies stream, the share of the time kept "
                                                             "for them; prompt tokens get the rest")
    prompt_burst_s: float = Field(1.0, ge=0, le=10, description="Prompt work (seconds) a step may take at "
                                                                 "once beyond the reply share, saved from steps "
                                                                 "that left theirs unspent: a new request's "
                                                                 "prompt goes through at once, replies pause at "
                                                                 "most this long")
    kv_state_dir: Path | None = Field(None, description="Where evicted prefixes' KV states are kept (cleared at "
                                                         "start); empty: a folder in the cache directory")


class ServerSettings(BaseModel):
    host: str = Field("localhost", description="Bind address; localhost = 127.0.0.1 and ::1; non-loopback "
                                                "needs an API key")
    port: int = Field(11434, ge=1, le=65535, description="11434 is Ollama's port, which Home Assistant expects")
    api_key: str | None = Field(None, description="Bearer key (prefer `api_key_file`)")
    api_key_file: Path | None = Field(None, description="File holding the Bearer key")
    insecure_no_key: bool = Field(False, description="Allow a non-loopback bind without a key")
    queue_size: int = Field(16, ge=1, le=1024, description="Queued requests before 503")
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request time limit")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body")
    max_text_chars: int = Field(20000, ge=1, description="Longest text in a request")
    model_name: str = Field("qwen-edge", description="Model name shown to OpenAI/Ollama clients")
    allowed_hosts: list[str] = Field(default_factory=list, description="Extra Host names accepted on a loopback bind "
                                                                       "(DNS-rebinding check)")
    drain_timeout_s: float = Field(30.0, gt=0, description="On SIGTERM, how long in-flight requests may run before "
                                                           "they are cut")
    retry_after_s: int = Field(2, ge=1, description="Retry-After seconds sent with a 503")


class MemorySettings(BaseModel):
    budget_mb: int = Field(1024, ge=64, description="Memory budget; the cgroup's memory.max when lower")
    soft_fraction: float = Field(0.9, gt=0, le=1, description="Above this share: drop idle sessions and caches")
    hard_fraction: float = Field(0.97, gt=0, le=1, description="Above this share: refuse new work (503)")
    sample_interval_s: float = Field(2.0, gt=0, description="How often memory is sampled")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QWEN_EDGE_", env_nested_delimiter="__", extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_CONFIG_FILE.get("path"))
        return (init_settings, env_settings, toml)


_CONFIG_FILE: dict[str, Path | None] = {"path": None}


class SettingsError(ValueError):
    """A configuration problem, worded for the user."""


def load_settings(config_file: Path | str | None = None, **overrides: dict[str, Any]) -> Settings:
    """Load settings from file + env, then apply ``overrides`` ({section: {field: value}}; None values skipped)."""
    path = config_file or os.environ.get("QWEN_EDGE_CONFIG")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"config file not found: {path}")
    _CONFIG_FILE["path"] = path
    init = {sec: {k: v for k, v in vals.items() if v is not None} for sec, vals in overrides.items()}
    try:
        base = Settings()
        merged = base.model_dump()
        for sec, vals in init.items():
            merged[sec].update(vals)
        return Settings.model_validate(merged) if init else base
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SettingsError(f"invalid setting {where}: {first['msg']}") from None
    except Exception as exc:  # TOML syntax errors and the like
        raise SettingsError(f"cannot read configuration {path or ''}: {exc}") from None
    finally:
        _CONFIG_FILE["path"] = None
