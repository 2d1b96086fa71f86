"""The exact-reward world's teacher (world.py): AnimateDiff's classes, as backends/animatediff.py
loads and calls them, over the world's lossless pixel VAE (space-to-depth by 4, so a 16x16 clip is
4x4 latents). Its teacher is committed in weights/world: there is no tiny one to build.
"""

import backends.animatediff as animatediff
import world
from common import ConfigError

OPTIONS = {**animatediff.OPTIONS,
           "pretrained_model_name_or_path": ("weights/world/sd", "the world teacher's SD-layout folder"),
           "motion_adapter": ("weights/world/motion_adapter", "the world teacher's motion modules", {"input": True})}
STUDENT_KEYS, TABLE, TRAINABLE, FSDP_WRAP = (animatediff.STUDENT_KEYS, animatediff.TABLE, animatediff.TRAINABLE,
                                            animatediff.FSDP_WRAP)
required_models, load_denoiser, prunable_blocks = animatediff.required_models, animatediff.load_denoiser, \
    animatediff.prunable_blocks
load_text_encoder, encode_prompts, with_denoiser = animatediff.load_text_encoder, animatediff.encode_prompts, \
    animatediff.with_denoiser
generate, objective, predict = animatediff.generate, animatediff.objective, animatediff.predict
enable_checkpointing = animatediff.enable_checkpointing


def build_tiny(args):
    raise ConfigError("model.build_tiny: the world's teacher is committed in weights/world (train_world_teacher.py "
                      "trains another); set build_tiny: false")


def load_pipeline(args, unet, device=None, dtype=None):
    return animatediff.load_pipeline(args, unet, device, dtype, vae_class=world.PixelVAE)


def export(args, unet, out_dir):
    info = animatediff.export(args, unet, out_dir, load_pipeline=load_pipeline)
    return {**info, "needs": "the world's pixel VAE (world.PixelVAE): vip's folder on the Python path"}


def denoise_inputs(unet, batch_size, num_frames, height, width, device=None, dtype=None):
    return animatediff.denoise_inputs(unet, batch_size, num_frames, height, width, device, dtype,
                                      vae_scale_factor=world.FACTOR)
