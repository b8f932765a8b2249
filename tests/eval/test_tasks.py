import pytest

from deftune.eval.tasks import exact_match, normalize_answer


def test_normalize_strips_and_cuts():
    assert normalize_answer("  2021-03-05  ") == "2021-03-05"
    assert normalize_answer("2021-03-05\nThat is the date.") == "2021-03-05"
    assert normalize_answer("2021-03-05### Instruction:\nmore") == "2021-03-05"
    assert normalize_answer("\n 2021-03-05 \n") == "2021-03-05"
    assert normalize_answer("") == ""


def test_exact_match_fraction():
    refs = ["2021-03-05", "1999-12-31", "2000-01-01", "1950-06-15"]
    preds = ["2021-03-05\n", " 1999-12-31 ### x", "2000-1-1", "June 15, 1950"]
    assert exact_match(preds, refs) == pytest.approx(0.5)
    assert exact_match(refs, refs) == 1.0
    assert exact_match([], []) == 0.0


def test_exact_match_length_mismatch():
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_multiline_references_keep_the_lines_of_the_prediction():
    from deftune.eval.tasks import exact_match, normalize_answer

    assert normalize_answer("line one\nline two\n### Instruction: x", keep_lines=True) == "line one\nline two"
    assert exact_match(["line one\nline two"], ["line one\nline two"]) == 1.0
    assert exact_match(["answer\nchatter"], ["answer"]) == 1.0
