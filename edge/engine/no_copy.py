"""No parroting: a reply may not repeat a run of `n` tokens of the user's own prose.

The rule is transformers' `encoder_no_repeat_ngram_size`, applied to a conversation's user
messages: when the reply's last n-1 tokens equal n-1 consecutive tokens of a user message, the token
that followed them there is banned, so the reply can quote a few words but never a clause. Code
(fenced or inline) and quoted text are left out of the sources: fixing a user's code or repeating
a quoted name is not parroting. Only tokens that carry a letter are banned: Qwen writes a number
digit by digit, and a ban inside "300" would turn it into "3,00"; the word after it is banned
instead.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

# fenced code, inline code, and text in quotes (ASCII, typographic, CJK corner brackets)
EXEMPT = re.compile(r"```.*?(?:```|$)|`[^`\n]*`|\"[^\"\n]*\"|“[^”\n]*”|「[^」\n]*」|『[^』\n]*』", re.S)


def prose(text: str) -> list[str]:
    """The parts of a user message that are the user's own prose."""
    return [part for part in EXEMPT.split(text) if part.strip()]


class CopyGuard:
    """Which next tokens would complete an `n`-token run copied from the sources."""

    def __init__(self, sources: Iterable[list[int]], n: int, bannable: Callable[[int], bool] = lambda _t: True) -> None:
        if n < 2:
            raise ValueError("a copied run is at least 2 tokens long")
        self.n = n
        self.follow: dict[tuple[int, ...], set[int]] = {}
        for tokens in sources:
            for i in range(len(tokens) - n + 1):
                if bannable(tokens[i + n - 1]):
                    self.follow.setdefault(tuple(tokens[i:i + n - 1]), set()).add(tokens[i + n - 1])

    @classmethod
    def of_messages(cls, texts: Iterable[str], tokenize: Callable[[str], list[int]], piece: Callable[[int], bytes],
                    n: int) -> "CopyGuard":
        def has_letter(token: int) -> bool:
            return any(ch.isalpha() for ch in piece(token).decode("utf-8", "ignore"))
        return cls((tokenize(part) for text in texts for part in prose(text)), n, has_letter)

    def banned(self, generated: list[int]) -> list[int]:
        if len(generated) < self.n - 1:
            return []
        return sorted(self.follow.get(tuple(generated[len(generated) - self.n + 1:]), ()))
