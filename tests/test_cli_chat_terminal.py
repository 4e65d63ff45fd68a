"""`qwen-edge chat` in a real terminal (tmux): the banner, and keys typed while a reply streams.

Typed during a reply, text must not land in the middle of it; it waits, and shows after the next
prompt, where Enter sends it. The tiny model cannot be told to talk long, so a turn whose reply
ended before the keys were sent is followed by another (bounded)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import uuid

import pytest

from robust_helpers import ROOT, wait_for

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
TYPED = "typed ahead"
BANNER = "qwen-edge chat · tiny-f32.gguf · /reset: new conversation · /exit or Ctrl-D: quit"
MESSAGES = ("I love this", "我今天很开心", "tell me about your day", "hello there", "what a week")


class Pane:
    """One tmux session on a private server (its own socket), killed at the end."""

    def __init__(self, command: str) -> None:
        self.socket = f"qwen-edge-test-{uuid.uuid4().hex[:8]}"
        self.tmux("new-session", "-d", "-s", "chat", "-x", "160", "-y", "50", command)

    def tmux(self, *args: str) -> str:
        out = subprocess.run([TMUX, "-u", "-L", self.socket, *args], capture_output=True, text=True, timeout=20,
                             env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin", "TERM": "xterm-256color",
                                  "HOME": os.environ.get("HOME", "/tmp")})
        assert out.returncode == 0, out.stderr
        return out.stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "chat", *(["-l"] if literal else []), *keys)

    def lines(self) -> list[str]:
        # -J joins lines the terminal wrapped; -S - from the start of the history
        return [line.rstrip() for line in self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat").splitlines()]

    def wait(self, predicate, what: str, timeout: float = 60) -> list[str]:
        return wait_for(lambda: predicate(self.lines()) and self.lines(), timeout, what, interval=0.05)

    def kill(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True, timeout=20)


def _is_prompt(line: str) -> bool:
    """The chat's prompt, empty or holding (part of) the typed-ahead text; a reply's own line that
    happens to start with ">" is not one."""
    return line == ">" or (line.startswith("> ") and TYPED.startswith(line[2:]))


def _prompts_after(lines: list[str], index: int) -> list[int]:
    return [i for i, line in enumerate(lines) if i > index and _is_prompt(line)]


def _sentiment_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if "LLM sentiment:" in line or "LLM 情感判断:" in line]


def test_banner_and_keys_typed_during_a_reply(tiny_gguf):
    env = {"QWEN_EDGE_MODEL__N_CTX": "4096", "QWEN_EDGE_CHAT__TEMPERATURE": "0.0", "PYTHONPATH": str(ROOT)}
    command = " ".join(["cd", shlex.quote(str(ROOT)), "&&", "env", *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                        shlex.quote(sys.executable), "-m", "edge.cli", "chat", "--model", shlex.quote(str(tiny_gguf)),
                        "--max-tokens", "1500", ";", "echo", "EXIT=$?", ";", "sleep", "120"])
    pane = Pane(command)
    try:
        lines = pane.wait(lambda ls: any(_is_prompt(line) for line in ls), "the banner and the first prompt")
        assert lines[0] == BANNER
        typed_during = None
        for message in MESSAGES:   # until the keys are typed while a reply is still streaming
            before = len(_sentiment_lines(pane.lines()))
            pane.keys(message, "Enter")
            lines = pane.wait(lambda ls: len(_sentiment_lines(ls)) > before, "the sentiment line")
            pane.keys(TYPED, literal=True)
            lines = pane.lines()
            start = _sentiment_lines(lines)[-1]
            if not _prompts_after(lines, start):   # the reply had not ended when the keys arrived
                typed_during = start
                break
            pane.keys("C-u")  # the reply was over: clear the prompt and try a longer one
        assert typed_during is not None, "no reply outlasted the keys (the tiny model ended them all at once)"
        lines = pane.wait(lambda ls: _prompts_after(ls, typed_during), "the reply to end", timeout=120)
        prompt = _prompts_after(lines, typed_during)[0]
        reply = "\n".join(lines[typed_during + 1:prompt])
        assert reply.strip(), "the reply is empty"
        assert "typed" not in reply and "ahead" not in reply, reply[-500:]  # nothing echoed into the reply
        assert lines[prompt] == f"> {TYPED}"                                  # shown after the next prompt
        pane.keys("Enter")                                                   # and sent with Enter
        lines = pane.wait(lambda ls: _sentiment_lines(ls)[-1] > prompt, "the queued line's turn", timeout=120)
        pane.wait(lambda ls: _prompts_after(ls, _sentiment_lines(ls)[-1]), "its reply to end", timeout=120)
        pane.keys("C-d")
        lines = pane.wait(lambda ls: any(line.startswith("EXIT=") for line in ls), "the chat to quit", timeout=30)
        assert "EXIT=0" in lines
    finally:
        pane.kill()


def test_commands_and_unknown_commands(tiny_gguf):
    env = {"QWEN_EDGE_MODEL__N_CTX": "4096", "PYTHONPATH": str(ROOT)}
    command = " ".join(["cd", shlex.quote(str(ROOT)), "&&", "env", *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                        shlex.quote(sys.executable), "-m", "edge.cli", "chat", "--model", shlex.quote(str(tiny_gguf)),
                        "--max-tokens", "3", ";", "echo", "EXIT=$?", ";", "sleep", "120"])
    pane = Pane(command)
    try:
        pane.wait(lambda ls: any(_is_prompt(line) for line in ls), "the first prompt")
        pane.keys("/help", "Enter")
        pane.wait(lambda ls: any("unknown command /help" in line for line in ls), "the unknown-command hint")
        pane.keys("/reset", "Enter")
        pane.wait(lambda ls: "(conversation cleared)" in ls, "the reset")
        pane.keys("/exit", "Enter")
        assert "EXIT=0" in pane.wait(lambda ls: any(line.startswith("EXIT=") for line in ls), "the chat to quit")
    finally:
        pane.kill()
