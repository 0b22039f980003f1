"""Prompt sources from data files: JSON lines, JSON, Parquet, or a `datasets` folder.

Each row becomes a `Problem(uid, question, reference, answer, source)`. Which fields hold
what is a column mapping (dotted paths reach into nested fields and lists:
`prompt.0.content`), written out or picked by name from `PRESETS` for the standard
layouts. A row that cannot be used is skipped and reported as `path:line: reason`
(`path:row N` for Parquet and `datasets` folders, N counted from 0), or raises `DataError`
with that message under `on_bad_row: error`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfdistill.records import Problem
from selfdistill.rewards.math_verifier import extract_boxed


class DataError(ValueError):
    """A data file, or a row of one, that cannot become problems; the message says where."""


class Columns(BaseModel):
    """Where a row keeps each part of a problem: field names, or dotted paths into nested fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str = Field("question", description="Field with the question shown to the policy.")
    reference: str | None = Field(
        None, description="Field with the worked reference solution (the teacher's privileged context)."
    )
    answer: str | None = Field("answer", description="Field with the final answer; null to take it from the reference.")
    id: str | None = Field(
        None, description="Field with a row id, used in uids and checked for duplicates; null: the row index."
    )
    reference_required: bool = Field(
        True, description="A row without a reference is a bad row; false: it gets an empty reference."
    )


@dataclass(frozen=True)
class Preset:
    """Column mapping of a standard data set layout, and how to clean its fields."""

    columns: Columns
    answer_from_reference: bool = False
    clean_question: Callable[[str], str] | None = None


_DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
_DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def _strip_dapo_instructions(question: str) -> str:
    # DAPO wraps each problem in an "Answer: $Answer" instruction; our prompts ask for \boxed{}.
    return question.removeprefix(_DAPO_PREFIX).removesuffix(_DAPO_SUFFIX)


PRESETS: dict[str, Preset] = {
    # openai/gsm8k: question, answer = worked solution ending in "#### 72".
    "gsm8k": Preset(Columns(question="question", reference="answer", answer=None), answer_from_reference=True),
    # hendrycks MATH: problem, solution with the answer in \boxed{}, level, type.
    "math": Preset(Columns(question="problem", reference="solution", answer=None), answer_from_reference=True),
    # HuggingFaceH4/MATH-500: MATH plus answer and unique_id.
    "math500": Preset(Columns(question="problem", reference="solution", answer="answer", id="unique_id")),
    # BytedTsinghua-SIA/DAPO-Math-17k: prompt = [{"role": "user", "content": ...}],
    # reward_model = {"ground_truth": ..., "style": ...}, extra_info = {"index": ...}; no solutions.
    "dapo_math": Preset(
        Columns(
            question="prompt.0.content",
            answer="reward_model.ground_truth",
            id="extra_info.index",
            reference_required=False,
        ),
        clean_question=_strip_dapo_instructions,
    ),
    # open-thoughts/OpenThoughts-114k, `metadata` config: problem, ground_truth_solution (the
    # source data set's solution, \boxed{} answer), deepseek_reasoning, deepseek_solution,
    # domain, source. Code and science rows have no \boxed{} answer and are skipped as bad rows.
    "openthoughts_math": Preset(
        Columns(question="problem", reference="ground_truth_solution", answer=None), answer_from_reference=True
    ),
    # AIME / AMC / HMMT answer files: problem, answer, optional solution, id.
    "competition": Preset(
        Columns(question="problem", reference="solution", answer="answer", id="id", reference_required=False)
    ),
}

PresetName = Literal["gsm8k", "math", "math500", "dapo_math", "openthoughts_math", "competition"]
Format = Literal["jsonl", "json", "parquet", "hf_disk"]


class FileSourceConfig(BaseModel):
    """Problems from a data file: where it is, how to read it, which fields are which."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["file"] = Field("file", description="Source name used to pick this source.")
    path: str = Field(
        ..., min_length=1, description="File, a folder of Parquet files, or a `datasets.save_to_disk` folder."
    )
    format: Literal["auto", "jsonl", "json", "parquet", "hf_disk"] = Field(
        "auto",
        description="auto: from the extension (.jsonl/.ndjson, .json, .parquet) or the folder's contents. "
        "json: a JSON array of rows, or JSON lines (what `Dataset.to_json` writes).",
    )
    preset: PresetName | None = Field(
        None, description="Standard layout (see `PRESETS`); sets columns and answer_from_reference."
    )
    columns: Columns = Field(default_factory=Columns, description="Which fields hold what (without a preset).")
    answer_from_reference: bool = Field(
        False,
        description="Take the answer from the reference: its GSM8K-style '#### 42' tail (the reference "
        "is then the text before it, calculator notes <<...>> removed) or else its last \\boxed{}.",
    )
    split: str = Field("train", description="Split to read when the `datasets` folder holds several.")
    source: str | None = Field(None, description="Label of these problems in uids and logs; default: the file name.")
    on_bad_row: Literal["skip", "error"] = Field(
        "skip", description="skip: report bad rows and go on; error: raise DataError at the first."
    )
    limit: int | None = Field(None, ge=1, description="Keep at most this many problems (after shuffling).")
    shuffle: bool = Field(False, description="Shuffle the problems (with `seed`) before applying `limit`.")
    seed: int = Field(0, description="Seed of the shuffle.")

    @model_validator(mode="after")
    def _columns_consistent(self) -> FileSourceConfig:
        if self.preset is not None:
            clash = sorted({"columns", "answer_from_reference"} & self.model_fields_set)
            if clash:
                raise ValueError(f"preset '{self.preset}' sets columns and answer_from_reference: drop {clash}")
            return self
        if self.answer_from_reference and self.columns.reference is None:
            raise ValueError("answer_from_reference: true needs columns.reference (the field to take the answer from)")
        if self.answer_from_reference and self.columns.answer is not None:
            raise ValueError(
                "answer_from_reference: true takes the answer from the reference; set columns.answer: null"
            )
        if not self.answer_from_reference and self.columns.answer is None:
            raise ValueError("columns.answer is null: name the answer field or set answer_from_reference: true")
        return self

    def layout(self) -> Preset:
        """The preset, or the columns and answer rule written out in this config."""
        if self.preset is not None:
            return PRESETS[self.preset]
        return Preset(self.columns, self.answer_from_reference)


@dataclass
class LoadReport:
    """What loading a file did: rows read, problems returned, bad rows skipped and why."""

    rows: int = 0
    loaded: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def bad_row(self, where: str, reason: object, on_bad_row: str) -> None:
        """Count and keep a bad row's message, or stop with `DataError` when `on_bad_row` is "error"."""
        message = f"{where}: {reason}"
        if on_bad_row == "error":
            raise DataError(message)
        self.skipped += 1
        self.errors.append(message)

    def finish(self, problems: list[Problem], shuffle: bool, seed: int, limit: int | None) -> list[Problem]:
        """Shuffle (seeded) and cut to `limit`; record how many problems were loaded."""
        if shuffle:
            random.Random(seed).shuffle(problems)
        problems = problems[:limit]
        self.loaded = len(problems)
        return problems


def load_problems(cfg: FileSourceConfig) -> tuple[list[Problem], LoadReport]:
    """Read the problems `cfg` describes; raise `DataError` for unusable files (or rows, per `on_bad_row`)."""
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    layout = cfg.layout()
    source = cfg.source or path.name.split(".")[0] or path.name
    report = LoadReport()
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}  # uid -> where it was first seen
    for where, row in _rows(path, _resolve_format(path, cfg.format), cfg.split):
        report.rows += 1
        try:
            if isinstance(row, _BadRow):  # the reader could not even parse it
                raise row
            problem = _to_problem(row, layout, source, report.rows - 1)
            if layout.columns.id is not None:
                if problem.uid in first_seen:
                    raise _BadRow(f"duplicate id: uid {problem.uid!r} was first seen at {first_seen[problem.uid]}")
                first_seen[problem.uid] = where
        except _BadRow as bad:
            report.bad_row(where, bad, cfg.on_bad_row)
            continue
        problems.append(problem)
        if cfg.limit is not None and not cfg.shuffle and len(problems) == cfg.limit:
            break
    if not problems:
        first = f"; first error: {report.errors[0]}" if report.errors else ""
        raise DataError(f"{path}: no usable rows ({report.rows} read, {report.skipped} bad{first})")
    return report.finish(problems, cfg.shuffle, cfg.seed, cfg.limit), report


class _BadRow(Exception):
    """Why one row cannot be a problem; `load_problems` adds where it is."""


def _to_problem(row: Any, layout: Preset, source: str, index: int) -> Problem:
    if not isinstance(row, dict):
        raise _BadRow(f"row is a {type(row).__name__}, not an object")
    columns = layout.columns
    question = _text(row, columns.question)
    if layout.clean_question is not None:
        question = layout.clean_question(question)
    reference = ""
    if columns.reference is not None:
        reference = _text(row, columns.reference, required=columns.reference_required)
    if columns.answer is not None:
        answer = _text(row, columns.answer)
    else:
        split = split_reference_answer(reference)
        if split is None:
            raise _BadRow(f"no '#### answer' tail or \\boxed{{}} answer in field {columns.reference!r}")
        reference, answer = split
    key = _text(row, columns.id) if columns.id is not None else str(index)
    return Problem(uid=f"{source}:{key}", question=question, reference=reference, answer=answer, source=source)


_GSM8K_TAIL = re.compile(r"####[ \t]*([^\n]*?)\s*$")
_CALCULATOR_NOTE = re.compile(r"<<[^<>\n]*>>")


def split_reference_answer(reference: str) -> tuple[str, str] | None:
    """`(reference, answer)` from a solution that ends in `#### 42` or holds a `\\boxed{}`.

    For the GSM8K form the reference becomes the text before `####` without calculator
    notes (`<<48/2=24>>`); a `\\boxed{}` reference stays whole. None when neither is there.
    """
    tail = _GSM8K_TAIL.search(reference)
    if tail and tail.group(1):
        return _CALCULATOR_NOTE.sub("", reference[: tail.start()]).strip(), tail.group(1)
    boxed = extract_boxed(reference)
    if boxed and boxed.strip():
        return reference, boxed.strip()
    return None


def _text(row: dict, path: str, required: bool = True) -> str:
    value = _lookup(row, path)
    if isinstance(value, float) and value != value:  # NaN: how pandas-made files spell "missing"
        value = None
    if value is None:
        if required:
            raise _BadRow(f"field {path!r} missing")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRow(f"field {path!r} is a {type(value).__name__}, not text")
    text = str(value).strip()
    if not text and required:
        raise _BadRow(f"field {path!r} is empty")
    return text


def _lookup(row: dict, path: str) -> Any:
    # A literal key wins, so flattened columns named "a.b" work too.
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _resolve_format(path: Path, fmt: str) -> Format:
    if fmt != "auto":
        return fmt  # type: ignore[return-value]
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "hf_disk"
        if next(path.rglob("*.parquet"), None) is not None:
            return "parquet"
        raise DataError(f"{path}: folder is neither a `datasets` folder nor holds .parquet files; set format")
    by_suffix: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
    if path.suffix.lower() not in by_suffix:
        raise DataError(f"{path}: cannot tell the format from the extension; set format: jsonl, json or parquet")
    return by_suffix[path.suffix.lower()]


def _rows(path: Path, fmt: Format, split: str) -> Iterator[tuple[str, Any]]:
    """`(where, row)` pairs; `where` is `path:line` or `path:row N`; an unparsable row is a `_BadRow`."""
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows, "hf_disk": _hf_disk_rows}
    try:
        yield from readers[fmt](path, split)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _jsonl_rows(path: Path, _split: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        yield from _json_lines(path, f)


def _json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{number}", _BadRow(f"invalid JSON: {e.msg} (column {e.colno})")


def _json_rows(path: Path, _split: str) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    start = _skip_space(text, 0)
    if text.startswith("{", start):  # JSON lines in a .json file
        yield from _json_lines(path, text.splitlines())
        return
    if not text.startswith("[", start):
        raise DataError(f"{path}: expected a JSON array of rows or JSON lines")
    decoder = json.JSONDecoder()
    position, line, counted_to = _skip_space(text, start + 1), 1, 0
    while not text.startswith("]", position):
        line += text.count("\n", counted_to, position)
        counted_to = position
        try:
            row, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        yield f"{path}:{line}", row
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
        elif not text.startswith("]", position):
            line += text.count("\n", counted_to, position)
            raise DataError(f"{path}:{line}: invalid JSON: expected ',' or ']' after a row")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _parquet_rows(path: Path, _split: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    for file in files:
        try:
            batches = pq.ParquetFile(file).iter_batches(batch_size=1024)
            index = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield f"{file}:row {index}", row
                    index += 1
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{file}: not a readable Parquet file: {e}") from e


def _hf_disk_rows(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: reading a `datasets` folder needs datasets (pip install datasets)") from e
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a `datasets.save_to_disk` folder: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (has {sorted(loaded)}); set split")
        loaded = loaded[split]
    for index, row in enumerate(loaded):
        yield f"{path}:row {index}", row
