"""autonomy-of-experts: Autonomy-of-Experts (AoE) and router-MoE layers, language models and training."""

import importlib.util as _importlib_util

from aoe.nn import AoE, DenseFFN, MoE, match_d_wide, total_aux_loss, update_selection_biases

__version__ = "0.1.0"
__all__ = ["AoE", "MoE", "DenseFFN", "match_d_wide", "total_aux_loss", "update_selection_biases", "__version__"]



def _register_hf_classes() -> None:
    import aoe.hf  # noqa: F401  (registers on import)


# With transformers installed, `import aoe` registers AoEConfig / AoEForCausalLM with AutoConfig and
# AutoModelForCausalLM (model_type "aoe"), so saved directories load without trust_remote_code. The
# registration waits until transformers is imported (by you or a library), so that `import aoe`
# does not pay for importing transformers.
if _importlib_util.find_spec("transformers") is not None:
    from aoe.utils.post_import import when_imported as _when_imported

    _when_imported("transformers", _register_hf_classes)
