"""The exact-reward world's DiT teacher (world.py, configs/world_wan.yaml): Wan's classes, as
backends/wan.py loads and calls them (a WanTransformer3DModel, a frozen UMT5 encoder over the
grammar's words, WanPipeline and a flow-matching sampler), over the world's lossless pixel VAE
shaped as Wan's (world.WanPixelVAE, no temporal compression; its factor read from the
transformer's input channels: 12 for 2x2-pixel latents, 48 for 4x4, the default).
Its teacher is committed in weights/world_wan (train_world_teacher.py --model dit).
"""

import torch

import backends.wan as wan
import models
import world
from common import ConfigError

OPTIONS = {**wan.OPTIONS,
           "pretrained_model_name_or_path": ("weights/world_wan", "the world's DiT teacher, a WanPipeline folder"),
           "max_sequence_length": (8, "text tokens: a world prompt is 6 words and 2 marks", {"min": 1})}
STUDENT_KEYS, TABLE, TRAINABLE, FSDP_WRAP = wan.STUDENT_KEYS, wan.TABLE, wan.TRAINABLE, wan.FSDP_WRAP
load_denoiser, prunable_blocks, load_text_encoder = wan.load_denoiser, wan.prunable_blocks, wan.load_text_encoder
encode_prompts, with_denoiser, objective = wan.encode_prompts, wan.with_denoiser, wan.objective
predict, enable_checkpointing = wan.predict, wan.enable_checkpointing


def required_models(args):
    wan.check_scheduler(args)
    return [dict(where="model.pretrained_model_name_or_path", name=args.pretrained_model_name_or_path,
                 files=[f for f in wan.FOLDERS if not f.startswith("vae/")],
                 what="the world's DiT teacher (train_world_teacher.py --model dit)", tiny=True)]


def build_tiny(args):
    raise ConfigError("model.build_tiny: the world's DiT teacher is committed in weights/world_wan "
                      "(train_world_teacher.py --model dit trains another); set build_tiny: false")


def load_pipeline(args, transformer, device=None, dtype=None):
    text_encoder, tokenizer = load_text_encoder(args, dtype=dtype)
    vae = world.WanPixelVAE(scale_factor_spatial=vae_scale_factor(transformer))
    pipe = wan.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=wan.sampling_scheduler(args))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def vae_scale_factor(transformer):
    """The pixels a side of the teacher's latents: a latent holds 3 x factor^2 values (world.WanPixelVAE)."""
    try:
        return world.latent_factor(transformer.config.in_channels)
    except ValueError as e:
        raise ConfigError(f"model.pretrained_model_name_or_path: the transformer takes {e}") from None


def initial_noise(generators, channels, num_frames, height, width, factor):
    """One clip's noise a generator, (B, channels, F, H/factor, W/factor): drawn here, as WanPipeline
    would round 8 frames to the 4k + 1 its own VAE takes."""
    shape = (1, channels, num_frames, height // factor, width // factor)
    return torch.cat([torch.randn(shape, generator=g) for g in generators])


def generate(pipe, prompts, seeds, args, return_latents=False):
    with models.quiet("diffusers.pipelines.wan.pipeline_wan"):  # its frame-count warning: the noise is given
        return wan.generate(pipe, prompts, seeds, args, return_latents,
                            initial_noise=lambda g: initial_noise(g, pipe.vae.config.z_dim, args.num_frames, args.height,
                                                                  args.width, pipe.vae.config.scale_factor_spatial))


WORLD_VAE = "the world's pixel VAE (world.WanPixelVAE): vip's folder on the Python path"


def export(args, transformer, out_dir):
    return {**wan.export(args, transformer, out_dir, load_pipeline=load_pipeline), "needs": WORLD_VAE}


def denoise_inputs(transformer, batch_size, num_frames, height, width, device=None, dtype=None):
    factor = vae_scale_factor(transformer)
    h, w = height // factor, width // factor
    sample = torch.randn(batch_size, transformer.config.in_channels, num_frames, h, w, device=device, dtype=dtype)
    text = torch.randn(batch_size, 8, transformer.config.text_dim, device=device, dtype=dtype)
    return sample, torch.full((batch_size,), 500.0, device=device), text
