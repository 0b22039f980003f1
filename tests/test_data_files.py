"""Prompt sources from files: presets on fixtures in each standard layout, bad rows, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from selfdistill.data.files import DataError, FileSourceConfig, load_problems, split_reference_answer
from selfdistill.records import Problem

FIXTURES = Path(__file__).parent / "fixtures"


def _load(name: str, **kwargs):
    return load_problems(FileSourceConfig(path=str(FIXTURES / name), **kwargs))


def test_gsm8k_preset_splits_the_answer_tail():
    problems, report = _load("gsm8k.jsonl", preset="gsm8k")
    assert problems[0] == Problem(
        uid="gsm8k:0",
        question="Mia reads 12 pages on Monday and twice as many on Tuesday. "
        "How many pages does she read in the two days?",
        reference="On Tuesday she reads 12*2 = 24 pages.\nIn total she reads 12+24 = 36 pages.",
        answer="36",
        source="gsm8k",
    )
    assert [p.answer for p in problems] == ["36", "42", "5000"]
    assert (report.rows, report.loaded, report.skipped) == (4, 3, 1)
    assert report.errors == [
        f"{FIXTURES / 'gsm8k.jsonl'}:3: no '#### answer' tail or \\boxed{{}} answer in field 'answer'"
    ]


def test_math_preset_takes_the_last_boxed_answer():
    problems, report = _load("math.jsonl", preset="math")
    assert [p.answer for p in problems] == ["\\frac{5}{6}", "4", "5\\sqrt{2}"]
    assert problems[1].reference == "Subtract 3: $2x = 8$, so $x = \\boxed{4}$."
    assert problems[1].question == "Solve $2x + 3 = 11$ for $x$."
    assert report.errors == [
        f"{FIXTURES / 'math.jsonl'}:3: no '#### answer' tail or \\boxed{{}} answer in field 'solution'"
    ]


def test_math500_preset_uses_the_answer_column_and_ids():
    problems, report = _load("math500.jsonl", preset="math500")
    assert [(p.uid, p.answer) for p in problems] == [
        ("math500:test/algebra/1.json", "81"),
        ("math500:test/prealgebra/3.json", "\\frac{3}{4}"),
    ]
    assert report.errors == [f"{FIXTURES / 'math500.jsonl'}:2: field 'answer' missing"]


def test_dapo_preset_reads_nested_parquet_fields_and_strips_the_instructions():
    problems, report = _load("dapo_math.parquet", preset="dapo_math")
    assert problems[0] == Problem(
        uid="dapo_math:9a0c1e2b-0001",
        question="Let $x$ be a positive real with $x^2 = 49$. Find $x$.",
        reference="",
        answer="7",
        source="dapo_math",
    )
    assert [p.answer for p in problems] == ["7", "32", "15"]
    assert report.errors == [f"{FIXTURES / 'dapo_math.parquet'}:row 2: field 'reward_model.ground_truth' missing"]


def test_openthoughts_preset_reads_a_json_array_with_line_numbers():
    problems, report = _load("openthoughts_math.json", preset="openthoughts_math")
    assert [p.answer for p in problems] == ["55", "6"]
    assert problems[0].reference == "Using $n(n+1)/2$ with $n=10$ gives $\\boxed{55}$."
    # The code row starts on line 10 of the pretty-printed array.
    assert report.errors == [
        f"{FIXTURES / 'openthoughts_math.json'}:10: "
        "no '#### answer' tail or \\boxed{} answer in field 'ground_truth_solution'"
    ]


def test_competition_preset_allows_missing_solutions_and_rejects_duplicate_ids():
    problems, report = _load("aime.jsonl", preset="competition")
    path = FIXTURES / "aime.jsonl"
    assert [(p.uid, p.answer, p.reference) for p in problems] == [
        ("aime:2024-I-1", "24", "$2^{10} = 1024$, which leaves remainder $24$."),
        ("aime:2024-I-2", "9", ""),
        ("aime:2024-I-5", "56", ""),
    ]
    assert report.errors == [
        f"{path}:3: field 'problem' is empty",
        f"{path}:4: duplicate id: uid 'aime:2024-I-2' was first seen at {path}:2",
    ]


def test_bad_row_raises_with_file_and_line_when_asked():
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:3: no '#### answer' tail"):
        _load("gsm8k.jsonl", preset="gsm8k", on_bad_row="error")


def test_hf_disk_folder_with_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (FIXTURES / "math500.jsonl").read_text().splitlines()]
    folder = tmp_path / "math500"
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(rows), "train": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(folder))
    problems, report = load_problems(FileSourceConfig(path=str(folder), preset="math500", split="test"))
    assert [p.answer for p in problems] == ["81", "\\frac{3}{4}"]
    assert report.errors == [f"{folder}:row 1: field 'answer' missing"]
    with pytest.raises(DataError, match=r"no split 'validation' \(has \['test', 'train'\]\)"):
        load_problems(FileSourceConfig(path=str(folder), preset="math500", split="validation"))


def test_parquet_folder_reads_every_file(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(FIXTURES / "dapo_math.parquet")
    (tmp_path / "data").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(2, 2), tmp_path / "data" / "train-00001-of-00002.parquet")
    problems, report = load_problems(FileSourceConfig(path=str(tmp_path), preset="dapo_math", source="dapo"))
    assert [p.answer for p in problems] == ["7", "32", "15"]
    assert report.errors == [
        f"{tmp_path / 'data' / 'train-00001-of-00002.parquet'}:row 0: field 'reward_model.ground_truth' missing"
    ]


def test_custom_columns_with_dotted_paths_and_invalid_lines(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"q": {"text": "1+1?"}, "sol": "It is \\boxed{2}."}),
                "{not json",
                "",
                json.dumps(["a", "list"]),
                json.dumps({"q": {"text": ["not", "text"]}, "sol": "\\boxed{3}"}),
                json.dumps({"q": {"text": "2+2?"}, "sol": "#### 4"}),
            ]
        )
        + "\n"
    )
    cfg = FileSourceConfig(
        path=str(path), columns={"question": "q.text", "reference": "sol", "answer": None}, answer_from_reference=True
    )
    problems, report = load_problems(cfg)
    assert [(p.uid, p.question, p.reference, p.answer) for p in problems] == [
        ("custom:0", "1+1?", "It is \\boxed{2}.", "2"),
        ("custom:4", "2+2?", "", "4"),
    ]
    assert (report.rows, report.loaded, report.skipped) == (5, 2, 3)
    assert report.errors == [
        f"{path}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{path}:4: row is a list, not an object",
        f"{path}:5: field 'q.text' is a list, not text",
    ]


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "exported.json"  # what datasets.Dataset.to_json writes
    path.write_text('{"question": "1+2?", "answer": 3}\n{"question": "2+2?", "answer": 4.5}\n')
    problems, _ = load_problems(FileSourceConfig(path=str(path)))
    assert [p.answer for p in problems] == ["3", "4.5"]


def test_shuffle_and_limit_are_seeded():
    def answers(**kwargs):
        return [p.answer for p in _load("gsm8k.jsonl", preset="gsm8k", **kwargs)[0]]

    assert answers(limit=2) == ["36", "42"]
    assert answers(shuffle=True, seed=3) == answers(shuffle=True, seed=3)
    assert sorted(answers(shuffle=True, seed=3)) == ["36", "42", "5000"]
    assert len({tuple(answers(shuffle=True, seed=s)) for s in range(8)}) > 1
    assert len(answers(shuffle=True, seed=3, limit=2)) == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "no such file or directory"),
        ("rows.txt", "x", "cannot tell the format from the extension"),
        ("broken.json", '[{"question": "a", "answer": "1"},\n {"question": ]', r"broken\.json:2:15: invalid JSON"),
        ("scalar.json", "42", "expected a JSON array of rows or JSON lines"),
        ("corrupt.parquet", "not parquet", "not a readable Parquet file"),
        (
            "all_bad.jsonl",
            '{"question": "no answer"}\n',
            r"no usable rows \(1 read, 1 bad; first error: .*all_bad\.jsonl:1: field 'answer' missing\)",
        ),
    ],
)
def test_unusable_files_raise_data_error_naming_the_path(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_problems(FileSourceConfig(path=str(path)))
    assert str(path) in str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"preset": "gsm8k", "columns": {"question": "q"}}, "preset 'gsm8k' sets columns"),
        ({"preset": "math", "answer_from_reference": True}, r"drop \['answer_from_reference'\]"),
        ({"columns": {"answer": None}}, "columns.answer is null"),
        ({"answer_from_reference": True}, "needs columns.reference"),
        ({"columns": {"reference": "s"}, "answer_from_reference": True}, "set columns.answer: null"),
        ({"preset": "gsm8k_v2"}, "preset"),
        ({"columns": {"question": "q", "solution": "s"}}, "extra_forbidden"),
        ({"limit": 0}, "limit"),
        ({"format": "csv"}, "format"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        FileSourceConfig(path="x.jsonl", **fields)


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("a <<1+1=2>>2\n#### 2", ("a 2", "2")),
        ("so \\boxed{7} and \\boxed{8}", ("so \\boxed{7} and \\boxed{8}", "8")),
        ("#### ", None),
        ("no answer here", None),
        ("\\boxed{ }", None),
    ],
)
def test_split_reference_answer(reference, expected):
    assert split_reference_answer(reference) == expected
