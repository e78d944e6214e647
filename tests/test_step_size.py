"""One training step moves a Share style's ΔW as far as it moves a real PEFT LoRA's, at any width."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from benchmarks.step_size import PaperParametrization, mean_step
from share_diffusion import share


class PeftLoraFactors(nn.Module):
    """A real PEFT LoRA layer's factors (B = lora_B.weight, A = lora_A.weightᵀ), started from `factors_a`."""

    def __init__(self, d_out: int, d_in: int, factors_a: torch.Tensor):
        super().__init__()
        model = nn.Sequential()
        model.add_module("proj", nn.Linear(d_in, d_out))
        self.lora = inject_adapter_in_model(LoraConfig(r=factors_a.shape[1], lora_alpha=factors_a.shape[1], target_modules=["proj"]), model)
        self.lora.requires_grad_(False)
        layer = self.lora.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(factors_a.T)
        self.lora_a, self.lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        for p in (self.lora_a, self.lora_b):
            p.requires_grad_(True)

    def factors(self):
        return self.lora_b, self.lora_a.T


@pytest.mark.parametrize("d_out, d_in", [(8, 12), (1280, 1280)])  # a tiny layer; SD1.5's widest
def test_a_share_step_moves_delta_w_as_far_as_a_peft_lora_step(d_out, d_in):
    ours = share.StyleInTraining("s", d_out, d_in, share.ShareConfig(rank=4), generator=torch.Generator().manual_seed(0))
    lora = PeftLoraFactors(d_out, d_in, ours.factors_a.detach().clone())
    assert float(lora.lora_b.abs().max()) == 0  # PEFT starts B at zero, as we do

    ratio = mean_step(ours, d_out, d_in, steps=5) / mean_step(lora, d_out, d_in, steps=5)

    assert ratio == pytest.approx(1, abs=1e-3)


def test_the_step_ratio_tells_the_replaced_parametrization_apart():
    d_out = d_in = 1280
    ours = share.StyleInTraining("s", d_out, d_in, share.ShareConfig(rank=4), generator=torch.Generator().manual_seed(0))
    lora = PeftLoraFactors(d_out, d_in, ours.factors_a.detach().clone())
    paper = PaperParametrization(d_out, d_in, 32, torch.Generator().manual_seed(0))

    ratio = mean_step(paper, d_out, d_in, steps=5) / mean_step(lora, d_out, d_in, steps=5)

    assert ratio < 0.5  # measured 0.26 over 20 steps: a widened orthonormal basis learns ~4x slower here
