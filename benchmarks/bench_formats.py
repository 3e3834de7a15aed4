"""Record corpora per format: peak memory and rate of reading them, and of tokenizing them.

    python benchmarks/bench_formats.py --read-mb 500 --prepare-mb 500

One corpus of records (documents of 2 to 8 KB of shuffled standard-library source lines, seeded),
written as ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` and ``.parquet`` (the last two when
``zstandard`` / ``pyarrow`` are installed). Each measurement runs in a fresh child process; its
peak resident set size is that process's high-water mark (``ru_maxrss``), "import" its RSS right
after the imports.

- read: every document of ``aoe.data.Source(file).stream()``, every chunk of its text taken (what
  tokenization reads), on the ``--read-mb`` corpus. MB/s = text bytes / wall time.
- prepare: ``prepare_tokens(file, tokenizer_path=...)`` (a tokenizer trained once on the plain
  JSON Lines file, vocab 4096) on the ``--prepare-mb`` corpus; the SHA-256 of ``train.bin`` and
  ``val.bin`` shows that every format gives the same tokens.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stdlib_lines(seed: int = 0) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    lines = [line for path in sorted(root.glob("*.py")) for line in path.read_text(errors="replace").splitlines()]
    random.Random(seed).shuffle(lines)
    return lines


def _records(megabytes: int):
    """Records {"id", "text"} of shuffled stdlib lines until ``megabytes`` MB of text."""
    lines, rng = _stdlib_lines(), random.Random(1)
    total, i, at = 0, 0, 0
    while total < megabytes * 10**6:
        size, doc = rng.randint(2000, 8000), []
        while sum(map(len, doc)) < size:
            doc.append(lines[at % len(lines)])
            at += 1
        text = "\n".join(doc) + "\n"
        total += len(text.encode("utf-8"))
        yield {"id": i, "text": text}
        i += 1


def write_corpora(directory: Path, megabytes: int) -> list[Path]:
    """The corpus in every available format, streamed to disk (never held whole)."""
    directory.mkdir(parents=True, exist_ok=True)
    plain, gz = directory / "corpus.jsonl", directory / "corpus.jsonl.gz"
    with open(plain, "w", encoding="utf-8") as f, gzip.open(gz, "wt", encoding="utf-8", compresslevel=6) as g:
        for record in _records(megabytes):
            line = json.dumps(record, ensure_ascii=False) + "\n"
            f.write(line)
            g.write(line)
    written = [plain, gz]
    try:
        import zstandard

        with open(plain, "rb") as src, open(directory / "corpus.jsonl.zst", "wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
        written.append(directory / "corpus.jsonl.zst")
    except ImportError:
        pass
    try:
        written.append(_write_parquet(plain, directory / "corpus.parquet"))
    except ImportError:
        pass
    return written


def _write_parquet(plain: Path, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer, open(plain, encoding="utf-8") as f:
        batch = []
        for line in f:
            batch.append(json.loads(line))
            if len(batch) == 5000:
                writer.write_table(pa.Table.from_pylist(batch, schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema))
    return path


def child_read(path: str) -> dict:
    from aoe.data import Source

    imported = _peak_mb()
    start, nbytes, docs = time.perf_counter(), 0, 0
    for doc in Source(path).stream():
        docs += 1
        nbytes += sum(len(chunk.encode("utf-8")) for chunk in doc.chunks())
    seconds = time.perf_counter() - start
    return {"docs": docs, "mb": nbytes / 1e6, "mb_s": nbytes / 1e6 / seconds, "peak": _peak_mb(), "import": imported}


def child_prepare(path: str, out: str, tokenizer: str) -> dict:
    from aoe.data import prepare_tokens

    imported = _peak_mb()
    start = time.perf_counter()
    data = prepare_tokens(path, out, tokenizer_path=tokenizer)
    seconds = time.perf_counter() - start
    digest = {s: hashlib.sha256((Path(out) / f"{s}.bin").read_bytes()).hexdigest()[:12] for s in ("train", "val")}
    return {"tokens": int(len(data.train) + len(data.val)), "s": seconds, "peak": _peak_mb(), "import": imported,
            **digest}


def child_train(path: str, out: str) -> dict:
    from aoe.data import Source
    from aoe.data.tokenizer import train_tokenizer

    train_tokenizer(Source(path).documents(max_bytes=20 * 10**6), vocab_size=4096).save(out)
    return {}


def _in_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--read-mb", type=int, default=500)
    ap.add_argument("--prepare-mb", type=int, default=50)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        task, *rest = args.child
        print(json.dumps({"read": child_read, "prepare": child_prepare, "train": child_train}[task](*rest)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-formats-"))
    print(f"| format | file MB | docs | text MB | read MB/s | read peak RSS MB (import) |\n|---|---|---|---|---|---|")
    read = write_corpora(work / "read", args.read_mb)
    for path in read:
        r = _in_child("read", str(path))
        print(f"| {path.name[len('corpus'):]} | {path.stat().st_size / 1e6:.0f} | {r['docs']:,} | {r['mb']:.0f} | "
              f"{r['mb_s']:.1f} | {r['peak']:.0f} ({r['import']:.0f}) |", flush=True)
    small = read if args.prepare_mb == args.read_mb else write_corpora(work / "prepare", args.prepare_mb)
    tokenizer = work / "tokenizer"
    _in_child("train", str(small[0]), str(tokenizer))
    print("\n| format | tokens | prepare s | prepare peak RSS MB (import) | train.bin / val.bin sha256 |\n"
          "|---|---|---|---|---|")
    for path in small:
        r = _in_child("prepare", str(path), str(work / ("tok" + path.name)), str(tokenizer / "tokenizer.json"))
        print(f"| {path.name[len('corpus'):]} | {r['tokens']:,} | {r['s']:.0f} | {r['peak']:.0f} ({r['import']:.0f}) | "
              f"{r['train']} / {r['val']} |", flush=True)


if __name__ == "__main__":
    main()
