"""A1111's attention syntax in captions: `(word)`, `[word]`, `(word:1.3)`, escapes and BREAK -> (text, weight) pieces."""

from __future__ import annotations

import re

# A1111 modules/prompt_parser.py `re_attention`, the same alternatives in the same order.
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND_UP = 1.1  # (word): x1.1 per level
SQUARE_DOWN = 1 / 1.1  # [word]: /1.1 per level
BREAK = -1.0  # the weight that marks a BREAK piece (start a new 75-token chunk)


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """(text, weight) pieces as A1111's `parse_prompt_attention` returns them.

    `(a)` x1.1, `((a))` x1.21, `[a]` /1.1, `(a:1.5)` x1.5 (nested weights multiply: `((a:1.2))` = 1.32),
    `\\(` a literal bracket, a stray `)` or `]` is text, an unclosed `(`/`[` still applies to the rest,
    the word BREAK becomes ("BREAK", -1). Adjacent pieces of equal weight are merged; "" gives [("", 1.0)].
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_UP)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_DOWN)
        else:
            parts = _BREAK.split(token)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", BREAK])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, ROUND_UP)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_DOWN)
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for piece in res[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def plain_text(text: str) -> str:
    """The caption with the weighting syntax removed (what the weights apply to)."""
    return "".join(t for t, w in parse_weighted(text) if w != BREAK)
