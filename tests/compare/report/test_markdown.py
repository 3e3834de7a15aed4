"""Number formatting and tables."""

from aoe.compare.report.markdown import fmt_lr, fmt_signed, table
from aoe.compare.report import fmt, fmt_bytes, fmt_mean_std, fmt_si


def test_formatting_is_robust():
    assert fmt(float("nan")) == "–" and fmt(None) == "–" and fmt("x") == "–"
    assert fmt(1.23456, 2) == "1.23"
    assert fmt_si(1_234_567) == "1.23 M" and fmt_si(None) == "–"
    assert fmt_bytes(None) == "–" and fmt_bytes(3 * 2**30) == "3.00 GiB"
    assert fmt_mean_std([2.0]) == "2.0000"
    assert fmt_mean_std([1.0, 3.0], 2) == "2.00 ± 1.41"
    assert fmt_mean_std([None]) == "–"


def test_signed_lr_and_table():
    assert fmt_signed(-0.205) == "-0.2050" and fmt_signed(0.1) == "+0.1000" and fmt_signed(None) == "–"
    assert fmt_lr(3e-3) == "0.003" and fmt_lr(1e-5) == "1e-05" and fmt_lr(float("nan")) == "–"
    assert table(["a", "b"], [["x|y", 1]]) == "| a | b |\n|:--|--:|\n| x\\|y | 1 |"
