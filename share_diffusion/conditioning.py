"""What a family's UNet is conditioned on while a style trains, one class per family.

    conditioning = unet_conditioning(pipe)                  # TextConditioning or SDXLConditioning
    inputs = conditioning(texts, images, mirrored, device)  # a UNetConditioning for one batch
    unet(noisy, timesteps, **inputs.kwargs(dtype))

* SD 1.x and 2.x (:class:`TextConditioning`): the text encoder's last hidden states, as their
  pipelines compute them (SD 2.x's config already ends at OpenCLIP's penultimate layer).
* SDXL (:class:`SDXLConditioning`), as diffusers' ``train_text_to_image_lora_sdxl.py`` and kohya
  sd-scripts train it: both tokenizers and text encoders, the penultimate hidden states of each
  concatenated, the pooled (projected) output of ``text_encoder_2`` as ``text_embeds``, and
  ``time_ids`` = original size (height, width) + crop top-left (top, left) + target size (height,
  width) of each image: the real size of its file, where its crop lies in the resized image
  (mirrored with the image when it is flipped), and its bucket. The text goes through the
  pipeline's own ``encode_prompt``, so a style trains on exactly what generation feeds the UNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .families import SDXL, architecture, family_of_pipeline
from .images import TrainingImage


@dataclass
class UNetConditioning:
    """The UNet's inputs besides the noisy latents and timesteps, for one batch."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds and time_ids

    def kwargs(self, dtype: torch.dtype) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward``, in the model's dtype."""
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states.to(dtype)}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = {key: value.to(dtype) for key, value in self.added_cond_kwargs.items()}
        return kwargs


class TextConditioning:
    """SD 1.x and 2.x: the text encoder's last hidden states."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, texts: list[str], images: Sequence[TrainingImage], mirrored: Sequence[bool],
                 device: torch.device) -> UNetConditioning:  # fmt: skip
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return UNetConditioning(text_encoder(ids.to(text_encoder.device))[0].to(device))


class SDXLConditioning:
    """SDXL: both text encoders, the pooled text embedding and each image's size and crop."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, texts: list[str], images: Sequence[TrainingImage], mirrored: Sequence[bool],
                 device: torch.device) -> UNetConditioning:  # fmt: skip
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=texts, device=self.pipe.text_encoder_2.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return UNetConditioning(
            prompt_embeds.to(device),
            {"text_embeds": pooled.to(device), "time_ids": time_ids(images, mirrored).to(device)},
        )


def time_ids(images: Sequence[TrainingImage], mirrored: Sequence[bool]) -> torch.Tensor:
    """SDXL's six size numbers per image: original (h, w), crop top-left (top, left), target (h, w)."""
    rows = []
    for image, flip in zip(images, mirrored):
        original, crop = image.size_and_crop(bool(flip))
        width, height = image.image.size
        rows.append([*original, *crop, height, width])
    return torch.tensor(rows, dtype=torch.float32)


def unet_conditioning(pipe) -> TextConditioning | SDXLConditioning:
    """The conditioning of the pipeline's family."""
    return SDXLConditioning(pipe) if architecture(family_of_pipeline(pipe)) == SDXL else TextConditioning(pipe)
