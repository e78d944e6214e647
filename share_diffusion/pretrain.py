"""Pretrain the embedded base model on the procedural world, from scratch, on a CPU.

    python -m share_diffusion.pretrain --out assets/base-model --vae-minutes 25 --unet-minutes 45 --decoder-minutes 20

Three stages:
1. The VAE (64x64 RGB -> 16x16x4 latents) learns to reconstruct a broad mix of images
   (`world.vae_training_image`): plain scenes, styled scenes and textures, so it can represent
   styles that users teach later. Its latent scaling factor is set from the data.
2. The UNet and the text encoder learn, jointly, to denoise latents of plain captioned scenes
   (noise prediction, 10% caption dropout for classifier-free guidance). No style is shown to them.
3. The VAE decoder alone is trained further. The encoder is frozen, so the latents the UNet
   learned stay valid while the images get sharper.

`--smoke` runs a few steps of each stage (used by the tests).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import world
from .training import sample_noise

# Words that become single tokens; anything else still tokenizes, byte by byte.
TOKENIZER_WORDS = sorted(
    set(" ".join(world.COLOURS).split())
    | set(world.SHAPES)
    | set(" ".join(world.POSITIONS).split())
    | set(" ".join(world.STYLES).split())
    | {"a", "an", "on", "in", "of", "the", "background", "image", "style", "painting", "picture",
       "photo", "drawing", "with", "and", "art", "by"}
)

# bf16 autocast: about 5x faster than fp32 on CPUs with AVX512-BF16, and the usual choice on GPUs.
MIXED_PRECISION = torch.autocast("cpu", dtype=torch.bfloat16)

NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer(directory: Path, words: list[str] = TOKENIZER_WORDS) -> CLIPTokenizer:
    """A byte-level CLIP BPE vocabulary in which each of `words` is one token.

    Every merge joins a token onto the word's end-of-word suffix, so within a word only one merge can
    ever apply; this makes each listed word reach its single token whatever the merge order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    for word in words:
        suffix = word[-1] + "</w>"
        for ch in reversed(word[:-1]):
            merge = f"{ch} {suffix}"
            suffix = ch + suffix
            if merge not in merges:
                merges.append(merge)
                vocab.append(suffix)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=world.IMAGE_SIZE,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=128,
        )
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def image_batch(make_image, rng: np.random.Generator, batch_size: int) -> torch.Tensor:
    images = np.stack([make_image(rng) for _ in range(batch_size)])
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1


def plain_scene_batch(rng: np.random.Generator, batch_size: int) -> torch.Tensor:
    """Plain scenes, the only images the UNet is trained on."""
    return image_batch(lambda r: world.render(world.sample_scene(r)), rng, batch_size)


def decoder_modules(vae: AutoencoderKL) -> list[torch.nn.Module]:
    """What turns latents into images: everything the decoder-only stage trains."""
    return [vae.decoder, vae.post_quant_conv]


def train_vae(
    vae: AutoencoderKL, minutes: float, max_steps: int, seed: int, batch_size: int = 8, lr: float = 1e-3,
    decoder_only: bool = False, anchor: float = 0.0, precision=MIXED_PRECISION,
) -> None:
    """Stage 1 trains the whole VAE; stage 3 (decoder_only) sharpens the decoder alone, so the encoder,
    and so every latent the UNet learned, stays fixed. With `anchor` > 0, stage 1 continues a trained
    VAE while holding the latents of plain scenes (all the UNet ever sees) to the starting encoder's,
    so the encoder can learn more of everything else without invalidating the UNet. `precision` is
    the autocast context (bf16 by default; a CPU without AVX512-BF16 is faster in float32)."""
    name = "decoder" if decoder_only else "vae"
    modules = decoder_modules(vae) if decoder_only else [vae]
    parameters = [parameter for module in modules for parameter in module.parameters()]
    vae.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    rng = np.random.default_rng(seed + 3 if decoder_only else seed)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    starting_vae = copy.deepcopy(vae) if anchor else None
    start, step = time.time(), 0
    budget = minutes * 60
    while step < max_steps and time.time() - start < budget:
        for group in optimizer.param_groups:
            group["lr"] = max(lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - start) / budget))), 2e-5)
        images = image_batch(world.vae_training_image, rng, batch_size)
        with torch.set_grad_enabled(not decoder_only), precision:
            latents = vae.encode(images).latent_dist.mode()
        with precision:
            recon = vae.decode(latents).sample.float()
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        if not decoder_only:  # keeps the latents' scale in check, like the KL term of a VAE
            loss = loss + 1e-6 * latents.float().square().sum(dim=(1, 2, 3)).mean()
        if anchor:
            plain = plain_scene_batch(rng, batch_size // 2)
            with torch.no_grad(), precision:
                target = starting_vae.encode(plain).latent_dist.mode().float()
            with precision:
                drift = F.mse_loss(vae.encode(plain).latent_dist.mode().float(), target) / target.var()
            loss = loss + anchor * drift
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            print(f"{name} step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    vae.requires_grad_(False)
    print(f"{name}: {step} steps in {time.time() - start:.0f}s", flush=True)


@torch.no_grad()
def take_decoder(vae: AutoencoderKL, donor: AutoencoderKL) -> None:
    """Put `donor`'s decoder behind `vae`'s encoder. Anchored legs hold the plain scenes' latents, so a
    decoder from a later leg fits an earlier leg's encoder, which may keep styled images' latents
    easier for a LoRA to learn (docs/embedded_model.md, Status)."""
    for module, donor_module in zip(decoder_modules(vae), decoder_modules(donor)):
        module.load_state_dict(donor_module.state_dict())


@torch.no_grad()
def make_deterministic(vae: AutoencoderKL) -> None:
    """Pin the posterior's log-variance at its floor: the VAE was trained on the posterior mean.

    Decoding samples with unit variance in early training hides the image from the decoder and
    slows learning many times over; as a plain autoencoder it converges in the few thousand
    steps a CPU allows. Afterwards `latent_dist.sample()` equals the mean, as for SD's own VAE
    in practice (its std is tiny).
    """
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:] = 0
    vae.quant_conv.bias[channels:] = -30.0


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = plain_scene_batch(rng, 256)
    std = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)


@torch.no_grad()
def encode_world(vae: AutoencoderKL, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Posterior mean and std of `count` plain scenes, and their scenes."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(count)]
    means, stds = [], []
    for i in range(0, count, 256):
        images = torch.from_numpy(np.stack([world.render(s) for s in scenes[i : i + 256]])).permute(0, 3, 1, 2) * 2 - 1
        with MIXED_PRECISION:
            posterior = vae.encode(images).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds), scenes


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    vae: AutoencoderKL,
    minutes: float,
    max_steps: int,
    seed: int,
    batch_size: int = 64,
    scene_count: int = 10000,
    lr: float = 5e-4,
    noise_offset: float = 0.0,
) -> EMAModel:
    rng = np.random.default_rng(seed + 1)
    torch.manual_seed(seed)
    means, stds, scenes = encode_world(vae, scene_count, seed + 2)
    scale = vae.config.scaling_factor
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    ema = EMAModel(unet.parameters(), decay=0.999)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    start, step = time.time(), 0
    budget = minutes * 60
    while step < max_steps and time.time() - start < budget:
        progress = min(1.0, (time.time() - start) / budget)
        step_lr = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = max(step_lr, 1e-5)
        idx = rng.integers(0, len(scenes), size=batch_size)
        latents = (means[idx] + stds[idx] * torch.randn_like(means[idx])) * scale
        captions = [
            "" if rng.random() < 0.1 else scenes[i].caption(with_position=rng.random() < 0.5) for i in idx
        ]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        noise = sample_noise(latents.shape, noise_offset, None)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with MIXED_PRECISION:
            prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        step += 1
        if step % 50 == 0:
            print(f"unet step {step} loss {loss.item():.4f} lr {step_lr:.2e} {time.time() - start:.0f}s", flush=True)
    print(f"unet: {step} steps in {time.time() - start:.0f}s", flush=True)
    return ema


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> None:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler(**NOISE_SCHEDULE, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/base-model"))
    parser.add_argument("--vae-minutes", type=float, default=25)
    parser.add_argument("--unet-minutes", type=float, default=45)
    parser.add_argument("--decoder-minutes", type=float, default=20, help="stage 3: the VAE decoder alone")
    parser.add_argument("--decoder-lr", type=float, default=3e-4, help="peak learning rate of stage 3 (cosine decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--vae-from", type=Path, default=None, help="start from a trained VAE folder (--vae-minutes 0: use it as is)")
    parser.add_argument("--decoder-from", type=Path, default=None,
                        help="with --vae-from: take the decoder of this trained VAE folder instead of its own")
    parser.add_argument("--vae-lr", type=float, default=1e-3, help="peak learning rate of the VAE (cosine decay)")
    parser.add_argument("--vae-anchor", type=float, default=0.0,
                        help="with --vae-from: weight holding plain scenes' latents to the starting encoder's, "
                        "so that a trained UNet stays valid (e.g. 2; 0: off)")
    parser.add_argument("--unet-from", type=Path, default=None,
                        help="continue the UNet and text encoder of a saved base model (for example assets/base-model)")
    parser.add_argument("--unet-batch", type=int, default=64, help="UNet batch size")
    parser.add_argument("--unet-lr", type=float, default=5e-4, help="peak learning rate of the UNet and text encoder (cosine decay)")
    parser.add_argument("--noise-offset", type=float, default=0.0,
                        help="per-channel noise offset for the UNet, so that it can move an image's mean colour (e.g. 0.1)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of each stage, for tests")
    args = parser.parse_args(argv)
    if args.vae_anchor and not args.vae_from:
        parser.error("--vae-anchor holds the latents of a trained VAE: give it with --vae-from")
    if args.decoder_from and not args.vae_from:
        parser.error("--decoder-from puts a trained decoder behind a trained encoder: give the encoder's VAE with --vae-from")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    max_steps = 3 if args.smoke else 10**9

    tokenizer = write_tokenizer(args.out / "tokenizer")
    vae = AutoencoderKL.from_pretrained(args.vae_from) if args.vae_from else build_vae()
    if args.decoder_from:
        take_decoder(vae, AutoencoderKL.from_pretrained(args.decoder_from))
    if args.vae_minutes > 0:
        train_vae(vae, args.vae_minutes, max_steps, args.seed, batch_size=4 if args.smoke else 8, lr=args.vae_lr, anchor=args.vae_anchor)
        make_deterministic(vae)
        if not args.vae_anchor:  # an anchored VAE keeps the scale the UNet was trained with
            set_latent_scale(vae, args.seed)
        vae.save_pretrained(args.out / "vae")
    vae.eval().requires_grad_(False)

    if args.unet_from:
        unet = UNet2DConditionModel.from_pretrained(args.unet_from / "unet")
        text_encoder = CLIPTextModel.from_pretrained(args.unet_from / "text_encoder")
    else:
        unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    ema = train_unet(
        unet, text_encoder, tokenizer, vae, args.unet_minutes, max_steps, args.seed,
        batch_size=4 if args.smoke else args.unet_batch, scene_count=64 if args.smoke else 10000, lr=args.unet_lr,
        noise_offset=args.noise_offset,
    )
    ema.copy_to(unet.parameters())
    if args.decoder_minutes > 0:
        train_vae(vae, args.decoder_minutes, max_steps, args.seed, batch_size=4 if args.smoke else 8, lr=args.decoder_lr, decoder_only=True)
    save_pipeline(args.out, vae, text_encoder.eval(), tokenizer, unet.eval())
    print(f"saved the base model to {args.out}", flush=True)


if __name__ == "__main__":
    main()
