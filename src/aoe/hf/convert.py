"""Convert a Hugging Face MoE or dense checkpoint into an AoE model (an ``aoe`` HF directory).

    convert_to_aoe(src_dir, dst_dir, num_experts=None, top_k=None, d_low=None, upcycle="copy", ffn="aoe")

``ffn="moe"`` (MoE sources only) converts into the native router MoE instead: the router
(``gate.weight`` [E, D] -> ``router`` [D, E]) and the experts are copied as they are, so the
converted model computes the source's function (same softmax, top-k and ``norm_topk_prob``);
``d_low`` must be unset. Everything below about dropping the router and factorizing the gates is
the default ``ffn="aoe"``.

Sources (a local directory with ``config.json`` and ``*.safetensors``), each a row of the table
``aoe.hf.sources.ARCHS`` (adding an architecture is adding a row and a test):

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
* **Qwen2-MoE** (``model_type="qwen2_moe"``): as Qwen3-MoE (dense ``mlp_only_layers`` /
  ``decoder_sparse_step`` layers, ``norm_topk_prob``), without q/k norms, and with what Qwen3-MoE
  lacks: biases on the q/k/v projections (``qkv_bias``, default true; o_proj has none) become the
  native ``attn_qkv_bias``, and every sparse layer's shared expert (``mlp.shared_expert.*``, a
  SwiGLU of width ``shared_expert_intermediate_size``) with its sigmoid gate
  (``mlp.shared_expert_gate`` [1, D]) becomes the layer's ``shared`` experts (``aoe.nn.shared``:
  ``n_shared_experts=1``, ``shared_expert_gate=True``), copied as is (never factorized).
* **Llama** (``model_type="llama"``, and "mistral" with the same checks; "qwen2" too, with its
  q/k/v biases as ``attn_qkv_bias``): every dense FFN
  becomes ``num_experts`` experts (default 1). ``upcycle="copy"``: each expert is a copy of the
  FFN (expert width F); with ``renormalize`` (the default for "copy") the identical experts'
  weights sum to 1, so the converted model computes the same function as the source, for every
  E and k, at full rank. ``upcycle="slice"``: the hidden dimension F is cut into E slices of
  F / E (the experts together are the FFN: exact for E = top_k = 1 only, since AoE weights the
  experts by the softmax over their norms); renormalize defaults to False there (chosen as
  before Algorithm 2's renormalized gate became AoE's default; pass it to choose).
* Refused with ``ConversionError`` (a ``ValueError``; the reason in the message):
  **DeepSeek-V2 / V3** (multi-head latent attention, group-limited routing: the native model has
  neither), any other model_type; and inside a supported type: a non-SiLU activation, attention
  biases other than Qwen2's q/k/v ones, MLP biases, a head_dim other than hidden_size /
  num_attention_heads, a RoPE scaling other than "default", OLMoE's ``clip_qkv``, a Qwen-MoE
  without any sparse layer, and any source tensor no table maps (e.g. a shared expert in a
  source whose row has none: nothing is dropped silently but an AoE conversion's routers). So is
  a source that cannot be read (an unreadable or invalid ``config.json``, a damaged safetensors
  file) or whose weights do not have the shapes (or the number of experts) its ``config.json``
  gives them; each message names the file or tensor.
  A sliding window (Mistral, Mixtral, Qwen2, Qwen-MoE with use_sliding_window) is kept exact by
  setting ``max_seq_len`` to min(max_position_embeddings, sliding_window): within that length
  the window never bites.

The gate projection W_g [D, F] of every expert is factorized by truncated SVD at rank R = d_low
(default: full rank min(D, F), lossless): ``W_g = U S V^T``, ``w_down = U_R sqrt(S_R)``,
``w_up = sqrt(S_R) V_R^T`` (in float64, then cast). The per-layer relative Frobenius error
``||W_g - w_down w_up|| / ||W_g||`` (over all the layer's experts; 0 for a layer kept dense) is
printed and returned. Attention (q/k norms and q/k/v biases included), norms, embeddings and
shared experts are copied exactly; the AoE expert width is d_wide = F.

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
from typing import Any

import torch

from aoe.config import ModelConfig
from aoe.hf._io import atomic_directory, check_destination
from aoe.io.bounds import check_sizes, native_shapes
from aoe.hf.configuration import AoEConfig
from aoe.hf.convert_plan import Plan, native_model_config, plan_conversion
from aoe.hf.sources import (
    ARCHS, GLOBAL_KEYS, LAYER_KEYS, QK_NORM_KEYS, QKV_BIAS_KEYS, REFUSED, SHARED_EXPERT_KEYS, SHARED_GATE_KEYS,
    UNTIED_KEYS, ConversionError, SourceArch, _LazyState, check_common, dense_ffn, hf_config, read_config_json,
    router_key, sparse_ffn,
)

__all__ = ["convert_to_aoe", "factorize_gate", "ConversionReport", "ConversionError", "SUPPORTED_SOURCES"]

SUPPORTED_SOURCES = tuple(ARCHS)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


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


def _check_destination(dst_dir, overwrite: bool, src: Path) -> None:
    try:
        check_destination(dst_dir, overwrite, sources=(src,))
    except ValueError as e:  # check_destination refuses a destination with a ValueError naming it
        raise ConversionError(str(e)) from None


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


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------
def _open_source(src_dir, dst_dir, overwrite: bool, upcycle: str) -> tuple[Path, SourceArch, Any]:
    """The source directory, its row of the table and its transformers config, after every check
    that needs no weights."""
    src = Path(src_dir).expanduser()
    if not (src / "config.json").is_file():
        raise ConversionError(f"{str(src)!r} is not a Hugging Face checkpoint directory (no config.json)")
    _check_destination(dst_dir, overwrite, src)
    mt = read_config_json(src).get("model_type")
    if mt in REFUSED:
        raise ConversionError(f"cannot convert {mt!r} ({str(src)!r}): {REFUSED[mt]}")
    if mt not in ARCHS:
        raise ConversionError(f"cannot convert model_type={mt!r}: supported sources are {list(SUPPORTED_SOURCES)}")
    if upcycle not in ("copy", "slice"):
        raise ConversionError(f"upcycle={upcycle!r} must be 'copy' or 'slice'")
    cfg = hf_config(src, mt)
    check_common(cfg, src)
    ARCHS[mt].check(cfg, src)
    return src, ARCHS[mt], cfg


class _Converter:
    """Writes the converted tensors of one source into a shard writer, checking every source
    shape against what the source's config.json implies, and remembering which keys it used."""

    def __init__(self, src: Path, state, writer, cfg, arch: SourceArch, plan: Plan, model_cfg: ModelConfig, dtype):
        self.src, self.state, self.writer, self.cfg, self.arch, self.plan = src, state, writer, cfg, arch, plan
        self.dtype = dtype
        self.expected = native_shapes(model_cfg)
        self.dims = (f"vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, num_attention_heads="
                     f"{model_cfg.n_heads}, num_key_value_heads={model_cfg.kv_heads}")
        self.used: set[str] = set()
        self.errors: list[float] = []

    def put(self, dst_key: str, src_key: str, transpose: bool = False, fields: str | None = None) -> None:
        """Copy one source tensor (transposed: an nn.Linear weight into an input-first native one);
        ``fields``: the config.json fields its shape comes from (default: the model's dimensions)."""
        if src_key not in self.state:
            raise ConversionError(f"source {str(self.src)!r} lacks {src_key!r}")
        tensor = self.state[src_key]
        expected = self.expected[f"model.{dst_key}"]
        _check_shape(self.src, src_key, tuple(tensor.shape), expected[::-1] if transpose else expected,
                     fields or self.dims)
        self.writer.add(f"model.{dst_key}", (tensor.T if transpose else tensor).to(self.dtype))
        self.used.add(src_key)

    def mapped(self, rows, transpose: bool = False, fields: str | None = None, **fmt) -> None:
        """Copy the tensors of a key-map table (native key <- source key)."""
        for dst_key, src_key in rows:
            self.put(dst_key.format(**fmt), src_key.format(**fmt), transpose, fields)

    def shared_experts(self, i: int) -> None:
        """The source's shared expert (and its sigmoid gate) of the sparse layer i, copied as is."""
        field = self.arch.shared_width_field
        if field is not None:
            dims = f"hidden_size={self.cfg.hidden_size}, {field}={getattr(self.cfg, field)}"
            self.mapped(SHARED_EXPERT_KEYS, transpose=True, fields=dims, i=i)
        if self.arch.shared_gate:
            self.mapped(SHARED_GATE_KEYS, transpose=True, fields=f"hidden_size={self.cfg.hidden_size}", i=i)

    def dense_layer(self, i: int, verbose: bool) -> None:
        """A dense MLP of a sparse source stays a dense SwiGLU FFN, copied as is."""
        D, F = self.cfg.hidden_size, self.cfg.intermediate_size
        g, u, d, keys = dense_ffn(self.state, i)
        _check_ffn_shapes(self.src, i, (g, u, d), D, F, f"hidden_size={D}, intermediate_size={F}")
        self.used.update(keys)
        for name, t in (("w_gate", g), ("w_in", u), ("w_out", d)):
            self.writer.add(f"model.layers.{i}.ffn.{name}", t.to(self.dtype))
        self.errors.append(0.0)
        if verbose:
            print(f"layer {i}: dense FFN (width {F}) copied as is")

    def expert_weights(self, i: int):
        """w_gate, w_in, w_out [E, ...] of layer i in the native layout, and the source keys read."""
        D, p, a = self.cfg.hidden_size, self.plan, self.arch
        if a.sparse:
            w_gate, w_in, w_out, keys = sparse_ffn(self.state, i, p.E)
            _check_expert_count(self.src, i, keys, p.E, a.experts_field)
            _check_ffn_shapes(self.src, i, (w_gate, w_in, w_out), D, p.F, f"hidden_size={D}, {a.width_field}={p.F}", E=p.E)
            return w_gate, w_in, w_out, keys
        g, u, d, keys = dense_ffn(self.state, i)
        _check_ffn_shapes(self.src, i, (g, u, d), D, p.F_dense, f"hidden_size={D}, intermediate_size={p.F_dense}")
        if p.upcycle == "copy":
            return (*(t[None].expand(p.E, *t.shape) for t in (g, u, d)), keys)
        F = p.F
        return (torch.stack([g[:, e * F:(e + 1) * F] for e in range(p.E)]),
                torch.stack([u[:, e * F:(e + 1) * F] for e in range(p.E)]),
                torch.stack([d[e * F:(e + 1) * F, :] for e in range(p.E)]), keys)

    def sparse_layer(self, i: int, verbose: bool) -> None:
        """The layer's experts with their gates factorized at rank R; the source's router (among
        the keys read) is dropped. With ffn="moe" the experts and the router are copied as is."""
        w_gate, w_in, w_out, keys = self.expert_weights(i)
        self.used.update(keys)
        self.shared_experts(i)
        if self.plan.ffn == "moe":
            self.moe_layer(i, (w_gate, w_in, w_out), verbose)
            return
        w_down, w_up, err = factorize_gate(w_gate, self.plan.R)
        self.errors.append(err)
        for name, t in (("w_down", w_down), ("w_up", w_up), ("w_in", w_in), ("w_out", w_out)):
            self.writer.add(f"model.layers.{i}.ffn.{name}", t.to(self.dtype))
        self.writer.add(f"model.layers.{i}.ffn.selection_bias", torch.zeros(self.plan.E, dtype=torch.float32))
        if verbose:
            print(f"layer {i}: gate rank {self.plan.R}/{min(self.cfg.hidden_size, self.plan.F)}, "
                  f"relative reconstruction error {err:.3e}")

    def moe_layer(self, i: int, experts, verbose: bool) -> None:
        """A native MoE layer: the source's router (transposed to [D, E]) and experts, as they are."""
        self.put(f"layers.{i}.ffn.router", router_key(self.state, i), transpose=True,
                 fields=f"hidden_size={self.cfg.hidden_size}, {self.arch.experts_field}={self.plan.E}")
        for name, t in zip(("w_gate", "w_in", "w_out"), experts):
            self.writer.add(f"model.layers.{i}.ffn.{name}", t.to(self.dtype))
        self.writer.add(f"model.layers.{i}.ffn.selection_bias", torch.zeros(self.plan.E, dtype=torch.float32))
        self.errors.append(0.0)
        if verbose:
            print(f"layer {i}: router and {self.plan.E} experts copied as is")

    def leftover(self) -> None:
        rest = sorted(k for k in self.state if k not in self.used and not k.endswith("rotary_emb.inv_freq"))
        if rest:
            raise ConversionError(f"{self.arch.model_type} source {str(self.src)!r} has weights this conversion does "
                                  f"not understand: {rest[:8]}{' ...' if len(rest) > 8 else ''}")


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
    ffn: str = "aoe",
) -> ConversionReport:
    """Convert ``src_dir`` (a Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Llama, Mistral or Qwen2 HF
    checkpoint) into an AoE HF directory ``dst_dir`` (model_type "aoe").

    ffn: the native FFN: "aoe" (the default: routers dropped, gates factorized) or "moe" (MoE
    sources only: the router and the experts kept as they are, the same function as the source;
    d_low must be unset). num_experts / top_k: experts and experts per token (defaults: MoE sources: the source's;
    Llama/Mistral: 1 / 1). d_low: rank of the factorized gate (default full rank min(hidden,
    expert width): lossless). upcycle: "copy" or "slice" (dense sources only). renormalize: AoE's
    gate renormalization (default: True for Mixtral and "copy", the source's norm_topk_prob for
    Qwen2-MoE, Qwen3-MoE and OLMoE, False for "slice"). dtype: of the written weights
    (default: the source's). max_shard_bytes: size of the written safetensors shards (one
    ``model.safetensors`` when everything fits, else HF-indexed shards). The source is read one
    tensor at a time. Raises ConversionError (a ValueError) on an unsupported or unreadable source,
    weights that do not fit the source's config.json, or inconsistent options.
    """
    src, arch, cfg = _open_source(src_dir, dst_dir, overwrite, upcycle)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    plan = plan_conversion(arch, cfg, src, num_experts, top_k, d_low, upcycle, renormalize, ffn)
    model_cfg = native_model_config(cfg, src, arch, plan)
    state = _LazyState(src)
    check_sizes(model_cfg, state.shapes(), src / "config.json", ConversionError,
                names={"d_ffn": arch.width_field, "d_wide": arch.width_field, "n_experts": "num_experts"})
    out_dtype = _weights_dtype(state, src, dtype)
    hf_cfg = _hf_config(model_cfg, cfg, out_dtype)
    with atomic_directory(dst_dir, overwrite=overwrite, sources=(src,)) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        conv = _Converter(src, state, writer, cfg, arch, plan, model_cfg, out_dtype)
        _convert_all(conv, model_cfg, verbose)
        _check_against_native(conv.expected, writer.shapes)
        writer.close()
        _write_config_files(hf_cfg, src, tmp)
    report = ConversionReport(source_type=arch.model_type, config=hf_cfg.to_dict(), layer_errors=conv.errors)
    if verbose:
        _print_summary(arch, plan, model_cfg, report, dst_dir)
    return report


def _weights_dtype(state, src: Path, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the written weights: ``dtype``, else the source's (its embedding's, which must exist)."""
    if "model.embed_tokens.weight" not in state:
        raise ConversionError(f"source {str(src)!r} lacks 'model.embed_tokens.weight'")
    return state["model.embed_tokens.weight"].dtype if dtype is None else dtype


def _hf_config(model_cfg: ModelConfig, cfg, out_dtype: torch.dtype) -> AoEConfig:
    """The converted directory's config: the native model's, the source's special token ids, the weights' dtype."""
    hf_cfg = AoEConfig.from_model_config(model_cfg, bos_token_id=getattr(cfg, "bos_token_id", None),
                                         eos_token_id=getattr(cfg, "eos_token_id", None),
                                         pad_token_id=getattr(cfg, "pad_token_id", None))
    hf_cfg.dtype = out_dtype
    hf_cfg.architectures = ["AoEForCausalLM"]
    return hf_cfg


def _write_config_files(hf_cfg: AoEConfig, src: Path, tmp: Path) -> None:
    """Beside the weights: config.json, and the source's tokenizer files (those it has)."""
    hf_cfg.save_pretrained(str(tmp))
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)


def _print_summary(arch: SourceArch, plan: Plan, model_cfg: ModelConfig, report: ConversionReport, dst_dir) -> None:
    """One line: what was converted into what, and the largest gate reconstruction error."""
    extra = (f", qk_norm={arch.qk_norm!r}" if arch.qk_norm != "none" else "") + (
        f", dense layers {list(plan.dense_layers)}" if plan.dense_layers else "") + (
        ", q/k/v biases" if model_cfg.attn_qkv_bias else "") + (
        f", a shared expert of width {model_cfg.d_shared}" if model_cfg.n_shared_experts else "")
    width = (f"d_low={plan.R}, d_wide={plan.F}" if plan.ffn == "aoe" else f"d_ffn={plan.F}")
    error = f"; max gate reconstruction error {report.max_error:.3e}" if plan.ffn == "aoe" else ""
    print(f"converted {arch.model_type} -> {plan.ffn}: {model_cfg.n_layers} layers, {plan.E} experts, "
          f"top_k={plan.k}, {width}, renormalize={plan.renormalize}{extra}{error}; wrote {str(dst_dir)!r}")


def _convert_all(conv: _Converter, model_cfg: ModelConfig, verbose: bool) -> None:
    """Every tensor: the key-map tables, then each layer's FFN; then nothing may be left over."""
    conv.mapped(GLOBAL_KEYS)
    if model_cfg.tie_embeddings:
        conv.used.add("lm_head.weight")
    else:
        conv.mapped(UNTIED_KEYS)
    for i in range(model_cfg.n_layers):
        conv.mapped(LAYER_KEYS, i=i)
        if conv.arch.qk_norm != "none":
            conv.mapped(QK_NORM_KEYS, i=i)
        if model_cfg.attn_qkv_bias:
            conv.mapped(QKV_BIAS_KEYS, i=i)
        if i in conv.plan.dense_layers:
            conv.dense_layer(i, verbose)
        else:
            conv.sparse_layer(i, verbose)
    conv.leftover()


def _check_against_native(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every key and shape of the written state matches the native model's (``native_shapes``);
    the source's shapes were checked as they were read, so a difference here is a bug."""
    got = dict(shapes)
    if expected != got:  # pragma: no cover - a bug in this module
        diff = sorted(set(expected.items()) ^ set(got.items()))
        raise AssertionError(f"converted state does not match the native model: {diff[:8]}")
