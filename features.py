"""A second, weight-free reward: pixel statistics on VideoScore's 1-4 scale (`reward: features`), alone
or averaged with VideoScore or the world's reward (`reward: ensemble`), so that pair selection does
not rest on one learned model's biases.

- visual_quality: sharpness, the energy of the Laplacian relative to the frame's own contrast (blur
  and haze lower it; a brighter or darker frame does not), times a noise penalty (Immerkaer's
  estimate of the noise level), since noise would pass for sharpness.
- temporal_consistency: SSIM between each frame and the previous one warped onto it by the optical
  flow, times a penalty for jumps in brightness: motion itself costs nothing; flicker, popping and
  melting objects do.
- dynamic_degree: the mean optical-flow magnitude (Farneback), in percent of the frame width a frame.
- text_alignment: none. No pixel statistic reads a prompt; the ensemble takes it from the learned reward.
"""

import os

import cv2
import numpy as np

import common

ASPECTS = ("visual_quality", "temporal_consistency", "dynamic_degree")
# Where each statistic reaches the middle of the scale (2.5): calibrated so that sharp rendered
# clips score near 4 and a 1.5-pixel blur, a 20% flicker or a frozen clip lose at least one point.
SHARPNESS_HALF = 0.5   # Laplacian energy / contrast
SSIM_FLOOR = 0.5       # warped SSIM at or below this is 1
NOISE_SCALE = 0.03     # noise std (of [0, 1] intensities) that costs visual quality a factor 1/e
JUMP_SCALE = 0.1       # relative brightness jump between frames that costs consistency a factor 1/e
MOTION_SCALE = 1.0     # percent of the width per frame at which dynamic degree is 1 + 3 * (1 - 1/e)


def _gray(frame):
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255


def sharpness(gray):
    return float(cv2.Laplacian(gray, cv2.CV_32F).var() / (gray.var() + 1e-4))


def noise_level(gray):
    """Immerkaer (1996): the noise std from the response to a mask that cancels smooth image content."""
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    response = np.abs(cv2.filter2D(gray, -1, mask, borderType=cv2.BORDER_REFLECT))[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * response.mean() / 6)


def flow(prev, nxt):
    """Farneback optical flow (H, W, 2) from `prev` to `nxt`, in pixels; window sizes scale with the frame."""
    size = min(prev.shape)
    return cv2.calcOpticalFlowFarneback((prev * 255).astype(np.uint8), (nxt * 255).astype(np.uint8), None,
                                        pyr_scale=0.5, levels=max(1, int(np.log2(size / 8))), winsize=max(5, size // 8),
                                        iterations=3, poly_n=5, poly_sigma=1.1, flags=0)


def ssim(a, b):
    """Mean SSIM of two gray frames in [0, 1] over 7x7 Gaussian windows."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    blur = lambda x: cv2.GaussianBlur(x, (7, 7), 1.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    return float((((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))).mean())


def warp(frame, motion):
    """`frame` moved along `motion` (the flow from it to the next frame): where it predicts the next frame."""
    h, w = frame.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(frame, xs - motion[..., 0], ys - motion[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def score_clip(frames):
    """The three aspects of one clip, uint8 (F, H, W, 3), each in [1, 4]."""
    grays = [_gray(f) for f in np.asarray(frames)]
    sharp = np.mean([sharpness(g) for g in grays])
    noise = np.mean([noise_level(g) for g in grays])
    flows = [flow(a, b) for a, b in zip(grays, grays[1:])]
    consistency, jumps = [], []
    for a, b, f in zip(grays, grays[1:], flows):
        predicted = warp(a, f)
        consistency.append(ssim(predicted, b))
        jumps.append(abs(b.mean() - predicted.mean()) / (max(b.mean(), predicted.mean()) + 1e-3))
    structure = np.clip((np.mean(consistency) - SSIM_FLOOR) / (1 - SSIM_FLOOR), 0, 1) if flows else 1.0
    steady = np.exp(-np.mean(jumps) / JUMP_SCALE) if flows else 1.0
    motion = np.mean([np.linalg.norm(f, axis=-1).mean() for f in flows]) / grays[0].shape[1] * 100 if flows else 0.0
    return {"visual_quality": 1 + 3 * sharp / (sharp + SHARPNESS_HALF) * float(np.exp(-noise / NOISE_SCALE)),
            "temporal_consistency": 1 + 3 * float(structure * steady),
            "dynamic_degree": 1 + 3 * (1 - float(np.exp(-motion / MOTION_SCALE)))}


def _frames(video):
    return common.read_video(video) if isinstance(video, (str, os.PathLike)) else np.asarray(video)


class FeatureReward:
    """VideoScorer's interface, `score(videos, prompts)`: MP4 paths or uint8 arrays (F, H, W, 3) in,
    one dict of the three aspects (1-4) per video out. The prompts are not read."""

    aspects = ASPECTS

    def score(self, videos, prompts):
        videos, prompts = list(videos), list(prompts)
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        return [score_clip(_frames(v)) for v in videos]


class EnsembleReward:
    """The mean of a learned reward (VideoScore, VideoReward or the world's) and FeatureReward,
    aspect by aspect, on the features' 1-4 scale (a learned reward on another scale says how to put
    its scores on it: `on_1_to_4`); an aspect only the learned one has (text alignment) is its alone.
    Each part is kept as `<aspect>/<part>` too, on its own scale, so the tables show what each said."""

    def __init__(self, learned, name):
        self.learned, self.features, self.name = learned, FeatureReward(), name
        self.aspects = learned.aspects
        self.on_1_to_4 = getattr(learned, "on_1_to_4", lambda score: score)

    def unreadable(self, prompt):
        return getattr(self.learned, "unreadable", lambda p: None)(prompt)

    def score(self, videos, prompts):
        frames = [_frames(v) for v in videos]
        out = []
        for a, b in zip(self.learned.score(frames, prompts), self.features.score(frames, prompts)):
            scaled = {k: self.on_1_to_4(v) for k, v in a.items()}
            mixed = {k: (v + b[k]) / 2 if k in b else v for k, v in scaled.items()}
            mixed.update({f"{k}/{self.name}": v for k, v in a.items() if k in b})
            mixed.update({f"{k}/features": v for k, v in b.items()})
            out.append(mixed)
        return out
