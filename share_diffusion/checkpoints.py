"""Resumable trainings: the whole training state every N steps, so that a crash, a kill or a
cancel loses at most N steps.

A checkpoint is a folder next to the library (`.<library>.training/<style>/`) holding
  state.safetensors  the trained parameters, the optimizer's tensors, the random generator;
  state.json         the step, the optimizer's other entries, the LR schedule, the gradient
                     scaler, the numpy generator, and a digest of everything that decides the
                     training (settings, images, trigger, base model) so that a resume with other
                     inputs is refused instead of silently mixing two trainings.
It is written to a temporary folder and renamed into place, so a kill mid-write leaves the
previous checkpoint. The library itself is only written by the merge at the end, as always.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ShareStudioError

# Settings that change what a training computes; the others (previews, checkpoint cadence) may differ on resume.
OUTCOME_FIELDS = ("steps", "learning_rate", "rank", "batch_size", "caption_dropout", "noise_offset", "seed",
                  "mixed_precision", "gradient_accumulation", "min_snr_gamma", "warmup_steps", "lr_schedule", "flip")  # fmt: skip


class CheckpointMismatch(ShareStudioError):
    pass


def training_digest(config, image_pixels: list[np.ndarray], trigger: str, model_fingerprint: str) -> str:
    """A hash of everything that decides what a training learns."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items() if k in OUTCOME_FIELDS}
    digest.update(json.dumps([settings, trigger, model_fingerprint], sort_keys=True).encode())
    for pixels in image_pixels:
        digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


@dataclass
class TrainingState:
    """What a training loop needs to continue exactly where it stopped."""

    step: int
    parameters: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    numpy_generator: np.random.Generator
    torch_generator: torch.Generator


class TrainingCheckpoint:
    """The checkpoint folder of one style's training."""

    def __init__(self, folder: Path, digest: str):
        self.folder, self.digest = Path(folder), digest

    @staticmethod
    def folder_for(library_path: Path, style_name: str) -> Path:
        """`.<library file>.training/<hash of the style name>` beside the library: any name is a safe folder."""
        key = hashlib.sha256(style_name.encode()).hexdigest()[:16]
        return library_path.parent / f".{library_path.name}.training" / key

    def exists(self) -> bool:
        return (self.folder / "state.json").is_file()

    def saved_step(self) -> int:
        return json.loads((self.folder / "state.json").read_text())["step"]

    def matches(self) -> bool:
        """Whether the saved training was made with the same inputs as this one."""
        return json.loads((self.folder / "state.json").read_text())["digest"] == self.digest

    def save(self, state: TrainingState) -> None:
        tensors = {f"parameter.{i}": p.detach().cpu().contiguous() for i, p in enumerate(state.parameters)}
        tensors["torch_generator"] = state.torch_generator.get_state()
        optimizer_entries: dict[str, dict] = {}
        for i, parameter in enumerate(state.parameters):
            for key, value in state.optimizer.state.get(parameter, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{i}.{key}"] = value.detach().cpu().contiguous()
                else:
                    optimizer_entries.setdefault(str(i), {})[key] = value
        meta = {
            "digest": self.digest, "step": state.step, "optimizer": optimizer_entries,
            "lr_schedule": state.lr_schedule.state_dict(), "scaler": state.scaler.state_dict(),
            "numpy_generator": state.numpy_generator.bit_generator.state,
        }  # fmt: skip
        temporary = self.folder.with_name(f".{self.folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        save_file(tensors, str(temporary / "state.safetensors"))
        (temporary / "state.json").write_text(json.dumps(meta, default=float))
        previous = self.folder.with_name(f".{self.folder.name}.{os.getpid()}.old")
        if self.folder.exists():
            os.replace(self.folder, previous)
        os.replace(temporary, self.folder)
        shutil.rmtree(previous, ignore_errors=True)

    def restore(self, state: TrainingState) -> int:
        """Load the saved state into `state`'s objects; returns the step it was saved after."""
        meta = json.loads((self.folder / "state.json").read_text())
        if not self.matches():
            raise CheckpointMismatch(
                f"the interrupted training in {self.folder} was made with other settings, images, trigger or base "
                "model; train with the same ones to resume it, or start over"
            )
        tensors = load_file(str(self.folder / "state.safetensors"))
        with torch.no_grad():
            for i, parameter in enumerate(state.parameters):
                parameter.copy_(tensors[f"parameter.{i}"])
        for i, parameter in enumerate(state.parameters):
            entries = {k.split(".", 2)[2]: v.to(parameter.device) for k, v in tensors.items() if k.startswith(f"optimizer.{i}.")}
            entries.update(meta["optimizer"].get(str(i), {}))
            if entries:
                state.optimizer.state[parameter] = entries
        state.lr_schedule.load_state_dict(meta["lr_schedule"])
        for group, rate in zip(state.optimizer.param_groups, state.lr_schedule.get_last_lr()):
            group["lr"] = rate
        state.scaler.load_state_dict(meta["scaler"])
        state.numpy_generator.bit_generator.state = meta["numpy_generator"]
        state.torch_generator.set_state(tensors["torch_generator"])
        return meta["step"]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        with_parent = self.folder.parent
        if with_parent.exists() and not any(with_parent.iterdir()):
            with_parent.rmdir()
