"""The text-encoder learning-rate benchmark: a tiny sweep on the tiny random pipeline."""

from __future__ import annotations

from benchmarks import continual, text_encoder_lr
from share_diffusion import share
from share_diffusion.training import TrainingConfig

SETTINGS = continual.Settings(styles=("sepia", "halftone"), images_per_style=3, prompts=2, sampling_steps=2, generation_batch=2,
                              training=TrainingConfig(steps=2, batch_size=2, learning_rate=1e-2))  # fmt: skip


def test_the_text_encoder_learns_the_style_only_at_a_rate_above_zero(tiny_pipe):
    _, frozen = text_encoder_lr.learn(tiny_pipe, SETTINGS, "sepia", 0.0)
    unet, text_encoder = text_encoder_lr.learn(tiny_pipe, SETTINGS, "sepia", 1e-2)
    assert frozen is None and text_encoder is not tiny_pipe.text_encoder
    for model in (unet, text_encoder):
        layers = share.share_layers(model).values()
        assert layers and all(layer.style_ids == ["s1"] for layer in layers)
        assert any(float((b @ a.T).norm()) > 0 for b, a in (layer.style_factors("s1") for layer in layers))


def test_tiny_sweep_scores_every_rate_and_applies_the_rule(tiny_pipeline_dir):
    results = text_encoder_lr.run(SETTINGS, str(tiny_pipeline_dir), (0.0, 1e-2), prompts=2, log=lambda *_: None)
    assert results["styles"] == ["sepia", "halftone"]
    for by_rate in results["scores"].values():
        assert set(by_rate) == {0.0, 1e-2} and all(cell["S"]["count"] == cell["S*"]["count"] == 2 for cell in by_rate.values())
    means = results["mean_S"]
    best = max(means.values())
    assert results["chosen"] == min(rate for rate, mean in means.items() if mean >= best - text_encoder_lr.CLOSE)
    assert f"chooses **{results['chosen']:g}**" in text_encoder_lr.markdown_report(results, "command")
