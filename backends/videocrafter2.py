"""VideoCrafter2 (text-to-video 512 v2.0) in diffusers' and transformers' classes, its noise
schedule and sampler, and the conversion of the official checkpoint.

- UNet: diffusers' UNet3DConditionModel, which matches VC2's module for module (temporal
  convolutions after each ResBlock, spatial then temporal transformer, the temporal transformer
  after conv_in), plus VC2's frame-rate embedding added to the time embedding.
- VAE: SD's AutoencoderKL. Text encoder: OpenCLIP ViT-H/14's text tower converted into
  transformers' CLIPTextModel with 23 layers. VC2 conditions on the penultimate layer followed by
  the final LayerNorm, which is exactly that model's last_hidden_state; diffusers' SD 2.x does the
  same with the same tower. So no open_clip dependency, and the encoder loads like AnimateDiff's CLIP.
- Schedule: SD's betas, epsilon prediction, and VC2's latent scaling `use_scale`: the clean latent
  is multiplied by scale(t), 1 at t = 0 falling linearly to 0.7 at t = 399, then 0.7.

The official checkpoint is converted on first use, or once by hand (convert_videocrafter2.py):

    python convert_videocrafter2.py --checkpoint VideoCrafter/VideoCrafter2 --output_dir weights/videocrafter2
"""

import html
import inspect
import json
import os
import pickle
import re
import shutil
import sys

import ftfy
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet3DConditionModel
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils import BaseOutput
from huggingface_hub import hf_hub_download
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import backends.animatediff as animatediff
import common
import models

UNET_CONFIG = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
                   cross_attention_dim=1024, attention_head_dim=64)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
# Tiny sizes of the same layout, for tests and CPU runs: sizes the official code builds too (its group
# norm is 32; attention at two levels of three, no attention at the coarsest, as in the real model).
TINY_UNET_CONFIG = dict(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=32, cross_attention_dim=32,
                        attention_head_dim=16, down_block_types=("CrossAttnDownBlock3D",) * 2 + ("DownBlock3D",),
                        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 2)
TINY_VAE_CONFIG = dict(VAE_CONFIG, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, layers_per_block=1, sample_size=32)
TINY_TEXT_CONFIG = dict(TEXT_CONFIG, vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, projection_dim=32, bos_token_id=512, eos_token_id=513)

# What VC2 samples with (scripts/run_text2video.sh of the official repository).
INFERENCE_DEFAULTS = dict(height=320, width=512, num_frames=16, fps=28, guidance_scale=12.0, num_inference_steps=50,
                          eta=1.0)
SCALE_B, MID_STEP = 0.7, 400  # use_scale: scale_b from the model config, mid_step lvdm's default
# OpenCLIP's BPE vocabulary in transformers' format, from the text tower's own repository.
TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class VideoCrafter2UNet(UNet3DConditionModel):
    """UNet3DConditionModel with VC2's frame-rate conditioning: the fps, embedded like a timestep
    (sinusoid, then Linear-SiLU-Linear), is added to the time embedding."""

    @register_to_config
    def __init__(self, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
                 up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, layers_per_block=2, norm_num_groups=32,
                 cross_attention_dim=1024, attention_head_dim=64):
        # attention_head_dim: diffusers' UNet3D reads it as the head *width* in its transformers
        # (heads = channels / 64 here, as in VC2), and the first temporal transformer has 8 heads.
        super().__init__(in_channels=in_channels, out_channels=out_channels, block_out_channels=block_out_channels,
                         down_block_types=down_block_types, up_block_types=up_block_types,
                         layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                         cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim)
        self.fps_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.fps_embedding = TimestepEmbedding(block_out_channels[0], block_out_channels[0] * 4)
        # config.json keeps only this class's arguments: the parent's other options are VC2's fixed values.
        ours = inspect.signature(type(self).__init__).parameters
        self._internal_dict = FrozenDict({k: v for k, v in self._internal_dict.items() if k in ours or k.startswith("_")})

    def forward(self, sample, timestep, encoder_hidden_states, fps=INFERENCE_DEFAULTS["fps"], **kwargs):
        """`sample` (B, C, F, h, w), `encoder_hidden_states` (B, 77, D): the UNet repeats it per frame;
        `fps` an int or one per video."""
        fps = torch.as_tensor(fps, device=sample.device).reshape(-1).expand(sample.shape[0])
        fps_emb = self.fps_embedding(self.fps_proj(fps).to(self.dtype))
        # The parent's forward is used as it is: the fps embedding joins at the time embedding's output.
        hook = self.time_embedding.register_forward_hook(lambda module, inputs, out: out + fps_emb)
        try:
            return super().forward(sample, timestep, encoder_hidden_states, **kwargs)
        finally:
            hook.remove()


# -----------------------------------------------------------------------------
# The official checkpoint's names: model.diffusion_model.* (lvdm UNetModel), first_stage_model.*
# (SD's VAE), cond_stage_model.model.* (OpenCLIP's text tower), and the schedule's buffers.

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "scale_arr")
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_key_map(unet):
    """{our UNet key: official key (without prefix)} for every parameter of `unet`. lvdm numbers
    its blocks flat: input_blocks[0] is conv_in, then per level `layers_per_block` blocks of
    [ResBlock (with its temporal conv), spatial transformer, temporal transformer] and a downsample;
    output_blocks mirror that with one more ResBlock per level and the upsample last."""
    per_level = unet.config.layers_per_block + 1
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "fps_embedding.linear_1": "fps_embedding.0",
           "fps_embedding.linear_2": "fps_embedding.2", "transformer_in": "init_attn.0", "conv_norm_out": "out.0",
           "conv_out": "out.2"}

    def inner(kind, j, rest, block_index):
        if kind == "resnets":
            name, tail = rest.split(".", 1)
            return f"{block_index(j)}.0.{RESNET[name]}.{tail}"
        return {"temp_convs": f"{block_index(j)}.0.temopral_conv.{rest}", "attentions": f"{block_index(j)}.1.{rest}",
                "temp_attentions": f"{block_index(j)}.2.{rest}"}[kind]

    out = {}
    for key in unet.state_dict():
        head, _, rest = key.partition(".")
        module = next((m for m in top if key.startswith(m + ".")), None)
        if module:
            out[key] = top[module] + key[len(module):]
        elif head == "down_blocks":
            i, kind, j, rest = re.match(r"down_blocks\.(\d+)\.(\w+)\.(\d+)\.(.+)", key).groups()
            i, j = int(i), int(j)
            if kind == "downsamplers":
                out[key] = f"input_blocks.{per_level * (i + 1)}.0.op.{rest.removeprefix('conv.')}"
            else:
                out[key] = "input_blocks." + inner(kind, j, rest, lambda j: 1 + per_level * i + j)
        elif head == "mid_block":
            kind, j, rest = re.match(r"mid_block\.(\w+)\.(\d+)\.(.+)", key).groups()
            index = {("resnets", 0): 0, ("temp_convs", 0): 0, ("attentions", 0): 1, ("temp_attentions", 0): 2,
                     ("resnets", 1): 3, ("temp_convs", 1): 3}[kind, int(j)]
            if kind == "resnets":
                name, tail = rest.split(".", 1)
                rest = f"{RESNET[name]}.{tail}"
            out[key] = f"middle_block.{index}." + ("temopral_conv." if kind == "temp_convs" else "") + rest
        elif head == "up_blocks":
            i, kind, j, rest = re.match(r"up_blocks\.(\d+)\.(\w+)\.(\d+)\.(.+)", key).groups()
            i, j = int(i), int(j)
            if kind == "upsamplers":
                attention = unet.config.up_block_types[i].startswith("CrossAttn")
                out[key] = f"output_blocks.{per_level * i + per_level - 1}.{3 if attention else 1}.{rest}"
            else:
                out[key] = "output_blocks." + inner(kind, j, rest, lambda j: per_level * i + j)
        else:
            raise KeyError(f"no official name for UNet key {key}")
    return out


def vae_key_map(vae):
    """{our VAE key: official key}: SD's VAE layout (diffusers' AutoencoderKL against ldm's)."""
    levels = len(vae.config.block_out_channels)
    rules = [(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
             (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
             (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
             (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
             (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
             (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
             (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
             (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}."),
             (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
             (r"\.conv_shortcut\.", ".nin_shortcut.")]
    out = {}
    for key in vae.state_dict():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        out[key] = new
    return out


def text_key_map(text_encoder):
    """{our CLIPTextModel key: official key}. The fused q/k/v projection of OpenCLIP is one official
    tensor for three of ours: those map to (official key, row slice)."""
    width = text_encoder.config.hidden_size
    keys = list(text_encoder.state_dict())
    p = "text_model." if keys[0].startswith("text_model.") else ""  # transformers 4 nests the model, 5 does not
    out = {f"{p}embeddings.token_embedding.weight": "token_embedding.weight",
           f"{p}embeddings.position_embedding.weight": "positional_embedding",
           f"{p}final_layer_norm.weight": "ln_final.weight", f"{p}final_layer_norm.bias": "ln_final.bias"}
    for key in keys:
        m = re.match(p.replace(".", "\\.") + r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            continue
        i, name, kind = m.groups()
        block = f"transformer.resblocks.{i}."
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            row = "qkv".index(name[10]) * width
            out[key] = (f"{block}attn.in_proj_{kind}", slice(row, row + width))
        else:
            out[key] = block + {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[name] + "." + kind
    return out


def unused_text_keys(num_layers):
    """Official text-tower keys VC2 stores but never runs: the last block (it reads the penultimate
    layer), and the projection and temperature of CLIP's contrastive head."""
    return lambda key: key in ("text_projection", "logit_scale") or key.startswith(f"transformer.resblocks.{num_layers}.")


def build_models(unet_config=UNET_CONFIG, vae_config=VAE_CONFIG, text_config=TEXT_CONFIG, device=None):
    """VC2's UNet, VAE and text encoder, randomly initialised (on `device`; "meta" allocates nothing)."""
    with torch.device(device or "cpu"):
        return (VideoCrafter2UNet(**unet_config), AutoencoderKL(**vae_config),
                CLIPTextModel(CLIPTextConfig(**text_config)))


def _with_prefix(prefix, mapping):
    return {k: (prefix + v if isinstance(v, str) else (prefix + v[0], v[1])) for k, v in mapping.items()}


def official_state_dict(unet, vae, text_encoder):
    """Our models' weights under the official names (the inverse of `convert_state_dict`): how a
    checkpoint in VC2's layout is written for tests."""
    state = {}
    for model, mapping in ((unet, _with_prefix(UNET_PREFIX, unet_key_map(unet))), (vae, _with_prefix(VAE_PREFIX, vae_key_map(vae))),
                           (text_encoder, _with_prefix(TEXT_PREFIX, text_key_map(text_encoder)))):
        for key, value in model.state_dict().items():
            if key not in mapping:  # buffers transformers does not save (position ids)
                continue
            target = mapping[key]
            if isinstance(target, tuple):  # q, k, v rows of the fused projection, in row order
                state.setdefault(target[0], {})[target[1].start] = value
                continue
            if value.dim() == 2 and ("init_attn" in target and "proj_" in target.split(".")[-2]
                                     or ".mid.attn_1." in target and target.split(".")[-2] in "qkv proj_out".split()):
                value = value[..., None] if "init_attn" in target else value[..., None, None]
            state[target] = value
    return {k: torch.cat([v[r] for r in sorted(v)]) if isinstance(v, dict) else v for k, v in state.items()}


def convert_state_dict(state, unet, vae, text_encoder, where="checkpoint"):
    """The official state dict split into our three models' state dicts. Every official key is
    used or known to be unused, and every one of our weights is found with its shape; anything
    else raises, naming the first offending key."""
    used, converted = set(), []
    unused = unused_text_keys(text_encoder.config.num_hidden_layers)
    for model, prefix, mapping in ((unet, UNET_PREFIX, unet_key_map(unet)), (vae, VAE_PREFIX, vae_key_map(vae)),
                                   (text_encoder, TEXT_PREFIX, text_key_map(text_encoder))):
        ours = {}
        expected = model.state_dict()
        for key, target in mapping.items():
            name, rows = (target, None) if isinstance(target, str) else target
            if prefix + name not in state:
                raise common.ConfigError(f"{where}: missing {prefix + name}; expected VideoCrafter2's model.ckpt "
                                         f"(its state_dict, or DeepSpeed's 'module')")
            value = state[prefix + name]
            value = value[rows] if rows is not None else value
            while value.dim() > expected[key].dim() and value.shape[-1] == 1:  # 1x1 convolutions -> Linear
                value = value.squeeze(-1)
            if value.shape != expected[key].shape:
                raise common.ConfigError(f"{where}: {prefix + name} has shape {list(value.shape)}; expected "
                                         f"{list(expected[key].shape)} for this model size")
            ours[key] = value
            used.add(prefix + name)
        converted.append(ours)
    left = [k for k in state if k not in used and k not in SCHEDULE_BUFFERS
            and not (k.startswith(TEXT_PREFIX) and unused(k[len(TEXT_PREFIX):]))]
    if left:
        raise common.ConfigError(f"{where}: {len(left)} unexpected tensors, e.g. {left[0]}; expected exactly "
                                 f"VideoCrafter2's text-to-video model")
    return converted


def load_official(path):
    """The state dict of an official VC2 checkpoint, read without running pickled code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise common.ConfigError(
            f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0][:160]}); this converter "
            f"never unpickles arbitrary objects: load it once yourself, if you trust it, and save "
            f"torch.save({{'state_dict': ckpt['state_dict']}}, 'model_state.ckpt')") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        return ckpt["state_dict"]
    if isinstance(ckpt, dict) and isinstance(ckpt.get("module"), dict):  # DeepSpeed: keys carry a 16-character prefix
        return {k[16:]: v for k, v in ckpt["module"].items()}
    raise common.ConfigError(f"{path}: expected a dict with 'state_dict' (or DeepSpeed's 'module'); "
                             f"got {type(ckpt).__name__} with keys {list(ckpt)[:5] if isinstance(ckpt, dict) else '-'}")


def load_tokenizer(name, cache_dir=None):
    """A CLIP BPE tokenizer from a hub id or folder, in its tokenizer/ subfolder or at its root."""
    for subfolder in ("tokenizer", ""):
        try:
            return CLIPTokenizer.from_pretrained(name, subfolder=subfolder, cache_dir=cache_dir)
        except (OSError, ValueError):
            continue
    raise common.ConfigError(f"--tokenizer {name}: no CLIP tokenizer in it (tried tokenizer/ and its root); expected "
                             f"a hub id or folder with OpenCLIP's BPE vocabulary, e.g. {TOKENIZER}")


def scheduler_of():
    """VC2's DDIM settings as a diffusers scheduler config: SD's betas (lvdm's 'linear' is diffusers'
    scaled_linear), timesteps 1, 21, ..., 981 for 50 steps, the last step's previous alpha is
    alphas_cumprod[0], no clipping. `use_scale` is not a scheduler option: see `add_noise`, `ddim_step`."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def convert(checkpoint, output_dir, tokenizer, configs=(UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG), cache_dir=None,
            revision=None):
    """Convert `checkpoint` (a local model.ckpt, or a hub repo id holding one) into `output_dir`:
    unet/ (VideoCrafter2UNet), vae/, text_encoder/, tokenizer/, scheduler/ in safetensors, then
    videocrafter2.json. A folder that already has videocrafter2.json is returned as it is."""
    done = os.path.join(output_dir, "videocrafter2.json")
    if os.path.exists(done):
        return output_dir
    path = checkpoint
    if not os.path.isfile(path):
        path = hf_hub_download(checkpoint, "model.ckpt", cache_dir=cache_dir, revision=revision)
    state = load_official(path)
    nets = build_models(*configs, device="meta")
    converted = convert_state_dict(state, *nets, where=path)
    tmp = output_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, model, weights in zip(("unet", "vae", "text_encoder"), nets, converted):
        model.load_state_dict({k: v.float().contiguous() for k, v in weights.items()}, strict=False, assign=True)
        model.save_pretrained(os.path.join(tmp, name))
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, cache_dir)
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))  # its own pad token: encode_prompts pads with 0
    scheduler_of().save_pretrained(os.path.join(tmp, "scheduler"))
    common.atomic_write_json(os.path.join(tmp, "videocrafter2.json"), {
        "source": checkpoint, "revision": revision, "unet_parameters": models.count_parameters(nets[0]),
        "scale_b": SCALE_B, "mid_step": MID_STEP, "inference_defaults": INFERENCE_DEFAULTS})
    if os.path.exists(output_dir):  # an unfinished earlier conversion
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    return output_dir


# -----------------------------------------------------------------------------
# VC2's schedule: the clean latent is scaled by scale(t) when noised, and the sampler undoes it.


def latent_scale(t, scale_b=SCALE_B, mid_step=MID_STEP):
    """scale(t): 1 at t = 0, linear down to scale_b at t = mid_step - 1, then scale_b (lvdm's scale_arr)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.where(t < mid_step, 1 - (1 - scale_b) * t / (mid_step - 1), torch.full_like(t, scale_b))


def add_noise(scheduler, latents, noise, timesteps):
    """x_t = sqrt(abar_t) * scale(t) * x_0 + sqrt(1 - abar_t) * eps, per video."""
    abar = scheduler.alphas_cumprod.to(latents.device)[timesteps].float()
    shape = (-1,) + (1,) * (latents.dim() - 1)
    signal = (abar.sqrt() * latent_scale(timesteps.cpu()).to(latents.device)).view(shape)
    return (signal * latents.float() + (1 - abar).sqrt().view(shape) * noise.float()).to(latents.dtype)


def ddim_step(x, eps, abar_t, abar_prev, scale_t, scale_prev, eta=0.0, noise=None):
    """One DDIM step of VC2's sampler from x_t to x_prev, given the predicted noise."""
    pred_x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5 / scale_t
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    x_prev = abar_prev ** 0.5 * scale_prev * pred_x0 + (1 - abar_prev - sigma ** 2) ** 0.5 * eps
    return x_prev + sigma * noise if eta > 0 else x_prev


def ddim_timesteps(num_inference_steps, num_train_timesteps=1000):
    """VC2's DDIM timesteps, ascending: every (1000 // S)-th step from 0, plus 1 (lvdm's "uniform"
    schedule). Where S does not divide 1000 that is more than S steps, as the official sampler takes:
    31 for S = 30, from 991. Where the last one would be 1000 (S = 3, 9, 27, 36, 37, 101-111, ...:
    1000 // S divides 999) the official sampler indexes past its 1000 alphas and crashes; here that
    step is left out (S = 3 then runs 1, 334, 667)."""
    c = num_train_timesteps // num_inference_steps
    return [t + 1 for t in range(0, num_train_timesteps, c) if t + 1 < num_train_timesteps]


@torch.no_grad()
def sample(unet, scheduler, text, uncond, latents, fps, num_inference_steps, guidance_scale, eta=1.0, generator=None):
    """Latents (B, 4, F, h, w) from noise `latents` by VC2's DDIM with classifier-free guidance;
    `text` and `uncond` are (B, 77, D) embeddings of the prompts and of ""; `generator` one or
    one per video, for eta's noise."""
    steps = ddim_timesteps(num_inference_steps)[::-1]  # 981, 961, ..., 1 for 50 steps
    abar = scheduler.alphas_cumprod
    # The sampler's state, the guidance (which multiplies rounding errors by its scale) and the
    # DDIM update stay in float32, as in VC2; only the UNet runs in its own dtype.
    x = latents.float()
    context = torch.cat([uncond, text]).to(unet.dtype)
    for i, t in enumerate(steps):
        prev = steps[i + 1] if i + 1 < len(steps) else 0  # the last step lands at alphas_cumprod[0], scale 1
        both = unet(torch.cat([x, x]).to(unet.dtype), t, context,
                    fps=torch.cat([fps, fps]) if torch.is_tensor(fps) else fps).sample.float()
        e_uncond, e_text = both.chunk(2)
        eps = e_uncond + guidance_scale * (e_text - e_uncond)
        noise = None
        if eta > 0:  # one generator per video, so a video does not depend on its batch
            gens = generator if isinstance(generator, list) else [generator] * len(x)
            noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens]).to(x)
        x = ddim_step(x, eps, float(abar[t]), float(abar[prev]), float(latent_scale(t)), float(latent_scale(prev)),
                      eta, noise)
    return x


class VideoCrafter2Scheduler(DDPMScheduler):
    """The training noise schedule: SD's betas and VC2's latent scaling in `add_noise`, so a
    training loop written for diffusers' schedulers noises latents as VC2 was trained."""

    def add_noise(self, original_samples, noise, timesteps):
        return add_noise(self, original_samples, noise, timesteps)


def training_scheduler():
    return VideoCrafter2Scheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, prediction_type="epsilon")


class VideoCrafter2Pipeline(DiffusionPipeline):
    """Text to video with VC2: prompts -> OpenCLIP text embeddings -> VC2's DDIM with guidance ->
    latents (output_type="latent") -> `decode_latents` -> video in [-1, 1], as AnimateDiffPipeline."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    def _encode(self, prompts):
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, self._execution_device).to(self.unet.dtype)

    @torch.no_grad()
    def __call__(self, prompt, num_frames=INFERENCE_DEFAULTS["num_frames"], height=INFERENCE_DEFAULTS["height"],
                 width=INFERENCE_DEFAULTS["width"], num_inference_steps=INFERENCE_DEFAULTS["num_inference_steps"],
                 guidance_scale=INFERENCE_DEFAULTS["guidance_scale"], generator=None, output_type="latent",
                 fps=INFERENCE_DEFAULTS["fps"], eta=INFERENCE_DEFAULTS["eta"]):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (1, self.unet.config.in_channels, num_frames, height // factor, width // factor)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self._execution_device)
        latents = sample(self.unet, self.scheduler, self._encode(prompts), self._encode([""] * len(prompts)), latents,
                         fps, num_inference_steps, guidance_scale, eta, generators)
        frames = latents if output_type == "latent" else self.decode_latents(latents)
        return BaseOutput(frames=frames)

    def decode_latents(self, latents):
        """(B, 4, F, h, w) latents -> (B, 3, F, H, W) video in [-1, 1], decoded a frame at a time as VC2 does."""
        b, _, f = latents.shape[:3]
        flat = latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / self.vae.config.scaling_factor
        video = torch.cat([self.vae.decode(z[None].to(self.vae.dtype)).sample for z in flat])
        return video.reshape(b, f, *video.shape[1:]).permute(0, 2, 1, 3, 4).float()


# -----------------------------------------------------------------------------
# Pruning: VC2's candidate blocks, each residual, so an identity in its place is "the block is gone".


def prunable_blocks(unet):
    """Every candidate block's path, in forward order: the first temporal transformer; per level
    each ResBlock whose input and output shapes agree, its temporal convolution, its spatial and
    temporal transformers. Removed blocks keep their names (see models.RemovedBlock)."""
    def level(prefix, block):
        names = []
        for j in range(len(block.resnets)):
            resnet = block.resnets[j]
            if not isinstance(resnet, ResnetBlock2D) or (resnet.in_channels == resnet.out_channels and resnet.conv_shortcut is None):
                names.append(f"{prefix}.resnets.{j}")
            for kind in ("temp_convs", "attentions", "temp_attentions"):
                if j < len(getattr(block, kind, None) or []):
                    names.append(f"{prefix}.{kind}.{j}")
        return names

    names = ["transformer_in"]
    for i, block in enumerate(unet.down_blocks):
        names += level(f"down_blocks.{i}", block)
    names += level("mid_block", unet.mid_block)
    for i, block in enumerate(unet.up_blocks):
        names += level(f"up_blocks.{i}", block)
    return names


def build_tiny_checkpoint(base_dir, seed=0):
    """A tiny VC2 with random weights, written as an official model.ckpt (beside `base_dir`) and
    converted into `base_dir` by the same path as the real checkpoint. Does nothing if present."""
    if os.path.exists(os.path.join(base_dir, "videocrafter2.json")):
        return base_dir
    torch.manual_seed(seed)
    nets = build_models(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG)
    for model in nets:  # the UNet's zero-initialised output layers would make every video the same
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    state = official_state_dict(*nets)
    state.update({k: torch.zeros(1400 if k == "scale_arr" else 1000) for k in SCHEDULE_BUFFERS})
    ckpt = base_dir.rstrip("/") + ".ckpt"
    with common.atomic_path(ckpt) as tmp:
        torch.save({"state_dict": state}, tmp)
    return convert(ckpt, base_dir, animatediff.tiny_clip_tokenizer(), configs=(TINY_UNET_CONFIG, TINY_VAE_CONFIG,
                                                                             TINY_TEXT_CONFIG))


# -----------------------------------------------------------------------------
# The backend interface (backends/README.md).

OPTIONS = {
    "pretrained_model_name_or_path": ("weights/videocrafter2", "the converted model: a folder written by convert "
                                                               "(converted from checkpoint on first use)"),
    "checkpoint": ("VideoCrafter/VideoCrafter2", "the official model.ckpt (hub repo id or path), converted once into "
                                                 "pretrained_model_name_or_path", {"input": True}),
}
STUDENT_KEYS = ("pretrained_model_name_or_path",)
TABLE = {"blocks": "Block params", "blocks_are": "the prunable blocks", "denoiser": "UNet"}
# VideoCrafter2's temporal layers (its UNet3D's names): what `trainable: motion_modules` trains here.
TEMPORAL = ("transformer_in.", ".temp_convs.", ".temp_attentions.")
TRAINABLE = {"motion_modules": lambda name: any(t in name or name.startswith(t) for t in TEMPORAL),
             "unet": lambda name: True}
FSDP_WRAP = ("ResnetBlock2D", "TemporalConvLayer", "Transformer2DModel", "TransformerTemporalModel")
with_denoiser = animatediff.with_denoiser
generate = models.generate


def load_text_encoder(args, dtype=None):
    """The text tower and its BPE tokenizer, rebuilt from the vocabulary and merges alone: a
    tokenizer saved with token 0 ("!") as its pad token (as conversions before this one did) would
    otherwise take every "!" in a prompt for that special token."""
    text_encoder = CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder",
                                                 dtype=dtype).eval().requires_grad_(False)
    return text_encoder, bpe_tokenizer(CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path,
                                                                     subfolder="tokenizer"))


def bpe_tokenizer(tokenizer):
    """`tokenizer`'s vocabulary and merges in a CLIPTokenizer of their own, with no added tokens."""
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    return CLIPTokenizer(vocab=bpe["vocab"], merges=merges)


def clean(text):
    """OpenCLIP's cleaning before BPE: ftfy's fixes, HTML entities undone (twice, as it does), and
    runs of whitespace folded to one space."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text.strip()).strip()


def encode_prompts(text_encoder, tokenizer, prompts, device, context_length=77):
    """OpenCLIP's text conditioning: cleaned prompts, start and end tokens, cut to 77 with the end
    token kept last, padded with token 0 (not with end-of-text, as CLIP's own tokenizer pads); the
    encoder's last hidden state (23 layers: the penultimate of OpenCLIP's 24) over all 77 positions."""
    rows = tokenizer([clean(p) for p in prompts], truncation=True, max_length=context_length).input_ids
    ids = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return text_encoder(ids.to(device))[0]


def required_models(args):
    """The converted folder; before the first conversion, the official checkpoint (located, not
    fetched: it is 11 GB) and the tokenizer the conversion reads."""
    base = args.pretrained_model_name_or_path
    if args.build_tiny:
        return [dict(where="model.pretrained_model_name_or_path", name=base, files=["videocrafter2.json"],
                     what="a converted VideoCrafter2 folder", tiny=True)]
    if os.path.exists(os.path.join(base, "videocrafter2.json")):
        return []
    if os.path.exists(base):
        raise common.ConfigError(f"model.pretrained_model_name_or_path: {base} exists but holds no videocrafter2.json; "
                                 f"expected a folder written by convert_videocrafter2.py (or a new path)")
    return sources(args.checkpoint, TOKENIZER, args.revision)


def sources(checkpoint, tokenizer, revision=None, where="model.checkpoint"):
    """What a conversion reads: a checkpoint file or hub repo, and a tokenizer unless it is local."""
    needed = [] if os.path.isfile(checkpoint) else [
        dict(where=where, name=checkpoint, files=["model.ckpt"], what="VideoCrafter2's model.ckpt (a file or hub repo id)",
             revision=revision, large=("model.ckpt",))]
    if isinstance(tokenizer, str) and not os.path.exists(tokenizer):
        needed.append(dict(where="tokenizer", name=tokenizer, files=["vocab.json", "merges.txt"],
                           what="a CLIP BPE tokenizer with OpenCLIP's vocabulary"))
    return needed


def build_tiny(args):
    build_tiny_checkpoint(args.pretrained_model_name_or_path)


def load_denoiser(args, dtype=None):
    """VideoCrafter2's UNet, converted from the official checkpoint on first use."""
    base = args.pretrained_model_name_or_path
    if not os.path.exists(os.path.join(base, "videocrafter2.json")):
        convert(args.checkpoint, base, tokenizer=TOKENIZER, **models.hub_kwargs(args))
    return VideoCrafter2UNet.from_pretrained(base, subfolder="unet", torch_dtype=dtype)


def load_pipeline(args, unet, device=None, dtype=None):
    """VC2's own pipeline (VC2's sampler) with AnimateDiffPipeline's call and `decode_latents`."""
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", torch_dtype=dtype)
    pipe = VideoCrafter2Pipeline(vae, *load_text_encoder(args, dtype=dtype), unet, scheduler_of())
    return animatediff.placed(pipe, device, dtype)


def enable_checkpointing(unet):
    """Every prunable block recomputed in backward: diffusers' UNet3D has no checkpointing of its own."""
    models.checkpoint_blocks(sys.modules[__name__], unet)


def objective(args):
    """DDPM with SD's betas, epsilon prediction and VC2's latent scaling in add_noise."""
    return common.DDPMObjective(training_scheduler())


def predict(unet, noisy, timesteps, text):
    """One training forward: VC2's UNet3D repeats the text per frame itself."""
    return unet(noisy, timesteps, text).sample


def denoise_inputs(unet, batch_size, num_frames, height, width, device=None, dtype=None):
    h, w = height // 8, width // 8
    sample = torch.randn(batch_size, unet.config.in_channels, num_frames, h, w, device=device, dtype=dtype)
    text = torch.randn(batch_size, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    return sample, torch.tensor([500], device=device), text


# -----------------------------------------------------------------------------
# Export: the student in vip's converted layout and as the official model.ckpt.


def schedule_buffers():
    """The 13 schedule buffers of VC2's model.ckpt, as lvdm's register_schedule computes them (in
    float64, kept as float32): the official loader is strict, so a checkpoint must carry them."""
    f64 = dict(dtype=torch.float64)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, **f64) ** 2
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, **f64), abar[:-1]])
    variance = betas * (1 - prev) / (1 - abar)
    buffers = {"betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": abar.sqrt(),
               "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(), "log_one_minus_alphas_cumprod": (1 - abar).log(),
               "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(),
               "posterior_variance": variance, "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
               "posterior_mean_coef1": betas * prev.sqrt() / (1 - abar),
               "posterior_mean_coef2": (1 - prev) * alphas.sqrt() / (1 - abar),
               # lvdm's scale_arr: 1 down to scale_b over mid_step steps, then scale_b for all 1000 (its length bug kept)
               "scale_arr": torch.cat([torch.linspace(1, SCALE_B, MID_STEP, **f64), torch.full((1000,), SCALE_B, **f64)])}
    return {k: v.float() for k, v in buffers.items()}


def export(args, unet, out_dir):
    """Write the student in vip's converted layout (unet/ of every block, each removed one's weights
    zero, and the base model's vae/, text_encoder/, tokenizer/, scheduler/) and as VideoCrafter2's
    own model.ckpt (official key names, the schedule buffers), which the official inference loads."""
    module, base = sys.modules[__name__], args.pretrained_model_name_or_path
    exported = models.with_blocks_zeroed(module, unet, dtype=torch.float32)
    exported.save_pretrained(os.path.join(out_dir, "unet"))
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(os.path.join(base, part), os.path.join(out_dir, part))
    shutil.copy(os.path.join(base, "videocrafter2.json"), os.path.join(out_dir, "videocrafter2.json"))
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    state = {**official_state_dict(exported, vae, text_encoder), **schedule_buffers()}
    torch.save({"state_dict": {k: v.contiguous() for k, v in state.items()}}, os.path.join(out_dir, "model.ckpt"))
    return {"denoiser": exported, "pipeline": None, "runs_removed": True,
            "form": "VideoCrafter2's own model.ckpt (its key names, for the official inference) and vip's converted "
                    "folder, with every block and each removed block's weights zero: the student's outputs exactly, "
                    "at the full model's cost; vip's loader (its student.json) runs the student without them"}
