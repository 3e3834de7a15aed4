"""The Hugging Face architectures ``aoe convert`` reads, as a table, and how their checkpoints are read.

Adding an architecture is adding a row to ``ARCHS`` (and a test): what kind of FFN it has, the
config.json fields of its expert count and width, its q/k norm, its q/k/v biases, its shared
expert, its default gate renormalization, which layers stay dense, and any check of its own.
Every architecture here has the Llama layout of the weights around the FFN; the rows of
``GLOBAL_KEYS``, ``LAYER_KEYS``, ``QK_NORM_KEYS``, ``QKV_BIAS_KEYS`` and ``SHARED_EXPERT_KEYS``
map the native key (``{i}``: the layer) to the source key. The FFN weights are read by
``sparse_ffn`` (per-expert ``experts.{e}.{gate,up,down}`` under ``EXPERT_NAMES``, or the fused
layout), ``router_key`` and ``dense_ffn``. A source tensor none of these reads is refused by the
converter (nothing is dropped silently but the router of an AoE conversion).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from aoe.errors import InputError, one_line


class ConversionError(InputError):
    """A source, destination or option ``convert_to_aoe`` cannot use; the message names the file,
    tensor or option and says why. A ``ValueError``."""


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
def _none(cfg) -> list[int]:
    return []


def _no_check(cfg, src: Path) -> None:
    return None


def _norm_topk_prob(cfg) -> bool:
    return bool(getattr(cfg, "norm_topk_prob", False))


def _false(cfg) -> bool:
    return False


def _no_clip_qkv(cfg, src: Path) -> None:
    if getattr(cfg, "clip_qkv", None) is not None:
        raise ConversionError(f"olmoe source {str(src)!r}: clip_qkv={cfg.clip_qkv} (queries, keys and values clamped); "
                              "the native attention does not clip")


@dataclass(frozen=True)
class SourceArch:
    """How one architecture's checkpoint maps onto the native model.

    sparse: an MoE source (its experts are kept, its router dropped) or a dense one (upcycled).
    experts_field / width_field: the config.json fields of the expert count and the expert (or
    dense FFN) width. qk_norm: the native ``qk_norm`` its q/k RMSNorms become. renormalize: the
    default gate renormalization from the source config (sparse sources). dense_layers: the
    layers whose MLP is dense in a sparse source (kept dense). check: refusals of its own.
    qkv_bias: whether its q/k/v projections have biases (native ``attn_qkv_bias``).
    shared_width_field: the config.json field of the width of its one shared expert (None: it
    has none); shared_gate: that expert's output is scaled by a sigmoid gate (Qwen2-MoE).
    """

    model_type: str
    sparse: bool
    width_field: str = "intermediate_size"
    experts_field: str | None = None
    qk_norm: str = "none"
    renormalize: Callable[[Any], bool] = _norm_topk_prob
    dense_layers: Callable[[Any], list[int]] = _none
    check: Callable[[Any, Path], None] = _no_check
    qkv_bias: Callable[[Any], bool] = _false
    shared_width_field: str | None = None
    shared_gate: bool = False


def _qwen_dense_layers(cfg) -> list[int]:
    """The Qwen2-MoE / Qwen3-MoE layers whose MLP is dense (transformers' rule: sparse iff the layer
    is not in ``mlp_only_layers`` and (layer + 1) % decoder_sparse_step == 0)."""
    mlp_only = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return [i for i in range(cfg.num_hidden_layers) if i in mlp_only or (i + 1) % step != 0]


ARCHS: dict[str, SourceArch] = {a.model_type: a for a in (
    SourceArch("mixtral", True, experts_field="num_local_experts", renormalize=lambda cfg: True),
    SourceArch("qwen3_moe", True, "moe_intermediate_size", "num_experts", qk_norm="head", dense_layers=_qwen_dense_layers),
    SourceArch("olmoe", True, experts_field="num_experts", qk_norm="full", check=_no_clip_qkv),
    SourceArch("llama", False),
    SourceArch("mistral", False),
    SourceArch("qwen2_moe", True, "moe_intermediate_size", "num_experts", dense_layers=_qwen_dense_layers,
               qkv_bias=lambda cfg: bool(getattr(cfg, "qkv_bias", True)),
               shared_width_field="shared_expert_intermediate_size", shared_gate=True),
    SourceArch("qwen2", False, qkv_bias=lambda cfg: True),  # Qwen2's q/k/v projections always have biases
)}

_DEEPSEEK = ("multi-head latent attention (keys and values through a low-rank latent, a decoupled RoPE part) "
             "and group-limited routing with a score-correction bias; the native model has neither")
#: Sources refused by name, with the reason.
REFUSED = {
    "deepseek_v2": f"DeepSeek-V2 has {_DEEPSEEK}",
    "deepseek_v3": f"DeepSeek-V3 has {_DEEPSEEK}",
}

#: native key <- source key (the native keys under "model." in the HF directory)
GLOBAL_KEYS = (("embed_tokens.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"))
UNTIED_KEYS = (("lm_head.weight", "lm_head.weight"),)
LAYER_KEYS = (
    *((f"layers.{{i}}.attn.{a}_proj.weight", f"model.layers.{{i}}.self_attn.{a}_proj.weight") for a in "qkvo"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
)
QK_NORM_KEYS = tuple((f"layers.{{i}}.attn.{a}_norm.weight", f"model.layers.{{i}}.self_attn.{a}_norm.weight") for a in "qk")
QKV_BIAS_KEYS = tuple((f"layers.{{i}}.attn.{a}_proj.bias", f"model.layers.{{i}}.self_attn.{a}_proj.bias") for a in "qkv")
#: native <- source, each transposed (the source's are nn.Linear weights [out, in]; the native
#: ``aoe.nn.shared.SharedExperts`` is input dimension first).
SHARED_EXPERT_KEYS = (
    ("layers.{i}.ffn.shared.w_gate", "model.layers.{i}.mlp.shared_expert.gate_proj.weight"),
    ("layers.{i}.ffn.shared.w_in", "model.layers.{i}.mlp.shared_expert.up_proj.weight"),
    ("layers.{i}.ffn.shared.w_out", "model.layers.{i}.mlp.shared_expert.down_proj.weight"),
)
SHARED_GATE_KEYS = (("layers.{i}.ffn.shared.gate", "model.layers.{i}.mlp.shared_expert_gate.weight"),)


# ---------------------------------------------------------------------------------------------
# Reading a source
# ---------------------------------------------------------------------------------------------
class _LazyState:
    """The source's safetensors tensors by name, read one at a time (a Mixtral-size checkpoint is
    never held in memory at once)."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        files = sorted(src.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{str(src)!r} has no *.safetensors weights (only safetensors checkpoints are supported)")
        self._handles, self._file = [], {}
        for f in files:
            handle = _open_safetensors(f, safe_open)
            self._handles.append(handle)
            self._file[handle] = f
        self._where = {key: h for h in self._handles for key in h.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the headers (no data read)."""
        return {key: tuple(handle.get_slice(key).get_shape()) for key, handle in self._where.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        handle = self._where[key]
        try:
            return handle.get_tensor(key)
        except Exception as e:  # safetensors reports damaged data with its own exception types
            raise ConversionError(f"cannot read tensor {key!r} of {str(self._file[handle])!r} ({one_line(e)}): "
                                  "the file is damaged; download or save it again") from None


def _open_safetensors(path: Path, safe_open):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors reports a bad header or a truncated file with its own exception types
        raise ConversionError(f"cannot read {str(path)!r} as safetensors ({one_line(e)}): the file is damaged "
                              "or not a safetensors file; download or save it again") from None


def read_config_json(src: Path) -> dict:
    """The JSON object of ``src/config.json``; an unreadable, non-UTF-8 or invalid file, or one that
    is not an object, raises ``ConversionError`` naming it."""
    path = src / "config.json"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConversionError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConversionError(f"{str(path)!r} is not UTF-8 text (offset {e.start}): save it as UTF-8 JSON") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{str(path)!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): "
                              "fix the file or save the checkpoint again") from None
    except (ValueError, RecursionError) as e:  # an integer of too many digits, very deep nesting
        raise ConversionError(f"{str(path)!r} is not valid JSON ({type(e).__name__}): fix the file") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{str(path)!r} must hold a JSON object (a model config), got {type(raw).__name__}")
    return raw


def hf_config(src: Path, model_type: str):
    """transformers' config of the source; one it refuses raises ``ConversionError`` naming the file."""
    from transformers import AutoConfig

    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        StrictDataclassError = ValueError  # noqa: N806
    try:
        return AutoConfig.from_pretrained(str(src))
    except (ValueError, TypeError, KeyError, OSError, StrictDataclassError) as e:
        raise ConversionError(f"{str(src / 'config.json')!r} is not a valid {model_type} config: {one_line(e)}") from None


def check_common(cfg, src: Path) -> None:
    mt = cfg.model_type
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"{mt} source {str(src)!r}: hidden_act={act!r}; only SiLU (SwiGLU) FFNs are supported")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise ConversionError(f"{mt} source {str(src)!r}: {flag}=True; the native model has no biases")
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ConversionError(f"{mt} source {str(src)!r}: head_dim={head_dim} != hidden_size / num_attention_heads; "
                         "the native attention requires head_dim = d_model / n_heads")
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ConversionError(f"{mt} source {str(src)!r}: RoPE scaling {rope_type!r} is not supported (plain RoPE only)")


def rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


# Per-expert weight names (gate, up, down) of the layouts save_pretrained writes: Mixtral's
# w1/w3/w2 (under block_sparse_moe. or mlp.), Qwen2-MoE's, Qwen3-MoE's and OLMoE's gate_proj/up_proj/down_proj.
EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def sparse_ffn(state, i: int, n_experts: int):
    """w_gate [E, D, F], w_in [E, D, F], w_out [E, F, D] (native layout) of the sparse layer i, and
    the source keys of its experts and its router (``router_key``: AoE drops it); anything else in
    the block (a shared expert) is read by its own table or left over.

    Reads the per-expert ``experts.{e}.{gate,up,down}`` Linear weights ([F, D], [F, D], [D, F]) that
    ``save_pretrained`` writes, or the fused ``experts.gate_up_proj`` [E, 2F, D] (gate rows first)
    and ``experts.down_proj`` [E, D, F] of transformers 5's in-memory layout."""
    for block in ("block_sparse_moe", "mlp"):
        p = f"model.layers.{i}.{block}.experts"
        router = f"model.layers.{i}.{block}.gate.weight"
        keys = [k for k in state if k.startswith(f"{p}.")] + ([router] if router in state else [])
        for g, u, d in EXPERT_NAMES:
            if f"{p}.0.{g}.weight" in state:
                try:
                    w_gate = torch.stack([state[f"{p}.{e}.{g}.weight"].T for e in range(n_experts)])
                    w_in = torch.stack([state[f"{p}.{e}.{u}.weight"].T for e in range(n_experts)])
                    w_out = torch.stack([state[f"{p}.{e}.{d}.weight"].T for e in range(n_experts)])
                except KeyError as err:
                    raise ConversionError(f"layer {i}: missing expert weight {err} ({n_experts} experts expected)") from None
                return w_gate, w_in, w_out, keys
        if f"{p}.gate_up_proj" in state:
            gate_up = state[f"{p}.gate_up_proj"]  # [E, 2F, D]: gate rows first, then up
            if gate_up.shape[0] != n_experts:
                raise ConversionError(f"layer {i}: {p}.gate_up_proj holds {gate_up.shape[0]} experts, expected {n_experts}")
            F = gate_up.shape[1] // 2
            w_gate = gate_up[:, :F, :].transpose(1, 2)
            w_in = gate_up[:, F:, :].transpose(1, 2)
            if f"{p}.down_proj" not in state:
                raise ConversionError(f"layer {i}: {p}.gate_up_proj has no {p}.down_proj beside it")
            w_out = state[f"{p}.down_proj"].transpose(1, 2)  # [E, D, F] -> [E, F, D]
            return w_gate, w_in, w_out, keys
    raise ConversionError(f"layer {i}: no expert weights found (expected block_sparse_moe.experts.* or mlp.experts.*)")


def router_key(state, i: int) -> str:
    """The source key of layer i's router weight [E, D] (``block_sparse_moe.gate`` or ``mlp.gate``)."""
    for block in ("block_sparse_moe", "mlp"):
        if f"model.layers.{i}.{block}.gate.weight" in state:
            return f"model.layers.{i}.{block}.gate.weight"
    raise ConversionError(f"layer {i}: no router weight found (expected model.layers.{i}.block_sparse_moe.gate.weight "
                          f"or model.layers.{i}.mlp.gate.weight)")


def dense_ffn(state: dict, i: int):
    p = f"model.layers.{i}.mlp"
    keys = [f"{p}.{name}_proj.weight" for name in ("gate", "up", "down")]
    try:
        w_gate, w_in, w_out = (state[k].T for k in keys)
    except KeyError as e:
        raise ConversionError(f"layer {i}: missing dense FFN weight {e}") from None
    return w_gate, w_in, w_out, keys
