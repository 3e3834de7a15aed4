"""The options both sparse layers take, declared once: ``SparseOptions``.

``MoE`` and ``AoE`` take these as keyword arguments besides their own (``inspect.signature(MoE)``
lists them: ``with_sparse_options``), and ``SparseFFN`` checks them here (``SparseOptions.check``)
and keeps each as the layer attribute of the same name. Whatever else describes a layer reads
them from here: ``aoe.nn.configs`` builds its layer configs from the layers' signatures, and
``aoe.config.ModelConfig`` maps its flat ``model.*`` keys onto these fields by name (``CONFIG_KEYS``
holds the one key spelled otherwise) and reports a bad value through ``check``. So an option
added here reaches the layers, the layer configs and the run config's mapping and validation.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

from aoe.nn.factorized import GATE_INITS
from aoe.nn.grouped_mm import BACKENDS as GROUPED_MM_BACKENDS
from aoe.nn.selection import SELECTIONS

__all__ = ["SparseOptions", "OptionError", "CONFIG_KEYS", "EC_INFERENCE", "with_sparse_options"]

EC_INFERENCE = ("top_k", "expert_choice")

#: The ``model.*`` key of an option whose run-config name differs from its field name here.
CONFIG_KEYS = {"shared_gate": "shared_expert_gate"}


class OptionError(ValueError):
    """A bad option value: ``name`` (the field), ``why`` (the rule it breaks, naming other keys as
    the ``key`` function of ``SparseOptions.check`` spells them)."""

    def __init__(self, name: str, value: Any, why: str, key: Callable[[str], str] = str):
        super().__init__(f"{key(name)}={value!r} {why}")
        self.name, self.value, self.why = name, value, why


@dataclass(frozen=True)
class SparseOptions:
    """The options ``MoE`` and ``AoE`` share; the defaults are the layers' (see ``SparseFFN``)."""

    #: Divide the chosen experts' softmax values by their sum (the paper's Algorithm 2; Mixtral).
    renormalize: bool = True
    #: Weight of the load-balancing loss ``E * sum_i f_i P_i`` (0 = off; the paper: 0.01).
    aux_loss_coef: float = 0.0
    #: Aux-loss-free balancing: step size of the per-expert selection bias (0 = off).
    bias_update_rate: float = 0.0
    #: Weight of Ent_conf, the mean entropy of the selection softmax, as a loss (0 = off; the paper
    #: trains Top-P with 1e-4); any rule.
    entropy_loss_coef: float = 0.0
    #: Grouped-matmul backend of the expert engine: "auto" | "torch" | "loop" (``aoe.nn.grouped_mm``).
    grouped_mm: str = "auto"
    #: Blocks of sorted rows the expert backward runs over (bounds its temporaries); None =
    #: ``clamp(S // (256 * E), 1, 4)`` (``aoe.nn.experts``).
    backward_chunks: int | None = None
    #: Std of the normal init of every weight (a factorized gate's w_up: see gate_init).
    init_std: float = 0.02
    #: How a factorized gate starts: "balanced" (w_up ~ N(0, 1/rank)) or "normal" (the authors':
    #: every factor ~ N(0, init_std)); ``aoe.nn.factorized``.
    gate_init: str = "balanced"
    #: How experts are chosen (``aoe.nn.selection``): "top_k", "top_p" (dynamic k) or
    #: "expert_choice" (each expert takes its best tokens of a sequence).
    selection: str = "top_k"
    #: top_p's threshold of cumulative probability, in (0, 1] (None = top_k / n_experts, which
    #: never takes more than top_k experts).
    top_p: float | None = None
    #: top_p's least experts per token.
    min_k: int = 1
    #: top_p's most experts per token (None = n_experts).
    max_k: int | None = None
    #: expert_choice: each expert takes ``C = ceil(capacity_factor * n * top_k / E)`` tokens of a
    #: sequence of n (1 = top-k's compute).
    capacity_factor: float = 1.0
    #: expert_choice outside training: "top_k" (routes each token by itself, as generation needs)
    #: or "expert_choice" (leaks later tokens into a causal LM's routing).
    ec_inference: str = "top_k"
    #: Always-active SwiGLU experts every token uses besides its chosen ones (``aoe.nn.shared``).
    n_shared_experts: int = 0
    #: Width of one shared expert (None = the layer's expert width).
    d_shared: int | None = None
    #: Scale the shared experts' output by ``sigmoid(x @ gate)`` (Qwen2-MoE).
    shared_gate: bool = False

    def check(self, n_experts: int, key: Callable[[str], str] = str) -> "SparseOptions":
        """These options, checked for a layer of ``n_experts`` experts (``OptionError`` on the first
        bad one; ``key`` spells an option's name in the message, e.g. as a run-config key)."""
        for rule in (self._check_numbers, self._check_choices, self._check_selection, self._check_shared):
            problem = rule(n_experts, key)
            if problem is not None:
                raise OptionError(problem[0], getattr(self, problem[0]), problem[1], key)
        return self

    def _check_numbers(self, n_experts: int, key) -> tuple[str, str] | None:
        for name in ("aux_loss_coef", "bias_update_rate", "entropy_loss_coef", "init_std"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) < math.inf:
                return name, "must be a finite number >= 0"
        if self.backward_chunks is not None and not _is_int(self.backward_chunks, 1):
            return "backward_chunks", "must be a positive integer (None = automatic)"
        return None

    def _check_choices(self, n_experts: int, key) -> tuple[str, str] | None:
        for name, what, choices in (("grouped_mm", "a backend", GROUPED_MM_BACKENDS), ("gate_init", "an init", GATE_INITS),
                                    ("selection", "a rule", SELECTIONS), ("ec_inference", "a rule", EC_INFERENCE)):
            if getattr(self, name) not in choices:
                return name, f"is not {what}; choose one of {list(choices)}"
        return None

    def _check_selection(self, n_experts: int, key) -> tuple[str, str] | None:
        E = f"{key('n_experts')}={n_experts}"
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            return "top_p", "must be in (0, 1] (unset = top_k / n_experts)"
        if not _is_int(self.min_k, 1):
            return "min_k", f"must be an integer in [1, {E}]"
        if self.min_k > n_experts:
            return "min_k", f"exceeds {E}"
        if self.max_k is not None and not (_is_int(self.max_k, self.min_k) and self.max_k <= n_experts):
            return "max_k", f"must be in [{key('min_k')}={self.min_k}, {E}] (unset = n_experts)"
        if not _is_number(self.capacity_factor) or not 0 < self.capacity_factor < math.inf:
            return "capacity_factor", "must be a positive number"
        if self.selection == "expert_choice" and self.bias_update_rate > 0:
            return "bias_update_rate", ("has no effect with selection='expert_choice' (each expert takes its C "
                                        "tokens whatever a per-expert bias); set it to 0")
        return None

    def _check_shared(self, n_experts: int, key) -> tuple[str, str] | None:
        if not _is_int(self.n_shared_experts, 0):
            return "n_shared_experts", "must be an integer >= 0"
        if self.n_shared_experts == 0 and (self.d_shared is not None or self.shared_gate):
            name = "d_shared" if self.d_shared is not None else "shared_gate"
            return name, f"is set, but shared experts need {key('n_shared_experts')} >= 1"
        if self.d_shared is not None and not _is_int(self.d_shared, 1):
            return "d_shared", "must be a positive integer (None = the expert width)"
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


NAMES = tuple(f.name for f in dataclasses.fields(SparseOptions))


def with_sparse_options(init):
    """Decorate a sparse layer's ``__init__(self, ..., **options)`` so that its signature lists
    the ``SparseOptions`` fields as keyword arguments with their defaults (for ``help``,
    ``inspect.signature`` and ``aoe.nn.configs``); the layer's own arguments come first, and a
    keyword the layer declares itself keeps the layer's default."""
    sig = inspect.signature(init)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in own}
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
             for f in dataclasses.fields(SparseOptions) if f.name not in taken]
    init.__signature__ = sig.replace(parameters=[*own, *extra])
    return init
