"""`pykd nas demo`'s report says whether its student beats the cut student of its shape, and why not."""
import math

from pykd.nas.demo import student_vs_cut


def test_a_gap_beyond_two_standard_errors_is_a_win():
    se = math.sqrt((0.80 * 0.20 + 0.74 * 0.26) / 1000)  # 0.0190: 0.06 is 3.2 standard errors
    line = student_vs_cut(0.80, 0.74, 1000, 2000)
    assert f"+0.0600; standard error of the difference {se:.4f}" in line
    assert "beat the cut beyond two standard errors" in line and "sandwich steps" not in line


def test_a_small_gap_is_a_tie_with_the_reason_and_the_study_that_tests_it():
    line = student_vs_cut(0.743, 0.747, 1000, 40)  # the demo's measured pair: -0.004, 0.2 standard errors
    assert "Within two standard errors: a tie" in line
    assert "trained 40 sandwich steps" in line and "tools/evidence_nas.py" in line


def test_a_worse_student_is_said_so():
    line = student_vs_cut(0.60, 0.75, 500, 40)
    assert "The cut student is better beyond two standard errors." in line
