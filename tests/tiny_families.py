"""Tiny random SD 2.x (epsilon and v) and SDXL pipelines, and their A1111 single-file layout.

The SD 1.x counterparts are ``conftest.build_tiny_pipeline`` and ``conftest.diffusers_to_ldm_state_dict``.
Every object is a real diffusers/transformers model with random weights.

diffusers ships only the original -> diffusers direction of the single-file layout.  The text
encoders' inverse here is the inverse of diffusers' own tables
(``single_file_utils.DIFFUSERS_TO_LDM_MAPPING["openclip"]``, ``LDM_CLIP_PREFIX_TO_REMOVE``), and,
for OpenCLIP's fused attention, of ``convert_open_clip_checkpoint`` (q, k and v stacked into
``in_proj_weight``, the projection stored transposed), as diffusers' scripts
``convert_diffusers_to_original_sdxl.py`` write them.  The tests prove the round trip weight by
weight against the pipelines they came from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import _unet_to_ldm, _vae_to_ldm, build_tiny_pipeline

#: diffusers' CLIP -> OpenCLIP names (the inverse of DIFFUSERS_TO_LDM_MAPPING["openclip"]).
_OPENCLIP_TOP = {
    "embeddings.position_embedding.weight": "positional_embedding",
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def openclip_state_dict(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's layout (SD 2.x ``cond_stage_model.model.``, SDXL's second encoder)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {}
    for key, value in state.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T  # OpenCLIP multiplies x @ projection
        elif key.startswith("encoder.layers."):
            index, rest = key.removeprefix("encoder.layers.").split(".", 1)
            base = f"transformer.resblocks.{index}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                kind = rest.rsplit(".", 1)[1]  # weight | bias
                if rest.startswith("self_attn.q_proj."):
                    layer = f"encoder.layers.{index}.self_attn."
                    out[base + f"attn.in_proj_{kind}"] = torch.cat(
                        [state[layer + f"{p}_proj.{kind}"] for p in ("q", "k", "v")]
                    )
                continue
            for old, new in _OPENCLIP_LAYER.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            out[base + rest] = value
        elif key != "embeddings.position_ids":
            raise KeyError(key)
    if "text_projection" not in out:  # SD 2.x files carry OpenCLIP's projection; diffusers ignores it
        hidden = out["ln_final.weight"].shape[0]
        out["text_projection"] = torch.eye(hidden)
    return {prefix + k: v for k, v in out.items()}


def _clip_l_state_dict(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    return {
        prefix + "text_model." + k.removeprefix("text_model."): v
        for k, v in text_encoder.state_dict().items()
        if not k.endswith("position_ids")
    }


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The A1111/original single-file layout of a tiny SD 2.x or SDXL pipeline."""
    state = dict(_unet_to_ldm(pipe.unet))
    state.update(_vae_to_ldm(pipe.vae))
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(_clip_l_state_dict(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(openclip_state_dict(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        state.update(openclip_state_dict(pipe.text_encoder, "cond_stage_model.model."))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def _open_clip_text_encoder(tokenizer, hidden: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",  # OpenCLIP's (SD 2.x, SDXL's second encoder); SD 1.x's CLIP uses quick_gelu
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_tiny_sd2_pipeline(workdir: Path, prediction_type: str = "epsilon"):
    """A tiny SD 2.x pipeline: OpenCLIP-style text encoder, linear projections, ``prediction_type`` scheduler.

    For ``v_prediction`` the bias that ComfyUI's SD 2.x test reads (the last output block's first
    transformer ``norm1.bias``) gets the spread of a trained v model; random init leaves it at 0.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    sd1 = build_tiny_pipeline(workdir)  # its tokenizer and VAE
    torch.manual_seed(1)
    text_encoder = _open_clip_text_encoder(sd1.tokenizer, 32)
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
    )
    if prediction_type == "v_prediction":
        with torch.no_grad():
            unet.up_blocks[1].attentions[1].transformer_blocks[0].norm1.bias.normal_(0, 0.2)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=sd1.vae, text_encoder=text_encoder, tokenizer=sd1.tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(workdir: Path):
    """A tiny SDXL pipeline: CLIP (32 wide) and OpenCLIP-with-projection (48 wide) text encoders, text_time UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd1 = build_tiny_pipeline(workdir)
    tokenizer = sd1.tokenizer
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Widths differ, as 768 and 1280 do in SDXL: diffusers tells the encoders of a file apart by them.
    text_encoder_2 = _open_clip_text_encoder(tokenizer, 48, with_projection=True)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=48 + 6 * time_dim,  # pooled text + 6 size/crop numbers
        cross_attention_dim=32 + 48,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=sd1.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )
