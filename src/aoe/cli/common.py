"""What every ``aoe`` command shares: the usage error (``error: ...``, exit status 2) and the checks
of a flag's value, the --device and a model's tokenizer."""

from __future__ import annotations

from aoe.errors import InputError


class CLIError(InputError):
    """A usage problem reported as ``error: ...`` with exit status 2."""


def _check(ok: bool, flag: str, value, rule: str) -> None:
    """Refuse a command-line value that breaks ``rule``, naming the flag."""
    if not ok:
        raise CLIError(f"{flag} {value} {rule}")


def _device(name: str | None) -> str:
    """The --device to use: the given torch device, checked, or cuda when available, else cpu."""
    from aoe.utils.device import resolve_device

    return str(resolve_device(name, error=CLIError))


def _check_tokenizer(loaded) -> None:
    """A model's tokenizer (``aoe.io.models.LoadedModel``) must exist and give ids its model has
    embeddings for."""
    if loaded.tokenizer is None:
        raise CLIError(f"{loaded.tokenizer_missing}: cannot encode text for this model")
    vocab, size = loaded.model.config.vocab_size, loaded.tokenizer.vocab_size
    if size > vocab:
        raise CLIError(f"{loaded.path}: its tokenizer has {size} tokens, more than the model's "
                       f"vocab_size={vocab}: the tokenizer.json does not belong to this model")
