"""Padding: a 2-D attention mask (the Hugging Face convention) turned into what the model uses.

The mask ``attention_mask_BS`` covers every position the keys come from: the S = start_pos + T
slots of the KV cache (the cached ones and the T new ones), or just the T tokens without a cache.
1 / True marks a real token, 0 / False a pad. Left padding, right padding and pads in between
are all allowed. From it:

- ``positions_BT``: each new token's position in its own sequence (the number of real tokens
  before it), so the rotary angles of a padded sequence are those of the sequence alone. A pad
  takes the position of the next real token (it is never seen, the value does not matter).
- ``allowed_B1TS``: which keys each new token attends to: the causal rule over the cache slots,
  and never a pad key. A pad query attends to itself only, so no row of the softmax is empty
  (an empty row would be NaN, and NaN times a zero weight is still NaN downstream).
- ``real_BT``: the new tokens that are real; the sparse FFNs route only these, and the loss
  leaves the others out.

Shape legend: B batch, T new tokens, S key slots (cached + new).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Padding:
    """What a padded forward needs (see the module docstring)."""

    positions_BT: torch.Tensor
    allowed_B1TS: torch.Tensor
    real_BT: torch.Tensor


def check_attention_mask(mask: torch.Tensor, batch: int, start_pos: int, length: int) -> torch.Tensor:
    """The mask as bool [B, start_pos + T]; [B, T] is accepted when start_pos is 0. Values other
    than 0 and 1 are refused (a 4-D additive mask belongs to another convention)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be a 2-D [batch, length] mask of 0s and 1s, got {shape}")
    if mask.shape != (batch, start_pos + length):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; expected ({batch}, {start_pos + length}): "
            f"one entry per cached position ({start_pos}) and per new token ({length})"
        )
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(f"attention_mask must hold 0s and 1s (bool or integer), got dtype {mask.dtype}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token)")
        mask = mask != 0
    return mask


def positions(mask_BS: torch.Tensor, start_pos: int) -> torch.Tensor:
    """[B, T]: each new token's position in its own sequence, the real tokens strictly before its
    slot (slots start_pos .. S - 1 of the bool key mask [B, S])."""
    real_before_BS = mask_BS.long().cumsum(dim=1) - mask_BS.long()
    return real_before_BS[:, start_pos:]


def padding(mask_BS: torch.Tensor, start_pos: int, length: int) -> Padding:
    """Positions, allowed keys and real tokens of the T = ``length`` new tokens (slots
    start_pos .. start_pos + T - 1) from the bool key mask [B, S]."""
    device = mask_BS.device
    positions_BT = positions(mask_BS, start_pos)
    slot_T = start_pos + torch.arange(length, device=device)
    key_S = torch.arange(mask_BS.shape[1], device=device)
    causal_TS = key_S[None, :] <= slot_T[:, None]
    self_TS = key_S[None, :] == slot_T[:, None]
    allowed_BTS = (causal_TS[None] & mask_BS[:, None, :]) | self_TS[None]
    return Padding(positions_BT, allowed_BTS[:, None], mask_BS[:, start_pos:])
