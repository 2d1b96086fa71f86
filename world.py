"""An exact-reward world: coloured shapes moving on black, small enough to train a teacher on a CPU.

Prompts come from a grammar ("a red square moves left slowly"); a deterministic renderer makes the
clip; `WorldReward` scores any clip on VideoScore's aspects (1-4) by locating the object in each
frame. The teacher M0 is an AnimateDiff-layout model over the lossless `PixelVAE` here (the
`world` backend, `configs/world.yaml`), trained once by `train_world_teacher.py` and committed in
weights/world; its notes are in docs/world.md.
"""

import itertools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

import common

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
# Temporal consistency's drift: each term over its just-visible size (relative mass, colour distance,
# relative spread, pixels of jerk); the clip's score decays with their sum.
DRIFT_TOLERANCE = {"mass": 0.1, "colour": 0.1, "spread": 0.15, "jerk": 0.5}


def _rate(x):
    return float(1 + 3 * np.clip(x, 0, 1))


def fitted_velocity(stats):
    """(vx, vy) in pixels per frame: the line fitted to the object's centres over the frames it is in
    (`frame_stats` of each frame, None where nothing is drawn; at least two drawn)."""
    t = np.array([i for i, s in enumerate(stats) if s is not None], dtype=np.float64)
    return np.polyfit(t, np.stack([s["centre"] for s in stats if s is not None]), 1)[0]


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
    tol = DRIFT_TOLERANCE
    drift = (mass.std() / mass.mean() / tol["mass"]
             + np.linalg.norm(colours - colours.mean(0), axis=1).mean() / tol["colour"]
             + (spread.std(0) / spread.mean(0)).mean() / tol["spread"] + jerk / tol["jerk"])
    temporal = present * np.exp(-drift / 2)

    # Dynamic degree: the fitted speed against the asked one.
    velocity = fitted_velocity(stats)
    asked = SPEEDS[speed]
    dynamic = np.exp(-(((np.linalg.norm(velocity) - asked) / (0.35 * asked)) ** 2))

    # Text alignment: colour, shape and direction as asked (a still object contradicts no direction).
    colour_match = max(0.0, float(colours.mean(0) @ np.array(COLOURS[colour])) / np.linalg.norm(colours.mean(0)))
    fill = np.median([s["fill"] for s in seen])
    skew = np.median([s["skew"] for s in seen])
    # The prompt's shape's share of the likeness, from log-likeness: a shape far from every prototype
    # would make each likeness 0 in floating point, and the share 0 / 0.
    log_likeness = {k: -((fill - f) / 0.1) ** 2 - ((skew - k3) / 0.45) ** 2 for k, (f, k3) in SHAPE_FEATURES.items()}
    top = max(log_likeness.values())
    shape_match = np.exp(log_likeness[shape] - top) / sum(np.exp(v - top) for v in log_likeness.values())
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
        videos, prompts = list(videos), list(prompts)
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        return [score_clip(common.read_video(v) if isinstance(v, (str, os.PathLike)) else np.asarray(v), p)
                for v, p in zip(videos, prompts)]


# -----------------------------------------------------------------------------
# The teacher's "VAE": the pixels themselves, and the word tokenizer of its frozen text encoder.

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


class WanPixelVAE(ModelMixin, ConfigMixin):
    """The same space-to-depth "VAE" shaped as WanPipeline reads a VAE (the DiT world, backends/
    world_wan.py): 3 x factor^2 channels (z_dim), latents normalised as (z - latents_mean) /
    latents_std (here z * SCALE), `scale_factor_spatial` x spatial and no temporal compression.
    No weights: one buffer gives it a device and dtype."""

    @register_to_config
    def __init__(self, scale_factor_spatial=FACTOR, scale_factor_temporal=1):
        super().__init__()
        channels = 3 * scale_factor_spatial ** 2
        self.register_to_config(z_dim=channels, latents_mean=(0.0,) * channels, latents_std=(1 / SCALE,) * channels)
        self.register_buffer("unit", torch.ones(1), persistent=False)

    def encode(self, x, return_dict=True):
        """Videos (B, 3, F, H, W) in [-1, 1] -> z (B, z_dim, F, H/factor, W/factor) in [0, 1], un-normalised."""
        b, _, f = x.shape[:3]
        z = F.pixel_unshuffle(((x + 1) / 2).permute(0, 2, 1, 3, 4).flatten(0, 1), self.config.scale_factor_spatial)
        return z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)

    def decode(self, z, return_dict=True):
        b, _, f = z.shape[:3]
        x = F.pixel_shuffle(z.permute(0, 2, 1, 3, 4).flatten(0, 1), self.config.scale_factor_spatial) * 2 - 1
        x = x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        return DecoderOutput(sample=x) if return_dict else (x,)


def latent_factor(channels):
    """The pixels a side of a pixel latent of `channels` values (3 x factor^2)."""
    factor = math.isqrt(channels // 3)
    if 3 * factor ** 2 != channels:
        raise ValueError(f"{channels} input channels; the world's pixel latents have 3 x factor^2 (12 or 48)")
    return factor


def frames_to_latents(frames, factor=FACTOR):
    """uint8 clips (B, F, H, W, 3) -> latents (B, 3 factor^2, F, H/factor, W/factor) in [0, 1], as the pixel VAEs encode."""
    x = torch.as_tensor(np.asarray(frames)).float().div(255)
    b, f = x.shape[:2]
    z = F.pixel_unshuffle(x.permute(0, 1, 4, 2, 3).reshape(b * f, 3, SIZE, SIZE), factor)
    return z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()


def word_tokenizer():
    words = ["<pad>", "<unk>", "<s>", "</s>", "a", "moves", *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=8, model_input_names=["input_ids", "attention_mask"])

