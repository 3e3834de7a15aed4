"""``make demo`` / ``aoe demo``: the small MoE vs AoE comparison on the embedded corpus.

Trains the tiny recipe's MoE and parameter-matched AoE for the same steps on the Python standard
library's source, writes the comparison report, then prints the headline table, each model's
validation loss next to the corpus's unigram entropy, and a short sample from the AoE model.
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_VARIANTS = ["moe", "aoe"]
DEMO_OVERRIDES = ["train.max_steps=400", "train.eval_every=100", "train.checkpoint_every=100", "train.log_every=10"]
QUICK_OVERRIDES = ["train.max_steps=20", "train.eval_every=10", "train.eval_batches=2", "train.checkpoint_every=10",
                   "train.log_every=5", "data.max_bytes=1000000"]
SAMPLE_PROMPT = "def "


def run_demo(out_dir: str = "runs/demo", quick: bool = False, seed: int = 0) -> int:
    from aoe.compare.report import headline_table
    from aoe.compare.runner import run_comparison
    from aoe.model import generate
    from aoe.io.models import load_model

    start = time.perf_counter()
    out = Path(out_dir)
    overrides = QUICK_OVERRIDES if quick else DEMO_OVERRIDES
    command = "aoe demo" + (" --quick" if quick else "") + f" --out {out_dir}"
    results = run_comparison(out, "tiny", overrides, DEMO_VARIANTS, [seed], command=command)
    entropy = results["corpus"]["unigram_entropy"]
    print()
    print(headline_table(results))
    print()
    for run in results["runs"]:
        verdict = "below" if run["val_loss"] < entropy else "NOT below"
        print(f"{run['variant']:>4}: validation loss {run['val_loss']:.3f} nats/token, {verdict} the corpus's "
              f"unigram entropy {entropy:.3f} (a model that ignores context)")
    aoe_run = next(r for r in results["runs"] if r["variant"] == "aoe")
    model, _, tokenizer = load_model(out / aoe_run["run_dir"])
    ids = generate(model, tokenizer.encode(SAMPLE_PROMPT), 60, temperature=0.8, top_k=50, seed=seed)
    print(f"\nAoE sample (temperature 0.8):\n{SAMPLE_PROMPT}{tokenizer.decode(ids.tolist()[len(tokenizer.encode(SAMPLE_PROMPT)):])}\n")
    print(f"report: {out / 'report.md'}   ({time.perf_counter() - start:.0f} s)")
    return 0
