"""Reports rendered once per module from the synthetic results (drawing the plots is the slow part)."""

import pytest

from aoe.compare.report import write_report

from .synthetic import CLEAR_WIN, make_results


@pytest.fixture(scope="module")
def clear_win(tmp_path_factory):
    """The old schema (no kind, baseline, gate weights or sweep): AoE clearly beats MoE."""
    out = tmp_path_factory.mktemp("clear")
    results = make_results(out, CLEAR_WIN)
    path = write_report(results, out)
    return results, out, path, path.read_text()


@pytest.fixture(scope="module")
def new_schema(tmp_path_factory):
    """Every newer key: kinds, explicit baselines, lrs, gate weights, dead experts, a sweep."""
    out = tmp_path_factory.mktemp("new")
    results = make_results(out, CLEAR_WIN, new_schema=True)
    path = write_report(results, out)
    return results, out, path, path.read_text()
