"""The root of the exceptions that report the user's input, not a bug.

``InputError`` (a ``ValueError``) is raised for a config file or override, a command-line
option, a data file or a checkpoint to convert that cannot be used as given. Its message is one
line that names the file, key or value and says what to do; the ``aoe`` command prints it as
``error: ...`` (exit status 2) instead of a traceback. Its families::

    aoe.config.ConfigError                           config files, overrides, config values
    aoe.cli.CLIError                                 command-line options
    aoe.eval.multiple_choice.MultipleChoiceFormatError   multiple-choice JSON Lines files
    aoe.hf.convert.ConversionError                   Hugging Face checkpoints to convert

A plain ``ValueError`` (or any other exception) that escapes the library is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "one_line", "shown"]


class InputError(ValueError):
    """Input the user gave cannot be used; the message names it and says what to do."""


def one_line(text: object) -> str:
    """``text`` as one line: its lines joined by " | " (a parser's multi-line report, for example)."""
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


def shown(value: object, limit: int = 200) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters (a huge value stays a short line)."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's limit on digits for str()
        return f"<an integer of {value.bit_length()} bits>"
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
