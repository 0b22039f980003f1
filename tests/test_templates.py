import pytest
from pydantic import ValidationError

from selfdistill.data.templates import PromptTemplates, partial_reference, render, split_reference
from selfdistill.records import Problem

PROBLEM = Problem(
    uid="p0",
    question="(12+7)*3-5",
    reference="12+7=19\n19*3=57\n57-5=52\n\\boxed{52}",
    answer="52",
    source="arithmetic",
)


@pytest.mark.parametrize(
    ("reference", "steps", "final"),
    [
        ("1+2=3\n3*4=12\n\\boxed{12}", ["1+2=3", "3*4=12"], "\\boxed{12}"),
        ("\n  1+2=3 \n\n\\boxed{3}\n\n", ["1+2=3"], "\\boxed{3}"),  # blank lines and spaces dropped
        ("\\boxed{7}", [], "\\boxed{7}"),
        ("a\nb", ["a", "b"], ""),  # no boxed line: every line is a step
        ("so the answer is \\boxed{5}", [], "so the answer is \\boxed{5}"),
        ("\\boxed{1}\nthen more", ["\\boxed{1}", "then more"], ""),  # only the last line can be final
        ("", [], ""),
    ],
)
def test_split_reference(reference, steps, final):
    assert split_reference(reference) == (steps, final)


def test_render_each_context():
    t = PromptTemplates()
    assert render(t, "plain", PROBLEM) == "Q: (12+7)*3-5\nA: "
    assert render(t, "none", PROBLEM) == "Q: (12+7)*3-5\nA: "
    assert render(t, "full", PROBLEM) == "Q: (12+7)*3-5\nR: 12+7=19\n19*3=57\n57-5=52\n\\boxed{52}\nA: "
    assert render(t, "reference_only", PROBLEM) == "R: 12+7=19\n19*3=57\n57-5=52\n\\boxed{52}\nA: "


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (0.0, "Q: (12+7)*3-5\nR: \\boxed{52}\nA: "),
        (0.5, "Q: (12+7)*3-5\nR: 12+7=19\n\\boxed{52}\nA: "),  # floor(0.5 * 3) = 1 step
        (0.7, "Q: (12+7)*3-5\nR: 12+7=19\n19*3=57\n\\boxed{52}\nA: "),
        (1.0, "Q: (12+7)*3-5\nR: 12+7=19\n19*3=57\n57-5=52\n\\boxed{52}\nA: "),
    ],
)
def test_render_partial(alpha, expected):
    assert render(PromptTemplates(), "partial", PROBLEM, alpha=alpha) == expected


def test_partial_without_final_line_keeps_steps_only():
    assert partial_reference("a\nb\nc\nd", 0.5) == "a\nb"


@pytest.mark.parametrize("alpha", [None, -0.1, 1.5])
def test_partial_needs_alpha_in_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        render(PromptTemplates(), "partial", PROBLEM, alpha=alpha)


def test_unknown_context_is_an_error():
    with pytest.raises(ValueError, match="unknown context 'teacher'"):
        render(PromptTemplates(), "teacher", PROBLEM)


def test_custom_templates_and_bad_fields():
    t = PromptTemplates(plain="Problem: {question}\nSolution: ")
    assert render(t, "plain", PROBLEM) == "Problem: (12+7)*3-5\nSolution: "
    with pytest.raises(ValidationError, match="full"):
        PromptTemplates(full="{question} {answer}")
    with pytest.raises(ValidationError, match="extra"):
        PromptTemplates(teacher="{question}")
