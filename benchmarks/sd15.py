"""The Stable Diffusion 1.5 pipeline with random weights, built offline from its configs.

    pipe = sd15_pipeline("cuda", torch.float16)

Memory and speed depend on the architecture, not on the weights, so benchmarks measure SD1.5
without downloading it: every component comes from the weight-less config folder that Share Studio
ships for SD1.5 (share_diffusion.model_configs.config_folder("sd15"): the Hub folder's configs and
CLIP's tokenizer), with random weights.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from share_diffusion.model_configs import config_folder


def sd15_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5 with random weights (the same for a seed), initialised on `device` and cast to `dtype`.

    Initialising on the device itself keeps a GPU run from spending its time in CPU initialisers.
    """
    folder = config_folder("sd15")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).eval()
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype != torch.float32:  # a float32 .to() is a no-op that still logs a warning
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
