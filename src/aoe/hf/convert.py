"""Convert a Hugging Face MoE or dense checkpoint into an AoE model (an ``aoe`` HF directory).

    convert_to_aoe(src_dir, dst_dir, num_experts=None, top_k=None, d_low=None, upcycle="copy")

Sources (a local directory with ``config.json`` and ``*.safetensors``):

* **Mixtral** (``model_type="mixtral"``): the router is dropped, every expert is kept. Both weight
  layouts are read: per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3`` (what ``save_pretrained``
  writes, also under ``mlp.``) and the fused ``experts.gate_up_proj`` [E, 2F, D] /
  ``experts.down_proj`` [E, D, F] of transformers 5's in-memory layout. ``num_experts`` must be
  the source's (or None); ``top_k`` defaults to the source's ``num_experts_per_tok``;
  ``renormalize`` defaults to True (Mixtral renormalizes its top-k weights).
* **Qwen3-MoE** (``model_type="qwen3_moe"``): as Mixtral (router dropped, every expert kept; the
  per-expert ``mlp.experts.{e}.gate_proj/up_proj/down_proj`` that ``save_pretrained`` writes, or
  the fused layout; expert width ``moe_intermediate_size``). The per-head q/k RMSNorms
  (``self_attn.q_norm/k_norm``, weight [head_dim]) become the native ``qk_norm="head"``.
  ``renormalize`` defaults to the source's ``norm_topk_prob``. Layers with a dense MLP
  (``mlp_only_layers``, ``decoder_sparse_step``) stay dense: native ``dense_layers`` with
  ``dense_d_ffn = intermediate_size``, the MLP copied as is (reported error 0). The source's
  ``head_dim`` must be hidden_size / num_attention_heads (refused otherwise).
* **OLMoE** (``model_type="olmoe"``): as Mixtral, with the q/k RMSNorms over the whole q / k
  projection (weights [H*Dh], [G*Dh]) as ``qk_norm="full"``; ``renormalize`` defaults to
  ``norm_topk_prob``; ``clip_qkv`` must be unset (refused otherwise: the native attention does
  not clamp).
* **Llama** (``model_type="llama"``, and "mistral" with the same checks): every dense FFN
  becomes ``num_experts`` experts (default 1). ``upcycle="copy"``: each expert is a copy of the
  FFN (expert width F); with ``renormalize`` (the default for "copy") the identical experts'
  weights sum to 1, so the converted model computes the same function as the source, for every
  E and k, at full rank. ``upcycle="slice"``: the hidden dimension F is cut into E slices of
  F / E (the experts together are the FFN: exact for E = top_k = 1 only, since AoE weights the
  experts by the softmax over their norms); renormalize defaults to the AoE default (False).
* Refused with ``ConversionError`` (a ``ValueError``; the reason in the message): **Qwen2-MoE**
  (a shared expert with its own sigmoid gate, and biases on q/k/v: the native model has
  neither), any other model_type; and inside a supported type: a non-SiLU activation, attention
  or MLP biases, a head_dim other than hidden_size / num_attention_heads, a RoPE scaling other
  than "default", OLMoE's ``clip_qkv``, a Qwen3-MoE without any sparse layer. So is a source
  that cannot be read (an unreadable or invalid ``config.json``, a damaged safetensors file) or
  whose weights do not have the shapes (or the number of experts) its ``config.json`` gives
  them; each message names the file or tensor.
  A sliding window (Mistral, Mixtral, Qwen3-MoE with use_sliding_window) is kept exact by
  setting ``max_seq_len`` to min(max_position_embeddings, sliding_window): within that length
  the window never bites.

The gate projection W_g [D, F] of every expert is factorized by truncated SVD at rank R = d_low
(default: full rank min(D, F), lossless): ``W_g = U S V^T``, ``w_down = U_R sqrt(S_R)``,
``w_up = sqrt(S_R) V_R^T`` (in float64, then cast). The per-layer relative Frobenius error
``||W_g - w_down w_up|| / ||W_g||`` (over all the layer's experts; 0 for a layer kept dense) is
printed and returned. Attention (q/k norms included), norms and embeddings are copied exactly;
the AoE expert width is d_wide = F.

The source is read one tensor at a time (safetensors only; single file or shards) and the
result written in shards of at most ``max_shard_bytes`` (5 GiB; one ``model.safetensors`` when it
fits), plus the source's tokenizer files. The destination is written into a temporary sibling
directory and renamed at the end (nothing is left behind on an error); an existing non-empty
destination is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aoe.config import ConfigError, ModelConfig
from aoe.errors import InputError, one_line
from aoe.hf._io import atomic_directory, check_destination
from aoe.hf.configuration import AoEConfig

__all__ = ["convert_to_aoe", "factorize_gate", "ConversionReport", "ConversionError", "SUPPORTED_SOURCES"]

SUPPORTED_SOURCES = ("mixtral", "qwen3_moe", "olmoe", "llama", "mistral")
_MOE_SOURCES = ("mixtral", "qwen3_moe", "olmoe")
#: The native ``qk_norm`` of each source type (Qwen3: per head over head_dim; OLMoE: over the
#: whole q / k projection).
_QK_NORM = {"qwen3_moe": "head", "olmoe": "full"}
_REFUSED = {
    "qwen2_moe": "Qwen2-MoE has a shared expert (with its own sigmoid gate) and biases on the q/k/v projections; "
                 "the native AoE model has neither",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


class ConversionError(InputError):
    """A source, destination or option ``convert_to_aoe`` cannot use; the message names the file,
    tensor or option and says why. A ``ValueError``."""


@dataclass
class ConversionReport:
    """What ``convert_to_aoe`` did: the source type, the resulting config, the per-layer relative
    Frobenius reconstruction error of the factorized gate projections (0.0 for a layer kept dense)."""

    source_type: str
    config: dict
    layer_errors: list[float] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max(self.layer_errors, default=0.0)


def factorize_gate(w_gate_EDF: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of every expert's gate projection ([E, D, F], input dim first) at ``rank``.

    Returns w_down [E, D, R], w_up [E, R, F] (float64) and the relative Frobenius error over all
    experts, ``sqrt(sum ||W_e - w_down_e w_up_e||^2) / sqrt(sum ||W_e||^2)``.
    """
    E, D, F = w_gate_EDF.shape
    if not 1 <= rank <= min(D, F):
        raise ConversionError(f"d_low={rank} must be in [1, min(hidden_size={D}, intermediate_size={F})={min(D, F)}]")
    w = w_gate_EDF.to(torch.float64)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # [E, D, K], [E, K], [E, K, F]
    root = S[:, :rank].sqrt()
    w_down = U[:, :, :rank] * root[:, None, :]
    w_up = root[:, :, None] * Vh[:, :rank, :]
    err = torch.linalg.matrix_norm(w - w_down @ w_up).pow(2).sum().sqrt()
    ref = torch.linalg.matrix_norm(w).pow(2).sum().sqrt()
    return w_down, w_up, float(err / ref) if ref > 0 else float(err)


# ---------------------------------------------------------------------------------------------
# Reading the source
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


class _ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` (one tensor per shard
    at least) and, with more than one shard, the HF ``model.safetensors.index.json``."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size
        self.shapes[key] = tuple(tensor.shape)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.directory / f"shard-{len(self.shards)}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.directory / "shard-0.safetensors").rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / f"shard-{i}.safetensors").rename(self.directory / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


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


def _hf_config(src: Path, model_type: str):
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


def _check_destination(dst_dir, overwrite: bool, src: Path) -> None:
    try:
        check_destination(dst_dir, overwrite, sources=(src,))
    except ValueError as e:  # check_destination refuses a destination with a ValueError naming it
        raise ConversionError(str(e)) from None


def _native_config(src: Path, **fields) -> ModelConfig:
    """The native model the source's config.json describes; a value it cannot take is named."""
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConversionError(f"{str(src / 'config.json')!r} describes a model the native one cannot be: {e}") from None


def _native_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the native model (built on meta), by its HF key."""
    from aoe.model.transformer import Transformer

    with torch.device("meta"):
        native = Transformer(model_cfg)
    expected = {f"model.{k}": tuple(v.shape) for k, v in native.state_dict().items()}
    if model_cfg.tie_embeddings:
        expected.pop("model.lm_head.weight", None)
    return expected


def _check_shape(src: Path, name: str, shape: tuple[int, ...], expected: tuple[int, ...], fields: str) -> None:
    """A source tensor must have the shape the source's config.json gives it."""
    if tuple(shape) != tuple(expected):
        raise ConversionError(
            f"{str(src)!r}: {name} has shape {list(shape)}, but config.json ({fields}) implies {list(expected)}: "
            "the config.json does not describe these weights; fix it or use the weights it belongs to")


def _check_ffn_shapes(src: Path, layer: int, tensors, D: int, F: int, fields: str, E: int | None = None) -> None:
    """Gate, up and down projections of layer ``layer`` in the native layout: [(E,) D, F], [(E,) D, F],
    [(E,) F, D]."""
    lead = () if E is None else (E,)
    for what, t, shape in zip(("gate", "up", "down"), tensors, ((D, F), (D, F), (F, D))):
        _check_shape(src, f"layer {layer}'s {what} projection (native layout)", tuple(t.shape), lead + shape, fields)


def _check_expert_count(src: Path, layer: int, keys: list[str], E: int, field_name: str) -> None:
    """The source must not hold more experts in a layer than its config.json counts."""
    found = {int(m.group(1)) for k in keys if (m := re.search(r"\.experts\.(\d+)\.", k))}
    if found and max(found) >= E:
        raise ConversionError(f"{str(src)!r}: layer {layer} holds {max(found) + 1} experts, but config.json has "
                              f"{field_name}={E}: fix config.json or use the weights it belongs to")


def _check_common(cfg, src: Path) -> None:
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


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


# Per-expert weight names (gate, up, down) of the layouts save_pretrained writes: Mixtral's
# w1/w3/w2 (under block_sparse_moe. or mlp.), Qwen3-MoE's and OLMoE's gate_proj/up_proj/down_proj.
_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def _moe_experts(state, i: int, n_experts: int):
    """w_gate [E, D, F], w_in [E, D, F], w_out [E, F, D] (native layout) of the sparse layer i, and
    every source key of that layer's MoE block (the router included: AoE drops it).

    Reads the per-expert ``experts.{e}.{gate,up,down}`` Linear weights ([F, D], [F, D], [D, F]) that
    ``save_pretrained`` writes, or the fused ``experts.gate_up_proj`` [E, 2F, D] (gate rows first)
    and ``experts.down_proj`` [E, D, F] of transformers 5's in-memory layout."""
    for block in ("block_sparse_moe", "mlp"):
        p = f"model.layers.{i}.{block}.experts"
        keys = [k for k in state if k.startswith(f"model.layers.{i}.{block}.")]
        for g, u, d in _EXPERT_NAMES:
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
            w_out = state[f"{p}.down_proj"].transpose(1, 2)  # [E, D, F] -> [E, F, D]
            return w_gate, w_in, w_out, keys
    raise ConversionError(f"layer {i}: no expert weights found (expected block_sparse_moe.experts.* or mlp.experts.*)")


def _qwen3_dense_layers(cfg) -> list[int]:
    """The Qwen3-MoE layers whose MLP is dense (transformers' rule: sparse iff the layer is not in
    ``mlp_only_layers`` and (layer + 1) % decoder_sparse_step == 0)."""
    mlp_only = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return [i for i in range(cfg.num_hidden_layers) if i in mlp_only or (i + 1) % step != 0]


def _llama_ffn(state: dict, i: int):
    p = f"model.layers.{i}.mlp"
    try:
        w_gate = state[f"{p}.gate_proj.weight"].T
        w_in = state[f"{p}.up_proj.weight"].T
        w_out = state[f"{p}.down_proj.weight"].T
    except KeyError as e:
        raise ConversionError(f"layer {i}: missing dense FFN weight {e}") from None
    return w_gate, w_in, w_out, [k for k in state if k.startswith(f"{p}.")]


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------
def convert_to_aoe(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    num_experts: int | None = None,
    top_k: int | None = None,
    d_low: int | None = None,
    upcycle: str = "copy",
    renormalize: bool | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    verbose: bool = True,
    max_shard_bytes: int = 5 * 1024**3,
) -> ConversionReport:
    """Convert ``src_dir`` (a Mixtral, Qwen3-MoE, OLMoE, Llama or Mistral HF checkpoint) into an
    AoE HF directory ``dst_dir``.

    num_experts / top_k: experts and experts per token (defaults: MoE sources: the source's;
    Llama/Mistral: 1 / 1). d_low: rank of the factorized gate (default full rank min(hidden,
    expert width): lossless). upcycle: "copy" or "slice" (dense sources only). renormalize: AoE's
    gate renormalization (default: True for Mixtral and "copy", the source's norm_topk_prob for
    Qwen3-MoE and OLMoE, False for "slice"). dtype: of the written weights
    (default: the source's). max_shard_bytes: size of the written safetensors shards (one
    ``model.safetensors`` when everything fits, else HF-indexed shards). The source is read one
    tensor at a time. Raises ConversionError (a ValueError) on an unsupported or unreadable source,
    weights that do not fit the source's config.json, or inconsistent options.
    """
    src = Path(src_dir).expanduser()
    if not (src / "config.json").is_file():
        raise ConversionError(f"{str(src)!r} is not a Hugging Face checkpoint directory (no config.json)")
    _check_destination(dst_dir, overwrite, src)
    raw = read_config_json(src)
    mt = raw.get("model_type")
    if mt in _REFUSED:
        raise ConversionError(f"cannot convert {mt!r} ({str(src)!r}): {_REFUSED[mt]}")
    if mt not in SUPPORTED_SOURCES:
        raise ConversionError(f"cannot convert model_type={mt!r}: supported sources are {list(SUPPORTED_SOURCES)}")
    if upcycle not in ("copy", "slice"):
        raise ConversionError(f"upcycle={upcycle!r} must be 'copy' or 'slice'")
    cfg = _hf_config(src, mt)
    _check_common(cfg, src)
    if mt == "olmoe" and getattr(cfg, "clip_qkv", None) is not None:
        raise ConversionError(f"olmoe source {str(src)!r}: clip_qkv={cfg.clip_qkv} (queries, keys and values clamped); "
                         "the native attention does not clip")
    qk_norm = _QK_NORM.get(mt, "none")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    state = _LazyState(src)
    n_layers = cfg.num_hidden_layers
    D = cfg.hidden_size
    is_moe = mt in _MOE_SOURCES
    dense_layers: list[int] = []  # Qwen3-MoE layers with a dense MLP (kept dense)
    if is_moe:
        E_src = cfg.num_local_experts if mt == "mixtral" else cfg.num_experts
        if num_experts is not None and num_experts != E_src:
            raise ConversionError(f"num_experts={num_experts}: a {mt} source keeps its {E_src} experts (leave num_experts unset)")
        E = E_src
        if E < 1:
            raise ConversionError(f"{mt} source {str(src)!r}: num_experts={E}, no sparse layer to convert")
        if mt == "qwen3_moe":
            dense_layers = _qwen3_dense_layers(cfg)
            if len(dense_layers) == n_layers:
                raise ConversionError(f"qwen3_moe source {str(src)!r}: every layer is dense (mlp_only_layers="
                                 f"{list(cfg.mlp_only_layers)}, decoder_sparse_step={cfg.decoder_sparse_step})")
        k = cfg.num_experts_per_tok if top_k is None else top_k
        F = cfg.moe_intermediate_size if mt == "qwen3_moe" else cfg.intermediate_size
        if renormalize is not None:
            renorm = renormalize
        else:  # Mixtral always renormalizes its top-k weights; Qwen3-MoE and OLMoE when norm_topk_prob
            renorm = True if mt == "mixtral" else bool(getattr(cfg, "norm_topk_prob", False))
    else:
        E = 1 if num_experts is None else num_experts
        k = 1 if top_k is None else top_k
        F_dense = cfg.intermediate_size
        if E < 1:
            raise ConversionError(f"num_experts={E} must be >= 1")
        if upcycle == "slice" and F_dense % E:
            raise ConversionError(f"upcycle='slice': intermediate_size={F_dense} is not divisible by num_experts={E}")
        F = F_dense // E if upcycle == "slice" else F_dense
        renorm = (upcycle == "copy") if renormalize is None else renormalize
    if not 1 <= k <= E:
        raise ConversionError(f"top_k={k} must be in [1, num_experts={E}]")
    R = min(D, F) if d_low is None else d_low
    if not isinstance(R, int) or not 1 <= R <= min(D, F):
        raise ConversionError(f"d_low={R} must be in [1, min(hidden_size={D}, expert width={F})={min(D, F)}]")

    max_seq_len = cfg.max_position_embeddings
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < max_seq_len:
        max_seq_len = window
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    model_cfg = _native_config(
        src, vocab_size=cfg.vocab_size, d_model=D, n_layers=n_layers, n_heads=cfg.num_attention_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, max_seq_len=max_seq_len,
        rope_theta=_rope_theta(cfg), norm_eps=float(cfg.rms_norm_eps), tie_embeddings=tie,
        init_std=float(getattr(cfg, "initializer_range", 0.02)), ffn="aoe", d_ffn=F, n_experts=E, top_k=k,
        d_low=R, d_wide=F, renormalize=renorm, qk_norm=qk_norm, dense_layers=dense_layers,
        dense_d_ffn=cfg.intermediate_size if dense_layers else None,
    )

    if "model.embed_tokens.weight" not in state:
        raise ConversionError(f"source {str(src)!r} lacks 'model.embed_tokens.weight'")
    src_dtype = state["model.embed_tokens.weight"].dtype
    out_dtype = src_dtype if dtype is None else dtype
    expected = _native_shapes(model_cfg)
    dims = (f"vocab_size={cfg.vocab_size}, hidden_size={D}, num_attention_heads={model_cfg.n_heads}, "
            f"num_key_value_heads={model_cfg.kv_heads}")
    ffn_dims = f"hidden_size={D}, {'moe_intermediate_size' if mt == 'qwen3_moe' else 'intermediate_size'}={F}"
    experts_field = "num_local_experts" if mt == "mixtral" else "num_experts"
    hf_config = AoEConfig.from_model_config(
        model_cfg,
        bos_token_id=getattr(cfg, "bos_token_id", None),
        eos_token_id=getattr(cfg, "eos_token_id", None),
        pad_token_id=getattr(cfg, "pad_token_id", None),
    )
    hf_config.dtype = out_dtype
    hf_config.architectures = ["AoEForCausalLM"]
    used: set[str] = set()
    errors: list[float] = []

    with atomic_directory(dst_dir, overwrite=overwrite, sources=(src,)) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)

        def put(dst_key: str, src_key: str) -> None:
            if src_key not in state:
                raise ConversionError(f"source {str(src)!r} lacks {src_key!r}")
            tensor = state[src_key]
            _check_shape(src, src_key, tuple(tensor.shape), expected[f"model.{dst_key}"], dims)
            writer.add(f"model.{dst_key}", tensor.to(out_dtype))
            used.add(src_key)

        put("embed_tokens.weight", "model.embed_tokens.weight")
        put("norm.weight", "model.norm.weight")
        if not tie:
            put("lm_head.weight", "lm_head.weight")
        else:
            used.add("lm_head.weight")
        for i in range(n_layers):
            for a in ("q", "k", "v", "o"):
                put(f"layers.{i}.attn.{a}_proj.weight", f"model.layers.{i}.self_attn.{a}_proj.weight")
            if qk_norm != "none":
                for a in ("q", "k"):
                    put(f"layers.{i}.attn.{a}_norm.weight", f"model.layers.{i}.self_attn.{a}_norm.weight")
            put(f"layers.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight")
            put(f"layers.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")
            if i in dense_layers:  # a dense MLP of the MoE source stays a dense SwiGLU FFN, copied as is
                g, u, d, keys = _llama_ffn(state, i)
                _check_ffn_shapes(src, i, (g, u, d), D, cfg.intermediate_size, f"hidden_size={D}, "
                                  f"intermediate_size={cfg.intermediate_size}")
                used.update(keys)
                for name, t in (("w_gate", g), ("w_in", u), ("w_out", d)):
                    writer.add(f"model.layers.{i}.ffn.{name}", t.to(out_dtype))
                errors.append(0.0)
                if verbose:
                    print(f"layer {i}: dense FFN (width {cfg.intermediate_size}) copied as is")
                continue
            if is_moe:
                w_gate, w_in, w_out, keys = _moe_experts(state, i, E)
                _check_expert_count(src, i, keys, E, experts_field)
                _check_ffn_shapes(src, i, (w_gate, w_in, w_out), D, F, ffn_dims, E=E)
            else:
                g, u, d, keys = _llama_ffn(state, i)
                _check_ffn_shapes(src, i, (g, u, d), D, F_dense, f"hidden_size={D}, intermediate_size={F_dense}")
                if upcycle == "copy":
                    w_gate, w_in, w_out = (t[None].expand(E, *t.shape) for t in (g, u, d))
                else:
                    w_gate = torch.stack([g[:, e * F:(e + 1) * F] for e in range(E)])
                    w_in = torch.stack([u[:, e * F:(e + 1) * F] for e in range(E)])
                    w_out = torch.stack([d[e * F:(e + 1) * F, :] for e in range(E)])
            used.update(keys)  # includes the source's router, which AoE drops
            w_down, w_up, err = factorize_gate(w_gate, R)
            errors.append(err)
            pre = f"layers.{i}.ffn"
            writer.add(f"model.{pre}.w_down", w_down.to(out_dtype))
            writer.add(f"model.{pre}.w_up", w_up.to(out_dtype))
            writer.add(f"model.{pre}.w_in", w_in.to(out_dtype))
            writer.add(f"model.{pre}.w_out", w_out.to(out_dtype))
            writer.add(f"model.{pre}.selection_bias", torch.zeros(E, dtype=torch.float32))
            del w_gate, w_in, w_out, w_down, w_up
            if verbose:
                print(f"layer {i}: gate rank {R}/{min(D, F)}, relative reconstruction error {err:.3e}")

        leftover = sorted(k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq"))
        if leftover:
            raise ConversionError(f"{mt} source {str(src)!r} has weights this conversion does not understand: "
                             f"{leftover[:8]}{' ...' if len(leftover) > 8 else ''}")
        _check_against_native(expected, writer.shapes)
        writer.close()
        hf_config.save_pretrained(str(tmp))
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    report = ConversionReport(source_type=mt, config=hf_config.to_dict(), layer_errors=errors)
    if verbose:
        extra = (f", qk_norm={qk_norm!r}" if qk_norm != "none" else "") + (
            f", dense layers {dense_layers}" if dense_layers else "")
        print(f"converted {mt} -> aoe: {n_layers} layers, {E} experts, top_k={k}, d_low={R}, d_wide={F}, "
              f"renormalize={renorm}{extra}; max gate reconstruction error {report.max_error:.3e}; wrote {str(dst_dir)!r}")
    return report


def _check_against_native(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every key and shape of the written state matches the native model's (``_native_shapes``);
    the source's shapes were checked as they were read, so a difference here is a bug."""
    got = dict(shapes)
    if expected != got:  # pragma: no cover - a bug in this module
        diff = sorted(set(expected.items()) ^ set(got.items()))
        raise AssertionError(f"converted state does not match the native model: {diff[:8]}")
