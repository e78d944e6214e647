"""The continual benchmark: its prompts and references, and a tiny run of the whole pipeline
(2 styles, 2 training steps, 2 sampling steps, the tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import continual, specificity
from share_diffusion import world


def test_evaluation_captions_are_fixed_and_distinct():
    captions = continual.evaluation_captions(16, seed=2026)
    assert captions == continual.evaluation_captions(16, seed=2026)
    assert len(set(captions)) == 16
    assert captions != continual.evaluation_captions(16, seed=2027)


def test_references_render_each_caption_in_the_style():
    captions = continual.evaluation_captions(3, seed=0)
    references = continual.reference_renders("sepia", captions)
    plain = np.stack([world.render(world.parse_caption(c)) for c in captions])
    assert references.shape == plain.shape
    for caption, reference, image in zip(captions, references, plain):
        assert np.array_equal(reference, world.style_sepia(world.parse_caption(caption), None))
        assert reference[..., 0].mean() > reference[..., 2].mean() and not np.allclose(reference, image)
    # from other scenes that fit the caption: the shape moves, the style stays
    assert not np.allclose(continual.reference_renders("sepia", captions, jitter_seed=5), references)


@pytest.fixture(scope="module")
def tiny_results(tiny_pipeline_dir):
    settings = continual.Settings(
        styles=("sepia", "halftone"), images_per_style=3, prompts=4, diagonal_prompts=2, eig_prompts=2,
        validation_prompts=2, sampling_steps=2, generation_batch=3, strengths=(0.5,), caps=(2,),
        training=continual.TrainingConfig(steps=2, batch_size=2),
    )  # fmt: skip
    return settings, continual.run_benchmark(settings, tiny_pipeline_dir, log=lambda *_: None)


def test_tiny_run_compares_share_with_a_lora_started_and_fed_alike(tiny_results):
    settings, results = tiny_results
    methods = results["methods"]
    assert set(methods) == {"share", "share_eig", "lora", "sequential_lora"}
    for style in settings.styles:
        share_score, lora_score = methods["share"]["final"][style], methods["lora"]["final"][style]
        assert share_score["count"] == lora_score["count"] == settings.prompts
        # the same start, batches and noise: Share's training is a LoRA's, and its merge is exact
        assert share_score["value"] == pytest.approx(lora_score["value"], abs=1e-3)
        assert results["ratio"][style]["count"] == settings.prompts
        assert methods["share"]["drift"][style] < 1e-5
    # the eig merge at the same k is lossy from the first style on
    assert max(methods["share_eig"]["drift"].values()) > 1e-3
    # the sequential LoRA's first style is trained as the independent one's; the last has nothing after it
    sequential = methods["sequential_lora"]
    assert sequential["after_learning"]["sepia"]["value"] == pytest.approx(methods["share"]["after_learning"]["sepia"]["value"], abs=1e-3)
    assert sequential["forgetting"]["halftone"] == pytest.approx(0, abs=1e-6)


def test_tiny_run_validates_the_measure_and_learning_does_not_depend_on_the_library(tiny_results):
    settings, results = tiny_results
    validation = results["validation"]
    assert set(validation["strength_sweep"]) == {"sepia", "halftone"}
    assert list(validation["strength_sweep"]["sepia"]) == [0.0, 0.5, 1.0]
    assert validation["strength_sweep"]["sepia"][0.0] == validation["closeness_sweep"]["sepia"][0.0] == 0.0
    assert set(validation["identified"]) == set(settings.styles)
    assert validation["capped"]["sepia"][2]["drift"] > 0.01  # k ≤ 2 cannot hold two rank-4 styles
    for style in settings.styles:
        assert validation["references_rerendered"][style] > 0.5  # a reference of another scene is close to 1
    plasticity = results["plasticity"]
    assert plasticity["library_size"] == 2 and plasticity["trained_factor_difference"] == 0.0
    assert plasticity["merge_drift"] < 1e-5


def test_tiny_run_keeps_every_scored_image(tiny_results):
    settings, results = tiny_results
    images = results["_images"]
    assert images["base"].shape[0] == settings.prompts
    assert {"share/sepia", "lora/halftone", "references/sepia", "validation/sepia/cap 2"} <= set(images)


def test_tiny_run_writes_its_report(tiny_results, tmp_path):
    settings, results = tiny_results
    environment = dict(date="today", machine="test", cpus=2, torch="x", threads=1)
    markdown = continual.markdown_report(results, settings, "python -m benchmarks.continual", environment)
    assert markdown.startswith("`python -m benchmarks.continual`")
    assert "| sepia (tuning) |" in markdown and "strength sweep" in markdown
    continual.save_samples(results["_samples"], list(settings.styles), tmp_path / "samples.png")
    assert (tmp_path / "samples.png").stat().st_size > 1000


def test_tiny_learning_rate_sweep(tiny_pipeline_dir, tiny_results):
    from benchmarks import learning_rates
    from share_diffusion.loading import load_pipeline

    settings, _ = tiny_results
    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
    evaluation = continual.Evaluation(pipe, settings, log=lambda *_: None)
    sweep = learning_rates.learning_rate_sweep(pipe, evaluation, settings, 2, log=lambda *_: None)
    assert set(sweep) == {"sepia", "halftone"}
    for methods in sweep.values():
        share_scores, lora_scores = methods["Share (ours)"], methods["Independent LoRA per style"]
        assert list(share_scores) == list(learning_rates.LEARNING_RATES)
        for rate in learning_rates.LEARNING_RATES:  # started and fed alike: the same style
            assert share_scores[rate]["value"] == pytest.approx(lora_scores[rate]["value"], abs=1e-3)



def test_tiny_run_rescored_by_style_specificity(tiny_results):
    settings, results = tiny_results
    saved = {key: (images * 255).round().astype(np.uint8) for key, images in results["_images"].items()}
    rescored = specificity.run(saved)
    assert rescored["styles"] == list(settings.styles)
    assert list(rescored["sweep"]["sepia"]) == ["0", "0.5", "1"] and list(rescored["exact_minus_capped"]["sepia"]) == ["2"]
    for style in settings.styles:
        own = rescored["references_rerendered"][style][style]["S*"]
        other = rescored["references_rerendered"][style][next(s for s in settings.styles if s != style)]["S*"]
        assert own.count == settings.prompts and own.value > 0.8 and abs(other.value) < 0.2, (own, other)
        assert rescored["ratio"][style]["S*"].value == pytest.approx(1, abs=1e-2)
    blended = rescored["known_mixtures"]["sepia"]
    assert blended["toward"] == "halftone" and blended["from_base"]["1.0"]["S"].value > blended["from_base"]["0.25"]["S"].value
    report = specificity.markdown_report(rescored, "command")
    assert "| sepia | " in report and "Share / LoRA, paired" in report
