"""The Definitions section (what every number of the report means) and the Notes section."""

from __future__ import annotations

from aoe.compare.report.figures import Figures
from aoe.compare.report.stats import VERDICT_RULE
from aoe.compare.report.study import Study

PEAK_MEMORY = (
    "the peak bytes of one micro-batch forward + backward (loss + aux loss) of the trained model, measured "
    "after training: parameters plus the most activations, temporaries and gradients alive at once; "
    "optimizer state is not included. On CUDA it is the allocator's peak (torch.cuda.max_memory_allocated "
    "after a reset); on CPU the peak of live tensor bytes counted by aoe.utils.memory.TensorMemoryTracker "
    "(no allocator overhead); – where it was not recorded"
)
FLOPS = (
    "matrix-multiply FLOPs of one training step per token, counted analytically as 3 × the forward "
    "matmul FLOPs (2 FLOPs per multiply-add; backward ≈ 2 × forward). Only the k chosen experts' "
    "matmuls count, plus the router, or for AoE the W_down of all n experts, plus attention and the "
    "output projection"
)

ITEMS = [
    ("Val loss", "mean next-token cross entropy in nats over the held-out validation windows, measured at "
                 "the end of training; the headline shows mean ± sample standard deviation over the completed "
                 "seeds (just the value with one seed)"),
    ("Perplexity", "exp(val loss), per run; the headline shows the mean over seeds of the runs' values"),
    ("Bits per byte", "val_loss / ln 2 / bytes_per_token, with bytes_per_token the mean UTF-8 bytes per "
                      "token of the validation text; mean over seeds"),
    ("Ent_load", "per layer, -Σ_i q_i log q_i with q_i the share of (token, slot) assignments given to "
                 "expert i, measured on validation batches at the end of training; maximum log E "
                 "(perfectly balanced, E experts); higher is more balanced. The headline shows the mean over "
                 "layers, then over seeds. This definition is this project's (the paper's formula is not public)"),
    ("Ent_conf", "per layer, the mean over tokens of -Σ_i p_i log p_i, where p is the softmax over all E "
                 "selection scores (router logits for MoE, activation norms for AoE); 0 is a one-hot choice, "
                 "log E a uniform one; lower is a more confident choice. Headline: mean over layers, then seeds. "
                 "This project's definition as well"),
    ("Max/mean load (imbalance)", "per layer, max_i (tokens to expert i) / mean_i (tokens per expert); "
                                  "1 is perfectly balanced; headline: mean over layers, then seeds"),
    ("Gate weight (top-1, top-2)", "gate_weight_mean[j], per layer: the mean over tokens of the j-th largest "
                                   "of a token's k chosen gate weights (top-1: the largest). Without "
                                   "renormalization the k chosen weights sum to less than 1: their sum (Σ gate "
                                   "weights) is how much of the chosen experts' output reaches the residual "
                                   "stream; renormalized (the paper's Algorithm 2, and the default), they sum to 1"),
    ("Dead experts", "per layer, the number of experts that received no token in the logged window: the "
                     "validation batches at the end of training in the tables, each logged training window in "
                     "the curves; summaries show the mean over layers"),
    ("Params total", "all parameters of the model, embeddings included (tied embeddings counted once)"),
    ("Params active", "parameters used for one token: the expert weights of the k chosen experts only; the "
                      "router, and AoE's W_down of all experts (every expert computes x W_down), count in full, "
                      "as do attention, norms and embeddings"),
    ("FLOPs/token", None),
    ("Tokens/s", "training tokens processed per second of wall-clock training time (excluding evaluation "
                 "where the runner separates it); mean over seeds"),
    ("Peak memory", None),
    ("Unigram baseline", "unigram_entropy: the entropy of the validation tokens under their own unigram "
                         "distribution; unigram_cross_entropy: the validation cross entropy of the training "
                         "set's unigram distribution, i.e. the val loss of a model that ignores all context. "
                         "A language model should be well below it"),
    ("Mean, std, standard error", "mean over completed seeds; std is the sample standard deviation "
                                  "(n − 1 in the denominator); standard error = std / √n"),
    ("Learning rate (lr)", "the peak learning rate of the schedule. With a learning-rate sweep, each variant "
                           "trained a short run at each lr of the sweep (one seed) and its main runs use the lr "
                           "with the lowest validation loss at the end of that short run; without one, every run "
                           "uses the base config's train.lr"),
    ("Baseline", "the variant another is compared against, as results.json names it; in files written before "
                 "it was recorded, every sparse variant is compared against `moe` and dense variants against "
                 "none"),
    ("Gap over training", "at each evaluation step, the variant's validation loss minus its baseline's, taken "
                          "per seed both completed (same seed: same data order), then the mean over those "
                          "seeds; band: min–max over them"),
    ("Smoothing", None),
    ("Verdict rule", VERDICT_RULE),
]


def smoothing_note(beta: float) -> str:
    return (f"training-loss curves are smoothed with a debiased exponential moving average, "
            f"s_t = β s_(t−1) + (1 − β) x_t divided by (1 − β^t), β = {beta} (chosen from the number of "
            f"logged points: 0.5 below 15, 0.8 below 50, 0.9 below 200, else 0.95); validation curves are not "
            f"smoothed; bands are the min–max over seeds")


def definitions(study: Study, figures: Figures) -> list[str]:
    custom = study.results.definitions
    device = str(study.results.machine.get("device") or "")
    on_device = f" (device of this study: {device})" if device else ""
    filled = {
        "FLOPs/token": custom.get("flops_per_token", FLOPS),
        "Peak memory": custom.get("peak_memory", PEAK_MEMORY) + on_device,
        "Smoothing": smoothing_note(figures.beta),
    }
    return ["## Definitions", "", *(f"- **{k}**: {filled.get(k, v)}." for k, v in ITEMS), ""]


def notes(study: Study) -> list[str]:
    if not study.notes:
        return []
    return ["## Notes", "", *(f"- {n}" for n in study.notes), ""]
