"""Cut long texts into pieces that a GPT-2 style byte-level BPE encodes exactly as the whole text.

A byte-level BPE never merges across a boundary of its pre-tokenizer, so encoding the pieces of a
text one by one and concatenating the ids gives the ids of the whole text whenever every cut is
a boundary the pre-tokenizer would have made in the whole text anyway, and the pieces are
pre-tokenized exactly as that part of the whole text. That holds for the GPT-2 pattern

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

(``pre_tokenizers.ByteLevel(use_regex=True)``) at a cut between characters ``a | b`` when no
alternative can match ``a`` and ``b`` together and ``a`` is not whitespace (the only lookahead,
``(?!\\S)``, ends a run of whitespace). The pattern has no lookbehind, so the text after the cut is
matched as if it started there. :data:`SAFE_CUT` finds such cuts, using only classes that Python
and the tokenizer's regex engine agree on:

* ``a`` any non-whitespace character, ``b`` an ASCII space, tab, newline or carriage return
  (Python's whitespace set contains the regex engine's, so a Python non-space is a non-space there);
* ``a`` an ASCII letter, ``b`` an ASCII digit or punctuation;
* ``a`` an ASCII digit, ``b`` an ASCII letter or punctuation;
* ``a`` ASCII punctuation other than ``'``, ``b`` an ASCII letter or digit; ``a = '``, ``b`` a digit
  (``'`` before a letter may start a contraction such as ``'s``).

When a stretch of ``max_piece_chars`` characters holds no such cut (a megabyte without an ASCII
space or line break after a visible character and without any ASCII letter/digit/punctuation
change, e.g. one enormous run of letters, of whitespace or of CJK text without spaces), the text
is cut there anyway: a *forced* cut. Only then can the ids differ from encoding the whole text:
the pre-token that spans the cut is encoded as two pre-tokens (it can not merge across the cut),
and the pre-tokens next to it may be split differently (a run of whitespace before the cut, for
instance). The tokens still decode to exactly the original text. A tokenizer trained on such a
text counts those one or two pre-tokens differently too. Forced cuts are reported through
``on_forced`` (and counted in the token manifest as ``forced_cuts``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from aoe.data.errors import DataError

__all__ = ["ChunkSizes", "DEFAULT_CHUNK_SIZES", "SAFE_CUT", "ForcedCuts", "split_pieces"]

log = logging.getLogger(__name__)

_PUNCT = r"!-/:-@\[-`{-~"  # every ASCII punctuation character
_PUNCT_NO_QUOTE = r"!-&(-/:-@\[-`{-~"  # the same without '
#: Matches the character before a safe cut; the cut is at ``match.end()`` (the lookahead is the
#: character after it). See the module docstring for why each alternative is safe.
SAFE_CUT = re.compile(
    r"\S(?=[ \t\n\r])"
    rf"|[A-Za-z](?=[0-9{_PUNCT}])"
    rf"|[0-9](?=[A-Za-z{_PUNCT}])"
    rf"|[{_PUNCT_NO_QUOTE}](?=[A-Za-z0-9])"
    r"|'(?=[0-9])"
)


@dataclass(frozen=True)
class ChunkSizes:
    """How much text the streaming data pipeline holds at once.

    read_bytes: bytes read from a file per read (a file up to this size is read whole).
    piece_chars / max_piece_chars: a text longer than ``max_piece_chars`` characters is cut into
    pieces of at least ``piece_chars`` and at most ``max_piece_chars`` characters (at the first
    safe cut after ``piece_chars``; a forced cut at ``max_piece_chars`` when there is none).
    batch_chars / batch_pieces: one ``encode_batch`` call takes pieces until either is reached.
    """

    read_bytes: int = 1 << 20
    piece_chars: int = 1 << 14
    max_piece_chars: int = 1 << 20
    batch_chars: int = 2 << 20
    batch_pieces: int = 1024

    def __post_init__(self) -> None:
        for name in ("read_bytes", "piece_chars", "max_piece_chars", "batch_chars", "batch_pieces"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"ChunkSizes.{name} must be a positive int, got {value!r}")
        if self.max_piece_chars < self.piece_chars:
            raise DataError(f"ChunkSizes.max_piece_chars={self.max_piece_chars} is smaller than "
                            f"piece_chars={self.piece_chars}")


DEFAULT_CHUNK_SIZES = ChunkSizes()


def _cut(text: str, start: int, sizes: ChunkSizes) -> tuple[int, bool]:
    """(end of the piece that starts at ``start``, forced?); needs ``len(text) > start + max_piece_chars``."""
    limit = start + sizes.max_piece_chars
    found = SAFE_CUT.search(text, start + sizes.piece_chars - 1, limit + 1)
    if found is None:
        return limit, True
    return found.end(), False


def split_pieces(chunks: Iterable[str], sizes: ChunkSizes = DEFAULT_CHUNK_SIZES,
                 on_forced: Callable[[int], None] | None = None) -> Iterator[str]:
    """The text ``"".join(chunks)`` as consecutive non-empty pieces (see :class:`ChunkSizes`).

    Holds at most one chunk plus ``max_piece_chars`` characters. ``on_forced(offset)`` is called
    with the character offset of every forced cut.
    """
    buf, pos, consumed = "", 0, 0  # consumed: characters of the text before buf
    for chunk in chunks:
        if not chunk:
            continue
        if pos:
            consumed += pos
            buf, pos = buf[pos:], 0
        buf = buf + chunk if buf else chunk
        while len(buf) - pos > sizes.max_piece_chars:
            end, forced = _cut(buf, pos, sizes)
            if forced and on_forced is not None:
                on_forced(consumed + end)
            yield buf[pos:end]
            pos = end
    if len(buf) > pos:
        yield buf[pos:]


class ForcedCuts:
    """Counts forced cuts (``count``) and the documents that had any (``documents``); warns once
    per document. ``callback(name)`` is the ``on_forced`` of :func:`split_pieces` for one document."""

    def __init__(self, sizes: ChunkSizes = DEFAULT_CHUNK_SIZES) -> None:
        self.sizes = sizes
        self.count = 0
        self.documents = 0

    def callback(self, name: str) -> Callable[[int], None]:
        first = True

        def note(offset: int) -> None:
            nonlocal first
            self.count += 1
            if first:
                first = False
                self.documents += 1
                log.warning("%s: no safe place to cut its text within %d characters before offset %d; cut there "
                            "anyway, so its tokens next to the cut may differ from encoding it whole "
                            "(see aoe.data.chunks)", name, self.sizes.max_piece_chars - self.sizes.piece_chars, offset)

        return note
