"""Stable Diffusion pipelines with random weights, built offline from the shipped config folders.

    pipe = random_pipeline("sd15", "cuda", torch.float16)
    pipe = random_pipeline("sdxl-base")

Memory and speed depend on the architecture, not on the weights, so benchmarks measure real
architectures without downloading them: every component that a shipped folder's model_index.json
lists (share_diffusion.model_configs.config_folder: the Hub folder's configs and CLIP's tokenizers)
is built from its config, the models with random weights.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import diffusers
import torch
import transformers

from share_diffusion.model_configs import config_folder


def random_pipeline(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> diffusers.DiffusionPipeline:  # fmt: skip
    """The shipped architecture `name` (model_configs.CONFIG_NAMES) with random weights (the same for
    a seed), initialised on `device` and cast to `dtype`.

    Initialising on the device itself keeps a GPU run from spending its time in CPU initialisers.
    """
    folder = config_folder(name)
    index = json.loads((folder / "model_index.json").read_text())
    torch.manual_seed(seed)
    components = {key: component(folder / key, *entry, device) for key, entry in index.items() if isinstance(entry, list)}
    options = {key: value for key, value in index.items() if not key.startswith("_") and not isinstance(value, list)}
    pipe = getattr(diffusers, index["_class_name"])(**components, **options)
    if dtype != torch.float32:  # a float32 .to() is a no-op that still logs a warning
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def component(folder: Path, library: str | None, class_name: str | None, device: str | torch.device):
    """One model_index.json entry: a model with random weights (in eval mode), a tokenizer or a
    scheduler from its files, or None for an empty entry (SD1.5's safety checker)."""
    if library is None:
        return None
    cls = getattr(importlib.import_module(library), class_name)
    if issubclass(cls, diffusers.ModelMixin):
        with torch.device(device):
            return cls.from_config(cls.load_config(folder)).eval()
    if issubclass(cls, transformers.PreTrainedModel):
        with torch.device(device):
            return cls(cls.config_class.from_pretrained(folder)).eval()
    return cls.from_pretrained(folder)
