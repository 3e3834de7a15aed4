"""``aoe export`` and ``aoe convert`` registered from ``aoe.cli.hf_options``; where transformers is missing
or unusable, commands that say the 'hf' extra is needed."""

from __future__ import annotations

from aoe.cli.common import CLIError


def _add_hf_parsers(sub) -> None:
    """``aoe export`` and ``aoe convert`` (``aoe.cli.hf_options``; transformers is imported only when one
    runs); without transformers, or with one aoe cannot use, two commands that say they need it."""
    import importlib.util

    from aoe.cli.hf_options import add_convert_parser, add_export_parser

    if importlib.util.find_spec("transformers") is None:
        for name in ("export", "convert"):
            unavailable = _needs_hf("transformers is not installed")
            sub.add_parser(name, help="(needs transformers)").set_defaults(func=unavailable)
        return
    for add in (add_export_parser, add_convert_parser):
        parser = add(sub)
        parser.set_defaults(func=_reporting_missing_hf(parser.get_default("func")))


def _needs_hf(why: str):
    def unavailable(args):
        raise CLIError(f"this command needs the 'hf' extra (pip install 'autonomy-of-experts[hf]'): {why}")

    return unavailable


def _reporting_missing_hf(run):
    """``run``, with an ImportError of the Hugging Face modules (an incompatible transformers)
    reported as the missing 'hf' extra."""

    def guarded(args):
        try:
            from aoe.hf import commands  # noqa: F401  (imports transformers)
        except ImportError as e:
            _needs_hf(str(e))(args)
        return run(args)

    return guarded
