"""Data preparation benchmark: peak memory and throughput of tokenizing a large text corpus.

Corpora: one text file per size (default 50 MB and 500 MB) of the Python standard library's
source lines (the ``stdlib`` source of ``aoe.data``), shuffled with a fixed seed and repeated until
the size is reached: one document of realistic code text, the hardest shape for memory (a file is
one document). Generated into ``--workdir`` (default: a temporary directory, removed at the end).

Measured, each in a fresh child process (its peak resident set size is its own high-water mark,
``getrusage(RUSAGE_SELF).ru_maxrss``, read at its end; "import RSS" is the same right after the
imports, i.e. the interpreter, torch and numpy before any work):

- train: ``load_or_train_tokenizer`` (byte-level BPE, vocab 4096) on the first corpus (and on every
  corpus in ``--train-sizes``); the one trained on the first corpus is the tokenizer used below.
- prepare: ``prepare_tokens(corpus, tokenizer_path=...)``, our whole preparation with an already
  trained tokenizer: read, decode, cut, encode, write ``train.bin``/``val.bin``, manifest, reopen
  and check every id. MB/s = corpus bytes / wall time of the call.
- library: the tokenizers library's own ``encode_batch`` and ``encode_batch_fast`` (which the
  pipeline calls: the same ids without offsets) on the same text: the file is read and cut into
  the same pieces and batches outside the clock, the batches go to the two methods in turn, and
  only the encode calls are timed. This is the limit: the rate of the encoding alone.

Contenders are interleaved per corpus, in alternating order (prepare then library on even
repetitions, library then prepare on odd ones); with more than one repetition the median is shown.
Throughput on a shared machine moves with its load: the wall-clock ratio is only as good as the
load was steady, so the CPU seconds per MB of each (all threads of the process) are shown too.

Usage:
    python benchmarks/bench_data.py                         # 50 MB and 500 MB
    python benchmarks/bench_data.py --sizes 50 500 --reps 2 1 --train-sizes 50 500
    python benchmarks/bench_data.py --sizes 10 --reps 3     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB_SIZE = 4096
MB = 1_000_000


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------
def stdlib_lines() -> list[str]:
    """Every line (newline kept) of the stdlib corpus of aoe.data, in file order."""
    from aoe.data import Source

    lines: list[str] = []
    for doc in Source("stdlib").stream():
        lines += doc.text().splitlines(keepends=True)
    return lines


def write_corpus(path: Path, size_mb: int, seed: int = 0) -> int:
    """Write ``size_mb`` MB (10**6 bytes, whole lines) of shuffled stdlib lines; returns the byte size."""
    lines = stdlib_lines()
    rng = random.Random(seed)
    target = size_mb * MB
    written = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        while written < target:
            rng.shuffle(lines)
            block: list[str] = []
            for line in lines:
                block.append(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
            f.write("".join(block))
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024


def child_train(corpus: str, cache_dir: str, tokenizer_out: str) -> dict:
    from aoe.data import Source
    from aoe.data.tokenizer import load_or_train_tokenizer

    import_rss = _rss_mb()
    t0 = time.perf_counter()
    tok = load_or_train_tokenizer(Source(corpus), cache_dir, vocab_size=VOCAB_SIZE)
    seconds = time.perf_counter() - t0
    if tokenizer_out:
        tok.save(tokenizer_out)
    return {"seconds": seconds, "peak_rss_mb": _rss_mb(), "import_rss_mb": import_rss, "vocab_size": tok.vocab_size,
            "hash": tok.hash}


def child_prepare(corpus: str, out_dir: str, tokenizer: str, cache_dir: str) -> dict:
    from aoe.data import prepare_tokens

    import_rss = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    data = prepare_tokens(corpus, out_dir, tokenizer_path=tokenizer, cache_dir=cache_dir)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = data.manifest
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": _rss_mb(), "import_rss_mb": import_rss,
            "tokens": m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"],
            "forced_cuts": m.get("forced_cuts"), "tokenize_s": m["timings"]["tokenize_s"]}


def _batches_of_pieces(corpus: str):
    """The corpus cut into the pieces and batches prepare_tokens uses (not timed by the caller)."""
    from aoe.data import DEFAULT_CHUNK_SIZES as sizes
    from aoe.data import Source
    from aoe.data.chunks import split_pieces

    batch, chars = [], 0
    for doc in Source(corpus).stream(read_bytes=sizes.read_bytes):
        for piece in split_pieces(doc.chunks(), sizes):
            batch.append(piece)
            chars += len(piece)
            if len(batch) >= sizes.batch_pieces or chars >= sizes.batch_chars:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def child_library(corpus: str, tokenizer: str) -> dict:
    """Seconds inside encode_batch and inside encode_batch_fast, and the UTF-8 bytes each encoded:
    the batches go to the two methods in turn (the corpus is shuffled lines, so both halves are
    alike), so every byte is encoded once, as in the pipeline."""
    from aoe.data import Tokenizer

    backend = Tokenizer.load(tokenizer).backend  # special tokens encoded as text, as in the pipeline
    methods = ["encode_batch"] + (["encode_batch_fast"] if hasattr(backend, "encode_batch_fast") else [])
    seconds = dict.fromkeys(methods, 0.0)
    cpu = dict.fromkeys(methods, 0.0)
    nbytes = dict.fromkeys(methods, 0)
    for i, batch in enumerate(_batches_of_pieces(corpus)):
        name = methods[i % len(methods)]
        nbytes[name] += sum(len(piece.encode("utf-8")) for piece in batch)
        t0, c0 = time.perf_counter(), time.process_time()
        encodings = getattr(backend, name)(batch, add_special_tokens=False)
        seconds[name] += time.perf_counter() - t0
        cpu[name] += time.process_time() - c0
        del encodings
    nan = float("nan")  # a corpus of one batch gives the second method nothing to encode
    return {"seconds": seconds, "cpu_s": cpu, "bytes": nbytes,
            "mb_s": {k: nbytes[k] / MB / seconds[k] if nbytes[k] else nan for k in methods},
            "cpu_s_per_mb": {k: cpu[k] / (nbytes[k] / MB) if nbytes[k] else nan for k in methods}}


CHILDREN = {"train": child_train, "prepare": child_prepare, "library": child_library}


def run_child(task: str, src: str | None = None, **kwargs) -> dict:
    """Run ``task`` in a fresh interpreter (importing ``aoe`` from the source tree ``src`` when
    given); returns its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", task, json.dumps(kwargs)]
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {task} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import tokenizers

    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"tokenizers {tokenizers.__version__}")


def measure_prepare(work: Path, corpus: Path, tokenizer: Path, size: int, rep: int) -> dict:
    out = work / f"tokens_{size}"
    shutil.rmtree(out, ignore_errors=True)
    r = run_child("prepare", corpus=str(corpus), out_dir=str(out), tokenizer=str(tokenizer),
                  cache_dir=str(work / "cache"))
    shutil.rmtree(out, ignore_errors=True)
    mb = corpus.stat().st_size / MB
    print(f"[{size} MB rep {rep}] prepare: {r['seconds']:.1f}s = {mb / r['seconds']:.2f} MB/s, "
          f"{r['cpu_s'] / mb:.2f} CPU s/MB, peak RSS {r['peak_rss_mb']:.0f} MB (import {r['import_rss_mb']:.0f})",
          flush=True)
    return r


def measure_library(corpus: Path, tokenizer: Path, size: int, rep: int) -> dict:
    lib = run_child("library", corpus=str(corpus), tokenizer=str(tokenizer))
    print(f"[{size} MB rep {rep}] library: " + ", ".join(
        f"{k} {lib['bytes'][k] / MB:.0f} MB in {lib['seconds'][k]:.1f}s = {lib['mb_s'][k]:.2f} MB/s, "
        f"{lib['cpu_s_per_mb'][k]:.2f} CPU s/MB" for k in lib["seconds"]), flush=True)
    return lib


def median(values):
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 500], help="corpus sizes in MB (10**6 bytes)")
    ap.add_argument("--train-sizes", type=int, nargs="*", default=None,
                    help="also train a tokenizer on these corpora (default: the first size only)")
    ap.add_argument("--reps", type=int, nargs="+", default=[1],
                    help="repetitions per contender, one value for all corpora or one per --sizes (median shown)")
    ap.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--baseline-src", default=None,
                    help="also run 'prepare' on the first corpus with aoe imported from this source tree "
                         "(e.g. an older commit's src/, from git archive), for a before/after")
    ap.add_argument("--child", nargs=2, metavar=("TASK", "ARGS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        task, kwargs = args.child
        print(json.dumps(CHILDREN[task](**json.loads(kwargs))))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="aoe-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    train_sizes = [args.sizes[0]] if args.train_sizes is None else args.train_sizes
    if len(args.reps) not in (1, len(args.sizes)):
        ap.error(f"--reps takes one value or one per size ({len(args.sizes)}), got {len(args.reps)}")
    reps = dict(zip(args.sizes, args.reps * len(args.sizes) if len(args.reps) == 1 else args.reps))
    print(f"machine: {machine()}\nworkdir: {work}", flush=True)
    results: dict = {"machine": machine(), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                     "corpora": {}, "train": {}}
    try:
        corpora = {}
        for size in sorted(set(args.sizes) | set(train_sizes)):
            path = work / f"corpus_{size}mb.txt"
            if not path.is_file():
                t0 = time.perf_counter()
                write_corpus(path, size)
                print(f"wrote {path.name} ({path.stat().st_size / MB:.1f} MB) in {time.perf_counter() - t0:.0f}s",
                      flush=True)
            corpora[size] = path
        tokenizer = work / "tokenizer.json"
        for size in train_sizes:
            shutil.rmtree(work / f"cache_train_{size}", ignore_errors=True)  # train, do not reuse
            r = run_child("train", corpus=str(corpora[size]), cache_dir=str(work / f"cache_train_{size}"),
                          tokenizer_out=str(tokenizer) if size == train_sizes[0] else "")
            results["train"][size] = r
            print(f"train {size} MB: {r['seconds']:.1f}s, {size / r['seconds']:.2f} MB/s, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB (import {r['import_rss_mb']:.0f} MB), vocab {r['vocab_size']}", flush=True)
        if not tokenizer.is_file():
            run_child("train", corpus=str(corpora[args.sizes[0]]), cache_dir=str(work / "cache_train"),
                      tokenizer_out=str(tokenizer))

        for size in args.sizes:
            nbytes = corpora[size].stat().st_size
            runs: dict[str, list] = {"prepare": [], "library": []}
            for rep in range(reps[size]):
                order = ("prepare", "library") if rep % 2 == 0 else ("library", "prepare")
                for contender in order:
                    if contender == "prepare":
                        runs["prepare"].append(measure_prepare(work, corpora[size], tokenizer, size, rep))
                    else:
                        runs["library"].append(measure_library(corpora[size], tokenizer, size, rep))
            ours = nbytes / MB / median([r["seconds"] for r in runs["prepare"]])
            lib_rates = {k: median([r["mb_s"][k] for r in runs["library"]]) for k in runs["library"][0]["mb_s"]}
            results["corpora"][size] = {
                "bytes": nbytes, "runs": runs, "ours_mb_s": ours, "library_mb_s": lib_rates,
                "ours_cpu_s_per_mb": median([r["cpu_s"] for r in runs["prepare"]]) / (nbytes / MB),
                "library_cpu_s_per_mb": {k: median([r["cpu_s_per_mb"][k] for r in runs["library"]])
                                         for k in runs["library"][0]["cpu_s_per_mb"]},
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs["prepare"]),
                "import_rss_mb": median([r["import_rss_mb"] for r in runs["prepare"]]),
                "tokens": runs["prepare"][0]["tokens"], "forced_cuts": runs["prepare"][0]["forced_cuts"],
            }
        if args.baseline_src:
            size = args.sizes[0]
            out = work / "tokens_baseline"
            shutil.rmtree(out, ignore_errors=True)
            r = run_child("prepare", src=args.baseline_src, corpus=str(corpora[size]), out_dir=str(out),
                          tokenizer=str(tokenizer), cache_dir=str(work / "cache_baseline"))
            shutil.rmtree(out, ignore_errors=True)
            results["baseline"] = {"src": args.baseline_src, "size_mb": size, **r}
            print(f"[{size} MB] baseline prepare ({args.baseline_src}): {r['seconds']:.1f}s = "
                  f"{corpora[size].stat().st_size / MB / r['seconds']:.2f} MB/s, peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| corpus | tokens | ours MB/s | encode_batch MB/s | ours / encode_batch | encode_batch_fast MB/s "
          "| ours / fast | CPU s/MB: ours, batch, fast | peak RSS MB (import) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, c in results["corpora"].items():
        lib, cpu = c["library_mb_s"], c["library_cpu_s_per_mb"]
        fast = lib.get("encode_batch_fast", float("nan"))
        print(f"| {size} MB | {c['tokens']:,} | {c['ours_mb_s']:.2f} | {lib['encode_batch']:.2f} | "
              f"{c['ours_mb_s'] / lib['encode_batch']:.0%} | {fast:.2f} | {c['ours_mb_s'] / fast:.0%} | "
              f"{c['ours_cpu_s_per_mb']:.2f}, {cpu['encode_batch']:.2f}, {cpu.get('encode_batch_fast', float('nan')):.2f} | "
              f"{c['peak_rss_mb']:.0f} ({c['import_rss_mb']:.0f}) |")
    for size, r in results["train"].items():
        print(f"tokenizer training on {size} MB: {r['seconds']:.0f}s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(import {r['import_rss_mb']:.0f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
