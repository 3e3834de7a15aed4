"""What ``import aoe`` costs beyond ``import torch``: the median over fresh interpreters.

    python benchmarks/bench_import.py [--runs 7]

Each run is a new process that times ``import torch`` and then ``import aoe``; it also says whether
``import aoe`` loaded transformers or torch._dynamo (it should load neither).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, sys, time
t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); import aoe; t2 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "aoe": t2 - t1, "transformers": "transformers" in sys.modules,
                  "dynamo": "torch._dynamo" in sys.modules}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    rows = [json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout)
            for _ in range(args.runs)]
    torch_s, aoe_s = statistics.median(r["torch"] for r in rows), statistics.median(r["aoe"] for r in rows)
    print(f"import torch: {torch_s:.3f} s; import aoe after it: {aoe_s:.3f} s (median of {args.runs}); "
          f"loads transformers: {any(r['transformers'] for r in rows)}, torch._dynamo: {any(r['dynamo'] for r in rows)}")


if __name__ == "__main__":
    main()
