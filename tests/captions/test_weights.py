"""captions/weights.py: A1111's attention syntax, checked against the examples in A1111's own docstring."""

from __future__ import annotations

import pytest

from captions.weights import parse_weighted, plain_text


def approx(pieces):
    return [(text, pytest.approx(weight)) for text, weight in pieces]


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
    ("((w))", [("w", 1.21)]),
    ("[w]", [("w", 1 / 1.1)]),
    ("((w:1.2))", [("w", 1.32)]),
    ("a ) stray ] bracket", [("a ) stray ] bracket", 1.0)]),
    ("ratio 16:9 frame", [("ratio 16:9 frame", 1.0)]),
    ("sky BREAK sea", [("sky", 1.0), ("BREAK", -1.0), ("sea", 1.0)]),
    ("", [("", 1.0)]),
])
def test_a1111_parse_examples(text, expected):
    assert parse_weighted(text) == approx(expected)


def test_plain_text_drops_the_syntax():
    assert plain_text("a (red:1.5) [small] cat") == "a red small cat"
