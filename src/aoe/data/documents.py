"""What a corpus source yields: ``Document`` (a name, its UTF-8 size, its text in chunks, read
again on every call) and ``DocStats``, the counters an iteration fills (``aoe.data.sources``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

__all__ = ["DocStats", "Document"]


@dataclass
class DocStats:
    """Counters filled while a source is iterated.

    documents: non-empty documents yielded; bytes: their total UTF-8 size; empty: whitespace-only
    documents dropped; decode_replaced / decode_skipped: documents with undecodable bytes that
    were decoded with U+FFFD / dropped; binary_skipped: files skipped because they look binary;
    capped: iteration stopped early at ``max_bytes``.
    """

    documents: int = 0
    bytes: int = 0
    empty: int = 0
    decode_replaced: int = 0
    decode_skipped: int = 0
    capped: bool = False
    binary_skipped: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class Document:
    """One non-empty document of a source.

    name: where it comes from (a path, ``path:line`` or ``spec[i]``), for messages. nbytes: the
    UTF-8 size of its text. :meth:`chunks`: its text as consecutive non-empty strings (a file is
    read again on every call); :meth:`text`: the whole text as one string.
    """

    __slots__ = ("name", "nbytes", "_chunks")

    def __init__(self, name: str, nbytes: int, chunks: Callable[[], Iterable[str]]) -> None:
        self.name = name
        self.nbytes = nbytes
        self._chunks = chunks

    @classmethod
    def from_text(cls, name: str, text: str, nbytes: int) -> "Document":
        return cls(name, nbytes, lambda: (text,))

    def chunks(self) -> Iterator[str]:
        return iter(self._chunks())

    def text(self) -> str:
        return "".join(self.chunks())

    def __repr__(self) -> str:
        return f"Document(name={self.name!r}, nbytes={self.nbytes})"
