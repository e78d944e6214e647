"""Shared test fixtures.

``tiny_pipeline_dir`` builds a tiny *random* but real diffusers
``StableDiffusionPipeline`` with the same shape family as the embedded base
model (64x64 images -> 16x16x4 latents, cross-attention UNet, small CLIP text
encoder with our own byte-level tokenizer) and saves it with
``save_pretrained``.  Tests use it instead of the embedded model so they run
fast on a CPU and do not depend on ``assets/base-model/`` existing.

``tiny_single_file`` converts that pipeline into an original-Stable-Diffusion
(LDM/A1111) single-file ``.safetensors`` checkpoint.  diffusers 0.42 ships only
the LDM -> diffusers direction, so the inverse key mapping lives here
(``diffusers_to_ldm_state_dict``); the round-trip test proves it is the exact
inverse of diffusers' own converters.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# The dev machines and CI have 2 cores shared with other jobs.  With torch's default of one
# OpenMP thread per core, the tiny-model tests slow down 10-100x as soon as another process
# is busy (threads spin waiting for each other).  One thread is fast and predictable.
# Set SHARE_TEST_THREADS to override.
TEST_THREADS = int(os.environ.get("SHARE_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))  # inherited by CLI subprocesses


def _limit_torch_threads() -> None:
    import torch

    torch.set_num_threads(TEST_THREADS)


_limit_torch_threads()

def build_tiny_pipeline(workdir: Path):
    """Construct a tiny random StableDiffusionPipeline (real diffusers/transformers objects)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from share_diffusion.pretrain import write_tokenizer

    torch.manual_seed(0)
    tokenizer = write_tokenizer(workdir / "_tokenizer_src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------------------
# diffusers -> original SD (LDM) key mapping: the inverse of diffusers.loaders.single_file_utils
# --------------------------------------------------------------------------------------
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/crop and pooled-text embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key_to_ldm(key: str, layers_per_block: int) -> str:
    per = layers_per_block + 1
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per}.0.op.{rest.removeprefix('conv.')}"
        idx = 1 + block * per + j
        if kind == "resnets":
            name, _, tail = rest.partition(".")
            return f"input_blocks.{idx}.0.{_UNET_RESNET[name]}.{tail}"
        return f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            name, _, tail = rest.partition(".")
            return f"middle_block.{2 * j}.{_UNET_RESNET[name]}.{tail}"
        return f"middle_block.1.{rest}"
    raise KeyError(key)


def _unet_to_ldm(unet) -> dict:
    lpb = unet.config.layers_per_block
    per = lpb + 1
    out = {}
    up_has_attn = {}
    for key in unet.state_dict():
        m = re.match(r"up_blocks\.(\d+)\.attentions\.", key)
        if m:
            up_has_attn[int(m[1])] = True
    for key, value in unet.state_dict().items():
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            if kind == "resnets":
                name, _, tail = rest.partition(".")
                new = f"output_blocks.{block * per + j}.0.{_UNET_RESNET[name]}.{tail}"
            elif kind == "attentions":
                new = f"output_blocks.{block * per + j}.1.{rest}"
            else:
                pos = 2 if up_has_attn.get(block) else 1
                new = f"output_blocks.{block * per + per - 1}.{pos}.{rest}"
        else:
            new = _unet_key_to_ldm(key, lpb)
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(vae) -> dict:
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        m_mid = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            part, blocks, i, kind, j, rest = m[1], m[2], int(m[3]), m[4], int(m[5]), m[6]
            rest = rest.replace("conv_shortcut", "nin_shortcut")
            if blocks == "down_blocks":
                new = f"{part}.down.{i}." + (f"block.{j}.{rest}" if kind == "resnets" else f"downsample.{rest}")
            else:
                i = n_up - 1 - i
                new = f"{part}.up.{i}." + (f"block.{j}.{rest}" if kind == "resnets" else f"upsample.{rest}")
        elif m_mid:
            part, kind, j, rest = m_mid[1], m_mid[2], int(m_mid[3]), m_mid[4]
            if kind == "resnets":
                new = f"{part}.mid.block_{j + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                name, leaf = rest.rsplit(".", 1)
                new = f"{part}.mid.attn_1.{_VAE_ATTN[name]}.{leaf}"
                if leaf == "weight" and value.ndim == 2:
                    value = value[:, :, None, None]  # LDM stores these as 1x1 convs
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out["first_stage_model." + new] = value
    return out


def diffusers_to_ldm_state_dict(pipe) -> dict:
    """Original SD single-file layout: model.diffusion_model.*, first_stage_model.*, cond_stage_model.*"""
    state = {}
    state.update(_unet_to_ldm(pipe.unet))
    state.update(_vae_to_ldm(pipe.vae))
    for key, value in pipe.text_encoder.state_dict().items():
        key = key.removeprefix("text_model.")  # transformers < 5.6 nested CLIPTextModel under text_model
        state["cond_stage_model.transformer.text_model." + key] = value
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random StableDiffusionPipeline saved by save_pretrained (safetensors)."""
    root = tmp_path_factory.mktemp("tiny_pipeline")
    pipe = build_tiny_pipeline(root)
    target = root / "tiny-sd"
    pipe.save_pretrained(target, safe_serialization=True)
    return target


@pytest.fixture(scope="session")
def tiny_single_file(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline as one original-SD-format ``.safetensors`` checkpoint."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    path = tmp_path_factory.mktemp("single_file") / "tiny-sd.safetensors"
    save_file(diffusers_to_ldm_state_dict(pipe), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipeline_dir):
    """A loaded tiny pipeline shared by read-only tests (do not mutate it)."""
    from share_diffusion.loading import load_pipeline

    return load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
