"""The Stable Diffusion 1.5 pipeline with random weights, built offline from its configs.

    pipe = sd15_pipeline("cuda", torch.float16)

Memory and speed depend on the architecture, not on the weights, so benchmarks measure SD1.5
without downloading it: the UNet is benchmarks.merge's SD15_UNET_CONFIG, the VAE and the CLIP
ViT-L/14 text encoder take the values of SD1.5's vae/config.json and text_encoder/config.json, and
the scheduler is its PNDM. The tokenizer is the embedded model's byte-level BPE
(share_diffusion.pretrain.write_tokenizer): the token ids differ from CLIP's, which does not matter
for random weights, and the text encoder keeps CLIP's 49408-token embedding.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from benchmarks.merge import SD15_UNET_CONFIG
from share_diffusion.pretrain import write_tokenizer

SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)
#: SD1.5's native image side in pixels.
SD15_RESOLUTION = 512


def sd15_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5 with random weights (the same for a seed), initialised on `device` and cast to `dtype`.

    Initialising on the device itself keeps a GPU run from spending its time in CPU initialisers.
    """
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tokenizer(Path(folder))
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
        vae = AutoencoderKL(**SD15_VAE_CONFIG).eval()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **SD15_TEXT_ENCODER_CONFIG,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype != torch.float32:  # a float32 .to() is a no-op that still logs a warning
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
