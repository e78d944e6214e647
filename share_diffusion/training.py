"""Learning one new style from a few images: the "train" step of Share.

Only the new style's loadings and its temporary basis directions are trained (see
`share.begin_style_training`), with the usual latent-diffusion loss: predict the noise (or v, when
the scheduler says so) added to the images' latents. The loop runs on its own copy of the UNet that
shares the frozen base weights, so the pipeline keeps generating with the library's styles while a
style trains; the caller merges the trained copy back.

With a text-encoder learning rate (kohya sd-scripts' ``--text_encoder_lr``), copies of the text
encoders learn the style too, on their attention's Share layers: the conditioning is then computed
with gradients through them, and the optimizer has one parameter group per learning rate.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from .checkpoints import TrainingCheckpoint, TrainingState
from .conditioning import UNetConditioning, unet_conditioning
from .errors import ShareStudioError
from .families import SDXL, architecture
from .images import AspectBuckets, ImageSet
from .latent_cache import encode_images_cached
from .share import CLIP_TARGET_MODULES, UNET_TARGET_MODULES, begin_style_training, share_layers


class TrainingCancelled(ShareStudioError):
    pass


class TrainingFailed(ShareStudioError):
    pass


LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainingConfig:
    steps: int = 300
    learning_rate: float = 4e-3
    rank: int = 4
    batch_size: int = 8
    caption_dropout: float = 0.1  # how often the caption is the bare trigger
    noise_offset: float = 0.1  # per-channel noise offset (kohya_ss); the embedded model is pretrained with the same
    seed: int = 0
    mixed_precision: str = "auto"  # auto (the model's own type) | no (fp32) | fp16 | bf16; see training_precision
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    preview_every: int = 0  # steps between preview images; 0 = none
    gradient_accumulation: int = 1  # batches per optimizer step (a step then sees batch_size × this)
    min_snr_gamma: float = 0.0  # min-SNR-γ loss weighting (Hang et al. 2023; 5 is usual); 0 = off
    warmup_steps: int = 0  # the learning rate rises linearly over these steps, then follows lr_schedule
    lr_schedule: str = "constant"  # constant | cosine
    flip: bool = True  # mirror images at random (not for styles with handedness, e.g. text)
    strength_previews: int = 8  # previews scored against the training images afterwards; 0 = none
    checkpoint_every: int = 100  # steps between resumable checkpoints (checkpoints.py); 0 = only on cancel
    latent_cache: str | None = None  # a folder for the images' VAE latents, reused by later trainings
    text_encoder_lr: float = 0.0  # the text encoders' learning rate (kohya's --text_encoder_lr); 0 = they stay frozen

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, not {self.mixed_precision!r}")
        if self.gradient_accumulation < 1 or self.warmup_steps < 0 or self.min_snr_gamma < 0 or self.checkpoint_every < 0:
            raise ValueError("gradient accumulation must be at least 1; warm-up steps, min-SNR γ and checkpoint_every at least 0")
        if not self.text_encoder_lr >= 0:
            raise ValueError(f"the text-encoder learning rate must be at least 0 (0: frozen), not {self.text_encoder_lr}")


# Presets per kind of base model. A style trains as a LoRA does, so one step moves ΔW as far at every
# layer width (benchmarks/results/step_size.md) and LoRA learning rates carry over.
#   embedded    the 64-px model in assets/: learns a procedural style in a few CPU minutes; its quick
#               learning rate is the best of a sweep on the tuning styles only, by a rule fixed before
#               the sweep (benchmarks/results/learning_rates*.md), and it was pretrained with noise
#               offset 0.1, so it trains with the same.
#   checkpoint  real SD 1.x/2.x checkpoints: the learning rate, rank and batch of kohya sd-scripts' and
#               the diffusers LoRA script's defaults, noise offset 0 (they were not trained with one).
#   sdxl        real SDXL checkpoints, at 1024 px: kohya sd-scripts' usual SDXL LoRA settings (U-Net
#               learning rate 1e-4, batch 1, gradient checkpointing; the diffusers SDXL LoRA script's
#               defaults agree), with twice the steps of the SD 1.x batch-4 preset.
#   Neither checkpoint set is measured here: no real weights can be fetched on our machines.
PRESETS = {
    "embedded": {
        "quick": TrainingConfig(steps=300, learning_rate=4e-3, rank=4, batch_size=8),
        "quality": TrainingConfig(steps=1200, learning_rate=1e-3, rank=8, batch_size=8),
    },
    "checkpoint": {
        "quick": TrainingConfig(steps=500, learning_rate=1e-4, rank=4, batch_size=4, noise_offset=0.0),
        "quality": TrainingConfig(steps=1500, learning_rate=1e-4, rank=8, batch_size=4, noise_offset=0.0),
    },
    "sdxl": {
        "quick": TrainingConfig(steps=1000, learning_rate=1e-4, rank=4, batch_size=1, noise_offset=0.0,
                                gradient_checkpointing=True),
        "quality": TrainingConfig(steps=3000, learning_rate=1e-4, rank=8, batch_size=1, noise_offset=0.0,
                                  gradient_checkpointing=True),
    },
}
PRESET_NAMES = ("quick", "quality")


def presets_for(model_kind: str, family: str | None = None) -> dict[str, TrainingConfig]:
    """The presets of a base model (loading.ModelInfo's kind and family): the embedded model's, SDXL
    checkpoints', or SD 1.x/2.x checkpoints'."""
    if model_kind == "embedded":
        return PRESETS["embedded"]
    return PRESETS["sdxl" if architecture(family) == SDXL else "checkpoint"]


def training_config(preset: str = "quick", model_kind: str = "embedded", family: str | None = None,
                    **overrides) -> TrainingConfig:  # fmt: skip
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return replace(presets_for(model_kind, family)[preset], **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class TrainingProgress:
    step: int
    total_steps: int
    loss: float
    elapsed: float
    resumed_at: int = 0  # the step a resumed training started from: elapsed counts the steps since

    @property
    def eta(self) -> float:
        return self.elapsed / max(self.step - self.resumed_at, 1) * (self.total_steps - self.step)

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


HALF_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def training_precision(model_dtype: torch.dtype, requested: str) -> torch.dtype | None:
    """The type a training computes in, None for float32. The trained factors stay float32.

    A half-precision model trains in its own type (fp16 then needs a gradient scaler, bf16 does
    not); a float32 model trains in float32, or autocasts to the half type asked for. Asking a
    half model for another type is refused: its frozen weights are already rounded to its own.
    """
    own = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model_dtype)
    if requested == "auto":
        return HALF_TYPES.get(own)
    if own is not None and requested != own:
        raise TrainingFailed(
            f"the model is loaded in {own}, so it trains in {own}: use --mixed-precision auto or {own}, "
            f"or load it with --dtype {'fp32' if requested == 'no' else requested}"
        )
    return HALF_TYPES.get(requested)


def copy_sharing_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that shares (does not copy) the module's parameters."""
    return copy.deepcopy(module, memo={id(p): p for p in module.parameters()})


def training_unet(pipe: StableDiffusionPipeline) -> torch.nn.Module:
    """A copy of the UNet for training that shares (does not copy) the frozen base weights."""
    return copy_sharing_weights(pipe.unet)


def pipeline_with(pipe: StableDiffusionPipeline, **components) -> StableDiffusionPipeline:
    """A pipeline of `pipe`'s class and components with some replaced (training copies, a scheduler);
    `pipe` itself is unchanged, so it keeps generating meanwhile."""
    return type(pipe)(**{**pipe.components, **components})


class TrainingModels(torch.nn.Module):
    """The UNet and the text encoders that learn with it, as one module: under DDP, the module that
    accelerate wraps must hold every trained parameter for their gradients to be averaged. Its
    forward is the UNet's; the text encoders run where the conditioning is computed (StyleBatches)."""

    def __init__(self, unet: torch.nn.Module, text_encoders: Mapping[str, torch.nn.Module]):
        super().__init__()
        self.unet = unet
        self.text_encoders = torch.nn.ModuleDict(text_encoders)

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


class StyleBatches:
    """Random training batches of one style's images: (noisy latents, timesteps, conditioning, target).

    Every process draws the same global batch of `batch_size` from the same seed and keeps its own
    slice of it, so that the processes of a multi-GPU run see different images and, with their
    gradients averaged, learn what one process learns from the whole batch. A batch comes from one
    aspect-ratio bucket (images of one size), drawn in proportion to its images; with a single
    bucket no bucket is drawn, so the random draws are those of a square-only training.

    The conditioning comes from the pipeline's own text encoders, without gradients, or, when
    `text_encoders` {component: training copy} are given, from those, with gradients: they learn.
    """

    def __init__(self, pipe: StableDiffusionPipeline, images: ImageSet, trigger: str, config: TrainingConfig,
                 rng: np.random.Generator, generator: torch.Generator, rank: int = 0, ranks: int = 1,
                 text_encoders: Mapping[str, torch.nn.Module] | None = None):  # fmt: skip
        if config.batch_size % ranks:
            raise TrainingFailed(f"the batch size ({config.batch_size}) must be a multiple of the {ranks} processes")
        self.pipe, self.trigger, self.config, self.rng, self.generator = pipe, trigger, config, rng, generator
        share = config.batch_size // ranks
        self.mine = slice(rank * share, (rank + 1) * share)
        cache = Path(config.latent_cache) if config.latent_cache else None
        self.buckets = [ImageBucket.encoded(pipe, bucket, trigger, cache) for bucket in by_size(images)]
        counts = np.array([len(bucket.images) for bucket in self.buckets], dtype=float)
        self.bucket_weights = counts / counts.sum()
        self.text_encoders_learn = bool(text_encoders)
        self.conditioning = unet_conditioning(pipeline_with(pipe, **text_encoders) if text_encoders else pipe)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    @torch.no_grad()
    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, UNetConditioning, torch.Tensor]:
        config, rng, generator, pipe, mine = self.config, self.rng, self.generator, self.pipe, self.mine
        bucket = self.buckets[rng.choice(len(self.buckets), p=self.bucket_weights) if len(self.buckets) > 1 else 0]
        index = rng.integers(0, len(bucket.captions), size=config.batch_size)
        means, stds = bucket.means[index], bucket.stds[index]
        latents = (means + stds * torch.randn(means.shape, generator=generator)) * pipe.vae.config.scaling_factor
        flip = torch.from_numpy(rng.random(config.batch_size) < 0.5) & config.flip
        latents = torch.where(flip[:, None, None, None], latents.flip(-1), latents)
        texts = [self.trigger if rng.random() < config.caption_dropout else bucket.captions[i] for i in index]
        noise = sample_noise(latents.shape, config.noise_offset, generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        latents, noise, timesteps = latents[mine], noise[mine], timesteps[mine]
        with torch.set_grad_enabled(self.text_encoders_learn):
            conditioning = self.conditioning(texts[mine], [bucket.images[i] for i in index[mine]], flip[mine].tolist(), device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return noisy.to(device), timesteps.to(device), conditioning, target.to(device)


@dataclass
class ImageBucket:
    """The training images of one size, their captions and their latents' posterior mean and std."""

    images: list
    captions: list[str]
    means: torch.Tensor
    stds: torch.Tensor

    @classmethod
    def encoded(cls, pipe: StableDiffusionPipeline, images: ImageSet, trigger: str, cache: Path | None) -> ImageBucket:
        means, stds = encode_images_cached(pipe, images, cache)
        return cls(images.images, training_captions(images, trigger), means, stds)


def by_size(images: ImageSet) -> list[ImageSet]:
    """The images grouped by size (one group per aspect-ratio bucket), in order of first appearance."""
    groups: dict[tuple[int, int], ImageSet] = {}
    for image in images.images:
        groups.setdefault(image.image.size, ImageSet()).images.append(image)
    return list(groups.values())


def aspect_buckets(pipe) -> AspectBuckets:
    """The training buckets of a model: about its native resolution² pixels, at 64-px steps.

    The step is 64 px (kohya's ``bucket_reso_steps``) where the native resolution is 512 px or
    more; smaller models get resolution/8, never finer than one latent cell of the UNet's deepest
    level (the VAE's and the UNet's downsampling together), so every bucket stays a size it can take.
    """
    resolution = native_resolution(pipe)
    cell = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return AspectBuckets.around(resolution, cell * max(1, min(64, resolution // 8) // cell))


def native_resolution(pipe) -> int:
    """The side of the square images the model was trained at."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


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
    checkpoint: TrainingCheckpoint | None = None,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
) -> torch.nn.Module:
    """Train a new style on `unet`, a `training_unet(pipe)` copy, and return it for `finish_style_training`.

    When config.text_encoder_lr > 0, the style also learns on `text_encoders` {component: a
    `copy_sharing_weights` copy with Share layers}, which the caller then merges as well.
    The pipeline itself is never changed. Raises TrainingCancelled when `cancel` is set, and
    TrainingFailed when the loss stops being finite. With a `checkpoint`, continues it if it exists.
    """
    if not share_layers(unet):
        raise TrainingFailed("the UNet has no Share layers; open a style library first")
    text_encoders = dict(text_encoders or {}) if config.text_encoder_lr > 0 else {}
    if config.text_encoder_lr > 0 and not (text_encoders and all(share_layers(m) for m in text_encoders.values())):
        raise TrainingFailed("a text-encoder learning rate needs text encoders with Share layers; open a style library first")
    for model in [unet, *text_encoders.values()]:
        for layer in share_layers(model).values():
            layer.config = replace(layer.config, rank=config.rank)
    # Its own generator, so the batches are the same as a LoRA's trained with the same seed; the
    # text encoders draw theirs after the UNet's, which are then those of a UNet-only training.
    generator = torch.Generator().manual_seed(config.seed)
    parameters = begin_style_training(unet, style_id, generator, UNET_TARGET_MODULES)
    text_parameters = [p for model in text_encoders.values()
                       for p in begin_style_training(model, style_id, generator, CLIP_TARGET_MODULES)]
    return fit(pipe, unet, parameters, images, trigger, config, progress, preview, preview_prompt, cancel, checkpoint,
               text_encoders, text_parameters)  # fmt: skip


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
    checkpoint: TrainingCheckpoint | None = None,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
    text_parameters: Sequence[torch.nn.Parameter] = (),
) -> torch.nn.Module:
    """The latent-diffusion loop: `parameters` of `unet` learn the style's images; returns `unet`.
    With `text_encoders` {component: training copy}, the conditioning runs through them and their
    `text_parameters` learn too, at config.text_encoder_lr.

    Only the parameters given must require gradients (a style in training, or e.g. a PEFT LoRA's). Under
    `accelerate launch` the processes share the batch and average their gradients. With a
    `checkpoint`, the loop continues from it when it exists, saves one every
    `config.checkpoint_every` steps, and saves one when cancelled.
    """
    # The precision is ours (training_precision) and the device the pipeline's: accelerate only
    # synchronises processes, so one process can train many times with different settings, and
    # the UNet copy, which shares the pipeline's weights, is never moved.
    accelerator = Accelerator(mixed_precision="no", cpu=pipe.device.type == "cpu", device_placement=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])  # fmt: skip
    model_dtype = pipe.unet.dtype
    compute_dtype = training_precision(model_dtype, requested_precision(config))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    models = TrainingModels(unet, text_encoders or {})
    models.train()
    optimizer = make_optimizer(parameters, config, text_parameters)
    schedule = "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule
    lr_schedule = get_scheduler(schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)
    scaler = torch.amp.GradScaler(pipe.device.type, enabled=compute_dtype == torch.float16)
    models = accelerator.prepare(models)
    device = pipe.device

    state = TrainingState(0, [*parameters, *text_parameters], optimizer, lr_schedule, scaler,
                          np.random.default_rng(config.seed), torch.Generator().manual_seed(config.seed))  # fmt: skip
    batches = StyleBatches(pipe, images, trigger, config, state.numpy_generator, state.torch_generator,
                           accelerator.process_index, accelerator.num_processes, text_encoders)  # fmt: skip
    if checkpoint is not None and checkpoint.exists():
        state.step = checkpoint.restore(state)

    def save_checkpoint(step: int) -> None:
        if checkpoint is not None and accelerator.is_main_process:
            state.step = step
            checkpoint.save(state)

    start, first_step = time.time(), state.step
    for step in range(state.step + 1, config.steps + 1):
        if cancel_requested(accelerator, cancel):
            save_checkpoint(step - 1)
            resumable = " It can be resumed (--resume)." if checkpoint is not None else ""
            raise TrainingCancelled(f"training cancelled at step {step - 1} of {config.steps}; the library is unchanged.{resumable}")
        loss = torch.zeros(())
        for micro_step in range(config.gradient_accumulation):
            noisy, timesteps, conditioning, target = batches.next(device)
            synchronise = micro_step == config.gradient_accumulation - 1
            with contextlib.nullcontext() if synchronise else accelerator.no_sync(models):
                with torch.autocast(device.type, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None):
                    prediction = models(noisy.to(model_dtype), timesteps, **conditioning.kwargs(model_dtype)).sample
                errors = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
                if config.min_snr_gamma:
                    errors = errors * min_snr_weights(batches.noise_scheduler, timesteps, config.min_snr_gamma)
                batch_loss = errors.mean() / config.gradient_accumulation
                if not all_finite(accelerator, batch_loss):
                    raise TrainingFailed(
                        f"the loss became {batch_loss.item()} at step {step}; lower the learning rate "
                        f"(it was {config.learning_rate:g}). The library is unchanged"
                    )
                accelerator.backward(scaler.scale(batch_loss))
            loss = loss + batch_loss.detach().cpu()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(state.parameters, 1.0)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        # The last step too: a merge that is then refused (a drift budget) can be redone with --resume.
        if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
            save_checkpoint(step)
        if accelerator.num_processes > 1:
            loss = accelerator.reduce(loss.to(device), "mean").cpu()
        if progress is not None:
            progress(TrainingProgress(step, config.steps, loss.item(), time.time() - start, first_step))
        if preview is not None and config.preview_every and step % config.preview_every == 0 and accelerator.is_main_process:
            trained = accelerator.unwrap_model(models)
            preview(step, preview_images(pipe, trained.unet, preview_prompt or with_trigger("", trigger), trained.text_encoders))
    models = accelerator.unwrap_model(models)
    models.eval()
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    return models.unet


def requested_precision(config: TrainingConfig) -> str:
    """config.mixed_precision; for "auto", `accelerate launch --mixed_precision fp16|bf16` if given."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return launcher if config.mixed_precision == "auto" and launcher in HALF_TYPES else config.mixed_precision


def cancel_requested(accelerator: Accelerator, cancel: threading.Event | None) -> bool:
    """Whether any process was asked to cancel: all of them stop at the same step."""
    requested = cancel is not None and cancel.is_set()
    if accelerator.num_processes == 1:
        return requested
    return bool(accelerator.reduce(torch.tensor(float(requested), device=accelerator.device), "sum") > 0)


def all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether every process's loss is finite: all of them stop at the same step when one is not."""
    finite = bool(torch.isfinite(loss))
    if accelerator.num_processes == 1:
        return finite
    return bool(accelerator.reduce(torch.tensor(float(finite), device=accelerator.device), "sum") == accelerator.num_processes)


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


def make_optimizer(parameters: list[torch.nn.Parameter], config: TrainingConfig,
                   text_parameters: Sequence[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW with the UNet's parameters at config.learning_rate and, as a second group, the text
    encoders' at config.text_encoder_lr."""
    groups = [{"params": list(parameters), "lr": config.learning_rate}]
    if text_parameters:
        groups.append({"params": list(text_parameters), "lr": config.text_encoder_lr})
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingFailed("8-bit Adam needs bitsandbytes: pip install -r requirements-gpu.txt") from None
        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate)
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=1e-4)


@torch.no_grad()
def preview_images(pipe: StableDiffusionPipeline, unet: torch.nn.Module, prompt: str,
                   text_encoders: Mapping[str, torch.nn.Module] | None = None, seed: int = 0) -> list:  # fmt: skip
    # Its own scheduler: the pipeline's may be stepping a user's generation at the same time.
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    preview_pipe = pipeline_with(pipe, unet=unet, scheduler=scheduler, **(text_encoders or {}))
    preview_pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return preview_pipe(prompt, num_inference_steps=15, guidance_scale=4.0, generator=generator).images
