"""The drift/bytes benchmark's table, on small layers (the full run is in benchmarks/results/)."""

from __future__ import annotations

from collections import Counter

import torch
from safetensors.torch import save_file

from benchmarks import drift_bytes


def test_no_limit_keeps_every_style_and_a_limit_cuts_and_saves_bytes():
    layers = drift_bytes.synthetic_layers(Counter({(16, 24): 3}), count=6)
    table = drift_bytes.drift_table(layers, limits=(None, 8), counts=(2, 6))
    rows = {(r["size_limit"], r["styles"]): r for r in table}
    assert rows[None, 6]["drift_max"] < 1e-5 and rows[None, 6]["k_max"] == 24 and rows[None, 6]["cut_styles"] == 0
    assert rows[8, 2]["drift_max"] < 1e-5  # two rank-4 styles fit in 8 directions
    assert rows[8, 6]["k_max"] == 8 and rows[8, 6]["drift_max"] > 0.01 and rows[8, 6]["cut_styles"] > 0
    assert rows[8, 6]["library_bytes"] < rows[None, 6]["library_bytes"]
    # rank-4 files: 3 layers × 6 styles × 4 × (16 + 24) float32 values
    assert rows[None, 6]["lora_bytes"] == 3 * 6 * 4 * 4 * (16 + 24)


def test_trained_styles_are_read_back_per_layer_in_training_order(tmp_path):
    path = tmp_path / "trained_factors.safetensors"
    factors = {t: (torch.randn(8, 4), torch.randn(6, 4)) for t in range(3)}
    save_file({f"{t}.down.attn1.to_q.{side}": x for t, pair in factors.items() for side, x in zip("BA", pair)}, path)
    layers = drift_bytes.trained_layers(path)
    assert list(layers) == ["down.attn1.to_q"] and layers["down.attn1.to_q"][0] == 1
    for (b, a), (expected_b, expected_a) in zip(layers["down.attn1.to_q"][1], factors.values()):
        assert torch.equal(b, expected_b) and torch.equal(a, expected_a)
