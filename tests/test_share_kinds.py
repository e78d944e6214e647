"""Share layers on every kind of module a LoRA touches: Linear, 1×1 and k×k convolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from share_diffusion import share


@pytest.mark.parametrize("base", [nn.Linear(6, 5), nn.Conv2d(6, 5, 1), nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 5, 3, stride=2)])
def test_adapter_applies_the_flattened_delta(base):
    """y = base(x) + the layer with weight ΔW reshaped to the base weight: in a mix, fused, and
    per item; for a convolution ΔW is d_out × (c_in·k·k)."""
    torch.manual_seed(0)
    layer = share.ShareLinear(base, share.ShareConfig())
    assert (layer.d_out, layer.d_in) == (5, base.weight[0].numel())
    factors = {s: (torch.randn(layer.d_out, 2), torch.randn(layer.d_in, 2)) for s in ("a", "b")}
    for style, (b, a) in factors.items():
        layer.add_style(style, b, a, scale=0.5)
    x = torch.randn(2, 6, 7, 7) if isinstance(base, nn.Conv2d) else torch.randn(2, 3, 6)
    reference = nn.Conv2d(6, 5, base.kernel_size, base.stride, base.padding) if isinstance(base, nn.Conv2d) else nn.Linear(6, 5)
    reference.load_state_dict(base.state_dict())
    with torch.no_grad():
        reference.weight += (0.5 * 1.5 * factors["a"][0] @ factors["a"][1].mT).reshape(base.weight.shape)
        expected = reference(x)
    layer.set_active_styles({"a": 1.5})
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.fuse()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unfuse()
    layer.set_active_styles([{"a": 1.5}, {}])
    out = layer(x)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], base(x)[1])


def test_training_only_touches_the_chosen_modules_and_the_rest_gets_rank_zero():
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(4, 4))
    model.add_module("proj_in", nn.Conv2d(4, 4, 1))
    share.inject_share_layers(model, share.ShareConfig(target_modules=("to_q", "proj_in")))
    parameters = share.begin_style_training(model, "s1", modules=("to_q",))
    assert len(parameters) == 2 and model.proj_in.style_in_training is None
    with torch.no_grad():
        model.to_q.style_in_training.factors_b += 1
    share.finish_style_training(model)
    assert share.style_ids(model) == ["s1"]
    assert model.proj_in.style_loadings("s1")[0].shape == (0, 0)
    assert model.to_q.style_loadings("s1")[0].shape[1] == 4
