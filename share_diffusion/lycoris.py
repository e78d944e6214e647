"""LyCORIS layers as plain LoRA factors: LoHa and LoKr by a truncated SVD of their ΔW, LoCon's
CP/Tucker middle exactly.

Key names and scales are LyCORIS's (lycoris/modules/loha.py, lokr.py, locon.py) as the loaders
that apply its files read them (A1111's network_hada.py and network_lokr.py, ComfyUI's
weight_adapter). With r the rank and alpha/r = 1 when a file has no alpha:

  LoHa  ΔW = (hada_w1_a hada_w1_b) ∘ (hada_w2_a hada_w2_b) · alpha/r, r = rows of hada_w1_b.
        With hada_t1/hada_t2 (a convolution's Tucker core, r×r×k_h×k_w) each factor is
        w[p, q, …] = Σ_ij t[i, j, …] w_a[i, p] w_b[j, q].
  LoKr  ΔW = w1 ⊗ w2 · alpha/r, w1 = lokr_w1 or lokr_w1_a lokr_w1_b, w2 = lokr_w2 or
        lokr_w2_a lokr_w2_b (or their Tucker core lokr_t2); r = rows of lokr_w2_b, else of
        lokr_w1_b; both w1 and w2 full: scale 1.
  LoCon lora_mid (a CP/Tucker core, r×r×k_h×k_w) between lora_down (r×c_in×1×1) and lora_up:
        it folds into lora_down, lora_down'[n, j, …] = Σ_m lora_mid[n, m, …] lora_down[m, j], exactly.

ΔW of a convolution is d_out × (c_in·k_h·k_w), as torch flattens its weight; for LoKr that is
w1 ⊗ (w2 flattened the same way). A LoHa or LoKr ΔW is not a low-rank product of its factors'
size (a Hadamard product of two rank-r matrices has rank up to r², a Kronecker product the product
of the ranks), so it is reduced: the smallest rank whose truncated SVD keeps KEPT_ENERGY of ‖ΔW‖²_F,
at most a limit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .errors import first_line

#: A LoHa or LoKr layer keeps the smallest rank that holds this share of its ‖ΔW‖²_F.
KEPT_ENERGY = 0.99
#: The most rank a reduced layer gets (a plain LoRA of rank 128 is already a large one).
MAX_RANK = 128


class LycorisError(ValueError):
    """A LyCORIS layer whose tensors are missing or do not fit together."""


def kind(parts: dict[str, Tensor]) -> str | None:
    """"LoHa" or "LoKr" for a layer's tensors {hada_w1_a: …, alpha: …}; None for any other layer."""
    if any(p.startswith("hada_") for p in parts):
        return "LoHa"
    if any(p.startswith("lokr_") for p in parts):
        return "LoKr"
    return None


def _require(parts: dict[str, Tensor], *names: str) -> list[Tensor]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise LycorisError(f"lacks {', '.join(missing)}")
    return [parts[n].double() for n in names]


def _tucker(core: Tensor, factor_a: Tensor, factor_b: Tensor) -> Tensor:
    """w[p, q, …] = Σ_ij core[i, j, …] a[i, p] b[j, q], flattened to p × (q·…)."""
    return torch.einsum("ij...,ip,jq->pq...", core, factor_a, factor_b).flatten(1)


def _product(parts: dict[str, Tensor], prefix: str, core: str | None = None) -> Tensor:
    """prefix_a · prefix_b as a matrix (a convolution's _b flattened), through the Tucker core when
    the layer has one."""
    factor_a, factor_b = _require(parts, f"{prefix}_a", f"{prefix}_b")
    if core in parts:
        return _tucker(parts[core].double(), factor_a, factor_b)
    return factor_a @ factor_b.flatten(1)


def _scale(parts: dict[str, Tensor], rank: int | None) -> float:
    return float(parts["alpha"]) / rank if "alpha" in parts and rank else 1.0


def loha_delta(parts: dict[str, Tensor]) -> Tensor:
    """ΔW = (w1_a w1_b) ∘ (w2_a w2_b) · alpha/r (float64, d_out × d_in)."""
    first, second = _product(parts, "hada_w1", "hada_t1"), _product(parts, "hada_w2", "hada_t2")
    if first.shape != second.shape:
        raise LycorisError(f"multiplies a {tuple(first.shape)} by a {tuple(second.shape)} product")
    return first * second * _scale(parts, parts["hada_w1_b"].shape[0])


def lokr_delta(parts: dict[str, Tensor]) -> Tensor:
    """ΔW = w1 ⊗ w2 · alpha/r (float64, d_out × d_in)."""
    w1 = parts["lokr_w1"].double() if "lokr_w1" in parts else _product(parts, "lokr_w1")
    w2 = parts["lokr_w2"].double().flatten(1) if "lokr_w2" in parts else _product(parts, "lokr_w2", "lokr_t2")
    decomposed = [f"lokr_{w}_b" for w in ("w2", "w1") if f"lokr_{w}" not in parts]
    return torch.kron(w1, w2) * _scale(parts, parts[decomposed[0]].shape[0] if decomposed else None)


def delta_weight(parts: dict[str, Tensor]) -> Tensor:
    """A LoHa or LoKr layer's ΔW (float64, d_out × d_in; see kind)."""
    try:
        return loha_delta(parts) if kind(parts) == "LoHa" else lokr_delta(parts)
    except RuntimeError as error:  # factors whose shapes do not multiply
        raise LycorisError(f"has tensors whose shapes do not fit ({first_line(error)})") from None


def fold_mid(down: Tensor, mid: Tensor) -> Tensor:
    """LoCon's lora_down with its lora_mid folded in: (r, c_in, k_h, k_w), the same ΔW."""
    return torch.einsum("nm...,mj->nj...", mid, down.flatten(1))


class Reduction(NamedTuple):
    up: Tensor  # d_out × rank, float32
    down: Tensor  # rank × d_in, float32: ΔŴ = up · down
    rank: int
    needed: int  # the rank that keeps KEPT_ENERGY (above the limit, more than rank)
    lost: float  # ‖ΔW − ΔŴ‖²_F = the energy past the kept singular values


def reduce(delta: Tensor, max_rank: int = MAX_RANK) -> Reduction:
    """The truncated SVD of ΔW at the smallest rank that keeps KEPT_ENERGY of ‖ΔW‖², at most
    max_rank, as balanced factors U√S, √S Vᵀ."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    energy = s.square().cumsum(0)
    needed = int(torch.searchsorted(energy, KEPT_ENERGY * energy[-1])) + 1
    rank = min(needed, max_rank)
    root = s[:rank].sqrt()
    up, down = (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()
    return Reduction(up, down, rank, needed, float(energy[-1] - energy[rank - 1]))
