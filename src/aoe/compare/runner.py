"""``aoe compare``: train every variant x seed on identical data, collect results.json, write the report.

    OUT/results.json        every run's numbers (schema in ``aoe.compare.report.results``)
    OUT/report.md, plots/   the report
    OUT/<variant>-s<seed>/  one ordinary training run each (checkpoints, metrics.jsonl, summary.json)
    OUT/sweep/<variant>-lr<lr>/  with --lr-sweep: the short runs that choose each variant's lr

Interrupted comparisons resume: a run whose summary.json shows it finished is not trained again, a
run with checkpoints continues from its newest good one, and results.json is rewritten after each run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from aoe.config import ConfigError, RunConfig, config_to_dict, load_config
from aoe.config.files import load_saved_config
from aoe.data import TokenData, unigram_cross_entropy, unigram_entropy
from aoe.compare.downstream import DownstreamPlan, score_run
from aoe.compare.suites import Suite, resolve_suite
from aoe.compare.sweep import SweepPlan, finished_summary, run_sweep
from aoe.compare.variants import Variant, resolve_variants
from aoe.io.checkpoint import list_checkpoints
from aoe.train.probe import finished_model, step_peak_bytes
from aoe.train.trainer import Trainer, prepare_data
from aoe.utils.device import resolve_device
from aoe.utils.files import atomic_write_text

RESULTS_FILE = "results.json"


def machine_info() -> dict[str, Any]:
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


def corpus_info(data: TokenData) -> dict[str, Any]:
    return {
        "source": data.manifest["source"]["spec"],
        "train_tokens": int(len(data.train)),
        "val_tokens": int(len(data.val)),
        "vocab_size": int(data.vocab_size),
        "unigram_entropy": unigram_entropy(data.val),
        "unigram_cross_entropy": unigram_cross_entropy(data.train, data.val, data.vocab_size),
        "bytes_per_token": data.bytes_per_token("val"),
    }


def same_config(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a stored config dict describes the same run as ``new``: equal where both have a key,
    and every key the stored one lacks (added to the config since) at its default value."""
    defaults = config_to_dict(RunConfig())
    for section, values in new.items():
        stored = old.get(section, {})
        for key, value in values.items():
            if key in stored:
                if stored[key] != value:
                    return False
            elif value != defaults[section].get(key):
                return False
    return all(section in new and set(keys) <= set(new[section]) for section, keys in old.items())


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float))


def _run_entry(variant: Variant, seed: int, run_dir: str, summary: dict[str, Any], peak: int | None,
               lr: float) -> dict[str, Any]:
    return {
        "variant": variant.name, "seed": seed, "status": "done", "run_dir": run_dir, "lr": lr,
        "val_loss": summary["val_loss"], "perplexity": summary["perplexity"], "bits_per_byte": summary["bits_per_byte"],
        "params_total": summary["params_total"], "params_active": summary["params_active"],
        "flops_per_token": summary["flops_per_token"], "tokens_per_s": summary["tokens_per_s"],
        "peak_memory_bytes": peak, "train_time_s": summary["train_time_s"], "steps": summary["step"],
        "tokens": summary["tokens"], "layers": summary["layers"],
    }


def _fit(cfg: RunConfig, run_dir: Path, data: TokenData, progress: bool) -> tuple[dict[str, Any], Trainer]:
    """Train one run to its end (continuing from its newest good checkpoint if it has one, else
    starting again: the logs of a start that saved no checkpoint are replaced)."""
    resume = bool(list_checkpoints(run_dir))
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress, data=data, restart=not resume)
    return trainer.fit(), trainer


def _train_one(cfg: RunConfig, run_dir: Path, data: TokenData, progress: bool) -> tuple[dict[str, Any], int]:
    summary, trainer = _fit(cfg, run_dir, data, progress)
    return summary, step_peak_bytes(trainer.model, cfg, data)


def _finished_elsewhere(cfg: RunConfig, run_dir: Path, data: TokenData) -> tuple[dict[str, Any], int] | None:
    """(summary, peak memory) of a run that finished at this config's max_steps, lr and seed but has
    no entry in results.json (trained by another invocation, e.g. one per seed), else None. Its
    final checkpoint is loaded (``aoe.train.probe.finished_model``: one of another model config is
    refused) and the peak memory measured again. Nothing is trained or written."""
    summary = finished_summary(run_dir, cfg.train.max_steps)
    if summary is None or not (run_dir / "config.yaml").is_file() or not list_checkpoints(run_dir):
        return None
    saved = load_saved_config(run_dir / "config.yaml")
    if (saved.train.lr, saved.train.seed) != (cfg.train.lr, cfg.train.seed):
        return None
    return summary, step_peak_bytes(finished_model(cfg, run_dir, data), cfg, data)


def _previous_results(path: Path, base: RunConfig, plan: SweepPlan | None) -> dict[str, Any]:
    """The stored results.json of an interrupted comparison ({} if none), refused when it was made
    with another base config or another learning-rate sweep."""
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    if not same_config(previous.get("config") or {}, config_to_dict(base)):
        raise ConfigError(f"{str(path)!r} was made with another base config; use another --out (nothing was overwritten)")
    stored = previous.get("sweep")
    if (plan is None) != (stored is None) or (plan is not None and not plan.same_as(stored)):
        made = "no learning-rate sweep" if stored is None else f"--lr-sweep {stored.get('lrs')} --sweep-steps {stored.get('steps')}"
        raise ConfigError(f"{str(path)!r} was made with {made}; use the same options or another --out (nothing was overwritten)")
    return previous


def _reusable(prior: dict[str, Any] | None, run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """A stored run entry that needs no training: done, at this config's max_steps and lr."""
    if prior is None or finished_summary(run_dir, cfg.train.max_steps) is None:
        return None
    if prior.get("lr", cfg.train.lr) != cfg.train.lr:
        return None
    return prior


def run_comparison(
    out_dir: str | os.PathLike,
    config: str | os.PathLike | None = "tiny",
    overrides: list[str] | tuple[str, ...] = (),
    variants: list[str] | None = None,
    seeds: list[int] | tuple[int, ...] = (0,),
    *,
    progress: bool = True,
    command: str | None = None,
    report: bool = True,
    lr_sweep: list[float] | tuple[float, ...] | None = None,
    sweep_steps: int | None = None,
    suite: str | None = None,
    downstream: DownstreamPlan | None = None,
) -> dict[str, Any]:
    """Train ``variants`` x ``seeds`` (see ``aoe.compare.variants``) on the base config
    ``config`` + ``overrides`` and write OUT/results.json and the report. Returns the results dict.

    ``lr_sweep``: learning rates to try first (``aoe.compare.sweep``): each variant trains
    ``sweep_steps`` steps (default: the base max_steps) at each, with the first seed, and its main
    runs use the one with the lowest validation loss. ``suite``: a named suite of variants instead
    of ``variants`` (``aoe.compare.suites``; e.g. "paper-table2"), its table added to the report.
    ``downstream``: score every finished run on multiple-choice files and lm-eval tasks
    (``aoe.compare.downstream``; a run already scored on each is not scored again).

    Peak memory per run: one micro-batch forward + backward after training
    (``aoe.utils.memory.training_step_peak_bytes``: parameters + activations + gradients).
    """
    out = Path(out_dir)
    base = load_config(config, overrides)
    chosen, plan, named = _check_request(config, overrides, base, variants, seeds, lr_sweep, sweep_steps, suite)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    previous = _previous_results(results_path, base, plan)
    data = prepare_data(base)
    results = _results_header(command or previous.get("command") or "aoe compare --out " + str(out), base, data,
                              chosen, seeds)
    if named is not None:
        results["suite"] = named.as_dict()
    lrs = {v.name: base.train.lr for v in chosen}
    if plan is not None:
        results["sweep"] = run_sweep(plan, chosen, config, overrides, out,
                                     lambda cfg, run_dir: _fit(cfg, run_dir, data, progress)[0],
                                     previous.get("sweep"), progress)
        lrs = _adopt_swept_lrs(results)
        _write_json(results_path, results)
    done = {(r["variant"], r["seed"]): r for r in previous.get("runs", []) if r.get("status") == "done"}
    jobs = [(v, seed) for seed in seeds for v in chosen]
    for i, (v, seed) in enumerate(jobs, 1):
        cfg = load_config(config, [*overrides, *v.overrides, f"train.seed={seed}", f"train.lr={lrs[v.name]!r}"])
        entry = _run_or_reuse(v, seed, cfg, out, data, done, f"[{i}/{len(jobs)}]", progress)
        results["runs"].append(_scored(entry, out, downstream, cfg.train.device, progress))
        _write_json(results_path, results)
    _write_json(results_path, results)
    if report:
        _report(results, out, progress)
    return results


def _scored(entry: dict[str, Any], out: Path, plan: DownstreamPlan | None, device: str, progress: bool) -> dict[str, Any]:
    """The run's entry with the downstream scores the plan asks for and it lacks."""
    if plan is None or entry.get("status") != "done" or not plan.missing(entry):
        return entry
    if progress:
        print(f"  scoring {entry['run_dir']} on {', '.join(plan.names)}", file=sys.stderr)
    where = str(resolve_device(device, 0, setting="train.device", error=ConfigError))
    return {**entry, "downstream": {**(entry.get("downstream") or {}), **score_run(out / entry["run_dir"], plan, where)}}


def _adopt_swept_lrs(results: dict[str, Any]) -> dict[str, float]:
    """The learning rate the sweep chose for each variant, also written into its entry of results["variants"]."""
    lrs = results["sweep"]["chosen"]
    for entry in results["variants"]:
        entry["lr"] = lrs[entry["name"]]
    return lrs


def _report(results: dict[str, Any], out: Path, progress: bool) -> None:
    """OUT/report.md and its plots (``aoe.compare.report``); with progress, its path on stderr."""
    from aoe.compare.report import write_report

    path = write_report(results, out)
    if progress:
        print(f"report: {path}", file=sys.stderr)


def _check_request(config, overrides, base: RunConfig, variants, seeds, lr_sweep, sweep_steps, suite=None):
    """The variants, the sweep plan and the suite (None without one each), refusing a bad request
    before anything trains."""
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds lists a seed twice: {list(seeds)}")
    named: Suite | None = None
    if suite is not None:
        if variants:
            raise ConfigError(f"--suite {suite} chooses its own variants; give --suite or --variants, not both")
        named = resolve_suite(suite, base.model)
    chosen = list(named.variants) if named is not None else resolve_variants(variants, base.model)
    plan = None
    if lr_sweep is not None:
        plan = SweepPlan(tuple(float(lr) for lr in lr_sweep), sweep_steps or base.train.max_steps, seeds[0])
    elif sweep_steps is not None:
        raise ConfigError("--sweep-steps needs --lr-sweep")
    for v in chosen:  # every variant's overrides are valid
        load_config(config, [*overrides, *v.overrides])
    return chosen, plan, named


def _results_header(command: str, base: RunConfig, data: TokenData, chosen: list[Variant], seeds) -> dict[str, Any]:
    return {
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "config": config_to_dict(base),
        "corpus": corpus_info(data),
        "variants": [v.as_dict() for v in chosen],
        "seeds": list(seeds),
        "runs": [],
    }


def _run_or_reuse(v: Variant, seed: int, cfg: RunConfig, out: Path, data: TokenData, done: dict, tag: str,
                  progress: bool) -> dict[str, Any]:
    """One run's results.json entry: the stored one when the run finished at this config; rebuilt
    from the run directory when it finished without one (another invocation trained it); else
    trained (continuing from its newest good checkpoint)."""
    run_name = f"{v.name}-s{seed}"
    prior = _reusable(done.get((v.name, seed)), out / run_name, cfg)
    if prior is not None:
        if progress:
            print(f"{tag} {run_name}: already done (val_loss {prior['val_loss']:.4f})", file=sys.stderr)
        return prior
    found = _finished_elsewhere(cfg, out / run_name, data)
    if found is not None:
        if progress:
            print(f"{tag} {run_name}: already done, not yet listed (val_loss {found[0]['val_loss']:.4f})", file=sys.stderr)
        return _run_entry(v, seed, run_name, *found, cfg.train.lr)
    if progress:
        print(f"{tag} {run_name}: {v.description}", file=sys.stderr)
    summary, peak = _train_one(cfg, out / run_name, data, progress)
    return _run_entry(v, seed, run_name, summary, peak, cfg.train.lr)
