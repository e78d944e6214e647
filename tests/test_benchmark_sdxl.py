"""benchmarks.sdxl's pieces on the tiny SDXL pipeline (tests/tiny_families.py): the bytes it counts
from shapes are those of the real state dict and of export_lora's files, its merge keeps every
style, and the whole run writes its report (no timing is checked)."""

import json

import pytest

from benchmarks import random_pipeline, sdxl
from share_diffusion import share
from tests.tiny_families import build_tiny_sdxl_pipeline

STYLES = 3


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    pipe = build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def merged(tiny_sdxl):
    """A library's Share layers on the tiny pipeline's three models, with STYLES streamed styles merged."""
    models = sdxl.library_models(tiny_sdxl)
    styles = sdxl.streamed_styles(models["unet"], STYLES)
    return models, styles, sdxl.merge_library(models, styles, repeats=1)


def test_the_merge_keeps_every_style_on_every_attention_projection(merged):
    models, styles, merge = merged
    attention = sdxl.attention_layers(models["unet"])
    assert merge["layers_with_styles"] == len(attention) == len(styles[0]) > 0
    assert merge["share_layers"]["text_encoder"] > 0 and merge["share_layers"]["text_encoder_2"] > 0
    assert merge["largest_k"] == STYLES * sdxl.STYLE_RANK  # no size limit: k grows by each style's rank
    assert merge["drift_max"] <= share.EXACT and merge["step_error_max"] <= share.EXACT


def test_library_bytes_counted_from_shapes_are_the_share_state_dicts(merged):
    models, _, _ = merged
    bases = {}
    for layer in sdxl.attention_layers(models["unet"]).values():
        k = (layer.basis_b.shape[1], layer.basis_a.shape[1])
        assert bases.setdefault((layer.d_out, layer.d_in), k) == k  # one basis rank per shape
    stored = sum(t.numel() * t.element_size() for model in models.values() for t in share.share_state_dict(model).values())
    assert sdxl.library_bytes(models, bases, STYLES) == stored


@pytest.mark.parametrize("rank", sdxl.LORA_RANKS)
def test_a_lora_files_bytes_are_down_up_and_alpha_of_every_attention_projection(merged, rank):
    models, styles, _ = merged
    layers = sdxl.attention_layers(models["unet"]).values()
    expected = sum(4 * rank * (layer.d_out + layer.d_in) + 4 for layer in layers)  # float32 down, up, alpha
    assert sdxl.lora_file_bytes(models["unet"], styles[0], rank) == expected


def test_the_whole_run_writes_its_report_on_the_tiny_pipeline(tiny_sdxl, monkeypatch, tmp_path):
    monkeypatch.setattr(random_pipeline, "random_pipeline", lambda name: tiny_sdxl)
    monkeypatch.setattr(sdxl, "RESOLUTION", {True: 64})
    monkeypatch.setattr(sdxl, "STYLE_COUNTS", (1, 10))
    sdxl.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "sdxl.json").read_text())
    assert [row["styles"] for row in results["bytes"]] == [1, 10]
    assert all(row["drift_max"] <= share.EXACT for row in results["bytes"])
    assert results["training"]["share"]["trainable_parameters"] == results["training"]["lora"]["trainable_parameters"]
    markdown = (tmp_path / "sdxl.md").read_text()
    assert "| **Share / LoRA** | **1.000** |" in markdown and "Every drift is within float rounding" in markdown
