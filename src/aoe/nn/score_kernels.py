"""Triton kernels of AoE's fused scoring (imported only where triton is; see ``aoe.nn.fused_scores``).

Both kernels compute tiles of ``c = x @ w_down`` over the fused [D, X] view (X = E*L, expert-major)
and never write c to memory:

- ``norm_partials``: each [BT, BN] tile of c is reduced in registers, in fp32, to one partial norm
  per (token, expert, column chunk): a sum of squares (l2), of magnitudes (l1) or their maximum
  (linf). The chunks of an expert (``ceil(L / BN)``, a few) are combined afterwards, on [T, E, chunks].
- ``norm_grad``: the backward recomputes the same tiles and writes only
  ``dc = dnorm/dc * grad_norm``, in x's dtype (l2: ``c * g / n``; l1: ``sign(c) * g``), from which
  two plain matmuls give the gradients of x and w_down.

Every loop bound is a ``tl.constexpr`` (D; the loop is ``range(0, D, BK)``): triton 3.6 with
numpy 2.4 fails on loop bounds passed at run time. Offsets are int64, so T * X may exceed 2^31.
Programs are laid out in groups of ``GROUP_T`` token blocks, so that neighbouring programs reuse
the same columns of w_down from L2.

Shape legend: T tokens, D model dim, E experts, L = d_low, X = E*L, BT/BN/BK the tile's tokens,
columns and reduction step, C column chunks per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ORDS = {"l2": 2, "l1": 1, "linf": 0}  # linf: forward only (its gradient needs tie counts)


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch settings; ``for_input`` chooses them."""

    block_t: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_t: int = 8

    @staticmethod
    def for_input(x_TD: torch.Tensor, d_low: int) -> "Tiles":
        """GPU: 128-token tiles over up to 128 columns of one expert, a 64-wide reduction step.
        CPU (the interpreter runs each program as numpy ops): tiles of 32, at most 64 columns."""
        n = max(16, min(128 if x_TD.is_cuda else 64, triton.next_power_of_2(d_low)))
        if x_TD.is_cuda:
            return Tiles(128, n, 64, num_warps=8 if n >= 128 else 4)
        return Tiles(32, n, 32)


@triton.jit
def _program_tile(T, n_cols, BT: tl.constexpr, GROUP_T: tl.constexpr):
    """The (token block, column block) of this program, grouped for L2 reuse."""
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BT)
    per_group = GROUP_T * n_cols
    first_t = (pid // per_group) * GROUP_T
    group_size = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_size
    pid_c = (pid % per_group) // group_size
    return pid_t, pid_c


@triton.jit
def _activation_tile(x_ptr, w_ptr, offs_t, cols, mask_t, mask_n, sxt, sxd, swd, swx,
                     D: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """c[offs_t, cols] = x[offs_t, :] @ w[:, cols], accumulated in fp32 ([BT, BN])."""
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < D
        a = tl.load(x_ptr + offs_t[:, None] * sxt + offs_k[None, :] * sxd,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + offs_k[:, None] * swd + cols[None, :] * swx,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 wrongly: fp32 operands there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 operands: full fp32 products, not tf32
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tile_coords(T, E, L: tl.constexpr, C: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                 GROUP_T: tl.constexpr):
    """This program's tokens, expert, column block (expert * C + chunk), columns in X, masks."""
    pid_t, pid_c = _program_tile(T, E * C, BT, GROUP_T)
    expert = pid_c // C
    offs_t = pid_t.to(tl.int64) * BT + tl.arange(0, BT)
    offs_l = (pid_c % C) * BN + tl.arange(0, BN)
    cols = expert.to(tl.int64) * L + offs_l
    return offs_t, expert, pid_c, cols, offs_t < T, offs_l < L


@triton.jit
def _norm_partials_kernel(x_ptr, w_ptr, part_ptr, T, E, sxt, sxd, swd, swx,
                          D: tl.constexpr, L: tl.constexpr, C: tl.constexpr, ORD: tl.constexpr,
                          BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_T: tl.constexpr,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """part[t, e, chunk] = the chunk's sum of c^2 (ORD 2), of |c| (ORD 1) or max |c| (ORD 0)."""
    offs_t, expert, pid_c, cols, mask_t, mask_n = _tile_coords(T, E, L, C, BT, BN, GROUP_T)
    c = _activation_tile(x_ptr, w_ptr, offs_t, cols, mask_t, mask_n, sxt, sxd, swd, swx,
                         D, BT, BN, BK, UPCAST, IEEE)  # masked columns are exactly 0
    if ORD == 2:
        part = tl.sum(c * c, axis=1)
    elif ORD == 1:
        part = tl.sum(tl.abs(c), axis=1)
    else:
        part = tl.max(tl.abs(c), axis=1)
    tl.store(part_ptr + offs_t * (E * C) + pid_c, part, mask=mask_t)


@triton.jit
def _norm_grad_kernel(x_ptr, w_ptr, norm_ptr, grad_ptr, dc_ptr, T, E, sxt, sxd, swd, swx,
                      D: tl.constexpr, L: tl.constexpr, C: tl.constexpr, ORD: tl.constexpr,
                      BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_T: tl.constexpr,
                      UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """dc[t, cols] = dnorm[t, e]/dc * grad[t, e] for this tile (ORD 2 or 1), stored in dc's dtype."""
    offs_t, expert, _, cols, mask_t, mask_n = _tile_coords(T, E, L, C, BT, BN, GROUP_T)
    c = _activation_tile(x_ptr, w_ptr, offs_t, cols, mask_t, mask_n, sxt, sxd, swd, swx,
                         D, BT, BN, BK, UPCAST, IEEE)
    g = tl.load(grad_ptr + offs_t * E + expert, mask=mask_t, other=0.0)
    if ORD == 2:
        n = tl.load(norm_ptr + offs_t * E + expert, mask=mask_t, other=1.0)
        dc = c * (g / tl.maximum(n, 1.1754943508222875e-38))[:, None]  # n clamped at fp32's tiny
    else:
        sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
        dc = sign * g[:, None]
    tl.store(dc_ptr + offs_t[:, None] * (E * L) + cols[None, :], dc.to(dc_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_n[None, :])


def new_buffer(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' outputs, left unwritten (tests fill them with NaN to see that every element is written)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _launch_args(x_TD: torch.Tensor, w_DX: torch.Tensor, d_low: int, norm: str, tiles: Tiles):
    T, D = x_TD.shape
    E = w_DX.shape[1] // d_low
    C = triton.cdiv(d_low, tiles.block_n)
    grid = (triton.cdiv(T, tiles.block_t) * E * C,)
    upcast = x_TD.dtype == torch.bfloat16 and not x_TD.is_cuda
    strides = (x_TD.stride(0), x_TD.stride(1), w_DX.stride(0), w_DX.stride(1))
    meta = dict(D=D, L=d_low, C=C, ORD=ORDS[norm], BT=tiles.block_t, BN=tiles.block_n, BK=tiles.block_k,
                GROUP_T=tiles.group_t, UPCAST=upcast, IEEE=x_TD.dtype == torch.float32,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return grid, T, E, C, strides, meta


def norm_partials(x_TD: torch.Tensor, w_DX: torch.Tensor, d_low: int, norm: str, tiles: Tiles) -> torch.Tensor:
    """[T, E, C] fp32 partial norms of ``x_TD @ w_DX`` per expert and column chunk."""
    grid, T, E, C, strides, meta = _launch_args(x_TD, w_DX, d_low, norm, tiles)
    part_TEC = new_buffer((T, E, C), x_TD.device, torch.float32)
    if T > 0:
        _norm_partials_kernel[grid](x_TD, w_DX, part_TEC, T, E, *strides, **meta)
    return part_TEC


def norm_grad(x_TD: torch.Tensor, w_DX: torch.Tensor, norms_TE: torch.Tensor, grad_TE: torch.Tensor,
              d_low: int, norm: str, tiles: Tiles) -> torch.Tensor:
    """[T, X] in x's dtype: the gradient of the norms' loss w.r.t. ``c = x_TD @ w_DX``."""
    if norm not in ("l2", "l1"):
        raise ValueError(f"norm={norm!r} has no fused backward; use scores_backend='torch'")
    grid, T, E, C, strides, meta = _launch_args(x_TD, w_DX, d_low, norm, tiles)
    dc_TX = new_buffer((T, E * d_low), x_TD.device, x_TD.dtype)
    if T > 0:
        _norm_grad_kernel[grid](x_TD, w_DX, norms_TE, grad_TE, dc_TX, T, E, *strides, **meta)
    return dc_TX
