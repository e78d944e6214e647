"""benchmarks.gpu needs a GPU: without CUDA it stops at once and says why. Its pieces run on a CPU:
the SDXL path on the tiny SDXL pipeline (tests/tiny_families.py), and the pipelines it builds from
the shipped config folders, on the meta device (shapes only)."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection

from benchmarks import gpu
from benchmarks.random_pipeline import random_pipeline
from tests.tiny_families import build_tiny_sdxl_pipeline


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_without_cuda_it_stops_at_once_with_the_reason(monkeypatch, tmp_path, family):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--family", family, "--out", str(tmp_path)])
    assert "needs a CUDA GPU" in str(stop.value.code)  # a message, so exit status 1
    assert not any(tmp_path.iterdir())


def test_help_describes_the_run(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--help"])
    assert stop.value.code == 0
    assert "--family" in capsys.readouterr().out


# Published sizes: SD1.5's UNet 859.5 M parameters, SDXL base's 2.567 B, its OpenCLIP bigG text encoder 694.7 M.
@pytest.mark.parametrize(
    "name, pipeline_class, unet_parameters",
    [("sd15", StableDiffusionPipeline, 859_520_964), ("sdxl-base", StableDiffusionXLPipeline, 2_567_463_684)],
)
def test_random_pipelines_have_the_shipped_architectures(name, pipeline_class, unet_parameters):
    pipe = random_pipeline(name, "meta")
    assert type(pipe) is pipeline_class
    assert sum(p.numel() for p in pipe.unet.parameters()) == unet_parameters
    assert all(p.device.type == "meta" for p in pipe.unet.parameters())
    if name == "sdxl-base":
        assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
        assert round(sum(p.numel() for p in pipe.text_encoder_2.parameters()) / 1e6, 1) == 694.7


def test_the_sdxl_benchmark_runs_on_the_tiny_sdxl_pipeline_with_the_sdxl_preset(tmp_path):
    pipe = build_tiny_sdxl_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    results = gpu.run_benchmark(pipe, "sdxl", steps=gpu.WARMUP_STEPS + 1, rounds=1, sampling_steps=2)
    settings, training = results["settings"], results["training"]
    assert (settings["batch_size"], settings["gradient_checkpointing"], settings["rank"]) == (1, True, 4)
    assert settings["resolution"] == 64 and settings["dtype"] == "float32"
    # The same rank on the same targets: a style trains exactly as many parameters as the LoRA.
    assert training["share"]["trainable_parameters"] == training["lora"]["trainable_parameters"] > 0
    assert all(training[m]["seconds_per_step"] > 0 for m in ("share", "lora"))
    assert set(results["generation"]) == {"base", "no style", "style"}
    markdown = gpu.markdown_report({**results, "command": "python -m benchmarks.gpu --family sdxl", "seconds_total": 1.0})
    assert "SDXL base architecture" in markdown and "gradient checkpointing" in markdown
    assert "| **Share / LoRA** | **1.000** |" in markdown
