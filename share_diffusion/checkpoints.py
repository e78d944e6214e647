"""Resumable trainings: the whole training state every N steps, so that a crash, a kill or a
cancel loses at most N steps.

A checkpoint is a folder next to the library (`.<library>.training/<style>/`) holding
  state.safetensors  the trained parameters (the UNet's, then the text encoders' when they learn),
                     the optimizer's tensors, the random generator;
  state.json         the step, the optimizer's other entries, the LR schedule, the gradient
                     scaler, the numpy generator, and a digest of everything that decides the
                     training (settings, images, trigger, base model) so that a resume with other
                     inputs is refused instead of silently mixing two trainings.
It is written to a temporary folder, fsynced and renamed into place; the previous one is moved
aside first, so a kill between the two renames leaves it under `.<folder>.old` (not resumable,
removed by the next save). The library itself is only written by the merge at the end, as always.
"""

from __future__ import annotations

import contextlib
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
                  "mixed_precision", "gradient_accumulation", "min_snr_gamma", "warmup_steps", "lr_schedule", "flip",
                  "use_8bit_adam", "text_encoder_lr")  # fmt: skip


class CheckpointMismatch(ShareStudioError):
    pass


def training_digest(config, images: list[tuple[np.ndarray, str | None]], trigger: str, model: str) -> str:
    """A hash of everything that decides what a training learns: the settings, each image's
    pixels and caption, the trigger, and the model (its fingerprint, dtype and scheduler)."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items() if k in OUTCOME_FIELDS}
    digest.update(json.dumps([settings, trigger, model, [caption for _, caption in images]], sort_keys=True).encode())
    for pixels, _ in images:
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

    def _meta(self) -> dict | None:
        """state.json, or None when there is none or it cannot be read (a damaged checkpoint)."""
        try:
            meta = json.loads((self.folder / "state.json").read_text())
            return meta if {"digest", "step"} <= set(meta) and (self.folder / "state.safetensors").is_file() else None
        except (OSError, ValueError):
            return None

    def exists(self) -> bool:
        return self._meta() is not None

    def damaged(self) -> bool:
        return self.folder.exists() and self._meta() is None

    def saved_step(self) -> int:
        return self._meta()["step"]

    def matches(self) -> bool:
        """Whether the saved training was made with the same inputs as this one."""
        meta = self._meta()
        return meta is not None and meta["digest"] == self.digest

    def save(self, state: TrainingState) -> None:
        optimizer = state.optimizer.state_dict()
        tensors = {f"parameter.{i}": p.detach().cpu().contiguous() for i, p in enumerate(state.parameters)}
        tensors["torch_generator"] = state.torch_generator.get_state()
        optimizer_entries: dict[str, dict] = {}
        for index, entries in optimizer["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    optimizer_entries.setdefault(str(index), {})[key] = value
        meta = {
            "digest": self.digest, "step": state.step, "optimizer": optimizer_entries,
            "param_groups": optimizer["param_groups"], "lr_schedule": state.lr_schedule.state_dict(),
            "scaler": state.scaler.state_dict(), "numpy_generator": state.numpy_generator.bit_generator.state,
        }  # fmt: skip
        temporary = self.folder.with_name(f".{self.folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        save_file(tensors, str(temporary / "state.safetensors"))
        (temporary / "state.json").write_text(json.dumps(meta, default=float))
        for written in temporary.iterdir():
            _sync(written)
        # Rename the old folder away, the new one in, then delete the old: a kill in between leaves
        # the old one under .old, which exists() does not see; the next save cleans it up.
        previous = self.folder.with_name(f".{self.folder.name}.old")
        shutil.rmtree(previous, ignore_errors=True)
        if self.folder.exists():
            os.replace(self.folder, previous)
        os.replace(temporary, self.folder)
        shutil.rmtree(previous, ignore_errors=True)

    def restore(self, state: TrainingState) -> int:
        """Load the saved state into `state`'s objects; returns the step it was saved after."""
        meta = self._meta()
        if meta is None or meta["digest"] != self.digest:
            raise CheckpointMismatch(
                f"the interrupted training in {self.folder} is damaged, or was made with other settings, images, "
                "captions, trigger or base model; train with the same ones to resume it, or start over (--restart)"
            )
        tensors = load_file(str(self.folder / "state.safetensors"))
        shapes = [tuple(tensors.get(f"parameter.{i}", torch.empty(0)).shape) for i in range(len(state.parameters))]
        if shapes != [tuple(p.shape) for p in state.parameters]:
            raise CheckpointMismatch(f"the interrupted training in {self.folder} trained other layers; start over (--restart)")
        with torch.no_grad():
            for i, parameter in enumerate(state.parameters):
                parameter.copy_(tensors[f"parameter.{i}"])
        optimizer_state: dict[int, dict] = {int(i): dict(entries) for i, entries in meta["optimizer"].items()}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
        state.optimizer.load_state_dict({"state": optimizer_state, "param_groups": meta["param_groups"]})
        state.lr_schedule.load_state_dict(meta["lr_schedule"])
        state.scaler.load_state_dict(meta["scaler"])
        state.numpy_generator.bit_generator.state = meta["numpy_generator"]
        state.torch_generator.set_state(tensors["torch_generator"])
        return meta["step"]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # the folder of all checkpoints, once it is empty
            self.folder.parent.rmdir()


def _sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
