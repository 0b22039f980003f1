"""CHAMP competition problems as a prompt source (pip install champ-dataset, MIT).

CHAMP ("Concept and Hint-Augmented Math Problems", 270 problems in five categories:
number theory, inequalities, polynomials, sequences, combinatorics) ships each problem
with a step-by-step solution and a final answer written in words or plain-text math. Each
problem becomes a `Problem`:

- question: the problem text (the dataset's `@@` concept markers removed);
- reference: the solution steps, one per line, then (with `boxed_answer_line`, the
  default) a `\\boxed{answer}` line, so partial exposure keeps the final answer;
- answer: the final answer, cleaned for the math verifier by `clean_answer`: the
  simplest form is kept ("C(10, 5), or equivalently 252" -> "252"), phrases around a
  value go ("3 is the only possible value" -> "3", "The limit exists and is equal to
  2/3" -> "2/3", "0 (i.e., no such values)" -> "0", "98 values" -> "98"), and a list of
  numbers becomes comma-separated ("1, 4 and 9" -> "1, 4, 9").

About a quarter of the answers stay prose ("No", "No integer solutions", "x=16 and x=81",
"x(n) > y(n-1) for all n >= 2"), which a math verifier cannot check: with `answers: checkable`
(default) those problems are left out and counted; `answers: all` keeps them with the
cleaned text as the gold. Splits: the problems are shuffled with `seed` (they come sorted
by category) and the last `run.eval_size` are held out. A problem without text, steps or
answer is a bad row, reported as `champ:FILE:ID: reason`, skipped or raised per
`on_bad_row`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from selfdistill.data.files import DataError
from selfdistill.data.report import SourceReport
from selfdistill.records import Problem


class ChampConfig(BaseModel):
    """Problems of the CHAMP data set (the copy inside the champ-dataset package, or a file in its format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["champ"] = Field("champ", description="Source name used to pick this source.")
    version: str = Field(
        "v0", min_length=1, description="Data file of the champ-dataset package (dataset_files/VERSION.json), or "
        "the path of a .json file in the same format."
    )
    answers: Literal["checkable", "all"] = Field(
        "checkable", description="checkable: leave out problems whose cleaned answer is still prose (not "
        "machine-checkable); all: keep every problem."
    )
    categories: tuple[str, ...] | None = Field(
        None, description="Keep only these categories (Number-Theory, Inequality, Polynomial, Sequence, "
        "Combinatorics); None: all."
    )
    boxed_answer_line: bool = Field(True, description="End each reference with a '\\boxed{answer}' line.")
    shuffle: bool = Field(True, description="Shuffle the problems with `seed` (they come sorted by category).")
    seed: int = Field(0, description="Seed of the shuffle.")
    limit: int | None = Field(None, ge=1, description="Keep at most this many problems (after shuffling).")
    on_bad_row: Literal["skip", "error"] = Field(
        "skip", description="skip: report bad problems and go on; error: raise DataError at the first."
    )


def load_problems(cfg: ChampConfig) -> tuple[list[Problem], SourceReport]:
    """The CHAMP problems `cfg` selects (bad ones skipped or raised per `on_bad_row`)."""
    path = data_file(cfg.version)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read CHAMP data: {e}") from e
    rows = raw.get("problems") if isinstance(raw, dict) else None
    if not isinstance(rows, dict):
        raise DataError(f"{path}: not CHAMP data (expected an object with a 'problems' mapping)")
    report = SourceReport()
    problems: list[Problem] = []
    for key, row in rows.items():
        report.rows += 1
        where = f"champ:{path.name}:{key}"
        try:
            problem = _to_problem(cfg, key, row)
        except _BadRow as bad:
            report.bad_row(where, bad, cfg.on_bad_row)
            continue
        if cfg.categories is not None and row.get("category") not in cfg.categories:
            report.left_out["in other categories"] += 1
            continue
        if cfg.answers == "checkable" and not is_checkable(problem.answer):
            report.left_out["with prose answers (answers: checkable)"] += 1
            continue
        problems.append(problem)
    if not problems:
        first = f"; first error: {report.errors[0]}" if report.errors else ""
        raise DataError(f"{path}: no usable CHAMP problems ({report.rows} read, {report.skipped} bad{first})")
    return report.finish(problems, cfg.shuffle, cfg.seed, cfg.limit), report


def data_file(version: str) -> Path:
    """The JSON file `version` names: a path, or dataset_files/VERSION.json of the champ-dataset package."""
    if version.endswith(".json"):
        path = Path(version)
        if not path.is_file():
            raise DataError(f"data.version: {path}: no such file")
        return path
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name=champ needs the champ-dataset package (pip install champ-dataset)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_files"
    path = folder / f"{version}.json"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.json"))
        raise DataError(f"data.version: champ-dataset has no {version!r} (has {have})")
    return path


class _BadRow(Exception):
    """Why one CHAMP problem cannot be a problem; `load_problems` adds where it is."""


def _to_problem(cfg: ChampConfig, key: str, row: Any) -> Problem:
    if not isinstance(row, dict):
        raise _BadRow(f"problem is a {type(row).__name__}, not an object")
    question = _field_text(row, "text")
    answer = clean_answer(_field_text(row, "answer"))
    steps = (row.get("solution") or {}).get("steps") if isinstance(row.get("solution"), dict) else None
    if not isinstance(steps, list) or not steps:
        raise _BadRow("no solution steps")
    lines = []
    for number, step in enumerate(steps, start=1):
        if not isinstance(step, dict):
            raise _BadRow(f"solution step {number} is a {type(step).__name__}, not an object")
        lines.append(_field_text(step, "text", f"solution step {number}"))
    if cfg.boxed_answer_line:
        lines.append(f"\\boxed{{{answer}}}")
    identifier = row.get("identifier") or key
    return Problem(uid=f"champ:{identifier}", question=question, reference="\n".join(lines), answer=answer,
                   source="champ")


def _field_text(row: dict, name: str, what: str | None = None) -> str:
    # CHAMP stores `_text` (markers removed) beside `_raw_text` (with @@ concept markers).
    value = row.get(f"_{name}")
    if value is None and isinstance(row.get(f"_raw_{name}"), str):
        value = row[f"_raw_{name}"].replace("@@", "")
    if not isinstance(value, str) or not value.strip():
        raise _BadRow(f"{what or name} missing or empty")
    return " ".join(value.split())


_EQUIVALENT = re.compile(r",\s*or (?:equivalently|an equivalent form such as)\s+(.+)$")
_APPROXIMATELY = re.compile(r",\s*or approximately .*$")
_IE = re.compile(r"\s*\((?:i\.e\.,?|no |none ).*\)$")
_ONLY_VALUE = re.compile(r"^(.+?) is the only possible value$")
_LIMIT = re.compile(r"^(?:The limit exists and is equal to|The only possible value for the limit is)\s+(.+)$")
_COUNT = re.compile(r"^(-?\d+|[a-z]) [a-z]+s$")  # "98 values", "0 roots", "n times"
_NUMBER_LIST = re.compile(r"^-?\d+(?:, -?\d+)* and -?\d+$")  # "1, 4 and 9"
_WORD = re.compile(r"[A-Za-z]{2,}")
_MATH_WORDS = {"sqrt", "floor", "ceil", "sum", "prod", "log", "ln", "exp", "sin", "cos", "tan", "pi", "inf"}
# Two-letter words are usually variable products (xy, yz); these few are English.
_SHORT_WORDS = {"no", "or", "is", "of", "at", "an", "if", "to", "in", "by", "be", "it", "as", "on"}


def clean_answer(answer: str) -> str:
    """CHAMP's final answer with the words around its value removed (see the module docstring)."""
    text = answer.strip()
    equivalent = _EQUIVALENT.search(text)
    if equivalent:
        text = equivalent.group(1)
    text = _APPROXIMATELY.sub("", text)
    text = _IE.sub("", text)
    for pattern in (_ONLY_VALUE, _LIMIT):
        match = pattern.match(text)
        if match:
            text = match.group(1)
    count = _COUNT.match(text)
    if count:
        text = count.group(1)
    if _NUMBER_LIST.match(text):
        text = text.replace(" and ", ", ")
    return text.strip().rstrip(".")


def is_checkable(answer: str) -> bool:
    """True when the (cleaned) answer is math a verifier can compare: no English words in it.

    Letter runs of three or more are words unless they are function names (sqrt, floor,
    ...); two-letter runs are variable products (xy) unless common English (no, or, is, ...).
    """
    for word in _WORD.findall(answer):
        lower = word.lower()
        if (len(word) >= 3 and lower not in _MATH_WORDS) or lower in _SHORT_WORDS:
            return False
    return bool(answer)
