"""Answers no checker should spend time on, refused in the caller before any worker sees them.

A verifier worker has a deadline, but every answer that runs into it costs the whole
`timeout_s` of a step. Most such answers are recognisable from their text alone, in
microseconds and without sympy: a power tower (`9^{9^{9^{9}}}`), an exponent, a sum or
integral limit or a factorial argument that is a huge number, nesting deeper than a bound,
a length over a bound, control characters (NUL), characters outside ASCII and the usual
mathematical symbols (look-alike digits and letters, bidi controls, emoji), and unbalanced
LaTeX. `refusal` names the first rule an answer breaks; the verifier scores it 0 with status
`refused`. Whatever passes still runs under the worker's deadline.
"""

from __future__ import annotations

import ast
import math
import re
import unicodedata

from pydantic import BaseModel, ConfigDict, Field


class AnswerLimits(BaseModel):
    """Bounds an answer must keep to be worth a checker's time (see rewards/guard.py)."""

    model_config = ConfigDict(extra="forbid")

    max_response_chars: int = Field(
        200_000, ge=1, description="Longest whole response (characters) whose answer is looked for at all."
    )
    max_answer_chars: int = Field(
        1000, ge=1, description="Longest `\\boxed{}` answer (characters) sent to a checker. Plain integers and "
        "answers identical to the gold are decided without a checker and skip this bound.",
    )
    max_nesting: int = Field(
        16, ge=1, description="Deepest nesting of braces, parentheses and brackets in an answer."
    )
    max_power_tower: int = Field(
        2, ge=1, description="Most exponents stacked on one another (`a^{b^{c}}` is 2)."
    )
    max_exponent: float = Field(
        10_000, gt=0, description="Largest number allowed as an exponent, a `\\sum`/`\\int` limit or a factorial "
        "argument (sympy would build or iterate over it).",
    )


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_EXTRA_SYMBOLS = set("°·…′″")  # allowed beyond ASCII, Greek letters and Unicode math symbols (category Sm)
_LATEX_COMMAND = re.compile(r"\\([A-Za-z]+|.)")
_FACTORIAL = re.compile(r"(\d+(?:\.\d+)?|\))\s*!")
_NUMERIC_TEXT = re.compile(r"[\d\s+\-*/^(){}.]+")


def refusal(answer: str, limits: AnswerLimits) -> str | None:
    """The rule `answer` (the contents of `\\boxed{}`) breaks, or None when a checker may take it."""
    if len(answer) > limits.max_answer_chars:
        return f"longer than {limits.max_answer_chars} characters"
    if _CONTROL.search(answer):
        return "control character"
    for char in answer:
        if ord(char) > 127 and not _allowed_symbol(char):
            return f"character U+{ord(char):04X} outside ASCII and math symbols"
    problem = _unbalanced(answer, limits.max_nesting)
    if problem:
        return problem
    text = answer.replace("**", "^")
    height = _tower_height(text, limits)
    if isinstance(height, str):
        return height
    if height > limits.max_power_tower:
        return f"power tower of height {height}"
    for match in _FACTORIAL.finditer(text):
        argument = match.group(1) if match.group(1) != ")" else _group_before(text, match.start(1))
        if _too_big(argument, limits.max_exponent):
            return f"factorial of {argument[:40]!r}"
    digits = _log10_magnitude(text)
    if digits is not None and digits > limits.max_exponent:
        return f"a number of about 10^{digits:.3g}"
    return None


def _allowed_symbol(char: str) -> bool:
    if char in _EXTRA_SYMBOLS:
        return True
    category = unicodedata.category(char)
    if category == "Sm":  # × ÷ − ± ≤ ≥ ≠ √ ∞ ...
        return True
    return category in ("Ll", "Lu") and "GREEK" in unicodedata.name(char, "")


def _unbalanced(answer: str, max_nesting: int) -> str | None:
    """Braces must pair up (escaped ones too); brackets may not (intervals like `(0, 1]`)."""
    depth = escaped = 0
    for command in _LATEX_COMMAND.findall(answer):
        if command == "{":
            escaped += 1
        elif command == "}":
            escaped -= 1
            if escaped < 0:
                return "unbalanced \\}"
    if escaped:
        return "unbalanced \\{"
    if answer.count("\\left") != answer.count("\\right"):
        return "unbalanced \\left / \\right"
    plain = answer.replace("\\{", "").replace("\\}", "")
    for char in plain:
        if char in "{([":
            depth += 1
            if depth > max_nesting:
                return f"nesting deeper than {max_nesting}"
        elif char in "})]":
            depth = max(0, depth - 1)
    if plain.count("{") != plain.count("}"):
        return "unbalanced braces"
    return None


def _tower_height(text: str, limits: AnswerLimits) -> int | str:
    """How many exponents stack at most, or the reason to refuse (an exponent or limit too big)."""
    height, i = 0, 0
    while True:
        i = text.find("^", i)
        if i < 0:
            return height
        exponent, end = _exponent_at(text, i + 1)
        if _too_big(exponent, limits.max_exponent):
            return f"exponent or limit {exponent[:40]!r} too large"
        inner = _tower_height(exponent, limits)
        if isinstance(inner, str):
            return inner
        height = max(height, 1 + inner)
        i = end


def _exponent_at(text: str, start: int) -> tuple[str, int]:
    """The exponent that starts at `start` (a braced group, or a token and any `^` chained to it)."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j], j + 1
        return text[i + 1 :], len(text)
    token = re.match(r"-?\d+(?:\.\d+)?|\\[A-Za-z]+|.", text[i:]) if i < len(text) else None
    end = i + (token.end() if token else 0)
    if end < len(text) and text[end] == "^":  # 9^9^9: the whole chain is the exponent
        chained, end = _exponent_at(text, end + 1)
        return text[i:end - len(chained)] + chained, end
    return text[i:end], end


def _group_before(text: str, close: int) -> str:
    depth = 0
    for j in range(close, -1, -1):
        depth += {")": 1, "(": -1}.get(text[j], 0)
        if depth == 0:
            return text[j + 1 : close]
    return text[:close]


def _too_big(expression: str, bound: float) -> bool:
    digits = _log10_magnitude(expression)
    return digits is not None and digits > math.log10(bound)


def _log10_magnitude(text: str) -> float | None:
    """log10 of |value| when `text` is plain arithmetic on numbers (inf when astronomically large), else None."""
    if not _NUMERIC_TEXT.fullmatch(text) or not any(c.isdigit() for c in text):
        return None
    source = text.replace("^", "**").replace("{", "(").replace("}", ")")
    try:
        return _magnitude(ast.parse(source, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _magnitude(node: ast.AST) -> float | None:
    """log10 |value| of an ast of numbers and + - * / **, computed in log space (never builds big numbers)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = abs(node.value)
        return math.log10(value) if value else -math.inf
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        return _magnitude(node.operand)
    if not isinstance(node, ast.BinOp):
        return None
    left, right = _magnitude(node.left), _magnitude(node.right)
    if left is None or right is None:
        return None
    if isinstance(node.op, (ast.Add, ast.Sub)):
        return max(left, right) + math.log10(2)
    if isinstance(node.op, ast.Mult):
        return left + right
    if isinstance(node.op, ast.Div):
        return left - right
    if isinstance(node.op, ast.Pow):
        exponent = math.inf if right > 300 else 10.0**right
        return exponent * left if left != -math.inf else -math.inf
    return None
