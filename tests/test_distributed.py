"""Training with `accelerate launch`: two CPU processes (gloo) share each batch, average their
gradients, and only the main one writes the library. On the tiny random pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from share_diffusion import share
from share_diffusion.images import load_training_images
from share_diffusion.library import StyleLibrary
from share_diffusion.loading import load_pipeline
from share_diffusion.studio import Studio
from share_diffusion.training import StyleBatches, TrainingConfig

ROOT = Path(__file__).resolve().parent.parent


def write_pictures(folder: Path, count: int = 4) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_each_process_keeps_its_own_slice_of_the_same_global_batch(tiny_pipe, tmp_path):
    images = load_training_images([write_pictures(tmp_path / "pictures")], tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor)
    config = TrainingConfig(batch_size=4)

    def first_batch(rank: int, ranks: int):
        batches = StyleBatches(tiny_pipe, images, "x", config, np.random.default_rng(0), torch.Generator().manual_seed(0), rank, ranks)
        return batches.next(torch.device("cpu"))

    def tensors(batch):  # noisy latents, timesteps, text context, target
        noisy, timesteps, conditioning, target = batch
        return noisy, timesteps, conditioning.encoder_hidden_states, target

    whole = tensors(first_batch(0, 1))
    halves = [tensors(first_batch(rank, 2)) for rank in (0, 1)]
    for part, (first, second) in enumerate(zip(*halves)):
        torch.testing.assert_close(torch.cat([first, second]), whole[part])  # together they make the batch
    noisy, timesteps = [half[0] for half in halves], [half[1] for half in halves]
    assert len(noisy[0]) == 2 and not torch.equal(*noisy) and not torch.equal(*timesteps)  # of different items


def train_in_two_processes(model: Path, pictures: Path, library: Path, port: int, *options: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of a 6-step training of style "grain" with a total batch of 4 on two
    CPU processes; it must succeed."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "share_diffusion",
              "train", "--library", str(library), "--name", "grain", "--images", str(pictures), "--model", str(model),
              "--steps", "6", "--batch-size", "4", "--lr", "1e-2", "--strength-previews", "0", *options]  # fmt: skip
    # About 40 s on 2 idle cores; the limit only stops a hang (2 gloo processes crawl on a loaded machine).
    run = subprocess.run(launch, env=environment, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_two_cpu_processes_train_one_style_as_one_process_does_with_the_same_total_batch(tiny_pipeline_dir, tmp_path):
    pictures = write_pictures(tmp_path / "pictures")
    library = tmp_path / "library.safetensors"
    run = train_in_two_processes(tiny_pipeline_dir, pictures, library, 29517)
    assert run.stdout.count("learned style 'grain'") == 1  # only the main process reports, and writes

    saved = StyleLibrary.load(library)
    assert [s["name"] for s in saved.styles] == ["grain"] and len(saved.meta["merges"]) == 1

    single = Studio(load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False), tmp_path / "single.safetensors")
    config = TrainingConfig(**{**single_config(single).__dict__, "steps": 6, "batch_size": 4, "learning_rate": 1e-2, "strength_previews": 0})
    single.train([pictures], "grain", config=config)
    launched = Studio(load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False), library)
    ours, theirs = (share.export_style(s.pipe.unet, s.styles[0]["id"]) for s in (single, launched))
    deltas = {name: (b @ a.T, theirs[name][0] @ theirs[name][1].T) for name, (b, a) in ours.items()}
    scale = sum(float(delta.square().sum()) for delta, _ in deltas.values()) ** 0.5
    assert scale > 0 and max(float((delta - other).norm()) for delta, other in deltas.values()) < 1e-4 * scale


def single_config(studio: Studio) -> TrainingConfig:
    from share_diffusion.training import training_config

    return training_config("quick", studio.model_kind)
