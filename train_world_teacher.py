"""Train the world's teacher M0: an AnimateDiff-layout UNetMotionModel over world.py's lossless
pixel VAE and a frozen random text encoder over the grammar's words, on rendered clips of the
training prompts (never the held-out ones). Resumable: rerun the same command after a kill.

    python train_world_teacher.py --output_dir weights/world --max_train_steps 6000

Writes <output_dir>/sd (unet, vae, text_encoder, tokenizer, scheduler, as SD1.5's folder),
<output_dir>/motion_adapter (the EMA of the trained weights, saved every --checkpointing_steps)
and <output_dir>/train_state.pt (to resume from). What made the teacher work is in docs/world.md.
"""

import argparse
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

import common
from world import FACTOR, FRAMES, SCALE, SIZE, PixelVAE, frames_to_latents, render, split_prompts, word_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="weights/world", help="writes <output_dir>/sd and <output_dir>/motion_adapter")
    p.add_argument("--max_train_steps", type=int, default=6000)
    p.add_argument("--train_batch_size", type=int, default=16, help="clips per step")
    p.add_argument("--learning_rate", type=float, default=1e-3)
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
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
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


def _teacher_folders(base_dir, adapter_dir):
    return os.path.join(base_dir, "unet"), os.path.join(base_dir, "text_encoder"), adapter_dir


def restore_teacher(base_dir, adapter_dir):
    """Put back a folder that a kill between the two renames of `save_teacher` left as <folder>.old."""
    for folder in _teacher_folders(base_dir, adapter_dir):
        if not os.path.exists(folder) and os.path.exists(folder + ".old"):
            os.replace(folder + ".old", folder)


def save_teacher(unet, text_encoder, base_dir, adapter_dir):
    """Split the trained UNetMotionModel back into the SD UNet and the motion adapter. Each folder
    is written beside its old self and swapped in: a kill mid-save leaves the old one complete,
    under its own name or as <folder>.old for `restore_teacher`."""
    unet2d = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    state = {k: v for k, v in unet.state_dict().items() if ".motion_modules." not in k}
    unet2d.load_state_dict(state, strict=True)
    saves = (unet2d.save_pretrained, text_encoder.save_pretrained, unet.save_motion_modules)
    for folder, save in zip(_teacher_folders(base_dir, adapter_dir), saves):
        tmp, old = folder + ".tmp", folder + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)


def main(args):
    """Train the teacher on rendered clips of the training prompts (never the held-out ones)."""
    base, adapter = os.path.join(args.output_dir, "sd"), os.path.join(args.output_dir, "motion_adapter")
    state_path = os.path.join(args.output_dir, "train_state.pt")
    restore_teacher(base, adapter)
    # A resumed run keeps the saved teacher folders: they hold the last checkpoint's weights.
    unet, text_encoder, tokenizer = build_world_models(base, adapter, seed=args.seed, channels=tuple(args.block_out_channels),
                                                       prediction_type=args.prediction_type, save=not os.path.exists(state_path))
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    train_prompts, _ = split_prompts()
    # The text encoder stays as built (random, frozen), as AnimateDiff's CLIP is frozen: trained
    # jointly, it collapsed the four direction words onto one embedding before the UNet learnt to
    # use them, and every clip then moved wherever its noise pointed.
    text_encoder.requires_grad_(False)
    names, params = zip(*unet.named_parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    schedule = lambda s: min(1.0, (s + 1) / args.lr_warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / args.max_train_steps))  # noqa: E731
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The average of the weights samples cleaner clips than the last weights: each step's update
    # noise is what shows as grain on the black background.
    ema = [p.detach().clone() for p in params]
    first = 0
    if os.path.exists(state_path):  # resume: weights, optimizer and schedule of the last save
        state = torch.load(state_path, weights_only=True)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"]), lr_scheduler.load_state_dict(state["lr_scheduler"])
        ema = [state["ema"][n] for n in names] if "ema" in state else ema
        first = state["step"]
        print(f"resumed from {state_path} at step {first}")
    rng = np.random.default_rng([args.seed, first])
    torch.manual_seed(args.seed * 100003 + first)
    unet.train()
    bar = tqdm(range(first, args.max_train_steps), desc="world teacher", initial=first, total=args.max_train_steps)
    start, smooth = time.time(), None
    for step in bar:
        prompts = [train_prompts[i] for i in rng.integers(len(train_prompts), size=args.train_batch_size)]
        latents = frames_to_latents([render(p, int(rng.integers(2 ** 31))) for p in prompts]) * SCALE
        texts = ["" if rng.random() < args.uncond_prob else p for p in prompts]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            text = text_encoder(ids)[0].repeat_interleave(FRAMES, dim=0)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(prompts),))
        pred = unet(scheduler.add_noise(latents, noise, t), t, text).sample
        loss = F.mse_loss(pred, common.diffusion_target(scheduler, latents, noise, t), reduction="none").mean((1, 2, 3, 4))
        loss = (loss * snr_weight(scheduler, t, args.snr_gamma)).mean()
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
            with torch.no_grad():
                trained = [p.detach().clone() for p in params]
                torch._foreach_copy_(params, ema)
                save_teacher(unet, text_encoder, base, adapter)
                torch._foreach_copy_(params, trained)
            tmp = state_path + ".tmp"
            torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "step": step + 1,
                        "ema": dict(zip(names, ema)), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": lr_scheduler.state_dict()}, tmp)
            os.replace(tmp, state_path)
            print(f"step {step + 1}: loss {smooth:.4f}, {time.time() - start:.0f} s", flush=True)


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
