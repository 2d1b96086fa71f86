"""What every script of vip needs, and nothing of the project: the ReDPO loss and its prediction
targets, video files, atomic writes and temporaries, and the one-line errors of bad input.

Every other module imports this one; it imports none of them.
"""

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F

# Without torchvision, transformers warns at the first use of an image processor and falls back to
# its PIL version, which is the one these scripts use: diffusers' pipelines import two at start.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


class ConfigError(ValueError):
    """Bad user input: the scripts print it as one line and exit with status 2."""


def run_main(main, parse_args):
    """Entry point: bad input is one line on stderr and exit status 2, not a traceback; so is a full
    disk, after which a rerun resumes (every artifact is written whole or not at all)."""
    args = None
    try:
        args = parse_args()
        if isinstance(args, argparse.Namespace):  # run as a script: what made its results (provenance.json)
            args._command = shlex.join(sys.argv)
        main(args)
    except ConfigError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:  # raised in a data loader worker: its last line is the error
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        if os.environ.get("RANK", "0") == "0":  # every process raises it; one says it
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not disk_full(e):
            raise
        where = getattr(e, "filename", None) or getattr(args, "output_dir", None) or "the output folder"
        print(f"error: {where}: no space left on the device; free some and rerun the same command: "
              f"finished work is kept and resumed", file=sys.stderr)
        sys.exit(2)


def disk_full(error):
    """Whether `error` (or what caused it) is a full disk: an OSError, or the messages safetensors
    and torch.save give for one (torch's zip writer reports a short write as 'unexpected pos')."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(error) for s in ("No space left on device", "os error 28", "unexpected pos")):
            return True
        error = error.__cause__ or error.__context__
    return False


# -----------------------------------------------------------------------------
# Files: every artifact is written under a temporary name and renamed into place.


def _writer():
    """Who writes a temporary: this host and PID namespace, so that a name is unique across hosts and
    containers sharing a filesystem, and a stale one can be told from a live writer's."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha1(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:8]


WRITER = _writer()
# tmp_name's, and .<name>.tmp<pid><suffix> as versions before it named them
TEMPORARY = re.compile(r"^\..+\.tmp(-(?P<writer>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}|\d+)(\.\w+)?$")
STALE_AFTER_S = 24 * 3600  # a temporary nobody has touched for a day is a dead writer's, wherever it ran


def tmp_name(path):
    """`.<name>.tmp-<writer>-<pid>-<random><suffix>` beside `path` (the suffix kept: writers pick formats by it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{WRITER}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def is_stale_temporary(path):
    """Whether `path` is a temporary (tmp_name's) whose writer is gone: a process of this host and PID
    namespace that no longer runs, or any writer after STALE_AFTER_S without a change."""
    match = TEMPORARY.match(os.path.basename(path))
    if not match:
        return False
    if match["writer"] == WRITER and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
        return True
    try:
        return time.time() - os.lstat(path).st_mtime > STALE_AFTER_S
    except OSError:
        return False


def remove_stale_temporaries(folder):
    """Remove what killed writers left in `folder` (not below it), where live writers may be at work."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        if not is_stale_temporary(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def intact(root, files):
    """Whether every file of `files` ({path relative to `root`: bytes}) is there, whole in size."""
    for rel, size in files.items():
        try:
            if os.path.getsize(os.path.join(root, rel)) != size:
                return False
        except OSError:
            return False
    return True


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def replace_folder(src, dst):
    """Move a finished folder into place, over what an unfinished earlier attempt left there."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(src, dst)


def weight_dtype(mixed_precision):
    try:
        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    except KeyError:
        raise ConfigError(f"mixed_precision: expected no, fp16 or bf16; got {mixed_precision!r}") from None


# -----------------------------------------------------------------------------
# ReDPO loss (pure: tensors in, tensor and float metrics out) and what the model is trained to predict


LOSS_TYPES = ("redpo", "dpo", "sft")


def per_sample_mse(a, b):
    """Mean of (a - b)^2 over every non-batch dim: one value per sample (C, F, H and W all averaged)."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


def redpo_loss(model_pred, ref_pred, target, *, beta, w_sft, loss_type="redpo"):
    """ReDPO = Diffusion-DPO + w_sft * SFT, with the frozen teacher M0 as the reference of both terms.

    model_pred, ref_pred, target: (2B, ...) with the B winners first, then the B losers (the
    Diffusion-DPO layout); each winner/loser pair shares its noise and timestep. `ref_pred` is the
    teacher's prediction and gets no gradient. Everything is computed in float32.

        logits = -beta * ((mse(model_w, tgt_w) - mse(ref_w, tgt_w)) - (mse(model_l, tgt_l) - mse(ref_l, tgt_l)))
        dpo    = -logsigmoid(logits).mean()
        sft    = mse(model_w, ref_w).mean()          (winners only)
        loss   = dpo + w_sft * sft  ("redpo") | dpo ("dpo") | sft ("sft")

    `beta` has no 0.5 factor: it is 0.5 x `beta_dpo` of the original Diffusion-DPO, diffusers' SDXL
    DPO script and VideoDPO (their 5000 is 2500 here), and `beta_dpo` itself in diffusers' SD1.5
    train_diffusion_dpo.py, which has no 0.5 factor either.
    The teacher is not the student's initialisation, so the DPO term does not start at log 2.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if not (model_pred.shape == ref_pred.shape == target.shape):
        raise ValueError(f"shapes differ: model {tuple(model_pred.shape)}, ref {tuple(ref_pred.shape)}, "
                         f"target {tuple(target.shape)}")
    if model_pred.ndim < 2 or model_pred.shape[0] % 2:
        raise ValueError(f"expected (2B, ...) with B winners then B losers; got shape {tuple(model_pred.shape)}")
    model_pred, target = model_pred.float(), target.float()
    ref_pred = ref_pred.detach().float()

    model_mse = per_sample_mse(model_pred, target)
    ref_mse = per_sample_mse(ref_pred, target)
    model_w, model_l = model_mse.chunk(2)
    ref_w, ref_l = ref_mse.chunk(2)
    logits = -beta * ((model_w - ref_w) - (model_l - ref_l))
    dpo = -F.logsigmoid(logits).mean()
    n = model_pred.shape[0] // 2
    sft = per_sample_mse(model_pred[:n], ref_pred[:n]).mean()
    loss = {"redpo": dpo + w_sft * sft, "dpo": dpo, "sft": sft}[loss_type]

    # TRL's DPO names: a sample's implicit reward is -beta * (its error - the reference's error).
    chosen, rejected = -beta * (model_w - ref_w), -beta * (model_l - ref_l)
    metrics = {
        "loss": loss.item(),
        "dpo_loss": dpo.item(),
        "sft_loss": sft.item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (logits > 0).float().mean().item(),
        "rewards/margins": logits.mean().item(),  # = chosen - rejected
        "mse/model_winner": model_w.mean().item(),
        "mse/model_loser": model_l.mean().item(),
        "mse/ref_winner": ref_w.mean().item(),
        "mse/ref_loser": ref_l.mean().item(),
    }
    return loss, metrics


def diffusion_target(scheduler, latents, noise, timesteps):
    """What a DDPM-family denoiser is trained to predict, by the scheduler's prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"scheduler prediction_type {kind!r}: expected epsilon, v_prediction or sample")


class DDPMObjective:
    """A diffusers DDPM-family scheduler as a training objective: integer timesteps drawn uniformly,
    the scheduler's noising, the target its prediction_type names."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def sample_timesteps(self, n, generator):
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        return diffusion_target(self.scheduler, latents, noise, timesteps)


def shift_sigmas(sigmas, shift):
    """The flow-matching schedule's shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatching:
    """Rectified flow, as Wan is trained: x_t = (1 - sigma) x_0 + sigma * noise, the model predicts
    the velocity noise - x_0, and is told the timestep 1000 * sigma. Sigma is drawn logit-normal
    (sigmoid of a standard normal) or uniform in [0, 1], then shifted."""

    def __init__(self, shift=1.0, sampling="logit_normal", num_train_timesteps=1000):
        if sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"sampling {sampling!r}: expected logit_normal or uniform")
        self.shift, self.sampling, self.num_train_timesteps = shift, sampling, num_train_timesteps

    def sample_timesteps(self, n, generator):
        u = torch.randn(n, generator=generator).sigmoid() if self.sampling == "logit_normal" else \
            torch.rand(n, generator=generator)
        return shift_sigmas(u, self.shift) * self.num_train_timesteps

    def sigmas(self, timesteps, latents):
        """The sigma of each timestep, shaped to broadcast over `latents`."""
        return (timesteps.float() / self.num_train_timesteps).view(-1, *[1] * (latents.dim() - 1))

    def add_noise(self, latents, noise, timesteps):
        sigma = self.sigmas(timesteps, latents)
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def target(self, latents, noise, timesteps):
        return noise - latents


# -----------------------------------------------------------------------------
# Video files


def write_video(path, frames, fps=8):
    """Write uint8 frames (F, H, W, 3) as an H.264 MP4, atomically."""
    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=2,
                         output_params=["-crf", "18"])


def read_video(path):
    """All frames of a video file as uint8 (F, H, W, 3)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: cannot read video (no such file): expected an MP4 file")
    # imageio's ffmpeg reads any frame size; decord misreads frames narrower than 32 pixels.
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:  # RGB, whatever the file's pixel format
            frames = [np.asarray(f) for f in reader]
    except Exception as e:  # ffmpeg's errors come with multi-line logs
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{path}: cannot read video ({reason}): expected an MP4 file") from None
    if not frames:
        raise ConfigError(f"{path}: cannot read video (no frames): expected an MP4 file")
    return np.stack(frames)


def video_fps(path):
    """The frame rate a video file declares."""
    try:
        with imageio.get_reader(os.fspath(path), format="FFMPEG") as reader:
            return float(reader.get_meta_data()["fps"])
    except Exception as e:
        raise ConfigError(f"{path}: cannot read video ({str(e).strip()[:200] or type(e).__name__}): expected an MP4 "
                          f"file") from None


def video_frames(video, min_frames=1):
    """A reward's input as uint8 frames (F, H, W, 3): an MP4 path read, an array checked."""
    frames = read_video(video) if isinstance(video, (str, os.PathLike)) else video
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 \
            or len(frames) < min_frames:
        what = f"{frames.dtype} array of shape {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"video must be an MP4 path or a uint8 array (F, H, W, 3) with F >= {min_frames}, got {what}")
    return frames


def in_batches(score_batch, videos, prompts, batch_size):
    """score_batch(videos, prompts) over consecutive batches: one result a (video, prompt) pair."""
    videos, prompts = list(videos), list(prompts)
    if len(videos) != len(prompts):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
    return [s for i in range(0, len(videos), batch_size)
            for s in score_batch(videos[i:i + batch_size], prompts[i:i + batch_size])]


# The aspects a reward scores, in VideoScore's order (the paper's table).
ASPECTS = ("visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment", "factual_consistency")
