"""TrainingJob: a real training on the embedded model in its worker thread, its events, cancel and errors."""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from share_diffusion.library import LibraryError
from share_diffusion.loading import EMBEDDED_MODEL_DIR, load_pipeline
from share_diffusion.studio import Studio
from share_diffusion.training import TrainingCancelled, TrainingConfig, TrainingProgress
from share_diffusion.training_job import TrainingJob, TrainingPreview

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "styles" / "examples"
MODEL = os.environ.get("SHARE_TEST_MODEL", str(EMBEDDED_MODEL_DIR))
FEW_STEPS = TrainingConfig(steps=4, batch_size=2, learning_rate=1e-2)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(MODEL, device="cpu", progress=False)


@pytest.fixture
def studio(pipe, tmp_path):
    return Studio(pipe, tmp_path / "library.safetensors", model_id="embedded")


def images(style: str) -> list[Path]:
    return sorted((EXAMPLES / style).glob("*.png"))[:4]


def test_events_report_every_step_and_the_previews_then_the_result(studio):
    config = TrainingConfig(steps=4, batch_size=2, learning_rate=1e-2, preview_every=2)
    job = TrainingJob(studio, images("hatching"), "Hatching", config=config).start()
    assert any(t.name == "train-Hatching" for t in threading.enumerate())
    events = list(job.events())
    steps = [e.step for e in events if isinstance(e, TrainingProgress)]
    previews = [e for e in events if isinstance(e, TrainingPreview)]
    assert steps == [1, 2, 3, 4]
    assert [p.step for p in previews] == [2, 4] and all(p.images for p in previews)
    result = job.result()
    assert result.name == "Hatching" and studio.style_names() == ["Hatching"]
    assert not job.running and studio.path.exists()


def test_cancel_mid_training_leaves_the_library_byte_identical(studio):
    TrainingJob(studio, images("hatching"), "Hatching", config=FEW_STEPS).start().result()
    saved = studio.path.read_bytes()

    job = TrainingJob(studio, images("neon"), "Neon", config=TrainingConfig(steps=5000, batch_size=2)).start()
    for event in job.events():
        if event.step == 2:
            job.cancel()
    with pytest.raises(TrainingCancelled, match="cancelled at step [2-9]"):
        job.result()
    assert job.cancel_requested
    assert studio.path.read_bytes() == saved and studio.style_names() == ["Hatching"]


def test_an_error_in_the_worker_is_raised_in_the_caller(studio):
    TrainingJob(studio, images("hatching"), "Hatching", config=FEW_STEPS).start().result()
    saved = studio.path.read_bytes()

    job = TrainingJob(studio, images("neon"), "Hatching", config=FEW_STEPS).start()
    assert list(job.events()) == []  # the clash is found before the first step
    with pytest.raises(LibraryError, match="a style named 'Hatching' exists"):
        job.result()
    assert studio.path.read_bytes() == saved


def test_ctrl_c_in_the_cli_cancels_the_training_and_keeps_the_library(studio):
    TrainingJob(studio, images("hatching"), "Hatching", config=FEW_STEPS).start().result()
    saved = studio.path.read_bytes()
    command = [sys.executable, "-m", "share_diffusion", "train", "--library", str(studio.path), "--model", MODEL,
               "--name", "Neon", "--images", *map(str, images("neon")), "--steps", "5000", "--batch-size", "2"]
    cli = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    stderr = ""
    while max(map(int, re.findall(r"\| *(\d+)/5000", stderr)), default=0) < 2:  # tqdm's bar at step 2 or later
        character = cli.stderr.read(1)
        assert character, f"the CLI ended before training: {stderr}"
        stderr += character
    cli.send_signal(signal.SIGINT)
    try:
        stderr += cli.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        cli.kill()
        pytest.fail(f"Ctrl-C did not stop the training within 120 s: {stderr[-2000:]}")
    assert cli.returncode == 130
    assert "share_diffusion: training cancelled at step" in stderr and "Traceback" not in stderr
    assert studio.path.read_bytes() == saved
