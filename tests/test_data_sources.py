"""Installed data sources: reasoning-gym tasks and CHAMP, their splits, bad rows and configs."""

from __future__ import annotations

import json

import pytest

from selfdistill.config import ConfigError, load_config
from selfdistill.data import load_split
from selfdistill.data import reasoning_gym as rg_source
from selfdistill.data.champ import ChampConfig, clean_answer, is_checkable
from selfdistill.data.champ import load_problems as load_champ
from selfdistill.data.files import DataError
from selfdistill.data.reasoning_gym import ReasoningGymConfig
from selfdistill.data.reasoning_gym import load_problems as load_rg
from selfdistill.data.report import SourceReport, log_report
from selfdistill.data.templates import split_reference

pytest.importorskip("reasoning_gym")
pytest.importorskip("champ_dataset")

# ------------------------------------------------------------------ reasoning-gym


def test_gsm_symbolic_worked_solution_is_the_reference():
    problems, report = load_rg(ReasoningGymConfig(task="gsm_symbolic", seed=0), 30)
    assert report.rows == 30 and report.skipped == 0 and report.loaded == len(problems) == 30
    first = problems[0]
    assert first.uid == "rg-gsm_symbolic-0-0" and first.source == "gsm_symbolic"
    assert first.answer == "28080"
    assert "####" not in first.reference and "<<" not in first.reference
    steps, final = split_reference(first.reference)
    assert final == "\\boxed{28080}" and len(steps) == 3
    assert all(p.reference.endswith(f"\\boxed{{{p.answer}}}") for p in problems)
    assert len({p.uid for p in problems}) == 30


def test_reasoning_gym_is_deterministic_and_splits_are_disjoint():
    cfg = ReasoningGymConfig(size=40, seed=3)
    train, held_out = load_split(cfg, "train", 10), load_split(cfg, "eval", 10)
    assert len(train) == 40 and len(held_out) == 10
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert load_split(cfg, "train", 10) == train
    assert load_split(ReasoningGymConfig(size=40, seed=4), "train", 10) != train


def test_task_without_worked_solution_gets_an_empty_reference_or_is_left_out():
    problems, _ = load_rg(ReasoningGymConfig(task="basic_arithmetic"), 5)
    assert [p.reference for p in problems] == [""] * 5 and all(p.answer for p in problems)
    with pytest.raises(DataError, match=r"basic_arithmetic\(seed=0\): no usable items .*5 without metadata"):
        load_rg(ReasoningGymConfig(task="basic_arithmetic", without_reference="skip"), 5)


def test_unknown_task_and_bad_params_fail_with_the_field():
    with pytest.raises(DataError, match=r"data.task: reasoning-gym has no task 'gsm_symbolc'.*gsm_symbolic"):
        load_rg(ReasoningGymConfig(task="gsm_symbolc"), 2)
    with pytest.raises(DataError, match=r"data.params: .*'gsm_symbolic' rejects \{'difficulty': 9.0\}"):
        load_rg(ReasoningGymConfig(params={"difficulty": 9.0}), 2)


class _FakeTask:
    """A generator with one good item and each kind of bad one."""

    good = {"question": "Q0?", "answer": "4", "metadata": {"answer_cot": "2+2=4\n#### 4"}}
    items = [
        good,
        RuntimeError("template broke"),
        {"question": "Q2?", "answer": None, "metadata": {}},
        {"question": "Q3?", "answer": "5", "metadata": {"answer_cot": "2+2=4\n#### 4"}},
        {"question": "Q0?", "answer": "4", "metadata": {"answer_cot": "2+2=4\n#### 4"}},
        {"question": "Q5?", "answer": "6", "metadata": {"answer_cot": "3+3=6\n#### 6.0"}},
    ]

    def __getitem__(self, index):
        item = self.items[index]
        if isinstance(item, Exception):
            raise item
        return item


def test_bad_items_are_reported_with_where_they_came_from(monkeypatch):
    monkeypatch.setattr(rg_source, "_create_dataset", lambda cfg, count: _FakeTask())
    problems, report = load_rg(ReasoningGymConfig(task="fake", seed=7), 6)
    assert [p.question for p in problems] == ["Q0?", "Q5?"]
    assert problems[0].reference == "2+2=4\n\\boxed{4}"
    assert report.skipped == 3 and report.left_out == {"repeated questions": 1}
    where = "reasoning_gym:fake(seed=7) item"
    assert report.errors == [
        f"{where} 1: generation failed: RuntimeError: template broke",
        f"{where} 2: answer missing",
        f"{where} 3: worked solution ends in '#### 4' but the answer is '5'",
    ]
    line = log_report("reasoning_gym:fake", report, file=open("/dev/null", "w"))
    assert "3 bad rows skipped (first: reasoning_gym:fake(seed=7) item 1" in line and "1 repeated questions" in line
    with pytest.raises(DataError, match=r"^reasoning_gym:fake\(seed=7\) item 1: generation failed"):
        load_rg(ReasoningGymConfig(task="fake", seed=7, on_bad_row="error"), 6)


# ------------------------------------------------------------------ CHAMP


def test_champ_steps_become_the_reference_and_answers_are_cleaned():
    problems, report = load_champ(ChampConfig(shuffle=False))
    assert report.rows == 270 and report.skipped == 0
    assert report.loaded == len(problems) == 270 - sum(report.left_out.values())
    assert 150 < len(problems) < 270
    first = problems[0]
    assert first.uid == "champ:P_Combinatorics_1" and first.answer == "239"
    steps, final = split_reference(first.reference)
    assert len(steps) == 6 and final == "\\boxed{239}"
    assert "@@" not in "".join(p.question + p.reference for p in problems)
    assert all(is_checkable(p.answer) for p in problems)
    everything, _ = load_champ(ChampConfig(answers="all"))
    assert len(everything) == 270


def test_champ_shuffle_limit_and_categories():
    a, _ = load_champ(ChampConfig(seed=1, limit=20))
    b, _ = load_champ(ChampConfig(seed=1, limit=20))
    assert a == b and len(a) == 20 and len({p.uid.split("_")[1] for p in a}) > 1  # categories mixed
    only, report = load_champ(ChampConfig(categories=("Sequence",)))
    assert only and all(p.uid.startswith("champ:P_Sequence_") for p in only)
    assert report.left_out["in other categories"] == 220
    train, held_out = load_split(ChampConfig(), "train", 30), load_split(ChampConfig(), "eval", 30)
    assert len(held_out) == 30 and not {p.uid for p in train} & {p.uid for p in held_out}


@pytest.mark.parametrize("raw, clean, checkable", [
    ("239", "239", True),
    ("C(10, 5), or equivalently 252", "252", True),
    ("3 is the only possible value", "3", True),
    ("The limit exists and is equal to 2/3", "2/3", True),
    ("0 (i.e., no such values)", "0", True),
    ("5/14, or approximately 35.7%", "5/14", True),
    ("98 values", "98", True),
    ("1, 4 and 9", "1, 4, 9", True),
    ("(x+y+z)(x^2+y^2+z^2-xy-yz-xz)", "(x+y+z)(x^2+y^2+z^2-xy-yz-xz)", True),
    ("2^floor(n/2)*floor(n/2)!", "2^floor(n/2)*floor(n/2)!", True),
    ("No", "No", False),
    ("No integer solutions", "No integer solutions", False),
    ("x=16 and x=81", "x=16 and x=81", False),
])
def test_champ_answer_cleaning(raw, clean, checkable):
    assert clean_answer(raw) == clean
    assert is_checkable(clean) is checkable


def test_champ_bad_rows_name_file_and_problem(tmp_path):
    good = {"identifier": "P_X_1", "_text": "What is 1+1?", "category": "X", "_answer": "2",
            "solution": {"steps": [{"_text": "1+1=2"}]}}
    data = {"problems": {
        "P_X_1": good,
        "P_X_2": {**good, "identifier": "P_X_2", "_text": ""},
        "P_X_3": {**good, "identifier": "P_X_3", "solution": {"steps": []}},
        "P_X_4": {**good, "identifier": "P_X_4", "_text": None, "_raw_text": "What is @@2+2@@?", "_answer": "4"},
        "P_X_5": "not an object",
    }}
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(data))
    problems, report = load_champ(ChampConfig(version=str(path), shuffle=False))
    assert [p.uid for p in problems] == ["champ:P_X_1", "champ:P_X_4"]
    assert problems[1].question == "What is 2+2?" and problems[1].reference == "1+1=2\n\\boxed{4}"
    assert report.errors == [
        "champ:mini.json:P_X_2: text missing or empty",
        "champ:mini.json:P_X_3: no solution steps",
        "champ:mini.json:P_X_5: problem is a str, not an object",
    ]
    with pytest.raises(DataError, match=r"^champ:mini.json:P_X_2: text missing or empty$"):
        load_champ(ChampConfig(version=str(path), on_bad_row="error"))
    with pytest.raises(DataError, match=r"data.version: champ-dataset has no 'v9'"):
        load_champ(ChampConfig(version="v9"))


# ------------------------------------------------------------------ configs and reports


def test_sources_are_selected_by_name_in_run_configs():
    cfg = load_config(None, ["data={name: reasoning_gym, task: gsm_symbolic, size: 50}"])
    assert isinstance(cfg.data, ReasoningGymConfig) and cfg.data.size == 50
    cfg = load_config(None, ["data={name: champ, answers: all}"])
    assert isinstance(cfg.data, ChampConfig) and cfg.data.answers == "all"
    with pytest.raises(ConfigError, match=r"data.without_reference: .*\(got 'drop'\)"):
        load_config(None, ["data={name: reasoning_gym, without_reference: drop}"])


def test_log_report_is_silent_when_everything_was_used(capsys):
    assert log_report("x", SourceReport(rows=3, loaded=3)) is None
    assert capsys.readouterr().err == ""
