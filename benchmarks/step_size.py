"""How far one optimizer step moves a layer's ΔW: Share's training against a LoRA's, per layer shape.

    python -m benchmarks.step_size [--out runs/step_size]

For every distinct attention-projection shape of the embedded UNet, SD1.5's and SDXL's UNets (built on
the meta device: shapes only), one layer learns a random linear target with AdamW (lr 1e-3,
clipping as in training) for 20 steps from the same start, and the mean ‖ΔW_t − ΔW_{t−1}‖_F per
step is compared with a PEFT-style LoRA's (B = 0, A kaiming-uniform, rank 4):
  share   share.StyleInTraining, what training uses now (free factors beside the basis);
  paper   the loadings-in-a-widened-basis parametrization it replaced, B = [C_B, E_B] L_B,
          A = [C_A, E_A] L_A with orthonormal columns, φ = 8, on an empty basis (k = 0) and on
          one holding k = 32 directions per side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from benchmarks.merge import SD15_UNET_CONFIG, sd15_attention_shapes
from benchmarks.output import add_output_option
from share_diffusion import share
from share_diffusion.model_configs import CONFIGS_DIR

EMBEDDED_UNET = Path(__file__).resolve().parent.parent / "assets" / "base-model" / "unet"
RANK, PHI, STEPS, LEARNING_RATE = 4, 8, 20, 1e-3


def orthonormal_complement(basis: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """`count` random orthonormal columns orthogonal to basis's."""
    random = torch.randn(basis.shape[0], count, generator=generator, dtype=torch.float64)
    random = random - basis.double() @ (basis.double().mT @ random)
    return torch.linalg.qr(random).Q.float()


class PaperParametrization(nn.Module):
    """The style in training as loadings on a widened orthonormal basis (replaced by StyleInTraining)."""

    def __init__(self, d_out: int, d_in: int, k: int, generator: torch.Generator):
        super().__init__()
        empty_b, empty_a = torch.zeros(d_out, 0), torch.zeros(d_in, 0)
        self.basis_b = orthonormal_complement(empty_b, k, generator)
        self.basis_a = orthonormal_complement(empty_a, k, generator)
        self.extra_b = nn.Parameter(orthonormal_complement(self.basis_b, PHI, generator))
        self.extra_a = nn.Parameter(orthonormal_complement(self.basis_a, PHI, generator))
        bound = (k + PHI) ** -0.5
        self.loadings_a = nn.Parameter(torch.empty(k + PHI, RANK).uniform_(-bound, bound, generator=generator))
        self.loadings_b = nn.Parameter(torch.zeros(k + PHI, RANK))

    def factors(self) -> tuple[Tensor, Tensor]:
        return torch.cat([self.basis_b, self.extra_b], 1) @ self.loadings_b, torch.cat([self.basis_a, self.extra_a], 1) @ self.loadings_a


class LoraFactors(nn.Module):
    """A PEFT LoRA's factors: lora_B zero, lora_A kaiming-uniform (bound 1/√d_in)."""

    def __init__(self, d_out: int, d_in: int, generator: torch.Generator):
        super().__init__()
        self.factors_b = nn.Parameter(torch.zeros(d_out, RANK))
        self.factors_a = nn.Parameter(torch.empty(d_in, RANK).uniform_(-(d_in**-0.5), d_in**-0.5, generator=generator))

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.factors_b, self.factors_a


def mean_step(module: nn.Module, d_out: int, d_in: int, seed: int = 0, steps: int = STEPS) -> float:
    """Mean ‖ΔW_t − ΔW_{t−1}‖_F over `steps` AdamW steps on a fixed random regression."""
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(64, d_in, generator=generator)
    targets = inputs @ torch.randn(d_in, d_out, generator=generator) * d_in**-0.5 * 0.1
    optimizer = torch.optim.AdamW(module.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    previous, moved = torch.zeros(d_out, d_in), []
    for _ in range(steps):
        factors_b, factors_a = module.factors()
        loss = (inputs @ factors_a @ factors_b.mT - targets).square().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(module.parameters()), 1.0)
        optimizer.step()
        with torch.no_grad():
            factors_b, factors_a = module.factors()
            delta = factors_b @ factors_a.mT
        moved.append(float((delta - previous).norm()))
        previous = delta
    return sum(moved) / len(moved)


def step_ratios(d_out: int, d_in: int) -> dict[str, float]:
    """Share / LoRA and paper / LoRA mean step sizes for one layer shape."""
    lora = mean_step(LoraFactors(d_out, d_in, torch.Generator().manual_seed(0)), d_out, d_in)
    ours = share.StyleInTraining("s", d_out, d_in, share.ShareConfig(rank=RANK), generator=torch.Generator().manual_seed(0))
    ratios = {"share": mean_step(ours, d_out, d_in) / lora}
    for k in (0, 32):
        paper = PaperParametrization(d_out, d_in, min(k, d_out - PHI, d_in - PHI), torch.Generator().manual_seed(0))
        ratios[f"paper_k{k}"] = mean_step(paper, d_out, d_in) / lora
    return ratios


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_output_option(parser, "step_size")
    args = parser.parse_args(argv)
    configs = {"embedded": EMBEDDED_UNET, "SD1.5": None, "SDXL": CONFIGS_DIR / "sdxl-base" / "unet"}
    configs = {m: SD15_UNET_CONFIG if f is None else {k: v for k, v in UNet2DConditionModel.load_config(f).items() if not k.startswith("_")}
               for m, f in configs.items()}  # fmt: skip
    rows = []
    for model, config in configs.items():
        for d_out, d_in in sorted(sd15_attention_shapes(config)):
            rows.append({"model": model, "d_out": d_out, "d_in": d_in, **step_ratios(d_out, d_in)})
            print(rows[-1])
    lines = [
        "`python -m benchmarks.step_size`", "",
        f"Mean ‖ΔW_t − ΔW_(t−1)‖_F over {STEPS} AdamW steps (lr {LEARNING_RATE:g}, rank {RANK}, clip 1.0) on a random "
        "linear target, divided by a LoRA's from the same start. Share: `share.StyleInTraining` (training now). "
        f"Paper: loadings on a widened orthonormal basis, φ = {PHI}, with k = 0 or 32 directions already in the basis "
        "(what training used before).", "",
        "| model | layer (d_out × d_in) | Share / LoRA | paper, k = 0 / LoRA | paper, k = 32 / LoRA |", "|---|---|---:|---:|---:|",
    ]  # fmt: skip
    lines += [f"| {r['model']} | {r['d_out']} × {r['d_in']} | {r['share']:.3f} | {r['paper_k0']:.3f} | {r['paper_k32']:.3f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_size.md").write_text("\n".join(lines) + "\n")
    (args.out / "step_size.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}/step_size.md")


if __name__ == "__main__":
    main()
