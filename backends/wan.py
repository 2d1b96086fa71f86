"""Wan2.1 text-to-video (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) in diffusers' classes: the
WanTransformer3DModel (a video DiT trained by flow matching), the Wan VAE, the UMT5 text encoder
and its tokenizer, and the pipeline's own scheduler for sampling.

The prunable blocks are the transformer's blocks, by path (`blocks.{i}`). Each is residual: its
self-attention, cross-attention and feed-forward each add an update (two of them gated by the time
embedding) to the hidden states, which go on otherwise unchanged. So an identity in a block's place
is exactly the block gone, and the blocks after it see the hidden states as they were before it.

Training is rectified flow (`common.FlowMatching`): x_t = (1 - sigma) x_0 + sigma * noise, the
velocity noise - x_0 is the target, timestep 1000 * sigma. Sigma is drawn logit-normal, then
shifted by the config's flow_shift, the shift the sampler uses: the student is trained at the noise
levels it is sampled at (see configs/wan.yaml for where each choice comes from).
"""

import contextlib
import functools
import inspect
import os
import re
from types import SimpleNamespace

import diffusers
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

import common
import models
from common import ConfigError, replace_folder, tmp_name

OPTIONS = {
    "pretrained_model_name_or_path": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "a Wan2.1 text-to-video folder in diffusers' "
                                                                          "layout: hub id or local folder"),
    "flow_shift": (3.0, "the flow-matching schedule's shift, for sampling and training (Wan: 3.0 at 480p, 5.0 at 720p)",
                   {"gt": 0}),
    "timestep_sampling": ("logit_normal", "training sigmas: logit_normal (sigmoid of a standard normal) | uniform, then "
                                          "shifted", {"choices": ("logit_normal", "uniform")}),
    "scheduler": ("", "the sampler: a diffusers scheduler class, built from the folder's scheduler config at flow_shift "
                      "(default: the folder's own, UniPC for Wan2.1)"),
    "stochastic_sampling": (False, "FlowMatchEulerDiscreteScheduler's stochastic steps: each re-noises the predicted "
                                   "clip, the noise drawn from the clip's own seed"),
    "negative_prompt": ("", "what guidance steers away from (Wan's authors use a long list of defects)"),
    "max_sequence_length": (512, "text tokens the transformer attends to (Wan: 512)", {"min": 1}),
}
STUDENT_KEYS = ()
TABLE = {"blocks": "Block params", "blocks_are": "the transformer blocks", "denoiser": "transformer"}
TRAINABLE = {"transformer": lambda name: True, "blocks": lambda name: name.startswith("blocks.")}
FSDP_WRAP = ("WanTransformerBlock",)
FOLDERS = ["transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json",
           "scheduler/scheduler_config.json"]


def check_scheduler(args):
    """The configured scheduler class, checked before any model loads."""
    if not args.scheduler:
        if args.stochastic_sampling:
            raise ConfigError("model.stochastic_sampling: set model.scheduler: FlowMatchEulerDiscreteScheduler too")
        return None
    cls = getattr(diffusers, args.scheduler, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ConfigError(f"model.scheduler: expected a diffusers scheduler class (FlowMatchEulerDiscreteScheduler, "
                          f"UniPCMultistepScheduler, ...); got {args.scheduler!r}")
    if args.stochastic_sampling and "stochastic_sampling" not in inspect.signature(cls.__init__).parameters:
        raise ConfigError(f"model.stochastic_sampling: {args.scheduler} has no stochastic sampling; "
                          f"use FlowMatchEulerDiscreteScheduler")
    return cls


def required_models(args):
    check_scheduler(args)
    if (args.num_frames - 1) % 4:
        raise ConfigError(f"model.num_frames: Wan's VAE takes 4k + 1 frames (81, 49, 17, ...); got {args.num_frames}")
    if args.height % 16 or args.width % 16:
        raise ConfigError(f"model.height, model.width: Wan takes multiples of 16 (8 for the VAE, 2 for the patches); "
                          f"got {args.height}x{args.width}")
    return [dict(where="model.pretrained_model_name_or_path", name=args.pretrained_model_name_or_path, files=FOLDERS,
                 what="a Wan2.1 folder in diffusers' layout (transformer, vae, text_encoder, tokenizer, scheduler)",
                 revision=args.revision, tiny=True)]


def load_denoiser(args, dtype=None):
    return WanTransformer3DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer",
                                                 torch_dtype=dtype, **models.hub_kwargs(args))


def prunable_blocks(transformer):
    return [f"blocks.{i}" for i in range(len(transformer.blocks))]


def load_text_encoder(args, dtype=None):
    base = args.pretrained_model_name_or_path
    text_encoder = UMT5EncoderModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype, **models.hub_kwargs(args))
    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", **models.hub_kwargs(args))
    tokenizer.model_max_length = args.max_sequence_length  # what encode_prompts pads and cuts to
    return text_encoder.eval().requires_grad_(False), tokenizer


def encode_prompts(text_encoder, tokenizer, prompts, device):
    """UMT5's last hidden state over the prompt's tokens, zeros after them, to the tokenizer's
    model_max_length (max_sequence_length): WanPipeline's own encoding (its prompt cleaning
    included), called as a function."""
    length = min(tokenizer.model_max_length, 512)
    holder = SimpleNamespace(text_encoder=text_encoder, tokenizer=tokenizer, _execution_device=torch.device(device))
    return WanPipeline._get_t5_prompt_embeds(holder, list(prompts), max_sequence_length=length, device=device)


def sampling_scheduler(args):
    """The configured scheduler, else the folder's own (UniPC with flow sigmas for Wan2.1), at the
    config's shift, from the folder's scheduler config."""
    config = UniPCMultistepScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                 **models.hub_kwargs(args))
    cls = check_scheduler(args) or getattr(diffusers, config["_class_name"])
    params = inspect.signature(cls.__init__).parameters
    kwargs = {"flow_shift" if "flow_shift" in params else "shift": args.flow_shift}  # UniPC | Euler
    if args.stochastic_sampling:
        kwargs["stochastic_sampling"] = True
    config = {k: v for k, v in config.items() if k in params or k.startswith("_")}  # another class's keys
    return cls.from_config(config, **kwargs)


@contextlib.contextmanager
def seeded_steps(scheduler, generators):
    """Stochastic steps draw each clip's noise from its own generator: WanPipeline passes none to
    `scheduler.step`, which would draw a batch's noise from the global generator, so that a clip
    would depend on the clips beside it."""
    if not getattr(scheduler.config, "stochastic_sampling", False):
        yield
        return
    scheduler.step = functools.partial(type(scheduler).step, scheduler, generator=generators)
    try:
        yield
    finally:
        del scheduler.step


def load_pipeline(args, transformer, device=None, dtype=None):
    """WanPipeline around `transformer`; the VAE stays in float32, as Wan decodes."""
    text_encoder, tokenizer = load_text_encoder(args, dtype=dtype)
    vae = AutoencoderKLWan.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", torch_dtype=torch.float32,
                                           **models.hub_kwargs(args))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=sampling_scheduler(args))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def with_denoiser(pipe, transformer):
    other = type(pipe)(**{**pipe.components, "transformer": transformer})
    other.set_progress_bar_config(disable=True)
    return other


@torch.no_grad()
def generate(pipe, prompts, seeds, args, return_latents=False, initial_noise=None):
    """uint8 videos (B, F, H, W, 3), one seed each; with `return_latents`, the normalised latents
    (B, 16, (F - 1) / 4 + 1, H / 8, W / 8) the transformer works in, which the VAE decodes.
    `initial_noise(generators)`: the initial noise from the clips' generators, where the pipeline
    should not draw it itself; stochastic steps then go on drawing from the same generators."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = initial_noise(generators) if initial_noise is not None else None
    with seeded_steps(pipe.scheduler, generators):
        latents = pipe(prompt=list(prompts), negative_prompt=[args.negative_prompt] * len(prompts),
                       num_frames=args.num_frames, height=args.height, width=args.width,
                       num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       generator=generators, latents=latents, output_type="latent",
                       max_sequence_length=args.max_sequence_length).frames
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(vae.device)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(vae.device)
    video = vae.decode(latents.to(vae.device, vae.dtype) * std + mean, return_dict=False)[0]  # (B, 3, F, H, W)
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
    return (frames, latents.float().cpu()) if return_latents else frames


def enable_checkpointing(transformer):
    transformer.enable_gradient_checkpointing()  # diffusers' own covers every block


def objective(args):
    return common.FlowMatching(shift=args.flow_shift, sampling=args.timestep_sampling)


def predict(transformer, noisy, timesteps, text):
    return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text, return_dict=False)[0]


def denoise_inputs(transformer, batch_size, num_frames, height, width, device=None, dtype=None, text_length=512):
    frames, factor = (num_frames - 1) // 4 + 1, vae_factor(transformer)
    sample = torch.randn(batch_size, transformer.config.in_channels, frames, height // factor, width // factor,
                         device=device, dtype=dtype)
    text = torch.randn(batch_size, text_length, transformer.config.text_dim, device=device, dtype=dtype)
    return sample, torch.full((batch_size,), 500.0, device=device), text


def renumbered(transformer, dtype=None):
    """The student as a WanTransformer3DModel of num_layers = the blocks it kept, renumbered in order
    (blocks.0, 1, ... of the kept ones): the same function, and only the kept blocks run."""
    kept = [i for i, block in enumerate(transformer.blocks) if not isinstance(block, models.RemovedBlock)]
    config = {k: v for k, v in transformer.config.items() if k != "_use_default_values"}
    exported = WanTransformer3DModel.from_config({**config, "num_layers": len(kept)})
    new = {old: i for i, old in enumerate(kept)}
    state = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{new[int(m[1])]}.", k): v
             for k, v in transformer.state_dict().items()}
    exported.load_state_dict(state, strict=True)  # every key of each, both ways
    with models.quiet("diffusers.models.modeling_utils"):  # diffusers warns on every cast
        return exported.to(dtype or next(transformer.parameters()).dtype).eval()


def export(args, transformer, out_dir, load_pipeline=load_pipeline):
    """Write the student as a WanPipeline folder (the base model's VAE, text encoder, tokenizer and
    the sampler vip uses, the renumbered transformer); returns what the card says."""
    dtype = common.weight_dtype(args.mixed_precision)  # the dtype vip generates in
    exported = renumbered(transformer, dtype)
    load_pipeline(args, exported, dtype=dtype).save_pretrained(out_dir)
    return {"denoiser": exported, "pipeline": "WanPipeline",
            "form": "a WanTransformer3DModel of the kept blocks, renumbered: the student's outputs and its speed"}


# Wan-AI/Wan2.1-T2V-1.3B-Diffusers' transformer/config.json (as diffusers' conversion script writes it),
# and the larger ones' from Wan's own configs (dim = heads x 128, ffn_dim, layers; Wan2.2's 48 latent
# channels): Wan2.1's wan/configs/wan_t2v_14B.py, Wan2.2's wan/configs/wan_ti2v_5B.py.
CONFIG_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                   text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
CONFIG_14B = dict(CONFIG_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
CONFIG_5B = dict(CONFIG_1_3B, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48)


def vae_factor(transformer):
    """Pixels a latent spans on a side: Wan2.1's VAE (16 latent channels) 8, Wan2.2's (48 channels) 16."""
    return 16 if transformer.config.in_channels == 48 else 8


# -----------------------------------------------------------------------------
# A tiny Wan: the real classes and folder layout at toy size, random, built offline and loaded back
# through the same from_pretrained calls.

TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=6, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])
TINY_TEXT = dict(vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                 is_encoder_decoder=False, dropout_rate=0.0)


def tiny_tokenizer():
    """A byte-level tokenizer with no merges (every character a token) and T5's pad and end tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def build_tiny(args, seed=0):
    """Write a tiny Wan2.1 folder (WanPipeline.save_pretrained's layout) at the config's path, unless it exists."""
    base = args.pretrained_model_name_or_path
    if os.path.exists(os.path.join(base, "model_index.json")):
        return
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER)
    for p in transformer.parameters():  # zero-initialised output layers would make every video the same
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=UMT5EncoderModel(UMT5Config(**TINY_TEXT)),
                       vae=AutoencoderKLWan(**TINY_VAE), transformer=transformer, scheduler=scheduler)
    tmp = tmp_name(base)
    pipe.save_pretrained(tmp)
    replace_folder(tmp, base)
