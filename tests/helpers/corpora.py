"""Small real corpora in temporary directories: text files of a few words, and the files a
directory source must skip."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the model routes each token to experts that pick themselves by the norm of their "
         "internal activations def return import class self value index batch while for").split()


def make_text(seed: int, n_words: int = 200) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(max(1, n_words // 10)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(10)))
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, n_files: int = 20, n_words: int = 200) -> list[Path]:
    """n_files .txt/.md/.py files in root and root/sub, plus files that must be ignored."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    paths = []
    for i in range(n_files):
        ext = (".txt", ".md", ".py")[i % 3]
        path = (root / "sub" if i % 2 else root) / f"doc{i:03d}{ext}"
        path.write_text(make_text(i, n_words), encoding="utf-8")
        paths.append(path)
    (root / "ignored.bin").write_bytes(b"\x00\x01binary")
    (root / ".hidden").mkdir(exist_ok=True)
    (root / ".hidden" / "secret.txt").write_text("hidden text\n")
    return paths
