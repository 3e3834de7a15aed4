"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A corpus, tokenizer or token file is missing, empty, malformed or inconsistent.

    Messages name the offending path or value so the fix is obvious from the message alone.
    """
