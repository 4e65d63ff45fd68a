"""The terminal while `qwen-edge chat` streams a reply.

Keys typed during a reply would be echoed by the terminal into the middle of it. While a reply
streams, echo is off; the terminal stays in line mode, so what is typed waits in its input buffer
(with backspace still applied) and GNU readline shows it after the next prompt, where it can be
edited before Enter sends it (a line ended with Enter during the reply is sent as the next turn).
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def enable_line_editing() -> None:
    """input() edits with readline (arrows, history) once the module is imported; it also shows
    text typed ahead during a reply after the next prompt."""
    try:
        import readline  # noqa: F401
    except ImportError:  # Python built without readline: plain input() still works
        pass


@contextmanager
def echo_off() -> Iterator[None]:
    """Turn the terminal's echo off for the block; restored however the block ends."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ECHONL)   # lflags; ICANON stays: typed text waits as a line
    termios.tcsetattr(fd, termios.TCSANOW, quiet)  # TCSANOW: never drop what was already typed
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
