"""Causal self-attention with rotary position embeddings, grouped-query heads and a KV cache.

Shape legend: B batch, T new tokens, S keys (cached + new), H query heads, G key/value heads
(H % G == 0; query head h reads key/value head h // (H / G)), Dh head dim, D model dim.

Rotary embeddings use the "rotate half" layout (the first and second halves of a head are the
pairs that rotate, as in Llama / Hugging Face), with frequencies ``theta ** (-2i / Dh)``; the
angles and the rotation are computed in fp32 whatever the model's dtype.

Optional query/key normalization (``qk_norm``), an RMSNorm applied before RoPE:
"head" normalizes every head's query and key over Dh with one weight [Dh] shared by all heads
(Qwen3 style: projection, split into heads, norm, RoPE); "full" normalizes the whole query
projection [H*Dh] and the whole key projection [G*Dh] (OLMoE style: projection, norm, split into
heads, RoPE). The keys are normalized before they enter the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aoe.model.norm import RMSNorm

QK_NORMS = ("none", "head", "full")


class RotaryEmbedding(nn.Module):
    """cos / sin tables [positions, Dh/2] in fp32, kept outside the state dict and outside
    ``module.to(dtype)`` (a bf16 table would lose the positions' precision). The tables cover the
    positions used so far: they grow (in blocks of ``BLOCK`` positions, each computed alone, so a
    position's value never depends on the table's length) as longer sequences come, up to
    ``max_seq_len``; a device gets a copy of the CPU table the first time it is asked for there."""

    BLOCK = 1024

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, float(theta)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _block(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (fp32, CPU) of positions first .. first + BLOCK - 1."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device="cpu")
                                         / self.head_dim))
        positions = torch.arange(first, first + self.BLOCK, dtype=torch.float64, device="cpu")
        angles = torch.outer(positions, inv_freq)
        return angles.cos().float(), angles.sin().float()

    def _cpu_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU tables, grown to cover at least ``length`` positions (device copies dropped)."""
        cpu = torch.device("cpu")
        have = self._tables.get(cpu)
        done = 0 if have is None else have[0].shape[0]
        if done >= length:
            return have
        want = min(max(length, 2 * done), self.max_seq_len)
        blocks = [self._block(first) for first in range(done, want, self.BLOCK)]
        cos = torch.cat(([have[0]] if have else []) + [b[0] for b in blocks])[:want]
        sin = torch.cat(([have[1]] if have else []) + [b[1] for b in blocks])[:want]
        self._tables = {cpu: (cos, sin)}
        return cos, sin

    def _tables_for(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables of at least ``length`` positions on ``device``."""
        tables = self._tables.get(device)
        if tables is None or tables[0].shape[0] < length:
            cos, sin = self._cpu_tables(length)
            tables = (cos, sin) if device == torch.device("cpu") else (cos.to(device), sin.to(device))
            self._tables[device] = tables
        return tables

    def forward(self, start_pos: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, Dh/2] (fp32) of positions start_pos .. start_pos + length - 1."""
        cos, sin = self._tables_for(start_pos + length, device)
        return cos[start_pos : start_pos + length], sin[start_pos : start_pos + length]

    def at(self, positions_BT: torch.Tensor, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, Dh/2] (fp32) of per-sequence positions [B, T] (padded batches), all
        below ``end`` (default max_seq_len)."""
        cos, sin = self._tables_for(self.max_seq_len if end is None else end, positions_BT.device)
        return cos[positions_BT].unsqueeze(1), sin[positions_BT].unsqueeze(1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta}"


def apply_rotary(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, Dh] by the angles of its T positions (cos/sin [T, Dh/2], or [B, 1, T, Dh/2]
    for per-sequence positions); fp32 inside."""
    x1, x2 = x_BHTK.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_TK - x2 * sin_TK, x2 * cos_TK + x1 * sin_TK), dim=-1)
    return out.to(x_BHTK.dtype)


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    ``k[layer]`` and ``v[layer]``: [B, G, max_len, Dh]. A forward with ``kv_cache=cache,
    start_pos=p`` on T new tokens writes positions p .. p+T-1 of every layer and attends to
    positions 0 .. p+T-1; ``length`` is then p + T. Writing at p < length overwrites (rewinds).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        for name, v in (("n_layers", n_layers), ("batch_size", batch_size), ("n_kv_heads", n_kv_heads),
                        ("head_dim", head_dim), ("max_len", max_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"KVCache: {name}={v!r} must be a positive integer")
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    @classmethod
    def for_model(
        cls, model: nn.Module, batch_size: int, max_len: int | None = None, *,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> "KVCache":
        """A cache shaped for a ``Transformer`` (max_len defaults to its max_seq_len; dtype and
        device to its embedding's)."""
        cfg = model.config
        weight = model.embed_tokens.weight
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        return cls(
            cfg.n_layers, batch_size, cfg.kv_heads, cfg.head_dim, max_len,
            device=weight.device if device is None else device, dtype=weight.dtype if dtype is None else dtype,
        )

    def update(
        self, layer: int, start_pos: int, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values at start_pos; return views of positions 0 .. start_pos+T-1."""
        end = start_pos + k_BGTK.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: positions up to {end} do not fit max_len={self.max_len}")
        self.k[layer][:, :, start_pos:end] = k_BGTK
        self.v[layer][:, :, start_pos:end] = v_BGTK
        self.length = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        """Forget every position (the memory is kept and overwritten by the next writes)."""
        self.length = 0

    def __repr__(self) -> str:
        B, G, S, Dh = self.k[0].shape
        return f"KVCache(layers={len(self.k)}, batch={B}, kv_heads={G}, max_len={S}, head_dim={Dh}, length={self.length}, dtype={self.k[0].dtype})"


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE and grouped-query heads (biases on q/k/v with
    ``qkv_bias``, Qwen2 style; none on o_proj).

    Weights: q_proj [H*Dh, D], k_proj / v_proj [G*Dh, D], o_proj [D, H*Dh] (``nn.Linear`` layout);
    with qkv_bias also q_proj.bias [H*Dh], k_proj.bias / v_proj.bias [G*Dh];
    with qk_norm="head" also q_norm.weight / k_norm.weight [Dh], with "full" q_norm.weight [H*Dh]
    and k_norm.weight [G*Dh] (RMSNorms of epsilon norm_eps; see the module docstring). With
    qk_norm="none" ``q_norm`` and ``k_norm`` are None (no parameters).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, qk_norm: str = "none",
                 norm_eps: float = 1e-5, qkv_bias: bool = False):
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r} is not one of {list(QK_NORMS)}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} does not divide d_model={d_model}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} does not divide n_heads={n_heads}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.qk_norm = qk_norm
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, norm_eps)
            self.k_norm = RMSNorm(self.head_dim, norm_eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(n_heads * self.head_dim, norm_eps)
            self.k_norm = RMSNorm(n_kv_heads * self.head_dim, norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_TK: torch.Tensor,
        sin_TK: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        start_pos: int = 0,
        allowed_B1TS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]. ``allowed_B1TS`` (padded batches, ``aoe.model.padding``): the
        keys each query may attend to, replacing the causal rule; None = causal over every key."""
        B, T, _ = x_BTD.shape
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k = self.q_proj(x_BTD), self.k_proj(x_BTD)  # [B, T, H*Dh], [B, T, G*Dh]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, H, Dh), k.view(B, T, G, Dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, G, Dh).transpose(1, 2)
        q, k = apply_rotary(q, cos_TK, sin_TK), apply_rotary(k, cos_TK, sin_TK)

        mask, is_causal = None, T > 1
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, start_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if start_pos > 0:  # T new queries at positions start_pos.. over S = start_pos + T keys
                is_causal = False
                if T > 1:
                    S = start_pos + T
                    mask = torch.arange(S, device=q.device)[None, :] <= (start_pos + torch.arange(T, device=q.device))[:, None]
        if allowed_B1TS is not None:
            mask, is_causal = allowed_B1TS, False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=G != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))

    def extra_repr(self) -> str:
        extra = f", qk_norm={self.qk_norm!r}" if self.qk_norm != "none" else ""
        return f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}{extra}"
