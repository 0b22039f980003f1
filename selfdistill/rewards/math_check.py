"""Answer equivalence, run inside the verifier's worker processes (see `deadline_pool.py`).

math-verify decides first, with its own timeouts off (the pool enforces the deadline). When
it says no, a small sympy fallback compares plain arithmetic that math-verify misreads
(`1e3`, `2**10`, `1\\,000`): each side is parsed with `ast` into a tree of numbers and
`+ - * / **`, nothing else, and evaluated exactly with sympy rationals. No `eval`,
no `sympify`: safe on untrusted model output.
"""

from __future__ import annotations

import ast
import logging
import re

import sympy
from math_verify import parse, verify

# math-verify warns once per process that its timeouts are off; the pool is the timeout.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_MAX_ARITHMETIC_CHARS = 200
_MAX_RESULT_BITS = 40_000  # about 12k digits: anything bigger is not an answer
_LITERAL_EXPONENT = re.compile(r"[eE]([+-]?\d+)")
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d)(?:,|\\,|\{,\}|\\!|\s)(?=\d{3}(?!\d))")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_LATEX_TO_ASCII = {r"\cdot": "*", r"\times": "*", "^": "**", "{": "(", "}": ")", r"\left": "", r"\right": ""}
_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def check(pair: tuple[str, str]) -> str:
    """Status of one `(gold, predicted)` answer pair: "correct", "wrong" or "unparsable".

    Both are bare answers (the contents of `\\boxed{}`), not whole responses.
    """
    gold, predicted = pair
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
    if predicted_parsed and verify(gold_parsed, predicted_parsed, timeout_seconds=None):
        return "correct"
    gold_value, predicted_value = arithmetic_value(gold), arithmetic_value(predicted)
    if gold_value is not None and predicted_value is not None:
        return "correct" if gold_value == predicted_value else "wrong"
    if predicted_value is not None or any(isinstance(p, sympy.Basic) for p in predicted_parsed):
        return "wrong"
    return "unparsable"


def warm_up() -> None:
    """Compile math-verify's regexes and load its grammars before the first deadline runs."""
    check(("\\frac{1}{2}", "0.5"))


def arithmetic_value(text: str) -> sympy.Rational | None:
    """Exact value of plain arithmetic on numbers (`1e3`, `2^{10}`, `\\frac{3}{4}`), else None."""
    text = _THOUSANDS_SEPARATOR.sub("", text.strip().strip("$"))
    text = _FRAC.sub(r"((\1)/(\2))", text)
    for latex, ascii_ in _LATEX_TO_ASCII.items():
        text = text.replace(latex, ascii_)
    if not text or len(text) > _MAX_ARITHMETIC_CHARS:
        return None
    try:
        return _evaluate(ast.parse(text, mode="eval").body, text)
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError):
        return None


def _evaluate(node: ast.AST, source: str) -> sympy.Rational | None:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        # The literal's own text keeps decimals exact: 0.1 stays 1/10.
        literal = ast.get_source_segment(source, node)
        exponent = _LITERAL_EXPONENT.search(literal or "")
        if literal is None or (exponent and abs(int(exponent.group(1))) > 100):
            return None
        return sympy.Rational(literal)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand, source)
        if value is None:
            return None
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, source), _evaluate(node.right, source)
        if left is None or right is None:
            return None
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        operation = _BINARY_OPS.get(type(node.op))
        if operation is None or (isinstance(node.op, ast.Div) and right == 0):
            return None
        return operation(left, right)
    return None


def _power(base: sympy.Rational, exponent: sympy.Rational) -> sympy.Rational | None:
    # Integer exponents only, bounded: the result stays rational and small enough to build.
    if not exponent.is_integer or (base == 0 and exponent < 0):
        return None
    if abs(exponent) * max(base.p.bit_length(), base.q.bit_length()) > _MAX_RESULT_BITS:
        return None
    return base**exponent
