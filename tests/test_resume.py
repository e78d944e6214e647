"""Resumable trainings (share_diffusion.checkpoints): a cancelled or killed training continues from
its last checkpoint and ends with the style an uninterrupted training learns; the library is not
touched until the merge. On the tiny random pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from share_diffusion import share
from share_diffusion.checkpoints import CheckpointMismatch, TrainingCheckpoint
from share_diffusion.loading import load_pipeline
from share_diffusion.studio import Studio
from share_diffusion.training import TrainingCancelled, TrainingConfig

CONFIG = TrainingConfig(steps=8, batch_size=2, learning_rate=1e-2, checkpoint_every=2, strength_previews=0, warmup_steps=2,
                        lr_schedule="cosine")  # fmt: skip


@pytest.fixture
def picture_folder(tmp_path) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def new_studio(pipeline_dir, library: Path) -> Studio:
    return Studio(load_pipeline(str(pipeline_dir), device="cpu", progress=False), library, model_id="tiny")


def style_delta(studio: Studio, name: str) -> dict[str, torch.Tensor]:
    style_id = next(s["id"] for s in studio.styles if s["name"] == name)
    return {layer: b @ a.T for layer, (b, a) in share.export_style(studio.pipe.unet, style_id).items()}


def assert_same_style(first: dict, second: dict, tolerance: float) -> None:
    """The same ΔW on every layer, relative to the style's ΔW over all layers."""
    scale = sum(float(delta.square().sum()) for delta in first.values()) ** 0.5
    worst = max(float((first[n] - second[n]).norm()) for n in first) / scale
    assert scale > 0 and worst <= tolerance, worst


def test_a_cancelled_training_resumes_exactly_where_it_stopped(tiny_pipeline_dir, picture_folder, tmp_path):
    straight = new_studio(tiny_pipeline_dir, tmp_path / "straight.safetensors")
    straight.train([picture_folder], "grain", config=CONFIG)

    studio = new_studio(tiny_pipeline_dir, tmp_path / "library.safetensors")
    cancel = threading.Event()
    with pytest.raises(TrainingCancelled, match="resumed"):
        studio.train([picture_folder], "grain", config=CONFIG, cancel=cancel,
                     progress=lambda p: p.step == 5 and cancel.set())  # fmt: skip
    assert not studio.path.exists()  # the library is only written by the merge
    assert studio.interrupted_training("grain") == 5

    result = studio.train([picture_folder], "grain", config=CONFIG, resume=True)
    assert result.resumed_from == 5
    assert studio.interrupted_training("grain") is None  # the checkpoint is gone once the style is saved
    assert_same_style(style_delta(straight, "grain"), style_delta(studio, "grain"), 1e-6)


def test_a_resume_with_other_settings_is_refused_and_resume_needs_a_checkpoint(tiny_pipeline_dir, picture_folder, tmp_path):
    studio = new_studio(tiny_pipeline_dir, tmp_path / "library.safetensors")
    with pytest.raises(Exception, match="no interrupted training"):
        studio.train([picture_folder], "grain", config=CONFIG, resume=True)
    cancel = threading.Event()
    with pytest.raises(TrainingCancelled):
        studio.train([picture_folder], "grain", config=CONFIG, cancel=cancel, progress=lambda p: p.step == 3 and cancel.set())
    other = TrainingConfig(**{**CONFIG.__dict__, "learning_rate": 5e-3})
    with pytest.raises(CheckpointMismatch, match="other settings"):
        studio.train([picture_folder], "grain", config=other, resume=True)
    assert studio.interrupted_training("grain") == 3  # refused, and nothing was lost
    # resume=None (the app): a checkpoint made with other settings is replaced by a fresh training
    assert studio.train([picture_folder], "grain", config=other).resumed_from is None


def test_a_damaged_checkpoint_is_refused_for_resume_and_replaced_by_a_new_training(tiny_pipeline_dir, picture_folder, tmp_path):
    studio = new_studio(tiny_pipeline_dir, tmp_path / "library.safetensors")
    cancel = threading.Event()
    with pytest.raises(TrainingCancelled):
        studio.train([picture_folder], "grain", config=CONFIG, cancel=cancel, progress=lambda p: p.step == 3 and cancel.set())
    (TrainingCheckpoint.folder_for(studio.path, "grain") / "state.json").write_text("")  # as a power loss may leave it
    assert studio.interrupted_training("grain") is None
    with pytest.raises(CheckpointMismatch, match="damaged"):
        studio.train([picture_folder], "grain", config=CONFIG, resume=True)
    assert studio.train([picture_folder], "grain", config=CONFIG).resumed_from is None
    assert studio.style_names() == ["grain"]


def cli_train(pipeline_dir, library: Path, pictures: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "share_diffusion", "train", "--library", str(library), "--name", "grain",
            "--images", str(pictures), "--model", str(pipeline_dir), "--device", "cpu", "--steps", "60", "--batch-size", "2",
            "--lr", "1e-2", "--checkpoint-every", "2", "--strength-previews", "0", *extra]  # fmt: skip


def test_a_killed_cli_training_resumes_with_resume_and_ends_like_an_uninterrupted_run(tiny_pipeline_dir, picture_folder, tmp_path):
    library = tmp_path / "library.safetensors"
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cli_train(tiny_pipeline_dir, library, picture_folder), env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    state = TrainingCheckpoint.folder_for(library, "grain") / "state.json"
    deadline = time.time() + 300
    while not state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists() and not library.exists(), process.stdout.read().decode()[-2000:]

    refused = subprocess.run(cli_train(tiny_pipeline_dir, library, picture_folder), env=environment, capture_output=True, text=True)
    assert refused.returncode != 0 and "add --resume" in refused.stderr and "--restart" in refused.stderr

    resumed = subprocess.run(cli_train(tiny_pipeline_dir, library, picture_folder, "--resume"), env=environment,
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout

    straight = tmp_path / "straight.safetensors"
    subprocess.run(cli_train(tiny_pipeline_dir, straight, picture_folder), env=environment, check=True, capture_output=True)
    studios = [new_studio(tiny_pipeline_dir, path) for path in (straight, library)]
    assert_same_style(*(style_delta(studio, "grain") for studio in studios), 1e-5)
