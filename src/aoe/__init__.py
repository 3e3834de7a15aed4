"""autonomy-of-experts: Autonomy-of-Experts (AoE) and router-MoE layers, language models and training."""

from aoe.nn import AoE, DenseFFN, MoE, match_d_wide, total_aux_loss, update_selection_biases

__version__ = "0.1.0"
__all__ = ["AoE", "MoE", "DenseFFN", "match_d_wide", "total_aux_loss", "update_selection_biases", "__version__"]
