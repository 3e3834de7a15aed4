"""The paper's AoE-vs-MoE study as one command (``aoe compare``), in two parts.

Running it (this folder): ``variants.py`` and ``suites.py`` define what is trained, ``sweep.py``
chooses each variant's learning rate, ``runner.py`` trains every variant x seed and writes
OUT/results.json, ``downstream.py`` scores the trained models, ``demo.py`` is ``make demo``.

Rendering its report (``aoe.compare.report``): OUT/report.md and its plots from results.json and
the runs' metrics alone, so a report can be rebuilt without training anything. The runner imports
only ``write_report`` and ``headline_table`` from it.
"""
