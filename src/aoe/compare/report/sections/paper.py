"""The paper's own table beside ours: the rows of a suite (``aoe compare --suite paper-table2``)
in Table 2's layout, with the paper's numbers next to what this study measured."""

from __future__ import annotations

from aoe.compare.report.markdown import fmt, fmt_mean_std, fmt_signed, table
from aoe.compare.report.stats import is_number, mean
from aoe.compare.report.study import Study
from aoe.compare.suites import TABLE2, TABLE2_TASKS


def _numbers(study: Study) -> dict[str, int]:
    """variant name -> its number in Table 2, when the study is that suite; else {}."""
    suite = study.results.raw.get("suite")
    if not isinstance(suite, dict) or suite.get("name") != "paper-table2":
        return {}
    return {str(k): int(v) for k, v in (suite.get("numbers") or {}).items() if isinstance(v, int) and v in TABLE2}


def _row(study: Study, name: str, number: int, moe_loss: float, moe_avg: float) -> list[object]:
    paper_label, _scores, paper_avg = TABLE2[number]
    s = study.summary(name)
    losses = s.val_loss if s is not None else []
    ours = mean(losses)
    return [number, paper_label, s.label if s is not None else name, fmt_mean_std(losses, 4),
            fmt_signed(ours - moe_loss, 4), f"{paper_avg:.2f}", fmt_signed(paper_avg - moe_avg, 2)]


def _accuracy_rows(study: Study, numbers: dict[str, int]) -> list[list[object]]:
    """Our downstream accuracies (%) in the paper's columns, where a run was scored on that task."""
    rows = []
    for name, number in sorted(numbers.items(), key=lambda item: item[1]):
        s = study.summary(name)
        scores = [mean(s.accuracy.get(task, [])) * 100 if s is not None else float("nan") for _, task in TABLE2_TASKS]
        if any(is_number(x) for x in scores):
            rows.append([number, s.label, *(fmt(x, 2) for x in scores)])
    return rows


def paper_table2(study: Study) -> list[str]:
    numbers = _numbers(study)
    if not numbers:
        return []
    by_number = {n: name for name, n in numbers.items()}
    moe = study.summary(by_number.get(1))
    moe_loss = mean(moe.val_loss) if moe is not None else float("nan")
    rows = [_row(study, by_number[n], n, moe_loss, TABLE2[1][2]) for n in sorted(by_number)]
    lines = [
        "## The paper's Table 2 beside this study", "",
        table(["#", "paper's configuration", "here", "val loss (nats)", "− row 1", "paper AVG (%)", "paper − row 1"],
              rows, align="rllrrrr"), "",
        "Rows as numbered in the paper (732M parameters, 100B tokens, downstream accuracy averaged over 8 tasks). "
        "Here: the base recipe of this study (configuration above), its validation loss as mean ± std over the "
        "completed seeds; lower is better for loss, higher for accuracy, so a row that helps in the paper has a "
        "positive `paper − row 1` and should have a negative `− row 1` here. d_low keeps the paper's ratios to "
        "d_model (aoe.compare.suites). The two columns measure different things at scales 100x apart: agreement "
        "in sign is what to look for, not in size.", "",
    ]
    accuracy = _accuracy_rows(study, numbers)
    if accuracy:
        lines += ["Downstream accuracy (%) in the paper's columns, where the runs were scored on the task:", "",
                  table(["#", "here", *(h for h, _ in TABLE2_TASKS)], accuracy), ""]
    return lines
