"""The report's sections, each a function of the study (and the drawn figures) returning markdown lines.

``render`` puts them in the report's order; a section without data returns no lines.
"""

from __future__ import annotations

from aoe.compare.report.figures import Figures
from aoe.compare.report.sections.definitions import definitions, notes
from aoe.compare.report.sections.paper import paper_table2
from aoe.compare.report.sections.setup import command, configuration, corpus, machine, title
from aoe.compare.report.sections.sweep import learning_rate_sweep
from aoe.compare.report.sections.tables import headline, per_layer, runs
from aoe.compare.report.sections.training import over_training
from aoe.compare.report.sections.verdict import verdict
from aoe.compare.report.study import Study


def render(study: Study, figures: Figures) -> str:
    """The whole report.md. Notes come last: every other section may add to them."""
    lines = [
        *title(study), *command(study), *machine(study), *corpus(study), *configuration(study),
        *learning_rate_sweep(study, figures), *headline(study), *runs(study), *per_layer(study, figures),
        *verdict(study), *paper_table2(study), *over_training(study, figures), *definitions(study, figures),
    ]
    return "\n".join(lines + notes(study))


__all__ = ["render"]
