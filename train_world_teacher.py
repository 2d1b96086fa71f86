"""Train a world teacher M0 on rendered clips of the training prompts (never the held-out ones),
over world.py's lossless pixel VAE and a frozen random text encoder over the grammar's words:

- `--model unet`: an AnimateDiff-layout UNetMotionModel, diffusion with zero terminal SNR, the clip
  predicted (configs/world.yaml); writes <output_dir>/sd (SD1.5's folder) and <output_dir>/motion_adapter.
- `--model dit`: a WanTransformer3DModel with a UMT5 encoder, flow matching, the velocity predicted
  (configs/world_wan.yaml); writes <output_dir>/{transformer,text_encoder,tokenizer,scheduler}.

    python train_world_teacher.py --output_dir weights/world --max_train_steps 6000

The committed DiT teacher (weights/world_wan): 8,000 steps weighted toward high noise, where the
path is decided, then two fine-tunes of 3,000 steps at the unshifted sigmas, where edges and sizes
are (about 1 h 35 min, then 26 min each, on one CPU thread), then 2,000 steps with a loss on what
temporal consistency scores (12 min):

    DIT="--model dit --vae_scale_factor 2 --temporal_patch_size 8 --dim 256 --attention_head_dim 64 --num_layers 4 --save_dtype float16"
    python train_world_teacher.py $DIT --flow_shift 3 --max_train_steps 8000 --output_dir runs/dit_shift3
    python train_world_teacher.py $DIT --pretrained_model_name_or_path runs/dit_shift3 --output_dir runs/dit_ft1 \
        --learning_rate 1e-4 --lr_warmup_steps 50 --max_train_steps 3000
    python train_world_teacher.py $DIT --pretrained_model_name_or_path runs/dit_ft1 --output_dir runs/dit_ft2 \
        --learning_rate 1e-4 --lr_warmup_steps 50 --max_train_steps 3000
    python train_world_teacher.py $DIT --pretrained_model_name_or_path runs/dit_ft2 --output_dir weights/world_wan \
        --learning_rate 1e-4 --lr_warmup_steps 50 --max_train_steps 2000 --moment_weight 10

The saved teacher is the EMA of the trained weights, saved every --checkpointing_steps beside
train_state.pt, which a rerun of the same command resumes from. What made each work: docs/world.md.
"""

import argparse
import copy
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (DDPMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel, UniPCMultistepScheduler,
                       WanTransformer3DModel)
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, UMT5Config, UMT5EncoderModel

import common
from backends import wan
from world import (DRIFT_TOLERANCE, FACTOR, FRAMES, SCALE, SIZE, PixelVAE, frames_to_latents, render, split_prompts,
                   word_tokenizer)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet", choices=["unet", "dit"], help="unet (configs/world.yaml) | dit (world_wan)")
    p.add_argument("--output_dir", default=None, help="default: weights/world (unet), weights/world_wan (dit)")
    p.add_argument("--max_train_steps", type=int, default=6000)
    p.add_argument("--train_batch_size", type=int, default=16, help="clips per step")
    p.add_argument("--learning_rate", type=float, default=None, help="default: 1e-3 (unet), 3e-4 (dit)")
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    p.add_argument("--uncond_prob", type=float, default=0.1, help="empty prompt rate, for classifier-free guidance")
    p.add_argument("--checkpointing_steps", type=int, default=500,
                   help="save the teacher, and train_state.pt to resume from, every this many steps")
    # 96 at the top: each latent pixel is a 4x4-pixel patch of 48 values. At 48 channels (the first
    # teacher), even a clip handed over almost clean (t = 1) came back with edges twice as wide.
    p.add_argument("--block_out_channels", type=int, nargs=2, default=[96, 64],
                   help="UNet widths at 4x4 and 2x2 latents; the first is what carries the 48 values of each 4x4-pixel patch")
    p.add_argument("--prediction_type", default="sample", choices=["sample", "v_prediction"])
    p.add_argument("--ema_decay", type=float, default=0.999,
                   help="the saved teacher is this exponential moving average of the trained weights")
    p.add_argument("--snr_gamma", type=float, default=5.0,
                   help="weight each clip's loss by its SNR clamped to [1, snr_gamma]; 0: uniform")
    # What each DiT layout did (frames and pixels a token against the width): docs/world.md.
    p.add_argument("--dim", type=int, default=128, help="dit: the transformer's width")
    p.add_argument("--attention_head_dim", type=int, default=32, help="dit: width of each attention head")
    p.add_argument("--temporal_patch_size", type=int, default=1, help="dit: frames a token holds (Wan's VAE: 4 a latent)")
    p.add_argument("--num_layers", type=int, default=8, help="dit: transformer blocks")
    p.add_argument("--ffn_dim", type=int, default=None, help="dit: feed-forward width (default: 4 x --dim)")
    p.add_argument("--vae_scale_factor", type=int, default=FACTOR, choices=[2, 4],
                   help="dit: pixels a side of a latent (its 3 x this^2 values; the UNet's is 4)")
    p.add_argument("--save_dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dit: the saved transformer's dtype (it loads as the config's); train_state.pt stays float32")
    p.add_argument("--flow_shift", type=float, default=1.0, help="dit: shift of the training sigmas")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="dit: start from this teacher folder's weights (its layout as the flags give it), with a "
                        "fresh optimizer and schedule; default: random weights")
    p.add_argument("--timestep_sampling", default="logit_normal", choices=["logit_normal", "uniform"],
                   help="dit: how training sigmas are drawn, before the shift")
    p.add_argument("--moment_weight", type=float, default=0.0,
                   help="dit: weight of a loss on the clip estimate's drift over its frames in mass, spread and "
                        "centre, as temporal consistency scores it (world.score_clip); 0: off")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or {"unet": "weights/world", "dit": "weights/world_wan"}[args.model]
    args.learning_rate = args.learning_rate or {"unet": 1e-3, "dit": 3e-4}[args.model]
    if args.pretrained_model_name_or_path and args.model != "dit":
        raise common.ConfigError("--pretrained_model_name_or_path: only --model dit starts from a saved teacher")
    if args.moment_weight and args.model != "dit":
        raise common.ConfigError("--moment_weight: only --model dit (its clip estimate is x_t - sigma * velocity)")
    for key in ("max_train_steps", "train_batch_size", "checkpointing_steps", "lr_warmup_steps"):
        if getattr(args, key) < 1:
            raise common.ConfigError(f"--{key}: expected a number at least 1; got {getattr(args, key)}")
    return args


def build_world_models(base_dir, adapter_dir, seed=0, channels=(96, 64), prediction_type="sample", save=True):
    """An untrained teacher in the AnimateDiff layout, saved (unless `save` is false) as base_dir
    (unet, vae, text_encoder, tokenizer, scheduler, as SD1.5's folder) and adapter_dir (the motion
    modules)."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=8, bos_token_id=2, eos_token_id=3, pad_token_id=0))
    unet2d = UNet2DConditionModel(
        sample_size=SIZE // FACTOR, in_channels=3 * FACTOR ** 2, out_channels=3 * FACTOR ** 2,
        block_out_channels=channels, layers_per_block=1,
        norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=16)
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=1, motion_mid_block_layers_per_block=1,
                            motion_num_attention_heads=4, motion_norm_num_groups=16, motion_max_seq_length=FRAMES)
    vae = PixelVAE(block_out_channels=(2, 2, 2), layers_per_block=1, norm_num_groups=2, latent_channels=3 * FACTOR ** 2,
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   sample_size=SIZE, scaling_factor=SCALE)
    # The clip itself ("sample"): black is 0 at every noise level, so the background costs nothing.
    # Predicting v (the noise, at low noise) asks for a gain of 1 / sigma the UNet learns poorly: it
    # left visible grain on the black. Epsilon cannot work with the zero terminal SNR below: at the
    # first step the clip is (x - sigma * eps) / sqrt(alpha_bar), a division by 0.
    # Zero terminal SNR: with SD's linear schedule, t = 999 still keeps 7% of the clip, and the model
    # learnt to read each clip's direction from that trace; sampling starts from pure noise, where the
    # trace is whatever the noise suggests, so clips moved where their seed pointed, not where the
    # prompt said. At zero SNR the first step can only follow the prompt.
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              steps_offset=1, prediction_type=prediction_type, rescale_betas_zero_snr=True)
    if save:
        for name, module in (("unet", unet2d), ("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer),
                             ("scheduler", scheduler)):
            module.save_pretrained(os.path.join(base_dir, name))
        adapter.save_pretrained(adapter_dir)
    return UNetMotionModel.from_unet2d(unet2d, adapter), text_encoder, tokenizer


def build_world_dit(folder, seed=0, dim=128, num_layers=8, head_dim=32, patch_t=1, ffn_dim=None, factor=FACTOR,
                    save=True):
    """An untrained DiT teacher in Wan's classes, saved (unless `save` is false) in `folder` as
    transformer/, text_encoder/, tokenizer/ and scheduler/: patches of patch_t x 1 x 1 over latents
    of `factor` x `factor` pixels, so each token holds 3 x factor^2 x patch_t values."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=3, is_encoder_decoder=False, dropout_rate=0.0))
    transformer = WanTransformer3DModel(
        patch_size=(patch_t, 1, 1), num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
        in_channels=3 * factor ** 2, out_channels=3 * factor ** 2, text_dim=64, freq_dim=64, ffn_dim=ffn_dim or 4 * dim,
        num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
    # Sampling as Wan samples: UniPC over flow sigmas (the config's flow_shift replaces this one).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                        num_train_timesteps=1000)
    if save:
        for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("tokenizer", tokenizer),
                             ("scheduler", scheduler)):
            module.save_pretrained(os.path.join(folder, name))
    return transformer, text_encoder, tokenizer


def teacher_folders(args):
    """The folders a checkpoint rewrites, each with how the trained model is saved into it."""
    if args.model == "dit":
        dtype = getattr(torch, args.save_dtype)
        return {os.path.join(args.output_dir, "transformer"): lambda model, text_encoder, path:
                (copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model).save_pretrained(path),
                os.path.join(args.output_dir, "text_encoder"): lambda model, text_encoder, path:
                text_encoder.save_pretrained(path)}
    base = os.path.join(args.output_dir, "sd")

    def unet2d(model, text_encoder, path):  # the trained UNetMotionModel split back into the SD UNet ...
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        unet.load_state_dict({k: v for k, v in model.state_dict().items() if ".motion_modules." not in k}, strict=True)
        unet.save_pretrained(path)
    return {os.path.join(base, "unet"): unet2d,  # ... and the motion adapter
            os.path.join(base, "text_encoder"): lambda model, text_encoder, path: text_encoder.save_pretrained(path),
            os.path.join(args.output_dir, "motion_adapter"): lambda model, text_encoder, path:
            model.save_motion_modules(path)}


def restore_teacher(folders):
    """Put back a folder that a kill between the two renames of `save_teacher` left as <folder>.old."""
    for folder in folders:
        if not os.path.exists(folder) and os.path.exists(folder + ".old"):
            os.replace(folder + ".old", folder)


def save_teacher(folders, model, text_encoder):
    """Each folder is written beside its old self and swapped in: a kill mid-save leaves the old one
    complete, under its own name or as <folder>.old for `restore_teacher`."""
    for folder, save in folders.items():
        tmp, old = folder + ".tmp", folder + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        save(model, text_encoder, tmp)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)


@torch.no_grad()
def save_average(folders, model, text_encoder, params, ema):
    """Save the teacher with the averaged weights `ema` in place of `params`, then put them back."""
    trained = [p.detach().clone() for p in params]
    torch._foreach_copy_(params, ema)
    save_teacher(folders, model, text_encoder)
    torch._foreach_copy_(params, trained)


def main(args):
    """Train the teacher on rendered clips of the training prompts (never the held-out ones)."""
    state_path = os.path.join(args.output_dir, "train_state.pt")
    folders = teacher_folders(args)
    restore_teacher(folders)
    # A resumed run keeps the saved teacher folders: they hold the last checkpoint's weights.
    fresh = not os.path.exists(state_path)
    if args.model == "dit":
        model, text_encoder, tokenizer = build_world_dit(args.output_dir, args.seed, args.dim, args.num_layers,
                                                            args.attention_head_dim, args.temporal_patch_size,
                                                            args.ffn_dim, args.vae_scale_factor, save=fresh)
        tokenizer.model_max_length = 8  # six words and the two marks, as configs/world_wan.yaml encodes them
        objective = common.FlowMatching(shift=args.flow_shift, sampling=args.timestep_sampling)
        if fresh and args.pretrained_model_name_or_path:
            start_from(model, text_encoder, args.pretrained_model_name_or_path)
        factor = args.vae_scale_factor
    else:
        base, adapter = os.path.join(args.output_dir, "sd"), os.path.join(args.output_dir, "motion_adapter")
        model, text_encoder, tokenizer = build_world_models(base, adapter, seed=args.seed,
                                                            channels=tuple(args.block_out_channels),
                                                            prediction_type=args.prediction_type, save=fresh)
        objective = common.DDPMObjective(DDPMScheduler.from_pretrained(base, subfolder="scheduler"))
        factor = FACTOR
    train_prompts, _ = split_prompts()
    # The text encoder stays as built (random, frozen), as AnimateDiff's CLIP is frozen: trained
    # jointly, it collapsed the four direction words onto one embedding before the UNet learnt to
    # use them, and every clip then moved wherever its noise pointed.
    text_encoder.requires_grad_(False)
    names, params = zip(*model.named_parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    schedule = lambda s: min(1.0, (s + 1) / args.lr_warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / args.max_train_steps))  # noqa: E731
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The average of the weights samples cleaner clips than the last weights: each step's update
    # noise is what shows as grain on the black background.
    ema = [p.detach().clone() for p in params]
    first = 0
    if not fresh:  # resume: weights, optimizer and schedule of the last save
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"]), lr_scheduler.load_state_dict(state["lr_scheduler"])
        ema = [state["ema"][n] for n in names] if "ema" in state else ema
        first = state["step"]
        print(f"resumed from {state_path} at step {first}")
    if first >= args.max_train_steps:  # done: the teacher is saved again, as this run asks (--save_dtype)
        save_average(folders, model, text_encoder, params, ema)
        return
    rng = np.random.default_rng([args.seed, first])
    torch.manual_seed(args.seed * 100003 + first)
    model.train()
    bar = tqdm(range(first, args.max_train_steps), desc="world teacher", initial=first, total=args.max_train_steps)
    start, smooth = time.time(), None
    for step in bar:
        prompts = [train_prompts[i] for i in rng.integers(len(train_prompts), size=args.train_batch_size)]
        latents = frames_to_latents([render(p, int(rng.integers(2 ** 31))) for p in prompts], factor) * SCALE
        texts = ["" if rng.random() < args.uncond_prob else p for p in prompts]
        noise = torch.randn_like(latents)
        t = objective.sample_timesteps(len(prompts), None)
        noisy = objective.add_noise(latents, noise, t)
        with torch.no_grad():
            if args.model == "dit":  # as WanPipeline encodes prompts
                text = wan.encode_prompts(text_encoder, tokenizer, texts, "cpu")
            else:
                ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                return_tensors="pt").input_ids
                text = text_encoder(ids)[0].repeat_interleave(FRAMES, dim=0)
        pred = wan.predict(model, noisy, t, text) if args.model == "dit" else model(noisy, t, text).sample
        loss = F.mse_loss(pred, objective.target(latents, noise, t), reduction="none").mean((1, 2, 3, 4))
        if args.model == "unet":
            loss = loss * snr_weight(objective.scheduler, t, args.snr_gamma)
        if args.moment_weight:  # weighted by 1 - sigma: near pure noise the estimate is a blur of every path
            sigma = objective.sigmas(t, latents)
            estimate = (noisy - sigma * pred) / SCALE
            loss = loss + args.moment_weight * moment_loss(estimate, latents / SCALE, factor) * (1 - sigma.flatten())
        loss = loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), lr_scheduler.step(), optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # warm-up: early on, the average forgets its random start faster
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(args.ema_decay, (step + 1) / (step + 10)))
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
        if (step + 1) % args.checkpointing_steps == 0 or step + 1 == args.max_train_steps:
            # The teacher first, the state last: a kill in between resumes from the previous state,
            # which trains up to here again and saves the teacher again.
            save_average(folders, model, text_encoder, params, ema)
            tmp = state_path + ".tmp"
            torch.save({"unet": model.state_dict(), "text_encoder": text_encoder.state_dict(), "step": step + 1,
                        "ema": dict(zip(names, ema)), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": lr_scheduler.state_dict()}, tmp)
            os.replace(tmp, state_path)
            print(f"step {step + 1}: loss {smooth:.4f}, {time.time() - start:.0f} s", flush=True)


def frame_light(latents, factor):
    """Pixel latents (B, 3 factor^2, F, h, w) -> each frame's light (B, F, H, W) in [0, 1], its
    brightest channel, as world.frame_stats reads it."""
    b, _, f = latents.shape[:3]
    light = F.pixel_shuffle(latents.transpose(1, 2).flatten(0, 1), factor).clamp(0, 1).amax(1)
    return light.view(b, f, *light.shape[-2:])


def frame_moments(light):
    """Each frame's mass, centre (x, y) and spread (x, y) of light (B, F, H, W): (B, F, 5)."""
    yy, xx = torch.meshgrid(*(torch.arange(n, dtype=light.dtype) for n in light.shape[-2:]), indexing="ij")
    mass = light.sum((-1, -2)) + 1e-3
    cx, cy = (light * xx).sum((-1, -2)) / mass, (light * yy).sum((-1, -2)) / mass
    sx = (light * (xx - cx[..., None, None]) ** 2).sum((-1, -2)) / mass
    sy = (light * (yy - cy[..., None, None]) ** 2).sum((-1, -2)) / mass
    return torch.stack([mass, cx, cy, sx, sy], -1)


def moment_loss(estimate, latents, factor):
    """Per clip: temporal consistency's drift terms (world.score_clip), squared, of the clip estimate
    measured against the clip near the object (its pixels and a one-pixel rim): how much each
    frame's mass and spread, relative to the clip's, vary over the frames, and the jerk of its
    centre. The pixel loss charges a frame a little larger than the rest as a few edge pixels;
    temporal consistency as a tenth of its score."""
    light = frame_light(latents, factor)
    window = F.max_pool2d((light > 0.05).float(), 3, 1, 1)
    got, want = frame_moments(frame_light(estimate, factor) * window), frame_moments(light * window)
    ratio = got[..., [0, 3, 4]] / want[..., [0, 3, 4]]
    error = got[..., 1:3] - want[..., 1:3]
    jerk = (error[:, 2:] - 2 * error[:, 1:-1] + error[:, :-2]).pow(2).sum(-1).mean(1)
    variance = ratio.var(1, unbiased=False)
    tol = DRIFT_TOLERANCE
    return variance[:, 0] / tol["mass"] ** 2 + variance[:, 1:].mean(1) / tol["spread"] ** 2 + jerk / tol["jerk"] ** 2


def start_from(transformer, text_encoder, folder):
    """Load a saved DiT teacher's weights into the models just built, which must have its layout."""
    saved = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)
    as_json = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (a saved tuple comes back a list)
    differ = sorted(k for k, v in transformer.config.items() if not k.startswith("_") and as_json(saved.config.get(k)) != as_json(v))
    if differ:
        raise common.ConfigError(f"--pretrained_model_name_or_path: {folder}/transformer/config.json differs from the "
                                 f"flags' layout in {', '.join(differ)}; give the flags its layout")
    transformer.load_state_dict(saved.state_dict())
    text_encoder.load_state_dict(UMT5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder")).state_dict())


def snr_weight(scheduler, t, gamma):
    """Per-clip loss weight SNR(t) clamped to [1, gamma]. A sample-predicting model is trained on
    an error that shrinks with the noise, so uniform weights leave the low-noise steps, where edges
    are decided, drowned by the high-noise ones: the teacher blurred clips it was handed almost
    clean. Min-SNR's min(SNR, gamma) would fix that but give the zero-SNR first step, the only one
    that picks the direction, weight 0, hence the floor of 1."""
    if not gamma:
        return torch.ones(len(t))
    alpha_bar = scheduler.alphas_cumprod[t]
    return (alpha_bar / (1 - alpha_bar)).clamp(1.0, gamma)


if __name__ == "__main__":
    common.run_main(main, parse_args)
