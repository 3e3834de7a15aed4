"""Markdown for the comparison report: number formatting and tables.

Every formatter writes an en dash for a value that is missing (None, NaN, inf, not a number), so a
failed run or a statistic a variant does not have never prints as "nan".
"""

from __future__ import annotations

from typing import Iterable, Sequence

from aoe.compare.report.stats import finite, is_number, mean, std

DASH = "–"


def fmt(x: object, digits: int = 3) -> str:
    """Fixed-point number, or an en dash for None/NaN/inf/non-numbers."""
    return f"{float(x):.{digits}f}" if is_number(x) else DASH


def fmt_signed(x: object, digits: int = 4) -> str:
    """Fixed-point with an explicit sign (a difference), or an en dash."""
    return f"{float(x):+.{digits}f}" if is_number(x) else DASH


def fmt_lr(x: object) -> str:
    """A learning rate in its shortest exact form (0.003, 1e-05), or an en dash."""
    return f"{float(x):g}" if is_number(x) else DASH


def fmt_si(x: object, digits: int = 2, unit: str = "") -> str:
    """1234567 -> '1.23 M' (K, M, G, T, P); en dash when missing."""
    if not is_number(x):
        return DASH
    v = float(x)
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.{digits}f} {prefix}{unit}".rstrip()
    return f"{v:.0f} {unit}".rstrip() if float(v).is_integer() else f"{v:.{digits}f} {unit}".rstrip()


def fmt_bytes(x: object) -> str:
    """Bytes in binary units (KiB, MiB, GiB); en dash when missing (e.g. not measured on CPU)."""
    if not is_number(x):
        return DASH
    v = float(x)
    for div, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v:.0f} B"


def fmt_mean_std(values: Sequence[object], digits: int = 4) -> str:
    """'mean ± std' over the finite values; just the value with one; en dash with none."""
    xs = finite(values)
    if not xs:
        return DASH
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(mean(xs), digits)} ± {fmt(std(xs), digits)}"


def escape(value: object) -> str:
    """A table cell: pipes escaped, newlines folded."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A markdown table; ``align`` has one letter per column, "l" or "r" (default: first left, rest right)."""
    cells = [[escape(c) for c in r] for r in rows]
    if align is None:
        align = "l" + "r" * (len(header) - 1)
    seps = [":--" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(seps) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def image(caption: str, rel_path: str) -> list[str]:
    """A captioned image: the caption in bold, then the image, each followed by a blank line."""
    return [f"**{caption}**", "", f"![{caption}]({rel_path})", ""]
