"""Learning one new style from a few images: the "train" step of Share.

Only the new style's loadings and its temporary basis directions are trained (see
`share.begin_style_training`), with the usual latent-diffusion loss: predict the noise (or v, when
the scheduler says so) added to the images' latents. The loop runs on its own copy of the UNet that
shares the frozen base weights, so the pipeline keeps generating with the library's styles while a
style trains; the caller merges the trained copy back.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from .images import ImageSet
from .errors import ShareStudioError
from .share import begin_style_training, share_layers


class TrainingCancelled(ShareStudioError):
    pass


class TrainingFailed(ShareStudioError):
    pass


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainingConfig:
    steps: int = 300
    learning_rate: float = 2e-3
    rank: int = 4
    batch_size: int = 8
    caption_dropout: float = 0.1  # how often the caption is the bare trigger
    noise_offset: float = 0.1  # per-channel noise offset (kohya_ss); the embedded model is pretrained with the same
    seed: int = 0
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    preview_every: int = 0  # steps between preview images; 0 = none
    gradient_accumulation: int = 1  # batches per optimizer step (a step then sees batch_size × this)
    min_snr_gamma: float = 0.0  # min-SNR-γ loss weighting (Hang et al. 2023; 5 is usual); 0 = off
    warmup_steps: int = 0  # the learning rate rises linearly over these steps, then follows lr_schedule
    lr_schedule: str = "constant"  # constant | cosine
    flip: bool = True  # mirror images at random (not for styles with handedness, e.g. text)

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        if self.gradient_accumulation < 1 or self.warmup_steps < 0 or self.min_snr_gamma < 0:
            raise ValueError("gradient accumulation must be at least 1, warm-up steps and min-SNR γ at least 0")
    strength_previews: int = 8  # previews scored against the training images afterwards; 0 = none


# Presets per kind of base model. A style trains as a LoRA does, so one step moves ΔW as far at every
# layer width (benchmarks/results/step_size.md) and LoRA learning rates carry over.
#   embedded    the 64-px model in assets/: learns a procedural style in a few CPU minutes; its learning
#               rate was swept on the tuning styles only (benchmarks/results/learning_rates.md), and it
#               was pretrained with noise offset 0.1, so it trains with the same.
#   checkpoint  real SD checkpoints: the learning rate, rank and batch of kohya sd-scripts' and the
#               diffusers LoRA script's defaults, noise offset 0 (they were not trained with one). Not
#               measured here: no real weights can be fetched on our machines.
PRESETS = {
    "embedded": {
        "quick": TrainingConfig(steps=300, learning_rate=2e-3, rank=4, batch_size=8),
        "quality": TrainingConfig(steps=1200, learning_rate=1e-3, rank=8, batch_size=8),
    },
    "checkpoint": {
        "quick": TrainingConfig(steps=500, learning_rate=1e-4, rank=4, batch_size=4, noise_offset=0.0),
        "quality": TrainingConfig(steps=1500, learning_rate=1e-4, rank=8, batch_size=4, noise_offset=0.0),
    },
}
PRESET_NAMES = ("quick", "quality")


def presets_for(model_kind: str) -> dict[str, TrainingConfig]:
    """The presets of a base model kind (loading.ModelInfo.kind): the embedded model's, or real checkpoints'."""
    return PRESETS["embedded" if model_kind == "embedded" else "checkpoint"]


def training_config(preset: str = "quick", model_kind: str = "embedded", **overrides) -> TrainingConfig:
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return replace(presets_for(model_kind)[preset], **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class TrainingProgress:
    step: int
    total_steps: int
    loss: float
    elapsed: float

    @property
    def eta(self) -> float:
        return self.elapsed / max(self.step, 1) * (self.total_steps - self.step)

    def describe(self) -> str:
        return f"step {self.step}/{self.total_steps} · loss {self.loss:.4f} · ETA {format_seconds(self.eta)}"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def with_trigger(prompt: str, trigger: str) -> str:
    """The prompt a style was trained with: the caption, then the trigger."""
    prompt = prompt.strip()
    if trigger in prompt.split():
        return prompt
    return f"{prompt}, in {trigger} style" if prompt else f"an image in {trigger} style"


def training_captions(images: ImageSet, trigger: str) -> list[str]:
    return [with_trigger(image.caption or "", trigger) for image in images.images]


def mixed_precision_for(device: torch.device, requested: str) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX"):
        return "bf16"
    return "no"


def copy_sharing_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that shares (does not copy) the module's parameters."""
    return copy.deepcopy(module, memo={id(p): p for p in module.parameters()})


def training_unet(pipe: StableDiffusionPipeline) -> torch.nn.Module:
    """A copy of the UNet for training that shares (does not copy) the frozen base weights."""
    return copy_sharing_weights(pipe.unet)


@torch.no_grad()
def encode_images(pipe: StableDiffusionPipeline, images: ImageSet, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent posterior mean and std of every image, `batch_size` images at a time so that the VAE's
    peak memory does not grow with the training set."""
    means, stds = [], []
    for start in range(0, len(images.images), batch_size):
        chunk = images.images[start : start + batch_size]
        pixels = torch.stack([torch.from_numpy(np.asarray(i.image, dtype=np.float32)) for i in chunk])
        pixels = (pixels.permute(0, 3, 1, 2) / 127.5 - 1).to(pipe.device, pipe.vae.dtype)
        posterior = pipe.vae.encode(pixels).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


class StyleBatches:
    """Random training batches of one style's images: (noisy latents, timesteps, text context, target)."""

    def __init__(self, pipe: StableDiffusionPipeline, images: ImageSet, trigger: str, config: TrainingConfig,
                 rng: np.random.Generator, generator: torch.Generator):  # fmt: skip
        self.pipe, self.trigger, self.config, self.rng, self.generator = pipe, trigger, config, rng, generator
        self.means, self.stds = encode_images(pipe, images)
        self.captions = training_captions(images, trigger)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    @torch.no_grad()
    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        config, rng, generator, pipe = self.config, self.rng, self.generator, self.pipe
        index = rng.integers(0, len(self.captions), size=config.batch_size)
        means, stds = self.means[index], self.stds[index]
        latents = (means + stds * torch.randn(means.shape, generator=generator)) * pipe.vae.config.scaling_factor
        flip = torch.from_numpy(rng.random(config.batch_size) < 0.5) & config.flip
        latents = torch.where(flip[:, None, None, None], latents.flip(-1), latents)
        texts = [self.trigger if rng.random() < config.caption_dropout else self.captions[i] for i in index]
        ids = pipe.tokenizer(
            texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        context = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].to(device)
        noise = sample_noise(latents.shape, config.noise_offset, generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return noisy.to(device), timesteps.to(device), context, target.to(device)


def train_style(
    pipe: StableDiffusionPipeline,
    unet: torch.nn.Module,
    images: ImageSet,
    style_id: str,
    trigger: str,
    config: TrainingConfig,
    progress: Callable[[TrainingProgress], None] | None = None,
    preview: Callable[[int, list], None] | None = None,
    preview_prompt: str | None = None,
    cancel: threading.Event | None = None,
) -> torch.nn.Module:
    """Train a new style on `unet`, a `training_unet(pipe)` copy, and return it for `finish_style_training`.

    The pipeline itself is never changed. Raises TrainingCancelled when `cancel` is set, and
    TrainingFailed when the loss stops being finite.
    """
    if not share_layers(unet):
        raise TrainingFailed("the UNet has no Share layers; open a style library first")
    for layer in share_layers(unet).values():
        layer.config = replace(layer.config, rank=config.rank)
    # Its own generator, so the batches are the same as a LoRA's trained with the same seed.
    parameters = begin_style_training(unet, style_id, torch.Generator().manual_seed(config.seed))
    return fit(pipe, unet, parameters, images, trigger, config, progress, preview, preview_prompt, cancel)


def fit(
    pipe: StableDiffusionPipeline,
    unet: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    images: ImageSet,
    trigger: str,
    config: TrainingConfig,
    progress: Callable[[TrainingProgress], None] | None = None,
    preview: Callable[[int, list], None] | None = None,
    preview_prompt: str | None = None,
    cancel: threading.Event | None = None,
) -> torch.nn.Module:
    """The latent-diffusion loop: `parameters` of `unet` learn the style's images; returns `unet`.

    Only `parameters` must require gradients (a style in training, or e.g. a PEFT LoRA's).
    """
    accelerator = Accelerator(
        mixed_precision=mixed_precision_for(pipe.device, config.mixed_precision), cpu=pipe.device.type == "cpu"
    )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = make_optimizer(parameters, config)
    schedule = "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)

    generator = torch.Generator().manual_seed(config.seed)
    batches = StyleBatches(pipe, images, trigger, config, np.random.default_rng(config.seed), generator)
    device = accelerator.device

    start = time.time()
    for step in range(1, config.steps + 1):
        if cancel is not None and cancel.is_set():
            raise TrainingCancelled(f"training cancelled at step {step - 1} of {config.steps}; the library is unchanged")
        loss = 0.0
        for _ in range(config.gradient_accumulation):
            noisy, timesteps, context, target = batches.next(device)
            with accelerator.autocast():
                prediction = unet(noisy, timesteps, encoder_hidden_states=context.to(noisy.dtype)).sample
            errors = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
            if config.min_snr_gamma:
                errors = errors * min_snr_weights(batches.noise_scheduler, timesteps, config.min_snr_gamma)
            batch_loss = errors.mean() / config.gradient_accumulation
            if not torch.isfinite(batch_loss):
                raise TrainingFailed(
                    f"the loss became {batch_loss.item()} at step {step}; lower the learning rate "
                    f"(it was {config.learning_rate:g}). The library is unchanged"
                )
            accelerator.backward(batch_loss)
            loss = loss + batch_loss.detach()
        accelerator.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(TrainingProgress(step, config.steps, loss.item(), time.time() - start))
        if preview is not None and config.preview_every and step % config.preview_every == 0:
            preview(step, preview_images(pipe, accelerator.unwrap_model(unet), preview_prompt or with_trigger("", trigger)))
    unet = accelerator.unwrap_model(unet)
    unet.eval()
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    return unet


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-γ: min(SNR, γ)/SNR when the model predicts the noise,
    min(SNR, γ)/(SNR + 1) when it predicts v (the same weighting of the image error)."""
    snr = compute_snr(noise_scheduler, timesteps.cpu()).to(timesteps.device)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr


def sample_noise(shape: torch.Size, offset: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise plus a random constant per image and channel.

    The noise schedule never fully destroys an image's mean colour, so a model trained on plain
    noise keeps the mean of its starting noise and cannot make images much darker or brighter than
    average (a black "neon" background, say). The offset teaches it to change that mean.
    """
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(*shape[:2], 1, 1, generator=generator)
    return noise


def make_optimizer(parameters: list[torch.nn.Parameter], config: TrainingConfig) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingFailed("8-bit Adam needs bitsandbytes: pip install -r requirements-gpu.txt") from None
        return bnb.optim.AdamW8bit(parameters, lr=config.learning_rate)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-4)


@torch.no_grad()
def preview_images(pipe: StableDiffusionPipeline, unet: torch.nn.Module, prompt: str, seed: int = 0) -> list:
    # Its own scheduler: the pipeline's may be stepping a user's generation at the same time.
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    preview_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "scheduler": scheduler})
    preview_pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return preview_pipe(prompt, num_inference_steps=15, guidance_scale=4.0, generator=generator).images
