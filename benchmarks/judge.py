"""A style judge for the continual benchmark: a small CNN, separate from the generator.

    python -m benchmarks.judge [--force]      # train (or load the cached weights) and report

Classes: "plain" (the world's unstyled render) and the styles of `world.STYLES` that can be told
apart from plain scenes (`JUDGED_STYLES`: all but "invert" and "checker", see AMBIGUOUS_STYLES). Training and
held-out images are rendered procedurally (`world.render` / `world.render_styled`) from disjoint
seeds, and augmented the way generated images differ from clean renders: a little blur, pixel
noise, a brightness/contrast wobble and a shift of a pixel or two. The generator (its VAE, UNet
or text encoder) is never used.

The weights are cached as safetensors under benchmarks/results/ with the settings in the file's
metadata; a cached file is used only when every setting matches, otherwise the judge retrains.
`load_or_train_judge` raises `JudgeTooWeak` when the held-out accuracy is under the bar.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from share_diffusion import world

PLAIN = "plain"
# "invert" and "checker" are left out: an inverted scene is often itself a valid plain scene (white on
# black <-> black on white, red <-> cyan, blue <-> yellow), and a checker scene on a gray background is
# pixel for pixel a plain one, so no judge can tell them apart from "plain" on those scenes.
AMBIGUOUS_STYLES = ("invert", "checker")
JUDGED_STYLES = tuple(s for s in world.STYLES if s not in AMBIGUOUS_STYLES)
CLASSES = (PLAIN, *JUDGED_STYLES)
RESULTS = Path(__file__).parent / "results"
DEFAULT_CACHE = RESULTS / "continual_judge.safetensors"
ARCHITECTURE_VERSION = 1  # bump when JudgeNet or the augmentation changes


class JudgeTooWeak(RuntimeError):
    pass


@dataclass(frozen=True)
class JudgeSettings:
    per_class: int = 300  # training images per class
    held_out_per_class: int = 100
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0
    min_accuracy: float = 0.95
    architecture: int = ARCHITECTURE_VERSION
    classes: tuple[str, ...] = CLASSES


class JudgeNet(nn.Module):
    """Four 3x3 conv layers (full resolution first, so 1-2 pixel textures are seen), then the mean
    and the max of the last feature map over the image, and a linear layer."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) in [0, 1]."""
        x = self.features(images * 2 - 1)
        return self.head(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1))


def render_class(name: str, scene: world.Scene, rng: np.random.Generator) -> np.ndarray:
    return world.render(scene) if name == PLAIN else world.render_styled(name, scene, rng)


def render_dataset(classes: tuple[str, ...], per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 64, 64) float images in [0, 1] and their class indices."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(classes):
        for _ in range(per_class):
            images.append(render_class(name, world.sample_scene(rng), rng))
            labels.append(label)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, torch.tensor(labels)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (σ up to ~1 px, per image), brightness/contrast wobble, noise, and a shift of ±2 px."""
    n = len(images)
    sigma = torch.rand(n, generator=generator) * 1.0
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (n, 5)
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    # Separable blur with a per-image kernel: grouped conv over (1, n*3, H, W).
    channels = padded.reshape(1, n * 3, *padded.shape[2:])
    kernel_rows = kernel.repeat_interleave(3, 0)
    blurred = F.conv2d(channels, kernel_rows[:, None, None, :], groups=n * 3)
    blurred = F.conv2d(blurred, kernel_rows[:, None, :, None], groups=n * 3).reshape(images.shape)
    contrast = 1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    brightness = 0.06 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    out = (blurred - 0.5) * contrast + 0.5 + brightness
    out = out + 0.03 * torch.randn(out.shape, generator=generator)
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    out = torch.roll(out, shifts=shift, dims=(2, 3))
    return out.clamp(0, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    predictions = torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return float((predictions == labels).float().mean())


def train_judge(settings: JudgeSettings, log=print) -> tuple[JudgeNet, dict]:
    start = time.time()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    images, labels = render_dataset(settings.classes, settings.per_class, settings.seed)
    held_images, held_labels = render_dataset(settings.classes, settings.held_out_per_class, settings.seed + 10_000)
    render_seconds = time.time() - start
    model = JudgeNet(len(settings.classes))
    steps_per_epoch = len(images) // settings.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, settings.learning_rate, total_steps=settings.epochs * steps_per_epoch
    )
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"judge epoch {epoch + 1}/{settings.epochs} loss {loss.item():.3f} {time.time() - start:.0f}s")
    model.eval()
    held_generator = torch.Generator().manual_seed(settings.seed + 1)
    report = {
        "held_out_accuracy_clean": accuracy(model, held_images, held_labels),
        "held_out_accuracy_augmented": accuracy(model, augment(held_images, held_generator), held_labels),
        "held_out_images": len(held_images),
        "training_images": len(images),
        "render_seconds": render_seconds,
        "train_seconds": time.time() - start,
        "threads": torch.get_num_threads(),
    }
    return model, report


def _metadata(settings: JudgeSettings, report: dict) -> dict[str, str]:
    return {"settings": json.dumps(asdict(settings)), "report": json.dumps(report)}


def load_or_train_judge(
    settings: JudgeSettings = JudgeSettings(), cache: Path | None = DEFAULT_CACHE, force: bool = False, log=print
) -> tuple[JudgeNet, dict]:
    """The judge and its report ({held_out_accuracy_*, cached, ...}); raises JudgeTooWeak under the bar."""
    model, report = None, None
    if cache is not None and cache.exists() and not force:
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("settings") == json.dumps(asdict(settings)):
            model = JudgeNet(len(settings.classes))
            model.load_state_dict(load_file(str(cache)))
            model.eval()
            report = {**json.loads(metadata["report"]), "cached": True}
            log(f"judge: cached weights from {cache}")
    if model is None:
        model, report = train_judge(settings, log)
        report["cached"] = False
        if cache is not None and report["held_out_accuracy_augmented"] >= settings.min_accuracy:
            cache.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(cache), metadata=_metadata(settings, {k: v for k, v in report.items() if k != "cached"}))
    worst = min(report["held_out_accuracy_clean"], report["held_out_accuracy_augmented"])
    if worst < settings.min_accuracy:
        raise JudgeTooWeak(
            f"the style judge reaches only {worst:.1%} held-out accuracy (clean {report['held_out_accuracy_clean']:.1%}, "
            f"augmented {report['held_out_accuracy_augmented']:.1%}); it must reach {settings.min_accuracy:.0%} "
            "before it judges anything"
        )
    log(
        f"judge: held-out accuracy {report['held_out_accuracy_clean']:.1%} clean, "
        f"{report['held_out_accuracy_augmented']:.1%} augmented ({report['held_out_images']} images)"
    )
    return model, report


@torch.no_grad()
def classify(model: nn.Module, images: np.ndarray | torch.Tensor, classes: tuple[str, ...] = CLASSES) -> list[str]:
    """Class names for (N, H, W, 3) images in [0, 1] (numpy, e.g. a pipeline's output_type="np")."""
    pixels = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    if pixels.shape[-1] != world.IMAGE_SIZE or pixels.shape[-2] != world.IMAGE_SIZE:
        pixels = F.interpolate(pixels, size=(world.IMAGE_SIZE, world.IMAGE_SIZE), mode="bilinear", antialias=True)
    model.eval()
    return [classes[i] for i in model(pixels).argmax(1).tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="retrain even if cached weights match")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, report = load_or_train_judge(force=args.force)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
