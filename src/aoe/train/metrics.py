"""What the trainer measures and where it writes it.

- ``RoutingStats``: per sparse layer, tokens per expert, Ent_load, Ent_conf, max/mean load, the
  mean gate weight of each rank (top-1, top-2, ...) and the number of dead experts, accumulated
  over several forwards (definitions in ``aoe.nn.balance``); for top-p and expert choice also
  the experts per token (mean and distribution) and the tokens no expert took.
- ``MetricsLogger``: ``OUT/metrics.jsonl`` (one JSON object per line; training entries carry
  ``step`` and ``loss``, validation entries ``step`` and ``val_loss``), and TensorBoard scalars
  when the ``tensorboard`` package is installed.
- ``measure_matmul_flops``: the dense matmul rate of a device and dtype, the practical peak the
  MFU estimate divides by.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from aoe.nn.balance import confidence_entropy, imbalance, load_entropy
from aoe.nn.sparse import SparseFFN, sparse_layers
from aoe.train.distributed import DistInfo, all_reduce_sum
from aoe.utils.files import atomic_write_text


#: A layer's ``last_loss_terms`` -> the per-layer metric that logs its mean over the collected forwards.
LOSS_TERMS = {"entropy": "entropy_loss", "erc": "erc_loss", "erc_eps": "erc_eps"}


class RoutingStats:
    """Accumulates the routing of every sparse layer of a model over forwards.

    Call ``collect()`` after each forward; ``summary()`` returns one dict per sparse layer:
    ``{"layer", "kind", "tokens_per_expert", "ent_load", "ent_conf", "imbalance",
    "gate_weight_mean", "dead_experts"}`` with Ent_conf the token-weighted mean over the collected
    forwards; ``gate_weight_mean[j]`` the mean over tokens of the (j+1)-th largest chosen gate
    weight (how much of the expert outputs reaches the residual stream: without renormalization
    they sum to less than 1; 0 for a slot a token left unused); ``dead_experts`` the number of
    experts that received no token. A layer with an auxiliary term on adds its unweighted mean
    (``LOSS_TERMS``: ``"entropy_loss"`` = Ent_conf as trained, ``"erc_loss"``, ``"erc_eps"`` = the
    mean noise bound of the ERC loss).

    A layer whose ``selection`` is not top-k adds ``"selection"`` (its rule), ``"experts_per_token"``
    (the mean), ``"experts_per_token_hist"`` (entry j: the tokens that used j experts),
    ``"unchosen_tokens"`` (tokens no expert took: expert choice's drops, which pass through the
    residual only) and ``"causal"`` (false when some collected forward routed by expert choice,
    whose routing sees later tokens of a sequence; true when evaluation fell back to top-k).
    Under torch.distributed the counts and sums are reduced over ranks, so every rank sees the
    global statistics.
    """

    def __init__(self, model: torch.nn.Module):
        # a block knows its index (``Block.layer_idx``); a sparse layer outside a block is numbered
        # by its place among the sparse layers
        block_of = {id(m.ffn): m.layer_idx for m in model.modules()
                    if isinstance(getattr(m, "layer_idx", None), int) and isinstance(getattr(m, "ffn", None), SparseFFN)}
        self.layers: list[tuple[int, SparseFFN]] = [
            (block_of.get(id(layer), i), layer) for i, layer in enumerate(sparse_layers(model))]
        self.reset()

    def reset(self) -> None:
        self.counts = [torch.zeros(m.n_experts, dtype=torch.float64) for _, m in self.layers]
        self.conf_sum = torch.zeros(len(self.layers), dtype=torch.float64)
        self.gate_sums = [torch.zeros(max_slots(m), dtype=torch.float64) for _, m in self.layers]
        self.hists = [torch.zeros(max_slots(m) + 1, dtype=torch.float64) for _, m in self.layers]
        self.n_tokens = torch.zeros(len(self.layers), dtype=torch.float64)
        self.leaky = torch.zeros(len(self.layers), dtype=torch.float64)  # forwards routed by expert choice
        self.terms = torch.zeros(len(self.layers), 2 * len(LOSS_TERMS), dtype=torch.float64)  # sums, then counts

    @torch.no_grad()
    def collect(self) -> None:
        for i, (_, layer) in enumerate(self.layers):
            info = layer.last_routing
            if info is None:
                continue
            self.counts[i] += info.tokens_per_expert.double().cpu()
            n = info.probs.shape[0]
            if n:
                self.conf_sum[i] += confidence_entropy(info.probs) * n
                gate_sum = info.gate_weights.double().sort(dim=-1, descending=True).values.sum(0).cpu()
                self.gate_sums[i][: gate_sum.numel()] += gate_sum
                if getattr(layer, "selection", "top_k") != "top_k":  # (top-k: every token uses k)
                    self.hists[i] += torch.bincount(info.experts_per_token_counts().cpu(),
                                                    minlength=self.hists[i].numel()).double()
                self.n_tokens[i] += n
            self.leaky[i] += 0.0 if info.causal else 1.0
            self._collect_terms(i, getattr(layer, "last_loss_terms", {}))

    def _collect_terms(self, i: int, terms: dict) -> None:
        for j, name in enumerate(LOSS_TERMS):
            if name in terms:
                self.terms[i, j] += float(terms[name])
                self.terms[i, len(LOSS_TERMS) + j] += 1

    def summary(self, dist_info: DistInfo | None = None) -> list[dict[str, Any]]:
        if not self.layers:
            return []
        n = len(self.layers)
        flat = torch.cat([*self.counts, *self.gate_sums, *self.hists, self.conf_sum, self.n_tokens, self.leaky,
                          self.terms.flatten()])
        if dist_info is not None:
            all_reduce_sum(flat, dist_info)
        sizes = [c.numel() for c in self.counts] + [g.numel() for g in self.gate_sums] + [h.numel() for h in self.hists]
        parts = list(flat.split([*sizes, n, n, n, self.terms.numel()]))
        conf_sum, n_tokens, leaky, terms = parts[-4], parts[-3], parts[-2], parts[-1].view_as(self.terms)
        out = []
        for i, (idx, layer) in enumerate(self.layers):
            counts, gate_sum = parts[i], parts[n + i]
            tokens = float(n_tokens[i])
            out.append({
                "layer": idx,
                "kind": type(layer).__name__.lower(),
                "tokens_per_expert": [int(c) for c in counts.tolist()],
                "ent_load": load_entropy(counts),
                "ent_conf": float(conf_sum[i] / n_tokens[i]) if n_tokens[i] > 0 else float("nan"),
                "imbalance": imbalance(counts),
                "gate_weight_mean": [float(g) / tokens if tokens > 0 else float("nan") for g in gate_sum.tolist()],
                "dead_experts": int((counts == 0).sum()) if tokens > 0 else None,
            })
            out[-1].update(_term_means(terms[i]))
            if getattr(layer, "selection", "top_k") != "top_k":
                out[-1].update(_rule_stats(layer.selection, parts[2 * n + i], tokens, float(leaky[i])))
        return out


def _term_means(sums_and_counts: torch.Tensor) -> dict[str, float]:
    n = len(LOSS_TERMS)
    return {key: float(sums_and_counts[j] / sums_and_counts[n + j])
            for j, key in enumerate(LOSS_TERMS.values()) if sums_and_counts[n + j] > 0}


def max_slots(layer: SparseFFN) -> int:
    """The most experts one token of ``layer`` can use (top-p: max_k; expert choice: every expert)."""
    rule = getattr(layer, "selection", "top_k")
    return {"top_p": getattr(layer, "max_k", layer.top_k), "expert_choice": layer.n_experts}.get(rule, layer.top_k)


def _rule_stats(rule: str, hist: torch.Tensor, tokens: float, leaky_forwards: float) -> dict[str, Any]:
    """The dynamic rules' statistics from the histogram of experts per token."""
    used = hist.sum()
    mean = float((hist * torch.arange(hist.numel(), dtype=hist.dtype)).sum() / used) if used > 0 else float("nan")
    return {"selection": rule, "experts_per_token": mean, "experts_per_token_hist": [int(h) for h in hist.tolist()],
            "unchosen_tokens": int(hist[0]), "causal": leaky_forwards == 0}


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf floats become None; tensors become numbers."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLogger:
    """Appends JSON lines to ``out_dir/metrics.jsonl`` (and TensorBoard scalars when available).

    Only the main process writes. ``truncate_after(step)`` drops entries of later steps (used on
    resume, so the log reads as one uninterrupted run).
    """

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
                except Exception:  # tensorboard not installed: the JSON log is the record
                    self._tb = None

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if entry.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def log(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        entry = _clean(entry)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self._tb is not None:
            step = entry.get("step", 0)
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)
            for layer in entry.get("layers") or []:
                for key in ("ent_load", "ent_conf", "imbalance"):
                    if layer.get(key) is not None:
                        self._tb.add_scalar(f"layer{layer['layer']}/{key}", layer[key], step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike, skipped: list[int] | None = None) -> list[dict[str, Any]]:
    """The entries of a metrics.jsonl, in file order: the project's one reader of that format.

    A line that is not a JSON object (one cut by a crash, say) is skipped; its 1-based line number
    is appended to ``skipped`` when a list is given. Blank lines are ignored. Bytes that are not
    UTF-8 (a character cut in half) are replaced, not fatal. A missing or unreadable file raises
    the ``OSError``.
    """
    out = []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            out.append(entry)
        elif skipped is not None:
            skipped.append(number)
    return out


@torch.no_grad()
def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 0.2) -> float:
    """FLOP/s of a square dense matmul on ``device`` in ``dtype`` (the practical peak for MFU)."""
    n = size or (4096 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    iters, start = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * iters / elapsed
