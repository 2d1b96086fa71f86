"""Shared pieces of vip: configuration, the ReDPO loss, video I/O, the VideoScore reward, the
AnimateDiff backend (load, prune motion modules, count, save/load students) and tiny offline models.

`train_redpo.py` needs only this file (plus torch, diffusers, transformers, accelerate), so the two
can be copied into another project together.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from transformers import Idefics2Model, Idefics2PreTrainedModel

# -----------------------------------------------------------------------------
# Configuration: one YAML per model with a section per stage, CLI flags override it.


class ConfigError(ValueError):
    """Bad user input: the scripts print it as one line and exit with status 2."""


SECTIONS = ("model", "reward", "prune", "curate", "train", "eval")

MIXED_PRECISION = ("no", "fp16", "bf16")

MODEL_OPTIONS = {
    "backend": ("animatediff", "model family: animatediff | world (AnimateDiff's classes over world.py's pixel VAE) "
                               "| videocrafter2 (videocrafter2.py)", {"choices": ("animatediff", "world", "videocrafter2")}),
    "pretrained_model_name_or_path": ("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                      "SD1.5 base: hub id or local folder (unet, vae, text_encoder, tokenizer, scheduler)"),
    "motion_adapter": ("guoyww/animatediff-motion-adapter-v1-5-2", "motion adapter: hub id or local folder"),
    "checkpoint": ("VideoCrafter/VideoCrafter2", "videocrafter2: the official model.ckpt (hub repo id or path), "
                                                 "converted once into pretrained_model_name_or_path"),
    "cache_dir": (None, "where hub downloads go (default: the Hugging Face cache, HF_HOME)"),
    "revision": (None, "hub revision (branch, tag or commit) of pretrained_model_name_or_path (and of checkpoint)"),
    "build_tiny": (False, "build random tiny models at the two paths above when missing (tests, CPU demo); "
                          "the paths must be local (./x, /x or a/b/c), never a hub id"),
    "num_frames": (16, "frames per generated video", {"min": 1}),
    "height": (512, "video height in pixels", {"min": 1}),
    "width": (512, "video width in pixels", {"min": 1}),
    "num_inference_steps": (25, "DDIM steps per video", {"min": 1}),
    "guidance_scale": (7.5, "classifier-free guidance scale", {"min": 0}),
    "fps": (8, "frame rate of the MP4s written", {"min": 1}),
    "generation_batch_size": (4, "videos generated per pipeline call", {"min": 1}),
    "mixed_precision": ("no", "no | fp16 | bf16: weights of frozen models and generation; autocast in training",
                        {"choices": MIXED_PRECISION}),
}

REWARD_OPTIONS = {
    "reward": ("videoscore", "videoscore | world (world.py's exact reward, for the world's prompts) | features "
                             "(weight-free, features.py) | ensemble (the mean of ensemble_with and features)",
               {"choices": ("videoscore", "world", "features", "ensemble")}),
    "ensemble_with": ("videoscore", "the learned reward reward: ensemble averages features with: videoscore | world",
                      {"choices": ("videoscore", "world")}),
    "reward_model": ("TIGER-Lab/VideoScore-v1.1", "VideoScore hub id or local folder"),
    "reward_num_frames": (None, "frames the reward sees (default: 48 for v1.1, 16 for v1)", {"type": int, "min": 1}),
    "reward_batch_size": (4, "videos per reward forward", {"min": 1}),
    "aspects": (["visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment"],
                "aspects that count: block ranking, pair selection, the table's average (the paper's four)",
                {"choices": ("visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment",
                             "factual_consistency")}),
}


def _rule(option):
    """(default, help[, rule]) -> (default, rule): the rule's type defaults to the default's, and to
    str (a path, an id, a name) when the default is None."""
    default, rule = option[0], dict(option[2]) if len(option) > 2 else {}
    rule.setdefault("type", str if default is None else list if isinstance(default, (list, tuple)) else type(default))
    return default, rule


def _coerce(value, option, where, from_cli=False):
    """Cast a YAML or CLI value to its option's type and check its range and choices, so a typo fails
    here, not mid-run. CLI values are strings (lists: the strings given); YAML is parsed only where
    the type needs it (numbers, booleans, lists): a path is a string, whatever characters it holds."""
    default, rule = _rule(option)
    kind = rule["type"]
    if value is None or (from_cli and default is None and kind in (int, float) and value.lower() in ("none", "null")):
        return None
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string (a path, name or id; quote it in YAML), got {value!r}")
        if "choices" in rule and value not in rule["choices"]:
            raise ConfigError(f"{where}: expected one of {', '.join(rule['choices'])}; got {value!r}")
        return value
    if kind is list:
        value = _as_list(value, where, from_cli)
        bad = [v for v in value if not isinstance(v, str) or ("choices" in rule and v not in rule["choices"])]
        if bad:
            expected = f"a list of {', '.join(rule['choices'])}" if "choices" in rule else "a list of strings"
            raise ConfigError(f"{where}: expected {expected}; got {bad[0]!r} in {value!r}")
        return value
    try:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = int(value) if not isinstance(value, str) else int(value.strip())
        else:
            number = float(value)
            if number != number:  # NaN passes every comparison below
                raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    for bound, ok, words in (("min", lambda x, b: x >= b, "at least"), ("max", lambda x, b: x <= b, "at most"),
                             ("gt", lambda x, b: x > b, "above"), ("lt", lambda x, b: x < b, "below")):
        if bound in rule and not ok(number, rule[bound]):
            raise ConfigError(f"{where}: expected a number {words} {rule[bound]}; got {value!r}")
    return number


def _as_list(value, where, from_cli):
    if from_cli:  # the strings of `--key a b c`
        if len(value) > 1:
            return list(value)
        value = value[0]
        if value.startswith("["):  # a YAML flow list, e.g. --aspects '[visual_quality, dynamic_degree]'
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None
            if not isinstance(parsed, list):
                raise ConfigError(f"{where}: not a valid YAML list: {value!r}; give the values separated by spaces")
            return parsed
    if isinstance(value, str):
        # One path that exists is one value, commas and all; otherwise comma-separated values.
        return [value] if os.path.exists(value) else [v for v in value.split(",") if v]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def parse_config(argv, description, sections):
    """Build the argparse flags of `sections` ({section: {key: (default, help[, rule])}}), read
    `--config` and apply CLI overrides. Returns a flat Namespace; `ns._sections` keeps the YAML shape.

    Precedence: CLI flag > YAML value > default. Unknown YAML sections or keys are an error that
    lists the valid ones. Keys are unique across sections so flags can stay flat, as in diffusers.
    A rule may give "type" (for a None default; else the default's type), "choices", and bounds
    "min", "max" (inclusive), "gt", "lt" (exclusive).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML config (configs/<model>.yaml)")
    for section, options in sections.items():
        group = parser.add_argument_group(section)
        for key, option in options.items():
            is_list = _rule(option)[1]["type"] is list
            group.add_argument(f"--{key}", type=str, default=None, nargs="+" if is_list else None,
                               help=f"{option[1]} (default: {option[0]})")
    cli = parser.parse_args(argv)

    values = {}
    if cli.config is not None:
        path = cli.config
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections {list(SECTIONS)}")
        for section, body in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown section '{section}'; valid sections: {', '.join(SECTIONS)}")
            if section not in sections:
                continue  # another stage's settings
            if not isinstance(body, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping of key: value")
            for key, value in body.items():
                if key not in sections[section]:
                    raise ConfigError(f"{path}: unknown key '{section}.{key}'; valid keys: "
                                      f"{', '.join(sections[section])}")
                values[key] = _coerce(value, sections[section][key], f"{path}: {section}.{key}")

    ns = argparse.Namespace(config=cli.config)
    ns._sections = {}
    ns._cli = {key for options in sections.values() for key in options if getattr(cli, key) is not None}
    for section, options in sections.items():
        ns._sections[section] = {}
        for key, option in options.items():
            value = values.get(key, option[0])
            if getattr(cli, key) is not None:
                value = _coerce(getattr(cli, key), option, f"--{key}", from_cli=True)
            setattr(ns, key, value)
            ns._sections[section][key] = value
    return ns


def config_dict(args):
    """The resolved config in YAML shape, refreshed from the Namespace (scripts may fill values)."""
    return {s: {k: getattr(args, k) for k in keys} for s, keys in args._sections.items()}


def save_config(args, path):
    atomic_write_text(path, yaml.safe_dump(config_dict(args), sort_keys=False))


def run_main(main, parse_args):
    """Entry point: bad input is one line on stderr and exit status 2, not a traceback; so is a full
    disk, after which a rerun resumes (every artifact is written whole or not at all)."""
    args = None
    try:
        args = parse_args()
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
    import errno

    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(error) for s in ("No space left on device", "os error 28", "unexpected pos")):
            return True
        error = error.__cause__ or error.__context__
    return False


# -----------------------------------------------------------------------------
# Files: every artifact is written under a temporary name and renamed into place.


def tmp_name(path):
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


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


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# -----------------------------------------------------------------------------
# ReDPO loss (pure: tensors in, tensor and float metrics out)

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

    `beta` has no 0.5 factor: it equals 0.5 x Diffusion-DPO's `beta_dpo` (their 5000 is 2500 here).
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


# -----------------------------------------------------------------------------
# Video files


def write_video(path, frames, fps=8):
    """Write uint8 frames (F, H, W, 3) as an H.264 MP4, atomically."""
    import imageio.v2 as imageio

    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=2,
                         output_params=["-crf", "18"])


# -----------------------------------------------------------------------------
# VideoScore reward (TIGER-Lab/VideoScore, VideoScore-v1.1): Mantis-Idefics2 with a 5-output
# regression head, rebuilt on plain transformers so that `mantis-vl` is not needed.

ASPECTS = ("visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment", "factual_consistency")

# Verbatim from the official examples/run_videoscore.py, leading and trailing newlines included:
# the checkpoints were trained on exactly this text.
REGRESSION_QUERY_PROMPT = """
Suppose you are an expert in judging and evaluating the quality of AI-generated videos,
please watch the following frames of a given video and see the text prompt for generating the video,
then give scores from 5 different dimensions:
(1) visual quality: the quality of the video in terms of clearness, resolution, brightness, and color
(2) temporal consistency, both the consistency of objects or humans and the smoothness of motion or movements
(3) dynamic degree, the degree of dynamic changes
(4) text-to-video alignment, the alignment between the text prompt and the video content
(5) factual consistency, the consistency of the video content with the common-sense and factual knowledge

for each dimension, output a float number from 1.0 to 4.0,
the higher the number is, the better the video performs in that sub-score, 
the lowest 1.0 means Bad, the highest 4.0 means Perfect/Real (the video is like a real video)
Here is an output example:
visual quality: 3.2
temporal consistency: 2.7
dynamic degree: 4.0
text-to-video alignment: 2.3
factual consistency: 1.8

For this video, the text prompt is "{text_prompt}",
all the frames of video are as follows:
"""
VIDEOSCORE_DEFAULT = "TIGER-Lab/VideoScore-v1.1"


class Idefics2ForSequenceClassification(Idefics2PreTrainedModel):
    """Idefics2 with a linear head read at the last real token; same parameter names as Mantis'
    class (`model.*`, `score.*`), so its checkpoints load as they are."""

    def __init__(self, config):
        super().__init__(config)
        self.model = Idefics2Model(config)
        self.score = nn.Linear(config.text_config.hidden_size, config.num_labels, bias=True)
        self.post_init()

    def forward(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            pixel_attention_mask=pixel_attention_mask, use_cache=False).last_hidden_state
        # Mantis finds the first pad token id instead, which also picks the last token under left
        # padding but misfires when the pad id (<unk>) occurs in the text; the mask cannot.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(-1)
        return self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


def read_video(path):
    """All frames of a video file as uint8 (F, H, W, 3)."""
    import imageio.v2 as imageio

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


def sample_frames(frames, num_frames):
    """Frames floor(i * F / num_frames), i < num_frames, as the official script picks them (its
    arange with a float step), in integer arithmetic; clips of at most num_frames are kept whole."""
    n = len(frames)
    if n <= num_frames:
        return frames
    return frames[np.arange(num_frames) * n // num_frames]


class VideoScorer:
    """`VideoScorer.from_pretrained(...).score(videos, prompts)`: one dict of raw (unclamped)
    regression outputs per video, keyed by ASPECTS; human labels were on a 1-4 scale."""

    def __init__(self, model, processor, num_frames, batch_size=1):
        if model.config.num_labels != len(ASPECTS):
            raise ValueError(f"VideoScore head has {model.config.num_labels} outputs, expected {len(ASPECTS)}")
        self.model, self.processor = model, processor
        self.num_frames, self.batch_size = int(num_frames), int(batch_size)
        # Right padding keeps every real token at the position it has when scored alone, so
        # batched scores equal one-by-one ones (the official script scores one video at a time).
        processor.tokenizer.padding_side = "right"

    @classmethod
    def from_pretrained(cls, name_or_path=VIDEOSCORE_DEFAULT, num_frames=None, device=None, dtype=None,
                        batch_size=1, cache_dir=None):
        from transformers import AutoProcessor

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = Idefics2ForSequenceClassification.from_pretrained(name_or_path, dtype=dtype, cache_dir=cache_dir)
        model.to(device).eval().requires_grad_(False)
        processor = AutoProcessor.from_pretrained(name_or_path, cache_dir=cache_dir)
        if num_frames is None:  # what each release was trained with
            num_frames = 48 if "v1.1" in str(name_or_path) else 16
        return cls(model, processor, num_frames, batch_size)

    aspects = ASPECTS

    @property
    def device(self):
        return self.model.device

    def unreadable(self, prompt):
        """Why VideoScore cannot read `prompt` (None: it can): its processor's image markup."""
        tokens = (self.processor.image_token, getattr(self.processor, "fake_image_token", None))
        bad = next((t for t in tokens if t and t in prompt), None)
        return bad and f"contains {bad!r}, which VideoScore's processor reads as an image slot; remove it"

    def _clip(self, video):
        frames = read_video(video) if isinstance(video, (str, os.PathLike)) else video
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
                or frames.shape[-1] != 3 or len(frames) == 0:
            what = f"{frames.dtype} array of shape {frames.shape}" if isinstance(frames, np.ndarray) \
                else type(frames).__name__
            raise ValueError(f"video must be an MP4 path or a uint8 array (F, H, W, 3) with F >= 1, got {what}")
        return sample_frames(frames, self.num_frames)

    def score(self, videos, prompts):
        videos, prompts = list(videos), list(prompts)
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        scores = []
        for i in range(0, len(videos), self.batch_size):
            scores += self._score_batch(videos[i:i + self.batch_size], prompts[i:i + self.batch_size])
        return scores

    @torch.inference_mode()
    def _score_batch(self, videos, prompts):
        from PIL import Image

        clips = [self._clip(v) for v in videos]
        texts = [REGRESSION_QUERY_PROMPT.format(text_prompt=p) + "<image> " * len(c) for p, c in zip(prompts, clips)]
        images = [[Image.fromarray(f) for f in c] for c in clips]  # the processor takes PIL images only
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        logits = self.model(**inputs).float().cpu()
        return [dict(zip(ASPECTS, row.tolist())) for row in logits]


def _tiny_bpe_tokenizer(vocab_size=400):
    """A byte-level BPE tokenizer trained here, on the scoring prompt and a few hundred generated
    captions; byte-level so no text is out of vocabulary. BOS added like Idefics2's Mistral one."""
    from itertools import product

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    subjects = ["a cat", "a dog", "two people", "a red car", "an old man", "a small bird", "the ocean", "a robot"]
    actions = ["walks", "runs", "jumps", "dances", "sleeps", "flies"]
    places = ["in the park", "on the beach", "at night", "under the rain", "in a city", "near a house"]
    lines = REGRESSION_QUERY_PROMPT.splitlines() + [" ".join(t) + "." for t in product(subjects, actions, places)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    # Idefics2 pads with <unk>, so padding is only recognisable through the attention mask.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_input_names=["input_ids", "attention_mask"])


TINY_MARK = "vip_tiny.json"  # written into every random tiny model folder


def is_tiny(path):
    return os.path.isfile(os.path.join(os.fspath(path), TINY_MARK))


def build_tiny_videoscore(out_dir, seed=0, image_size=32, image_seq_len=4, hidden_size=56):
    """Write a tiny random VideoScore checkpoint (model, processor, tokenizer) into out_dir, with
    the real layout, so VideoScorer.from_pretrained(out_dir) takes the same path as the real one."""
    from transformers import Idefics2Config, Idefics2ImageProcessor, Idefics2Processor

    image_processor = Idefics2ImageProcessor(do_image_splitting=False, size={
        "longest_edge": image_size, "shortest_edge": image_size // 2})
    # The processor adds <fake_token_around_image>, <image> and <end_of_utterance> to the
    # tokenizer, so the vocabulary size is read after building it.
    processor = Idefics2Processor(image_processor, _tiny_bpe_tokenizer(), image_seq_len=image_seq_len)
    tokenizer = processor.tokenizer
    # At the default init std (0.02) a model this small barely sees its frames, so a wrong frame
    # choice would go unnoticed in tests; 0.2 makes the scores depend on the pixels.
    shared = dict(hidden_size=hidden_size, initializer_range=0.2)
    config = Idefics2Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, **shared),
        vision_config=dict(intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8, **shared),
        # Idefics2 requires: latents == image_seq_len, perceiver width == text width, kv heads <= heads.
        perceiver_config=dict(rms_norm_eps=1e-5, resampler_n_latents=image_seq_len, resampler_depth=1,
                              resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1, **shared),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), num_labels=len(ASPECTS),
        problem_type="regression", initializer_range=0.2)
    torch.manual_seed(seed)
    model = Idefics2ForSequenceClassification(config)
    tmp = tmp_name(out_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    # Released checkpoints predate transformers 5 and keep the image processor in its own file
    # beside a two-key processor_config.json: write that layout so loading takes the same path.
    image_processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "processor_config.json"), "w") as f:
        json.dump({"image_seq_len": image_seq_len, "processor_class": "Idefics2Processor"}, f, indent=2)
    with open(os.path.join(tmp, TINY_MARK), "w") as f:  # so no table calls it VideoScore
        json.dump({"random": True, "built_by": "build_tiny"}, f)
    os.replace(tmp, out_dir)
    return str(out_dir)


def hub(args, revision=True):
    """from_pretrained's hub arguments of a config: its cache_dir everywhere; its revision only for
    the base model, since a revision names a commit of one repository. Local folders ignore both."""
    kwargs = {"cache_dir": getattr(args, "cache_dir", None)}
    if revision and getattr(args, "revision", None):
        kwargs["revision"] = args.revision
    return kwargs


def is_local_path(name):
    """Whether a model name can only be a local path: it exists, or is written as one (absolute,
    ./ ../ ~, or more than one '/'); hub ids are 'namespace/name' or 'name'."""
    name = os.fspath(name)
    return os.path.exists(name) or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def require_model(name, files, where, what, cache_dir=None, revision=None, large=()):
    """Check that a model is there before any work starts: a local folder with `files`, or a hub id
    whose files are cached or downloadable. One ConfigError line says what is wrong and how to fix
    it (offline clusters meet this on their first run). Files in `large` are only located, not fetched."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    name = os.fspath(name)
    if os.path.isdir(name):
        missing = [f for f in files if not os.path.isfile(os.path.join(name, f))]
        if missing:
            raise ConfigError(f"{where}: {os.path.join(name, missing[0])} is missing; expected {what}")
        return
    if is_local_path(name):
        raise ConfigError(f"{where}: {name}: no such folder; expected {what}")
    for f in files:
        try:
            hf_hub_download(name, f, cache_dir=cache_dir, revision=revision, dry_run=f in large)
        except LocalEntryNotFoundError:
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
            raise ConfigError(f"{where}: {name} is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
                              f"and {why}; fetch it with `hf download {name}` where there is network (then copy the "
                              f"cache here), or set {where} to a local folder") from None
        except GatedRepoError:
            raise ConfigError(f"{where}: {name} is gated on the hub; accept its terms on huggingface.co and run "
                              f"`hf auth login`") from None
        except RepositoryNotFoundError:
            raise ConfigError(f"{where}: {name} is neither a local folder nor a model on the hub (a typo? a private "
                              f"model needs `hf auth login`); expected {what}") from None
        except RevisionNotFoundError:
            raise ConfigError(f"{where}: {name} has no revision {revision!r} on the hub") from None
        except EntryNotFoundError:
            raise ConfigError(f"{where}: {name} has no file {f} on the hub; expected {what}") from None


def check_models(args):
    """Every model the config names is there (or, with build_tiny, will be built at a local path)."""
    model_files = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json",
                   "scheduler/scheduler_config.json"]
    hubs = {"cache_dir": args.cache_dir}
    if args.backend == "videocrafter2":
        base = args.pretrained_model_name_or_path
        needed = [("pretrained_model_name_or_path", base, [], "", {})] if args.build_tiny else []
        if not args.build_tiny and not os.path.exists(os.path.join(base, "videocrafter2.json")):
            if os.path.exists(base):
                raise ConfigError(f"model.pretrained_model_name_or_path: {base} exists but holds no videocrafter2.json; "
                                  f"expected a folder written by `python videocrafter2.py convert` (or a new path)")
            import videocrafter2

            videocrafter2.check_sources(args.checkpoint, videocrafter2.TOKENIZER, args.cache_dir, args.revision,
                                        where="model.checkpoint")
    else:
        needed = [("pretrained_model_name_or_path", args.pretrained_model_name_or_path, model_files,
                   "an SD1.5-layout folder (unet, vae, text_encoder, tokenizer, scheduler)", {"revision": args.revision}),
                  ("motion_adapter", args.motion_adapter, ["config.json"], "a diffusers MotionAdapter folder", {})]
    reward = getattr(args, "reward", None)  # train_redpo.py scores nothing
    if "videoscore" in (reward, args.ensemble_with if reward == "ensemble" else None):
        needed.append(("reward_model", args.reward_model, ["config.json"],
                       "a VideoScore checkpoint (TIGER-Lab/VideoScore-v1.1)", {}))
    for key, name, files, what, extra in needed:
        section = "reward" if key == "reward_model" else "model"
        where = f"{section}.{key}"
        if args.build_tiny and key in ("pretrained_model_name_or_path", "motion_adapter", "reward_model"):
            if not is_local_path(name):  # a tiny random model written at a hub id would later pass for the real one
                raise ConfigError(f"{where}: {name!r} reads as a hub id, and build_tiny only builds at local paths; "
                                  f"write it as ./{name} (or another local path), or set build_tiny: false")
            continue
        require_model(name, files, where, what, **hubs, **extra)


def check_prompts(reward, prompts, where):
    """Every prompt is one the reward can score, checked before anything is generated."""
    for p in prompts:
        why = getattr(reward, "unreadable", lambda p: None)(p)
        if why:
            raise ConfigError(f"{where}: prompt {p[:80]!r} {why}")


def load_reward(args, device=None):
    """The reward of the config (`reward: videoscore | world | features | ensemble`), VideoScore
    built tiny first when `build_tiny` is set; it must score every aspect of `aspects`."""
    reward = _build_reward(args, device)
    missing = [a for a in args.aspects if a not in reward.aspects]
    if missing:
        raise ConfigError(f"reward.aspects: reward {args.reward} scores only {', '.join(reward.aspects)}; got "
                          f"{', '.join(missing)}" + (" (use reward: ensemble for text_alignment)"
                                                     if args.reward == "features" else ""))
    return reward


def _build_reward(args, device=None):
    if args.reward in ("features", "ensemble"):
        import features

        if args.reward == "features":
            return features.FeatureReward()
        if args.ensemble_with not in ("videoscore", "world"):
            raise ConfigError(f"reward.ensemble_with: expected videoscore or world; got {args.ensemble_with!r}")
        learned = _build_reward(argparse.Namespace(**{**vars(args), "reward": args.ensemble_with}), device)
        return features.EnsembleReward(learned, args.ensemble_with)
    if args.reward == "world":
        from world import WorldReward

        return WorldReward()
    if args.reward != "videoscore":
        raise ConfigError(f"reward.reward: expected videoscore, world, features or ensemble; got {args.reward!r}")
    if args.build_tiny and not os.path.exists(os.path.join(args.reward_model, "config.json")):
        if not is_local_path(args.reward_model):
            raise ConfigError(f"reward.reward_model: {args.reward_model!r} reads as a hub id, and build_tiny only builds "
                              f"at local paths; write it as ./{args.reward_model}, or set build_tiny: false")
        build_tiny_videoscore(args.reward_model)
    dtype = weight_dtype(args.mixed_precision) if args.mixed_precision != "no" else None
    return VideoScorer.from_pretrained(args.reward_model, num_frames=args.reward_num_frames, device=device,
                                       dtype=dtype, batch_size=args.reward_batch_size, **hub(args, revision=False))


# -----------------------------------------------------------------------------
# AnimateDiff backend: SD1.5 + motion adapter; the prunable blocks are the 21 motion modules.


class RemovedBlock(nn.Module):
    """Stands in for a removed block. Every candidate block is residual (proj_out(...) + input), so
    the identity is exactly 'the block is gone'; deleting it from its ModuleList instead would
    break the zip(resnets, attentions, motion_modules) pairing inside the up blocks."""

    def forward(self, hidden_states, *args, **kwargs):
        # Transformers called with return_dict=False are indexed: [0] must be the hidden states.
        return (hidden_states,) if kwargs.get("return_dict", True) is False else hidden_states


def _motion_module_names(unet):
    """Every prunable block's path, in forward order (down, mid, up), removed or not: AnimateDiff's
    motion modules, or VideoCrafter2's candidates (videocrafter2.prunable_blocks)."""
    if is_vc2(unet):
        import videocrafter2

        return videocrafter2.prunable_blocks(unet)

    def names(prefix, block):
        return [f"{prefix}.motion_modules.{j}" for j in range(len(getattr(block, "motion_modules", [])))]

    down = [n for i, b in enumerate(unet.down_blocks) for n in names(f"down_blocks.{i}", b)]
    up = [n for i, b in enumerate(unet.up_blocks) for n in names(f"up_blocks.{i}", b)]
    return down + names("mid_block", unet.mid_block) + up


def list_blocks(unet):
    """The prunable blocks still present, in forward order: [{"name", "params"}]."""
    blocks = []
    for name in _motion_module_names(unet):
        module = unet.get_submodule(name)
        if not isinstance(module, RemovedBlock):
            blocks.append({"name": name, "params": count_parameters(module)})
    return blocks


def removed_blocks(unet):
    return [n for n in _motion_module_names(unet) if isinstance(unet.get_submodule(n), RemovedBlock)]


def _check_block_names(unet, names, where="blocks"):
    valid = _motion_module_names(unet)
    for name in names:
        if name not in valid:
            raise ConfigError(f"{where}: unknown block '{name}'; valid blocks look like {valid[0]} ... {valid[-1]}")


def remove_blocks(unet, names, where="blocks"):
    """Replace the named motion modules with identities, in place. Returns the removed modules."""
    _check_block_names(unet, names, where)
    old = {}
    for name in names:
        old[name] = unet.get_submodule(name)
        _set_submodule(unet, name, RemovedBlock())
    return old


def _set_submodule(root, name, module):
    parent, _, child = name.rpartition(".")
    parent = root.get_submodule(parent)
    if child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def is_vc2(unet):
    # By name, so that common.py works in a project that has no videocrafter2.py beside it.
    return any(c.__name__ == "VideoCrafter2UNet" for c in type(unet).__mro__)


# VideoCrafter2's temporal layers (its UNet3D's names), which `trainable: motion_modules` trains there.
VC2_TEMPORAL = ("transformer_in.", ".temp_convs.", ".temp_attentions.")


def is_temporal(key):
    """A parameter name of the layers `trainable: motion_modules` trains: AnimateDiff's motion
    modules, or VideoCrafter2's temporal convolutions and transformers."""
    return ".motion_modules." in key or any(t in key or key.startswith(t) for t in VC2_TEMPORAL)


def frame_text(unet, text, num_frames):
    """Text embeddings (B, 77, D) as `unet` takes them: UNetMotionModel wants one copy per frame
    (B*F, 77, D), the pipeline's job; VC2's UNet3D repeats them itself."""
    return text if is_vc2(unet) else text.repeat_interleave(num_frames, dim=0)


@contextlib.contextmanager
def blocks_removed(unet, names):
    """Remove blocks for the duration of the block (the block scan in prune.py), then put them back."""
    old = remove_blocks(unet, names)
    try:
        yield unet
    finally:
        for name, module in old.items():
            _set_submodule(unet, name, module)


def checkpoint_motion_modules(unet):
    """Recompute each prunable block in the backward pass instead of keeping its activations.
    diffusers' gradient checkpointing leaves the motion modules out, and they are the layers trained;
    its UNet3D (VideoCrafter2) has none, and there the blocks cover most of the UNet."""
    from torch.utils.checkpoint import checkpoint

    for block in list_blocks(unet):
        module = unet.get_submodule(block["name"])
        # use_reentrant=False: the reentrant variant breaks under DDP and with frozen inputs.
        module.forward = lambda *a, _f=module.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def weight_dtype(mixed_precision):
    try:
        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    except KeyError:
        raise ConfigError(f"mixed_precision: expected no, fp16 or bf16; got {mixed_precision!r}") from None


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def motion_parameters(unet):
    """Parameters of the motion modules still present: the paper's AnimateDiff count (0.453B full)."""
    return sum(b["params"] for b in list_blocks(unet))


def denoise_inputs(unet, batch_size, num_frames, height, width, vae_scale_factor=8, device=None, dtype=None):
    """Random inputs of one UNet call: latents (B, C, F, h, w), a timestep, and text embeddings
    repeated per frame (B*F, 77, D): UNetMotionModel does not repeat them itself, the pipeline does."""
    h, w = height // vae_scale_factor, width // vae_scale_factor
    sample = torch.randn(batch_size, unet.config.in_channels, num_frames, h, w, device=device, dtype=dtype)
    text = torch.randn(batch_size, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    return sample, torch.tensor([500], device=device), frame_text(unet, text, num_frames)


def count_flops(unet, num_frames, height, width, batch_size=1, vae_scale_factor=8):
    """FLOPs of one UNet call (one denoising step, no guidance) for `batch_size` videos.

    Counted with torch.utils.flop_counter on a meta-device copy: no memory, no compute, any size,
    and attention counted as its matmuls (CPU's fused attention kernel has no FLOP formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}
    with torch.device("meta"):
        ghost = type(unet).from_config(config)
    remove_blocks(ghost, removed_blocks(unet))
    h, w = height // vae_scale_factor, width // vae_scale_factor
    with torch.device("meta"):
        sample = torch.empty(batch_size, unet.config.in_channels, num_frames, h, w)
        text = frame_text(unet, torch.empty(batch_size, 77, unet.config.cross_attention_dim), num_frames)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ghost(sample, torch.tensor([500], device="meta"), text)
    return counter.get_total_flops()


def _same_model(a, b):
    """Hub ids compare as written; local folders by absolute path."""
    norm = lambda p: os.path.abspath(p) if os.path.exists(p) else p  # noqa: E731
    return norm(str(a)) == norm(str(b))


def load_unet(args, student=None, dtype=None):
    """The UNet of `args`: AnimateDiff's UNetMotionModel (SD1.5 UNet + motion adapter) or
    VideoCrafter2's (converted from the official checkpoint on first use); with `student`, a
    folder written by `save_student`, its blocks removed and its weights loaded."""
    meta = None
    if student is not None:
        meta = read_student_meta(student)
        for key in ("pretrained_model_name_or_path", "motion_adapter"):
            if not _same_model(meta[key], getattr(args, key)):
                raise ConfigError(f"{student}/student.json: {key} is {meta[key]!r} but the config's is "
                                  f"{getattr(args, key)!r}; expected a student of the configured base model")
    if args.backend == "videocrafter2":
        import videocrafter2

        base = args.pretrained_model_name_or_path
        if args.build_tiny:
            videocrafter2.build_tiny(base)
        elif not os.path.exists(os.path.join(base, "videocrafter2.json")):
            videocrafter2.convert(args.checkpoint, base, tokenizer=videocrafter2.TOKENIZER, **hub(args))
        unet = videocrafter2.VideoCrafter2UNet.from_pretrained(base, subfolder="unet", torch_dtype=dtype)
    else:
        from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

        if args.build_tiny:
            build_tiny_animatediff(args.pretrained_model_name_or_path, args.motion_adapter)
        unet2d = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet",
                                                      torch_dtype=dtype, **hub(args))
        adapter = MotionAdapter.from_pretrained(args.motion_adapter, torch_dtype=dtype, **hub(args, revision=False))
        with _quiet("diffusers.models.modeling_utils"):  # from_unet2d's no-op cast warns too
            unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    if meta is not None:
        remove_blocks(unet, meta["removed_blocks"], f"{student}/student.json: removed_blocks")
        from safetensors.torch import load_file

        try:
            state = load_file(os.path.join(student, "student.safetensors"))
        except Exception as e:
            raise ConfigError(f"{student}/student.safetensors: cannot read ({str(e).splitlines()[0][:120]}); "
                              f"expected the safetensors file written with student.json") from None
        missing, unexpected = unet.load_state_dict(state, strict=False)
        expected = set(_student_state(unet, meta["weights"]))
        if unexpected or expected & set(missing):
            raise ConfigError(f"{student}/student.safetensors: does not match student.json "
                              f"({len(unexpected)} unexpected, {len(expected & set(missing))} missing tensors)")
    return unet


@contextlib.contextmanager
def _quiet(logger_name):
    import logging

    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _student_state(unet, weights):
    state = unet.state_dict()
    if weights == "motion_modules":
        state = {k: v for k, v in state.items() if is_temporal(k)}
    return state


def read_student_meta(student):
    path = os.path.join(student, "student.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except OSError:
        raise ConfigError(f"{path}: missing; expected a student folder written by train_redpo.py or prune.py") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    need = ("backend", "pretrained_model_name_or_path", "motion_adapter", "removed_blocks", "weights")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise ConfigError(f"{path}: expected a JSON object with keys {', '.join(need)}")
    if not isinstance(meta["removed_blocks"], list) or not all(isinstance(b, str) for b in meta["removed_blocks"]):
        raise ConfigError(f"{path}: 'removed_blocks' is {meta['removed_blocks']!r}; expected a list of block names")
    if meta["weights"] not in ("motion_modules", "unet"):
        raise ConfigError(f"{path}: 'weights' is {meta['weights']!r}; expected motion_modules or unet")
    return meta


def save_student(unet, out_dir, args, weights="motion_modules", extra=None, state=None):
    """Save a student: `student.safetensors` (the motion modules, or the whole UNet with
    weights="unet") and `student.json` naming the base model and the removed blocks. The JSON is
    written last, so a folder with it is complete."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    # `state`: the full state dict where `unet` holds only a shard of it (FSDP's get_state_dict)
    kept = _student_state(unet, weights)
    state = {k: v.detach().contiguous().cpu() for k, v in (state or kept).items() if k in kept}
    with atomic_path(os.path.join(out_dir, "student.safetensors")) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    meta = {
        "backend": args.backend,
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "motion_adapter": args.motion_adapter,
        "removed_blocks": removed_blocks(unet),
        "weights": weights,
        "motion_parameters": motion_parameters(unet),
        "unet_parameters": count_parameters(unet),
        **(extra or {}),
    }
    atomic_write_json(os.path.join(out_dir, "student.json"), meta)


def load_pipeline(args, unet, device=None, dtype=None):
    """An AnimateDiffPipeline around `unet`, with the base model's VAE, text encoder and tokenizer
    and AnimateDiff's DDIM settings (linear betas, no sample clipping); for VideoCrafter2, its own
    pipeline (VC2's sampler) with the same call and `decode_latents`."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler

    base = args.pretrained_model_name_or_path
    if args.backend not in ("animatediff", "world", "videocrafter2"):
        raise ConfigError(f"model.backend: expected animatediff, world or videocrafter2; got {args.backend!r}")
    if args.backend == "videocrafter2":
        import videocrafter2

        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype)  # converted on first use
        pipe = videocrafter2.VideoCrafter2Pipeline(vae, *load_text_encoder(args, dtype=dtype), unet,
                                                   videocrafter2.scheduler_of())
        return _placed(pipe, device, dtype)
    vae_class = AutoencoderKL
    if args.backend == "world":
        from world import PixelVAE as vae_class
    text_encoder, tokenizer = load_text_encoder(args, dtype=dtype)
    pipe = AnimateDiffPipeline(
        vae=vae_class.from_pretrained(base, subfolder="vae", torch_dtype=dtype, **hub(args)),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=None,
        scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler", beta_schedule="linear", clip_sample=False,
                                                timestep_spacing="linspace", steps_offset=1, **hub(args)),
    )
    return _placed(pipe, device, dtype)


def _placed(pipe, device, dtype):
    pipe.set_progress_bar_config(disable=True)
    with _quiet("diffusers.models.modeling_utils"):  # diffusers warns on every cast, even a no-op one
        return pipe.to(device=device, dtype=dtype)


def with_unet(pipe, unet):
    """The same pipeline (shared VAE, text encoder, scheduler config) around another UNet."""
    other = type(pipe)(**{**pipe.components, "unet": unet})
    other.set_progress_bar_config(disable=True)
    return other


def load_text_encoder(args, dtype=None):
    from transformers import AutoTokenizer, CLIPTextModel

    base = args.pretrained_model_name_or_path
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype, **hub(args))
    return text_encoder.eval().requires_grad_(False), AutoTokenizer.from_pretrained(base, subfolder="tokenizer", **hub(args))


def encode_prompts(text_encoder, tokenizer, prompts, device):
    """CLIP's last hidden state over the padded tokens (B, 77, D for SD), as the pipeline conditions on."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def noise_scheduler(args):
    """The training noise schedule: AnimateDiff's linear betas, the same as the sampler's; VC2's
    scaled-linear betas with its latent scaling."""
    from diffusers import DDPMScheduler

    if args.backend == "videocrafter2":
        import videocrafter2

        return videocrafter2.training_scheduler()
    return DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler",
                                         beta_schedule="linear", clip_sample=False, **hub(args))


def diffusion_target(scheduler, latents, noise, timesteps):
    """What the UNet is trained to predict, by the scheduler's prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"scheduler prediction_type {kind!r}: expected epsilon, v_prediction or sample")


@torch.no_grad()
def generate(pipe, prompts, seeds, args, return_latents=False):
    """Generate one video per (prompt, seed): uint8 frames (B, F, H, W, 3), and with
    `return_latents` the scaled VAE latents (B, C, F, h, w) the frames were decoded from."""
    device = pipe._execution_device
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = pipe(prompt=list(prompts), num_frames=args.num_frames, height=args.height, width=args.width,
                   num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                   generator=generators, output_type="latent").frames
    video = pipe.decode_latents(latents.to(device))
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, C, F, H, W) -> (B, F, H, W, C)
    return (frames, latents.float().cpu()) if return_latents else frames


# -----------------------------------------------------------------------------
# Tiny offline models: the real classes and folder layouts at toy size, random weights, built
# from configs and loaded back through the same from_pretrained calls as real checkpoints.


def _tiny_clip_tokenizer():
    """A CLIPTokenizer over CLIP's byte-level alphabet, with and without the end-of-word mark, and
    no merges: every word is spelled out character by character (514 tokens)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build_tiny_animatediff(base_dir, adapter_dir, seed=0):
    """Write a tiny SD1.5-layout folder and a tiny motion adapter folder, unless both exist.

    UNet (32, 64) channels with 2 layers per block, so 11 motion modules (4 down, 1 mid, 6 up);
    a 4-level VAE (scale factor 8, like SD's); a 2-layer CLIP text encoder."""
    from diffusers import (AutoencoderKL, DDIMScheduler, MotionAdapter, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    if os.path.exists(os.path.join(base_dir, "model_index.json")) and \
            os.path.exists(os.path.join(adapter_dir, "config.json")):
        return
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_mid_block_layers_per_block=1,
                            motion_num_attention_heads=2, motion_norm_num_groups=8, motion_max_seq_length=32)
    import shutil

    tmp = tmp_name(base_dir)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_tiny_clip_tokenizer(), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp)
    adapter_tmp = tmp_name(adapter_dir)
    adapter.save_pretrained(adapter_tmp)
    for src, dst in ((tmp, base_dir), (adapter_tmp, adapter_dir)):
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)


# -----------------------------------------------------------------------------
# Stage plumbing shared by the four scripts: prompts, resumable sharded work, skip when done.


def read_prompts(path):
    """Prompts from a text file (one a line), JSONL ({"prompt": ...} a line) or CSV with a
    `prompt` column (VidProM's export has one)."""
    import csv

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read prompts ({getattr(e, 'strerror', None) or e})") from None
    if str(path).endswith(".jsonl"):
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(row["prompt"] if isinstance(row["prompt"], str) else None)
            except (json.JSONDecodeError, KeyError, TypeError):
                prompts.append(None)
            if prompts[-1] is None:
                raise ConfigError(f"{path}:{i}: expected a JSON object with a 'prompt' string")
    elif str(path).endswith(".csv"):
        reader = csv.DictReader(text.splitlines())
        if "prompt" not in (reader.fieldnames or []):
            raise ConfigError(f"{path}: expected a CSV header with a 'prompt' column; got {reader.fieldnames}")
        prompts = [row["prompt"] for row in reader]
    else:
        prompts = text.splitlines()
    prompts = [" ".join(p.split()) for p in prompts if p and p.strip()]
    if not prompts:
        raise ConfigError(f"{path}: no prompts; expected one prompt a line, or JSONL/CSV with a 'prompt' field")
    return prompts


# Keys that change how a run goes, not what it makes: a rerun differing only in them resumes.
RUN_ONLY_KEYS = {"output_dir", "resume_from_checkpoint", "report_to", "logging_steps", "checkpointing_steps",
                 "validation_steps", "validation_prompts", "num_validation_videos",
                 "checkpoints_total_limit", "dataloader_num_workers", "generation_batch_size", "reward_batch_size"}


def _what_it_makes(config, ignore=()):
    skip = RUN_ONLY_KEYS | set(ignore)
    return {s: {k: v for k, v in body.items() if k not in skip} for s, body in config.items()}


def _saved_config(output_dir):
    try:
        with open(os.path.join(output_dir, "config.yaml")) as f:
            saved = yaml.safe_load(f)
        return saved if isinstance(saved, dict) and all(isinstance(v, dict) for v in saved.values()) else None
    except (OSError, yaml.YAMLError):
        return None


def config_matches(output_dir, args, ignore=()):
    """True when `output_dir/config.yaml` was written for a config that makes the same artifacts
    (keys in `ignore` aside)."""
    saved = _saved_config(output_dir)
    return saved is not None and _what_it_makes(saved, ignore) == _what_it_makes(config_dict(args), ignore)


def stage_done(output_dir, args, final_artifact):
    """True when `final_artifact` exists and was made with this config: the rerun skips. Reads only."""
    return config_matches(output_dir, args) and os.path.exists(os.path.join(output_dir, final_artifact))


def _config_changes(saved, args, ignore=()):
    old, new = _what_it_makes(saved or {}, ignore), _what_it_makes(config_dict(args), ignore)
    keys = [f"{s}.{k}" for s in new for k in new[s] if (old.get(s) or {}).get(k, "<unset>") != new[s][k]]
    return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "") if keys else "unknown config"


_LOCKS = {}  # output folder -> open lock file: the lock lives as long as the process


def lock_folder(folder):
    """One run per output folder: an exclusive lock on `folder/.lock`, released when the process
    ends, however it ends. A second run gets a ConfigError naming the holder."""
    import fcntl
    import socket
    import time

    folder = os.path.abspath(folder)
    if folder in _LOCKS:
        return
    f = open(os.path.join(folder, ".lock"), "a+")
    for attempt in range(50):  # a few seconds, in which a just-killed holder finishes exiting
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            time.sleep(0.1)
    else:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"{folder}: in use by {holder}; wait for it to finish or stop it, "
                          f"or use another --output_dir") from None
    f.seek(0), f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]})\n")
    f.flush()
    _LOCKS[folder] = f


def _remove_temporaries(folder):
    """What killed runs left: files named by tmp_name (.x.tmp<pid>.ext) and folders named *.tmp.
    Under the folder's lock no other process writes here, so every one of them is stale."""
    import re
    import shutil

    stale = re.compile(r"^\..+\.tmp\d+(\.\w+)?$")
    for root, dirs, files in os.walk(folder):
        if root == folder and "replaced" in dirs:
            dirs.remove("replaced")
        for d in [d for d in dirs if d.endswith(".tmp")]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            dirs.remove(d)
        for name in files:
            if stale.match(name):
                os.remove(os.path.join(root, name))


def start_stage(accelerator, output_dir, args, results, work=(), work_ignores=(), final=None):
    """Take `output_dir` for this run, once its inputs are checked: lock it, remove what killed runs
    left half-written, and write the resolved config beside the outputs.

    Results (glob patterns of what the stage writes) made under another config are moved aside to
    replaced/<time>/, never deleted, and said so. Where the configs differ only in `work_ignores`,
    the per-item `work` is kept (it is still valid) and only `final`, the file that marks the stage
    done, is removed. Every process calls this; the main one acts, and its error is everyone's.
    Returns the replaced/<time> folder results were moved to, or None."""
    import glob
    import shutil
    import time

    from accelerate.utils import broadcast_object_list

    error = aside = None
    if accelerator.is_main_process:
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock_folder(output_dir)
            _remove_temporaries(output_dir)
            if not config_matches(output_dir, args):
                keep = set(work) if config_matches(output_dir, args, work_ignores) else set()
                found = [p for pattern in results if pattern not in keep
                         for p in glob.glob(os.path.join(glob.escape(output_dir), pattern))]
                if keep:
                    for path in found:
                        if os.path.basename(path) == final:
                            os.remove(path)
                elif found:
                    saved = _saved_config(output_dir)
                    aside = os.path.join(output_dir, "replaced", time.strftime("%Y%m%d-%H%M%S"))
                    while os.path.exists(aside):
                        aside += "+"
                    config = os.path.join(output_dir, "config.yaml")
                    for path in found + [config] * os.path.exists(config):
                        dest = os.path.join(aside, os.path.relpath(path, output_dir))
                        os.makedirs(os.path.dirname(dest), exist_ok=True)
                        shutil.move(path, dest)
                    print(f"{output_dir}: made with another config ({_config_changes(saved, args)}); "
                          f"its results are kept in {aside}", file=sys.stderr)
            save_config(args, os.path.join(output_dir, "config.yaml"))
        except ConfigError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        error, aside = broadcast_object_list([error, aside])
    if error:
        raise ConfigError(error)
    return aside


def run_items(items, work, out_path, accelerator, desc, batch_size=1):
    """Resumable sharded work: this process takes items[rank::world] (dicts with a unique "id") in
    chunks of `batch_size`, skips chunks whose result files all exist, and calls `work(chunk) ->
    [result]` on the others. Each result lands in `out_path(id)` as JSON, atomically: the files
    are the gather. The chunks are the same however often the run was killed, so a resumed run
    batches (and so computes, to the last bit) exactly what an uninterrupted one does. Returns
    every item's result, on every process, once all processes are done."""
    from tqdm.auto import tqdm

    mine = items[accelerator.process_index::accelerator.num_processes]
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    todo = [c for c in chunks if not all(os.path.exists(out_path(it["id"])) for it in c)]
    done = sum(os.path.exists(out_path(it["id"])) for it in items)
    accelerator.print(f"{desc}: {len(items)} items on {accelerator.num_processes} process(es), {done} already done")
    bar = tqdm(total=len(mine), initial=len(mine) - sum(map(len, todo)), desc=desc,
               disable=not accelerator.is_main_process)
    try:
        for chunk in todo:
            for it, result in zip(chunk, work(chunk), strict=True):
                atomic_write_json(out_path(it["id"]), result)
            bar.update(len(chunk))
    finally:  # before any error's message, so that it is the last line
        bar.close()
    accelerator.wait_for_everyone()
    return [json.loads(Path(out_path(it["id"])).read_text()) for it in items]


MANIFEST_KEYS = ("id", "prompt", "seed", "winner", "loser", "latents", "winner_scores", "loser_scores")


def _inside(rel):
    """A manifest's file path is relative and stays in the manifest's folder."""
    return isinstance(rel, str) and rel and not os.path.isabs(rel) and \
        not os.path.normpath(rel).startswith(os.pardir) and os.path.normpath(rel) != "."


def read_manifest(path):
    """The rows of a pair manifest (curate.py's pairs.jsonl), each checked for its fields and types;
    file paths must be relative to the manifest's folder and stay inside it."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read pair manifest ({getattr(e, 'strerror', None) or e})") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not all(k in row for k in MANIFEST_KEYS):
            raise ConfigError(f"{path}:{i}: expected a JSON object with {', '.join(MANIFEST_KEYS)}")
        numbers = lambda d: isinstance(d, dict) and all(isinstance(v, (int, float)) for v in d.values())  # noqa: E731
        bad = [k for k, ok in (("prompt", isinstance(row["prompt"], str) and row["prompt"].strip()),
                               ("seed", isinstance(row["seed"], int) and not isinstance(row["seed"], bool)),
                               ("winner_scores", numbers(row["winner_scores"])),
                               ("loser_scores", numbers(row["loser_scores"])))
               if not ok]
        if bad:
            raise ConfigError(f"{path}:{i}: '{bad[0]}' is {row[bad[0]]!r}; expected "
                              + {"prompt": "a prompt string", "seed": "an integer seed"}.get(bad[0], "a dict of scores"))
        for key in ("winner", "loser", "latents"):
            if not _inside(row[key]):
                raise ConfigError(f"{path}:{i}: '{key}' is {row[key]!r}; expected a path relative to the manifest's "
                                  f"folder and inside it (as curate.py writes)")
        rows.append(row)
    return rows
