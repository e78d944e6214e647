"""The known-drift benchmark on the tiny random pipeline, with random styles on its Share layers."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from benchmarks import continual, known_drift
from share_diffusion import share
from share_diffusion.loading import load_pipeline


def test_capped_libraries_drift_and_are_scored_against_the_exact_one(tiny_pipeline_dir, tmp_path):
    settings = continual.Settings(styles=("sepia", "halftone"), sampling_steps=2, generation_batch=2)
    unet = load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False).unet
    share.inject_share_layers(unet, share.ShareConfig(rank=4))
    generator = torch.Generator().manual_seed(0)
    factors = {f"{t}.{name}.{side}": torch.randn(width, 4, generator=generator)
               for t in range(2) for name, layer in share.share_layers(unet).items()
               for side, width in (("B", layer.d_out), ("A", layer.d_in))}  # fmt: skip
    save_file(factors, tmp_path / "trained_factors.safetensors")

    results = known_drift.run(settings, tmp_path / "trained_factors.safetensors", prompts=2, caps=(2,),
                              model=tiny_pipeline_dir, log=lambda *_: None)  # fmt: skip
    assert max(results["drift"]["exact"].values()) < 1e-5 and min(results["drift"]["cap 2"].values()) > 0.1
    for style in settings.styles:
        assert results["score"][style]["exact"]["S"]["count"] == 2
        assert set(results["exact_minus_capped"][style]["cap 2"]) == {"S", "S*"}
    assert "of 2 (style, cap) cases" in known_drift.markdown_report(results, "command")
