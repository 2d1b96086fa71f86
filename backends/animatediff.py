"""AnimateDiff (SD1.5 + motion adapter v1.5-2) in diffusers' classes: the UNetMotionModel, its
pipeline and its training schedule. The prunable blocks are the 21 motion modules; each is residual
(proj_out(...) + its input), so an identity in its place is exactly "the module is gone".

The interface every backend has (backends/README.md); `configs/animatediff.yaml` and `configs/tiny.yaml` use it.
"""

import os
import sys

import torch
from diffusers import (AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, DDPMScheduler, MotionAdapter,
                       StableDiffusionPipeline, UNet2DConditionModel, UNetMotionModel)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import common
import models
from common import replace_folder, tmp_name

OPTIONS = {
    "pretrained_model_name_or_path": ("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                      "SD1.5 base: hub id or local folder (unet, vae, text_encoder, tokenizer, scheduler)"),
    "motion_adapter": ("guoyww/animatediff-motion-adapter-v1-5-2", "motion adapter: hub id or local folder",
                       {"input": True}),
}
STUDENT_KEYS = ("pretrained_model_name_or_path", "motion_adapter")  # a student's base model, beside the backend
TABLE = {"blocks": "Motion params", "blocks_are": "the motion modules (the paper's count)", "denoiser": "UNet"}
TRAINABLE = {"motion_modules": lambda name: ".motion_modules." in name, "unet": lambda name: True}
FSDP_WRAP = ("AnimateDiffTransformer3D", "Transformer2DModel", "ResnetBlock2D")  # the motion modules, SD's blocks
SD_FILES = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json",
            "scheduler/scheduler_config.json"]


def required_models(args):
    return [dict(where="model.pretrained_model_name_or_path", name=args.pretrained_model_name_or_path, files=SD_FILES,
                 what="an SD1.5-layout folder (unet, vae, text_encoder, tokenizer, scheduler)", revision=args.revision,
                 tiny=True),
            dict(where="model.motion_adapter", name=args.motion_adapter, files=["config.json"],
                 what="a diffusers MotionAdapter folder", tiny=True)]


def load_denoiser(args, dtype=None):
    """AnimateDiff's UNetMotionModel: the SD1.5 UNet with the motion adapter's modules."""
    unet2d = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet",
                                                  torch_dtype=dtype, **models.hub_kwargs(args))
    adapter = MotionAdapter.from_pretrained(args.motion_adapter, torch_dtype=dtype,
                                            **models.hub_kwargs(args, revision=False))
    with models.quiet("diffusers.models.modeling_utils"):  # from_unet2d's no-op cast warns
        return UNetMotionModel.from_unet2d(unet2d, adapter)


def prunable_blocks(unet):
    """Every motion module's path, in forward order (down, mid, up), removed or not."""
    def names(prefix, block):
        return [f"{prefix}.motion_modules.{j}" for j in range(len(getattr(block, "motion_modules", [])))]

    down = [n for i, b in enumerate(unet.down_blocks) for n in names(f"down_blocks.{i}", b)]
    up = [n for i, b in enumerate(unet.up_blocks) for n in names(f"up_blocks.{i}", b)]
    return down + names("mid_block", unet.mid_block) + up


def load_text_encoder(args, dtype=None):
    base = args.pretrained_model_name_or_path
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype, **models.hub_kwargs(args))
    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", **models.hub_kwargs(args))
    return text_encoder.eval().requires_grad_(False), tokenizer


def encode_prompts(text_encoder, tokenizer, prompts, device):
    """CLIP's last hidden state over the padded tokens (B, 77, D for SD), as the pipeline conditions on."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def load_pipeline(args, unet, device=None, dtype=None, vae_class=AutoencoderKL):
    """An AnimateDiffPipeline around `unet`, with the base model's VAE, text encoder and tokenizer
    and AnimateDiff's DDIM settings (linear betas, no sample clipping)."""
    base = args.pretrained_model_name_or_path
    text_encoder, tokenizer = load_text_encoder(args, dtype=dtype)
    pipe = AnimateDiffPipeline(
        vae=vae_class.from_pretrained(base, subfolder="vae", torch_dtype=dtype, **models.hub_kwargs(args)),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=None,
        scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler", beta_schedule="linear", clip_sample=False,
                                                timestep_spacing="linspace", steps_offset=1, **models.hub_kwargs(args)),
    )
    return placed(pipe, device, dtype)


def placed(pipe, device, dtype):
    pipe.set_progress_bar_config(disable=True)
    with models.quiet("diffusers.models.modeling_utils"):  # diffusers warns on every cast, even a no-op one
        return pipe.to(device=device, dtype=dtype)


def with_denoiser(pipe, unet):
    """The same pipeline (shared VAE, text encoder, scheduler config) around another UNet."""
    other = type(pipe)(**{**pipe.components, "unet": unet})
    other.set_progress_bar_config(disable=True)
    return other


generate = models.generate


def enable_checkpointing(unet):
    """diffusers' gradient checkpointing, and the motion modules too: it leaves them out, and they train."""
    unet.enable_gradient_checkpointing()
    models.checkpoint_blocks(sys.modules[__name__], unet)


def objective(args):
    """DDPM with AnimateDiff's linear betas, the same as the sampler's; the base model's prediction type."""
    return common.DDPMObjective(DDPMScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", beta_schedule="linear", clip_sample=False,
        **models.hub_kwargs(args)))


def predict(unet, noisy, timesteps, text):
    """One training forward: UNetMotionModel does not repeat the text per frame (its pipeline does)."""
    return unet(noisy, timesteps, text.repeat_interleave(noisy.shape[2], dim=0)).sample


def denoise_inputs(unet, batch_size, num_frames, height, width, device=None, dtype=None, vae_scale_factor=8):
    """Random inputs of one UNet call for videos of `height` x `width` pixels: latents (B, C, F, h,
    w), a timestep, and text embeddings repeated per frame (B*F, 77, D)."""
    h, w = height // vae_scale_factor, width // vae_scale_factor
    sample = torch.randn(batch_size, unet.config.in_channels, num_frames, h, w, device=device, dtype=dtype)
    text = torch.randn(batch_size * num_frames, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    return sample, torch.tensor([500], device=device), text


# -----------------------------------------------------------------------------
# Tiny offline models: the real classes and folder layouts at toy size, random weights, built
# from configs and loaded back through the same from_pretrained calls as real checkpoints.


def tiny_clip_tokenizer():
    """A CLIPTokenizer over CLIP's byte-level alphabet, with and without the end-of-word mark, and
    no merges: every word is spelled out character by character (514 tokens)."""
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


# The tiny models' configs (benchmarks/bench.py's "tiny" size builds the same).
TINY_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
TINY_ADAPTER = dict(block_out_channels=(32, 64), motion_layers_per_block=2, motion_mid_block_layers_per_block=1,
                    motion_num_attention_heads=2, motion_norm_num_groups=8, motion_max_seq_length=32)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_TEXT = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)


def build_tiny(args, seed=0):
    """Write a tiny SD1.5-layout folder and a tiny motion adapter folder at the config's paths,
    unless both exist. UNet (32, 64) channels with 2 layers per block, so 11 motion modules (4 down,
    1 mid, 6 up); a 4-level VAE (scale factor 8, like SD's); a 2-layer CLIP text encoder."""
    base_dir, adapter_dir = args.pretrained_model_name_or_path, args.motion_adapter
    if os.path.exists(os.path.join(base_dir, "model_index.json")) and \
            os.path.exists(os.path.join(adapter_dir, "config.json")):
        return
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    adapter = MotionAdapter(**TINY_ADAPTER)
    tmp = tmp_name(base_dir)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp)
    adapter_tmp = tmp_name(adapter_dir)
    adapter.save_pretrained(adapter_tmp)
    for src, dst in ((tmp, base_dir), (adapter_tmp, adapter_dir)):
        replace_folder(src, dst)


# -----------------------------------------------------------------------------
# Export: the student as an AnimateDiffPipeline folder that plain diffusers loads.


def motion_modules_emptied(unet):
    """The student as a UNetMotionModel: diffusers cannot drop a motion module from its blocks, but
    takes a layer count for each one (nested `temporal_transformer_layers_per_block`), so a removed
    module becomes one of no transformer layers with its norm and projections zero. It adds exactly
    nothing, as the removed module does, at the cost of one norm and two C x C projections."""
    module = sys.modules[__name__]
    removed, config = set(models.removed_blocks(module, unet)), dict(unet.config)

    def per_block(value, n):
        return list(value) if isinstance(value, (list, tuple)) else [value] * n

    def layers(prefix, block, value):  # one count a motion module of the block, 0 where removed
        return [0 if f"{prefix}.motion_modules.{j}" in removed else value[j] if isinstance(value, (list, tuple)) else value
                for j in range(len(block.motion_modules))]

    down = per_block(config["temporal_transformer_layers_per_block"], len(unet.down_blocks))
    up = per_block(config["reverse_temporal_transformer_layers_per_block"] or down[::-1], len(unet.up_blocks))
    config.update(temporal_transformer_layers_per_block=[layers(f"down_blocks.{i}", b, down[i])
                                                         for i, b in enumerate(unet.down_blocks)],
                  reverse_temporal_transformer_layers_per_block=[layers(f"up_blocks.{i}", b, up[i])
                                                                 for i, b in enumerate(unet.up_blocks)])
    if getattr(unet.mid_block, "motion_modules", None):
        config["temporal_transformer_layers_per_mid_block"] = layers(
            "mid_block", unet.mid_block, config["temporal_transformer_layers_per_mid_block"])
    config = {k: v for k, v in config.items() if k != "_use_default_values"}
    return models.with_blocks_zeroed(module, unet, zeroed=UNetMotionModel.from_config(config))


def export(args, unet, out_dir, load_pipeline=load_pipeline):
    """Write the student as an AnimateDiffPipeline folder (the base model's VAE, text encoder,
    tokenizer and the sampler vip uses, the student's UNetMotionModel); returns what the card says."""
    exported = motion_modules_emptied(unet)
    load_pipeline(args, exported, dtype=common.weight_dtype(args.mixed_precision)).save_pretrained(out_dir)
    return {"denoiser": exported, "pipeline": "AnimateDiffPipeline",
            "form": "a UNetMotionModel whose removed motion modules have no transformer layers and zero projections: "
                    "the student's outputs exactly, and almost all of its saving (a removed module still runs one "
                    "norm and two channel-wide projections)"}
