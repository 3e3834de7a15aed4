"""How long ``aoe --help`` and every subcommand's ``--help`` take beyond Python's own start.

    python benchmarks/bench_cli.py [--runs 7]

Each repetition starts a fresh interpreter once per contender, in turn: ``python -c pass`` (the
baseline: Python's start), then ``python -m aoe.cli [COMMAND] --help`` for the top level and every
command. The table gives the median wall time of each and its excess over the baseline, and
whether the command imported torch or transformers (``--help`` should import neither).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = ("", "train", "eval", "generate", "compare", "demo", "export", "convert")
PROBE = ("import runpy, sys\nsys.argv = ['aoe', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('aoe.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)\n")


def _timed(argv: list[str]) -> tuple[float, str]:
    """(wall seconds, the last line of stderr) of one fresh interpreter running ``argv``."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, (out.stderr.strip().splitlines() or [""])[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    times: dict[str, list[float]] = {"(python -c pass)": [], **{c or "(top level)": [] for c in COMMANDS}}
    imports: dict[str, str] = {}
    for _ in range(args.runs):
        times["(python -c pass)"].append(_timed(["-c", "pass"])[0])
        for command in COMMANDS:
            argv = ["-c", PROBE, *([command] if command else []), "--help"]
            seconds, imports[command or "(top level)"] = _timed(argv)
            times[command or "(top level)"].append(seconds)
    base = statistics.median(times["(python -c pass)"])
    print(f"| command | median s | over Python's start s | imports torch, transformers |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| aoe {name} --help | {median:.3f} | {median - base:+.3f} | {imports.get(name, '-')} |"
              if name != "(python -c pass)" else f"| python -c pass | {median:.3f} | 0 | - |")


if __name__ == "__main__":
    main()
