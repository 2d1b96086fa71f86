"""An exact-reward world: coloured shapes moving on black, small enough to train a teacher on a CPU.

Prompts come from a grammar ("a red square moves left slowly"); a deterministic renderer makes the
clip; `WorldReward` scores any clip on VideoScore's aspects (1-4) by locating the object in each
frame. The teacher M0 is an AnimateDiff-layout model (UNetMotionModel, CLIP text encoder) over a
lossless pixel "VAE", so prune/curate/train/evaluate run on it unchanged (`configs/world.yaml`).

Train the teacher once (weights are committed in weights/world/, so the default needs no training):

    python world.py teacher --output_dir weights/world --max_train_steps 6000
"""

import argparse
import itertools
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

SIZE, FRAMES, OBJECT = 16, 8, 6  # pixels per side, frames per clip, object width in pixels
FACTOR = 4  # space-to-depth: 16x16x3 pixels are 4x4x48 latents
SCALE = 5.0  # the VAE's scaling factor: mostly-black clips have std ~0.2, the model wants ~1
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slowly": 0.5, "quickly": 1.0}  # pixels per frame


def prompt_of(colour, shape, direction, speed):
    return f"a {colour} {shape} moves {direction} {speed}"


def parse_prompt(prompt):
    """(colour, shape, direction, speed) of a world prompt; ValueError for anything else."""
    words = prompt.lower().split()
    if len(words) != 6 or words[0] != "a" or words[3] != "moves" or words[1] not in COLOURS \
            or words[2] not in SHAPES or words[4] not in DIRECTIONS or words[5] not in SPEEDS:
        raise ValueError(f"not a world prompt: {prompt!r}; expected 'a <{'|'.join(COLOURS)}> <{'|'.join(SHAPES)}> "
                         f"moves <{'|'.join(DIRECTIONS)}> <{'|'.join(SPEEDS)}>'")
    return words[1], words[2], words[4], words[5]


def all_prompts():
    return [prompt_of(*c) for c in itertools.product(COLOURS, SHAPES, DIRECTIONS, SPEEDS)]


def split_prompts():
    """(train, held_out): the 10 of 72 combinations whose attribute indices sum to a multiple of 6
    are never seen in training; every colour, shape, direction and speed still is, so held-out
    prompts test composition. Train is shuffled."""
    train, held = [], []
    for idx in itertools.product(range(len(COLOURS)), range(len(SHAPES)), range(len(DIRECTIONS)), range(len(SPEEDS))):
        words = (list(COLOURS)[idx[0]], SHAPES[idx[1]], list(DIRECTIONS)[idx[2]], list(SPEEDS)[idx[3]])
        (held if sum(idx) % 6 == 0 else train).append(prompt_of(*words))
    order = np.random.default_rng(0).permutation(len(train))  # any prefix mixes every attribute
    return [train[i] for i in order], held


def _shape_mask(shape, cx, cy, scale=8):
    """Coverage in [0, 1] of each pixel by the shape centred at (cx, cy), by 8x8 supersampling."""
    n = SIZE * scale
    ys, xs = np.mgrid[0:n, 0:n]
    x, y = (xs + 0.5) / scale - cx, (ys + 0.5) / scale - cy
    r = OBJECT / 2
    if shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    elif shape == "circle":
        inside = x ** 2 + y ** 2 <= r ** 2
    else:  # triangle, apex up: |x| shrinks linearly from the base (y = r) to the apex (y = -r)
        inside = (y <= r) & (y >= -r) & (np.abs(x) <= (y + r) / 2)
    return inside.reshape(SIZE, scale, SIZE, scale).mean(axis=(1, 3))


def render(prompt, seed):
    """The clip of a prompt: uint8 (FRAMES, SIZE, SIZE, 3). The seed picks the start position."""
    colour, shape, direction, speed = parse_prompt(prompt)
    (dx, dy), v = DIRECTIONS[direction], SPEEDS[speed]
    travel = v * (FRAMES - 1)
    rng = np.random.default_rng(seed)
    lo, hi = OBJECT / 2, SIZE - OBJECT / 2

    def start(d):  # anywhere the whole path stays inside the frame
        return rng.uniform(lo + travel * (d < 0), hi - travel * (d > 0))

    x0, y0 = start(dx), start(dy)
    frames = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.float32)
    for t in range(FRAMES):
        frames[t] = _shape_mask(shape, x0 + dx * v * t, y0 + dy * v * t)[..., None] * np.array(COLOURS[colour])
    return (frames * 255).round().astype(np.uint8)



# -----------------------------------------------------------------------------
# The exact reward: VideoScore's aspects, 1 (bad) to 4 (perfect), measured on the object itself.

ASPECTS = ("visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment")
# Shape prototypes as rendered: (area / bounding-box area, third moment of the light along y).
SHAPE_FEATURES = {"square": (0.98, 0.0), "circle": (0.76, 0.0), "triangle": (0.64, -1.4)}


def _components(mask):
    """4-connected component labels of a small boolean mask (0: background)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:  # each pass lets every pixel take its smallest neighbouring label
        padded = np.pad(labels, 1, constant_values=h * w + 1)
        nbrs = np.stack([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        nbrs = np.where(nbrs == 0, h * w + 1, nbrs).min(0)
        new = np.where(mask, nbrs, 0)
        if (new == labels).all():
            return labels
        labels = new


def frame_stats(frame):
    """The object of one frame: None when nothing is drawn, else its measurements. Size, place and
    shape come from moments of the light near the object: exact under anti-aliasing, and a
    symmetric blur leaves the centre and the third moment as they are."""
    v = frame.astype(np.float32) / 255
    light = v.max(-1)
    peak = light.max()
    if peak < 0.2:
        return None
    mask = light > 0.5 * peak  # relative: a dimmed frame keeps its shape
    labels = _components(mask)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    obj = labels == ids[counts.argmax()]
    # The object and a one-pixel rim (a 3x3 dilation), where anti-aliased edges live.
    near = np.lib.stride_tricks.sliding_window_view(np.pad(obj, 1), (3, 3)).any((-1, -2))
    w = light * near
    mass = w.sum()
    seen = np.where(light > VISIBLE, light, 0.0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx, cy = (w * xx).sum() / mass, (w * yy).sum() / mass
    ys, xs = np.nonzero(obj)
    edge = near & (light > 0.1 * peak) & (light < 0.9 * peak)
    return {
        "parts": len(ids),
        "centre": np.array([cx, cy]),
        "mass": mass,  # size times brightness
        "spread": np.array([(w * (xx - cx) ** 2).sum(), (w * (yy - cy) ** 2).sum()]) / mass,
        "skew": (w * (yy - cy) ** 3).sum() / mass,  # the upward triangle tails up: < 0
        "fill": obj.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1)),
        "colour": (v * near[..., None]).sum((0, 1)) / (light * near).sum(),  # pure red is (1, 0, 0) at any coverage
        "stray": (seen * ~near).sum() / seen.sum(),  # visible light that is not the object
        "edge": edge.sum() / max(obj.sum(), 1),  # soft pixels per object pixel: blur raises it
    }


# Tolerances sit at just-visible levels, so sub-visible deviations a viewer cannot see (a haze of
# 1-3% of white, a tenth of a pixel of jitter) do not cost a clip its score.
VISIBLE = 10 / 255  # light below this reads as black


def _rate(x):
    return float(1 + 3 * np.clip(x, 0, 1))


def score_clip(frames, prompt):
    """VideoScore's four aspects of one clip (F, H, W, 3) for a world prompt, each in [1, 4]."""
    colour, shape, direction, speed = parse_prompt(prompt)
    stats = [frame_stats(f) for f in frames]
    seen = [s for s in stats if s is not None]
    if len(seen) < 2:
        return dict.fromkeys(ASPECTS, 1.0)
    present = len(seen) / len(stats)

    # Visual quality: one object, nothing else lit, crisp edges, a pure colour; per frame.
    quality = [(1.0 / s["parts"]) * (1 - min(1.0, 4 * s["stray"])) * np.exp(-max(0.0, s["edge"] - 0.9) / 0.5)
               * (s["colour"].max() / s["colour"].sum()) ** 2 for s in seen]
    visual = present * np.mean(quality)

    # Temporal consistency: the same size, brightness, colour and shape in every frame, and a steady path.
    mass = np.array([s["mass"] for s in seen])
    colours = np.stack([s["colour"] for s in seen])
    spread = np.stack([s["spread"] for s in seen])
    centres = np.stack([s["centre"] for s in seen])
    jerk = np.linalg.norm(np.diff(centres, 2, axis=0), axis=1).mean() if len(seen) > 2 else 0.0
    drift = (mass.std() / mass.mean() / 0.1 + np.linalg.norm(colours - colours.mean(0), axis=1).mean() / 0.1
             + (spread.std(0) / spread.mean(0)).mean() / 0.15 + jerk / 0.5)
    temporal = present * np.exp(-drift / 2)

    # Dynamic degree: the fitted speed against the asked one.
    t = np.array([i for i, s in enumerate(stats) if s is not None], dtype=np.float64)
    velocity = np.polyfit(t, centres, 1)[0]  # (vx, vy) in pixels per frame
    asked = SPEEDS[speed]
    dynamic = np.exp(-(((np.linalg.norm(velocity) - asked) / (0.35 * asked)) ** 2))

    # Text alignment: colour, shape and direction as asked (a still object contradicts no direction).
    colour_match = max(0.0, float(colours.mean(0) @ np.array(COLOURS[colour])) / np.linalg.norm(colours.mean(0)))
    fill = np.median([s["fill"] for s in seen])
    skew = np.median([s["skew"] for s in seen])
    likeness = {k: np.exp(-((fill - f) / 0.1) ** 2 - ((skew - k3) / 0.45) ** 2) for k, (f, k3) in SHAPE_FEATURES.items()}
    shape_match = likeness[shape] / sum(likeness.values())
    moved = np.linalg.norm(velocity)
    direction_match = 1.0 if moved < 0.15 else max(0.0, float(velocity @ np.array(DIRECTIONS[direction])) / moved)
    text = (colour_match + shape_match + direction_match) / 3
    return {"visual_quality": _rate(visual), "temporal_consistency": _rate(temporal),
            "dynamic_degree": _rate(dynamic), "text_alignment": _rate(text)}


class WorldReward:
    """The exact reward, with VideoScorer's interface: `score(videos, prompts)` over MP4 paths or
    uint8 arrays (F, H, W, 3); one dict of aspects (1-4) per video. The scripts score the frames
    themselves: at 16x16, H.264's half-resolution colour costs a rendered clip about 1.2 of visual
    quality, so an MP4 scores lower than the frames it was written from."""

    aspects = ASPECTS

    def unreadable(self, prompt):
        try:
            parse_prompt(prompt)
        except ValueError as e:
            return "is not a world prompt; " + str(e).split("; ", 1)[1]  # the world's reward reads only its grammar
        return None

    def score(self, videos, prompts):
        import common

        videos, prompts = list(videos), list(prompts)
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        return [score_clip(common.read_video(v) if isinstance(v, (str, os.PathLike)) else np.asarray(v), p)
                for v, p in zip(videos, prompts)]


# -----------------------------------------------------------------------------
# The teacher's model: AnimateDiff's classes over a lossless pixel "VAE".

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution  # noqa: E402
from diffusers.models.modeling_outputs import AutoencoderKLOutput  # noqa: E402


class PixelVAE(AutoencoderKL):
    """Space-to-depth (FACTOR 4) in place of a trained VAE: latents are the pixels themselves in
    [0, 1], black at 0, so the model need not learn the background. The encoder and decoder
    weights of the parent class are tiny and unused; its config gives the pipeline a scale factor
    of 4 (three levels); its scaling factor (SCALE) brings the latents to about unit variance."""

    def encode(self, x, return_dict=True):
        z = F.pixel_unshuffle((x + 1) / 2, FACTOR)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], 1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z, return_dict=True, generator=None):
        x = F.pixel_shuffle(z, FACTOR) * 2 - 1
        return DecoderOutput(sample=x) if return_dict else (x,)


def frames_to_latents(frames):
    """uint8 clips (B, F, H, W, 3) -> latents (B, 48, F, H/4, W/4) in [0, 1], as PixelVAE encodes."""
    x = torch.as_tensor(np.asarray(frames)).float().div(255)
    b, f = x.shape[:2]
    z = F.pixel_unshuffle(x.permute(0, 1, 4, 2, 3).reshape(b * f, 3, SIZE, SIZE), FACTOR)
    return z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "a", "moves", *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=8, model_input_names=["input_ids", "attention_mask"])


def build_world_models(base_dir, adapter_dir, seed=0, channels=(96, 64), prediction_type="sample", save=True):
    """An untrained teacher in the AnimateDiff layout, saved (unless `save` is false) as base_dir
    (unet, vae, text_encoder, tokenizer, scheduler, as SD1.5's folder) and adapter_dir (the motion
    modules)."""
    from diffusers import DDPMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _word_tokenizer()
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
    import shutil

    from diffusers import UNet2DConditionModel

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("teacher", help="train the teacher M0 on rendered clips")
    t.add_argument("--output_dir", default="weights/world", help="writes <output_dir>/sd and <output_dir>/motion_adapter")
    t.add_argument("--max_train_steps", type=int, default=6000)
    t.add_argument("--train_batch_size", type=int, default=16, help="clips per step")
    t.add_argument("--learning_rate", type=float, default=1e-3)
    t.add_argument("--lr_warmup_steps", type=int, default=200)
    t.add_argument("--uncond_prob", type=float, default=0.1, help="empty prompt rate, for classifier-free guidance")
    t.add_argument("--checkpointing_steps", type=int, default=500,
                   help="save the teacher, and train_state.pt to resume from, every this many steps")
    # 96 at the top: each latent pixel is a 4x4-pixel patch of 48 values. At 48 channels (the first
    # teacher), even a clip handed over almost clean (t = 1) came back with edges twice as wide.
    t.add_argument("--block_out_channels", type=int, nargs=2, default=[96, 64],
                   help="UNet widths at 4x4 and 2x2 latents; the first is what carries the 48 values of each 4x4-pixel patch")
    t.add_argument("--prediction_type", default="sample", choices=["sample", "v_prediction"])
    t.add_argument("--ema_decay", type=float, default=0.999,
                   help="the saved teacher is this exponential moving average of the trained weights")
    t.add_argument("--snr_gamma", type=float, default=5.0,
                   help="weight each clip's loss by its SNR clamped to [1, snr_gamma]; 0: uniform")
    t.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("ablation", help="teacher, pruned, +SFT, +DPO, +ReDPO, offline ReDPO over seeds")
    a.add_argument("--config", default="configs/world.yaml")
    a.add_argument("--output_dir", default="runs/world-ablation")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--stages", type=int, default=2)
    a.add_argument("--num_blocks", type=int, nargs="+", default=None,
                   help="motion modules cut at each stage, one number a stage, or one for all, instead of "
                        "the config's prune.num_blocks / prune.prune_params")
    a.add_argument("--seed_only", action="store_true", help=argparse.SUPPRESS)  # a --jobs process: no table
    a.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once, each in its own process with cores/jobs threads and its log in seed_<s>/log.txt")
    return p.parse_args(argv)


def main(args):
    if args.command == "ablation":
        return ablation(args)
    train_teacher(args)


def train_teacher(args):
    """Train the teacher on rendered clips of the training prompts (never the held-out ones)."""
    import time

    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    import common

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


ROWS = ["teacher (M0)", "pruned", "+SFT", "+DPO only", "+ReDPO", "+ReDPO offline"]


def _run(script, config, out, *flags):
    import subprocess

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)  # from any working directory
    subprocess.run([sys.executable, script, "--config", config, "--output_dir", out, *flags], check=True)
    return out


def ablation_seed(config_path, root, cuts):
    """One seed of the ablation, sharing what variants share: stage 1's pruning and pairs (all of
    them), and the pruning of a student two variants have in common (online and offline ReDPO at
    stage 2). cuts[k - 1] blocks are cut at stage k (None: as the config says). Returns the final student of each row."""
    variants = {"+SFT": "sft", "+DPO only": "dpo", "+ReDPO": "redpo", "+ReDPO offline": "redpo"}
    current = dict.fromkeys(variants)  # None: the full model M0
    pruned_of = {}  # student it was pruned from -> prune folder
    stage1_pairs = os.path.join(root, "stage_1", "shared", "curate")
    for k, cut in enumerate(cuts, start=1):
        stage = os.path.join(root, f"stage_{k}")
        trained_of = {}  # (pruned folder, pairs) -> trained student: identical runs train once
        for name, loss in variants.items():
            tag = name.strip("+").replace(" ", "_").lower()
            parent = current[name]
            if parent not in pruned_of:
                pruned_of[parent] = os.path.join(stage, "shared" if k == 1 else tag, "prune")
                _run("prune.py", config_path, pruned_of[parent], *(["--num_blocks", str(cut)] if cut else []),
                     *(["--student", parent] if parent else []))
            pruned = pruned_of[parent]
            pairs = stage1_pairs if (k == 1 or name == "+ReDPO offline") else os.path.join(stage, tag, "curate")
            if not os.path.exists(os.path.join(pairs, "pairs.jsonl")):
                _run("curate.py", config_path, pairs, "--student", os.path.join(pruned, "student"),
                     "--ranking", os.path.join(pruned, "ranking.json"))
            key = (pruned, pairs, loss)
            if key not in trained_of:
                out = _run("train_redpo.py", config_path, os.path.join(stage, tag, "train"), "--student",
                           os.path.join(pruned, "student"), "--pairs", os.path.join(pairs, "pairs.jsonl"),
                           "--loss_type", loss, "--resume_from_checkpoint", "latest")
                trained_of[key] = os.path.join(out, "student")
            current[name] = trained_of[key]
    return current


def ablation(args):
    """Teacher, pruned (M0 minus the final ReDPO student's blocks, untrained), +SFT, +DPO only,
    +ReDPO and offline ReDPO after --stages stages, evaluated on the held-out prompts, per seed;
    a seed already done is read back, so seeds can run in separate processes and be gathered."""
    import time

    import yaml

    import common

    base = yaml.safe_load(open(args.config))
    aspects = base["reward"]["aspects"]
    cuts = args.num_blocks or [None]
    if len(cuts) not in (1, args.stages):
        raise SystemExit(f"world.py ablation: --num_blocks: expected one number or {args.stages} (one a stage); got {len(cuts)}")
    cuts = cuts * args.stages if len(cuts) == 1 else cuts
    if args.num_blocks:
        base["prune"]["prune_params"] = None  # the flag decides, not a budget in the config
        cut = f"cutting {'+'.join(map(str, cuts))} motion modules"
    elif base["prune"].get("prune_params"):
        cut = f"each cutting at least {base['prune']['prune_params']:,} motion-module parameters"
    else:
        cut = f"each cutting {base['prune'].get('num_blocks', 1)} motion modules"
    seeds = list(dict.fromkeys(args.seeds))  # a seed named twice would run twice in one folder
    settings = {}
    for seed in seeds:  # every folder checked before anything runs
        config = {k: dict(v) for k, v in base.items()}
        for section in ("prune", "curate", "train"):
            config[section]["seed"] = seed
        # Every step inside a seed skips what it finds done, so a seed's folder only ever serves
        # the settings it was started with.
        settings[seed] = json.loads(json.dumps({"stages": args.stages, "num_blocks": cuts, "config": config}))
        path = os.path.join(args.output_dir, f"seed_{seed}", "settings.json")
        if os.path.exists(path) and json.load(open(path)) != settings[seed]:
            raise SystemExit(f"world.py ablation: {path}: made with other --stages, --num_blocks or "
                             f"--config; use another --output_dir, or remove {os.path.dirname(path)} to start the seed over")
    if args.jobs > 1:
        run_seeds_in_parallel(args, seeds)
    results, seconds = {}, 0.0
    for seed in seeds:
        root = os.path.join(args.output_dir, f"seed_{seed}")
        done = os.path.join(root, "result.json")
        config = settings[seed]["config"]
        if not os.path.exists(done):
            start = time.time()
            config_path = os.path.join(root, "config.yaml")
            os.makedirs(root, exist_ok=True)
            common.atomic_write_json(os.path.join(root, "settings.json"), settings[seed])
            common.atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
            finals = ablation_seed(config_path, root, cuts)
            finals["pruned"] = pruned_baseline(config, root, finals["+ReDPO"])
            students = [finals[r] for r in ROWS[1:]]
            report = os.path.join(root, "eval")
            _run("evaluate.py", config_path, report, "--students", ",".join(students))
            models = json.load(open(os.path.join(report, "eval.json")))["models"]
            common.atomic_write_json(done, {"seconds": time.time() - start,
                                            "scores": {r: m["scores"] for r, m in zip(ROWS, models)}})
        result = json.load(open(done))
        seconds += result["seconds"]
        for row, scores in result["scores"].items():
            results.setdefault(row, []).append(scores)
    lines = [f"| model | {' | '.join(aspects)} | average |", "|" + "---|" * (len(aspects) + 2)]
    for row in ROWS:
        runs = results[row]
        cells = [np.array([r[a] for r in runs]) for a in aspects] + [np.array([np.mean([r[a] for a in aspects]) for r in runs])]
        # The sample standard deviation: three seeds are a sample of the seeds there could be.
        lines.append(f"| {row} | " + " | ".join(f"{c.mean():.3f} ± {c.std(ddof=1) if len(c) > 1 else 0:.3f}"
                                                 for c in cells) + " |")
    table = (f"Held-out prompts; {args.stages} stages {cut}; seeds {seeds}; mean ± sample std over seeds; "
             f"{seconds / 60:.1f} CPU-process minutes in all\n\n" + "\n".join(lines) + "\n")
    if not args.seed_only:
        common.atomic_write_text(os.path.join(args.output_dir, "ablation.md"), table)
    print(table)


def run_seeds_in_parallel(args, seeds):
    """Each unfinished seed in a process of its own, --jobs at a time; the caller then gathers."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    pending = [s for s in seeds if not os.path.exists(os.path.join(args.output_dir, f"seed_{s}", "result.json"))]
    # The cores are split between the processes: processes that each start a thread per core slow
    # one another down several times over.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // args.jobs)))
    flags = ["--config", args.config, "--output_dir", args.output_dir, "--stages", str(args.stages), "--seed_only"]
    flags += ["--num_blocks", *map(str, args.num_blocks)] if args.num_blocks else []

    def run(seed):
        log = os.path.join(args.output_dir, f"seed_{seed}", "log.txt")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        print(f"world.py ablation: seed {seed} running, log in {log}", flush=True)
        with open(log, "a") as f:
            cmd = [sys.executable, os.path.abspath(__file__), "ablation", "--seeds", str(seed), *flags]
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode

    pool = ThreadPoolExecutor(args.jobs)
    try:
        failed = [s for s, rc in zip(pending, pool.map(run, pending)) if rc != 0]
    except BaseException:  # Ctrl-C: start no further seed
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()
    if failed:
        raise SystemExit(f"world.py ablation: seed(s) {failed} failed; see {args.output_dir}/seed_<s>/log.txt")


def pruned_baseline(config, root, final_student):
    """M0 with the final student's blocks removed and no training, saved as a student."""
    import common

    student = os.path.join(root, "pruned_untrained")
    if not os.path.exists(os.path.join(student, "student.json")):
        args = common.parse_config([], "", {"model": common.MODEL_OPTIONS})
        for k, v in config["model"].items():
            setattr(args, k, v)
        unet = common.load_unet(args)
        common.remove_blocks(unet, common.read_student_meta(final_student)["removed_blocks"])
        common.save_student(unet, student, args)
    return student


if __name__ == "__main__":
    main(parse_args())
