"""autonomy-of-experts: Autonomy-of-Experts (AoE) and router-MoE layers, language models and training."""

import importlib.util as _importlib_util

__version__ = "0.1.0"
__all__ = ["AoE", "MoE", "DenseFFN", "match_d_wide", "total_aux_loss", "update_selection_biases", "__version__"]
_FROM_NN = frozenset(__all__) - {"__version__"}


def __getattr__(name: str):
    """``aoe.AoE`` and the other layer names, imported from ``aoe.nn`` (and so torch) on first use:
    ``import aoe`` itself, and the ``aoe`` command's ``--help``, stay quick."""
    if name in _FROM_NN:
        import aoe.nn

        return getattr(aoe.nn, name)
    raise AttributeError(f"module 'aoe' has no attribute {name!r}")



def _register_hf_classes() -> None:
    """Import aoe.hf (which registers the classes); a failure there must not break importing
    transformers, so it becomes a warning."""
    try:
        import aoe.hf  # noqa: F401
    except Exception as e:  # an incompatible transformers, say: the rest of aoe still works
        import warnings

        warnings.warn(f"aoe: could not register AoEConfig/AoEForCausalLM with transformers: {e}", stacklevel=2)


# With transformers installed, `import aoe` registers AoEConfig / AoEForCausalLM with AutoConfig and
# AutoModelForCausalLM (model_type "aoe"), so saved directories load without trust_remote_code. The
# registration waits until transformers is imported (by you or a library), so that `import aoe`
# does not pay for importing transformers.
if _importlib_util.find_spec("transformers") is not None:
    from aoe.utils.post_import import when_imported as _when_imported

    _when_imported("transformers", _register_hf_classes)
