"""VideoReward (VideoAlign, KwaiVGI/VideoReward) on plain transformers: Qwen2-VL-2B with a linear
head read at three special tokens, loaded from the checkpoint as released (`model_config.json`
beside `checkpoint-<step>/model.pth`, the un-merged LoRA model's state dict), with the official
inference's frame sampling (2 fps, an even count of at least 4), resize (28-pixel multiples between
100,352 and 200,704 pixels a frame), prompt and normalisation, so that neither the authors' package
nor remote code is needed. A tiny random one of the released layout: videoreward_tiny.py.

    VideoRewardScorer.from_pretrained("KwaiVGI/VideoReward").score(["a.mp4", frames_uint8], prompts)
"""

import glob
import json
import math
import os
import re
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import init_empty_weights
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel
from transformers.utils import cached_file

import common
from common import ConfigError

VIDEOREWARD_DEFAULT = "KwaiVGI/VideoReward"
BASE_DEFAULT = "Qwen/Qwen2-VL-2B-Instruct"
BASE_FILES = ["config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json"]  # no weights
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
# The paper's aspect each head scores. MQ (stability, naturalness, smoothness, and a low score for a
# static video) is nearest temporal_consistency; no head scores dynamic_degree or factual_consistency.
ASPECT_OF = {"VQ": "visual_quality", "MQ": "temporal_consistency", "TA": "text_alignment"}

# The official frame sampling and resize (vision_process.py of VideoAlign, after qwen-vl-utils).
FRAME_FACTOR, MIN_FRAMES, MAX_FRAMES = 2, 4, 768
PIXEL_FACTOR, MIN_PIXELS = 28, 128 * 28 * 28

# Verbatim from the official prompt_template.py (DETAILED_PROMPT_WITH_SPECIAL_TOKEN), trailing spaces
# included: the released checkpoint was trained on exactly this text.
PROMPT = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""


def chat_text(prompt):
    """The whole text the official inference tokenizes for one video: Qwen2-VL-Instruct's chat
    template with the video before the prompt, and the generation prompt after it."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|video_pad|><|vision_end|>" + PROMPT.format(text_prompt=prompt)
            + "<|im_end|>\n<|im_start|>assistant\n")


def num_frames(total, video_fps, fps=2.0):
    """How many frames are read: `fps` a second, an even number from 4 to 768, at most `total`."""
    low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    high = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
    n = round(min(max(total / video_fps * fps, low), high) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(f"a video of {total} frames is too short for VideoReward (at least {FRAME_FACTOR})")
    return n


def frame_indices(total, n):
    """Evenly spread, as the official reader picks them (float32 linspace, rounded half to even)."""
    return torch.linspace(0, total - 1, n).round().long().tolist()


def smart_resize(height, width, min_pixels=MIN_PIXELS, max_pixels=256 * 28 * 28, factor=PIXEL_FACTOR):
    """The frame size Qwen2-VL reads: multiples of `factor`, the pixel count within the bounds,
    the aspect ratio kept as nearly as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a {height}x{width} video is too elongated for VideoReward (aspect ratio over 200)")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def resize(frames, height, width):
    """uint8 (T, H, W, 3) to float (T, 3, height, width) of whole values 0..255: bicubic with
    antialiasing, rounded back to bytes, as torchvision resizes uint8 frames."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(0, 255).round_()


def patchify(frames, mean, std, patch_size=14, temporal_patch_size=2, merge_size=2):
    """Qwen2-VL's video input: (T, 3, H, W) of 0..255 to `pixel_values_videos` (one row a
    temporal_patch_size x patch_size^2 patch, in the merger's order) and `video_grid_thw`."""
    x = (frames / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if len(x) % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(temporal_patch_size - len(x) % temporal_patch_size, -1, -1, -1)])
    t, c, h, w = len(x) // temporal_patch_size, x.shape[1], x.shape[2] // patch_size, x.shape[3] // patch_size
    x = x.reshape(t, temporal_patch_size, c, h // merge_size, merge_size, patch_size, w // merge_size, merge_size,
                  patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, c * temporal_patch_size * patch_size ** 2)
    return x, torch.tensor([t, h, w])


def merge_lora(state, scaling):
    """A PEFT LoRA model's state dict as the plain model's: each `<m>.base_layer.weight` plus
    scaling * lora_B @ lora_A, in float32, under `<m>.weight`."""
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        merged[key.replace(".base_layer.", ".")] = value
    for key in [k for k in state if ".lora_A." in k]:
        module, adapter = key.split(".lora_A.")
        base, b = merged.get(f"{module}.weight"), state.get(f"{module}.lora_B.{adapter}")
        if base is None or b is None:
            continue  # the check of the model's keys names what is missing
        a, b = state[key].float(), b.float()
        merged[f"{module}.weight"] = base.float() + scaling * (b @ a)  # rounded once, to the dtype it is loaded in
    return merged


def to_transformers(state):
    """The released keys (the 4.45 layout under PEFT's `base_model.model.`) as Qwen2VLModel's plus
    `rm_head.weight` (VideoRewardModel's names); the unused `lm_head` is dropped."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        if key.startswith(("model.language_model.", "model.visual.")):  # saved by transformers 4.52 or later
            out[key] = value
        elif key.startswith("model."):
            out["model.language_model." + key[len("model."):]] = value
        elif key.startswith("visual."):
            out["model." + key] = value
        elif key.startswith("rm_head."):
            out[key] = value
    return out


class VideoRewardModel(nn.Module):
    """Qwen2VLModel plus the head: hidden states after the last norm, read at the reward tokens.
    Positions are 0..L-1 on every rotary section, video tokens included, as the official forward
    (which passes none) computes them; Qwen2-VL's own 3-D video positions would change the scores."""

    def __init__(self, config, output_dim=1):
        super().__init__()
        self.config = config
        self.model = Qwen2VLModel(config)
        self.rm_head = nn.Linear(config.text_config.hidden_size, output_dim, bias=False)

    def forward(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw, reward_token_ids):
        embeds = self.model.get_input_embeddings()(input_ids)
        video = self.model.get_video_features(pixel_values_videos, video_grid_thw).pooler_output
        mask = (input_ids == self.config.video_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, torch.cat(video).to(embeds.dtype))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1)
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False,
                                           position_ids=positions.expand(3, input_ids.shape[0], -1)).last_hidden_state
        logits = self.rm_head(hidden)
        at = torch.isin(input_ids, torch.tensor(reward_token_ids, device=input_ids.device))
        logits = logits[at].view(input_ids.shape[0], len(reward_token_ids), -1)
        # one output: the same row read at each token; one per token: token k's own output
        return logits[..., 0] if logits.shape[-1] == 1 else logits.diagonal(dim1=1, dim2=2)


def read_config(folder):
    """model_config.json of a VideoReward folder, with the fields scoring needs checked."""
    path = os.path.join(folder, "model_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        data, model, lora = config["data_config"], config["model_config"], config["peft_lora_config"]
        needed = {"data_config": (data, ["fps", "max_frame_pixels", "prompt_template_type", "eval_dim"]),
                  "model_config": (model, ["model_name_or_path", "output_dim", "reward_token", "use_special_tokens"]),
                  "peft_lora_config": (lora, ["lora_enable", "lora_r", "lora_alpha"])}
        for section, (values, keys) in needed.items():
            missing = [k for k in keys if k not in values]
            if missing:
                raise ConfigError(f"{path}: {section} has no {missing[0]}; expected VideoReward's model_config.json")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e}); expected VideoReward's "
                          f"model_config.json") from None
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: no section {e}; expected VideoReward's model_config.json with data_config, "
                          f"model_config and peft_lora_config") from None
    what = {"prompt_template_type": (data["prompt_template_type"], "detailed_special"),
            "reward_token": (model["reward_token"], "special"), "use_special_tokens": (model["use_special_tokens"], True),
            "num_frames": (data.get("num_frames"), None), "sample_type": (data.get("sample_type", "uniform"), "uniform"),
            "eval_dim": (data["eval_dim"], list(ASPECT_OF))}
    for key, (got, want) in what.items():
        if got != want:
            raise ConfigError(f"{path}: {key} is {got!r}; only the released VideoReward's {want!r} is supported")
    if model["output_dim"] not in (1, len(ASPECT_OF)):
        raise ConfigError(f"{path}: output_dim is {model['output_dim']!r}; expected 1 or {len(ASPECT_OF)} (one output a "
                          f"reward token)")
    return config


def checkpoint_file(folder, step=None):
    """checkpoint-<step>/model.pth, the highest step unless one is given (as the official loader)."""
    steps = sorted((int(m.group(1)), d) for d in glob.glob(os.path.join(folder, "checkpoint-*"))
                   if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))))
    steps = [(s, d) for s, d in steps if step is None or s == step]
    if not steps:
        raise ConfigError(f"{folder}: no checkpoint-{step if step is not None else '<step>'} folder; expected "
                          f"VideoReward's layout (model_config.json beside checkpoint-<step>/model.pth)")
    path = os.path.join(steps[-1][1], "model.pth")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is missing: only the released layout (the whole model's state dict in "
                          f"model.pth) is supported, not an adapter alone")
    return path


def resolve(folder, name_or_path):
    """Where a model_config.json path points: beside the folder, as given, or the hub."""
    beside = os.path.join(folder, name_or_path)
    return beside if os.path.isdir(beside) else name_or_path


def base_of(folder, config):
    """The base Qwen2-VL the head was trained on (its config, tokenizer, image statistics only; the
    checkpoint holds every weight). Some releases name a path of the authors' cluster there."""
    name = resolve(folder, config["model_config"]["model_name_or_path"])
    if os.path.isabs(name) and not os.path.isdir(name):
        warnings.warn(f"{os.path.join(folder, 'model_config.json')}: model_name_or_path {name} is not here; "
                      f"reading the base model from {BASE_DEFAULT}")
        name = BASE_DEFAULT
    return name


def local_requirements(folder):
    """For stage.check_models, of a local VideoReward folder: the files it must hold (model_config.json
    and the model.pth loaded), and its base model's entry."""
    config = read_config(folder)
    base = dict(where=f"{os.path.join(folder, 'model_config.json')}: model_config.model_name_or_path",
                name=base_of(folder, config), files=BASE_FILES,
                what=f"the base Qwen2-VL of VideoReward ({BASE_DEFAULT})")
    return ["model_config.json", os.path.relpath(checkpoint_file(folder), folder)], [base]


def load_state(path):
    """model.pth, read without running pickled code and without reading it all into memory."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConfigError(f"{path}: cannot read ({str(e).splitlines()[0][:160]}); expected VideoReward's "
                          f"model.pth (a state dict)") from None
    return state


class VideoRewardScorer:
    """`VideoRewardScorer.from_pretrained(...).score(videos, prompts)`: one dict a video of the three
    normalised outputs (the release's validation mean and std), keyed by the paper's aspects."""

    aspects = tuple(ASPECT_OF.values())

    def __init__(self, model, tokenizer, data_config, image_config, norm=None, video_fps=8, batch_size=1):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, int(batch_size)
        self.fps, self.max_pixels = float(data_config["fps"]), int(data_config["max_frame_pixels"])
        self.image_config, self.norm, self.video_fps = image_config, norm, float(video_fps)
        self.reward_token_ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        # Right padding: positions ignore the mask, so every real token keeps its alone-scored position.
        tokenizer.padding_side = "right"

    @classmethod
    def from_pretrained(cls, name_or_path=VIDEOREWARD_DEFAULT, device=None, dtype=None, batch_size=1, video_fps=8,
                        cache_dir=None, step=None):
        folder = download(name_or_path, cache_dir)
        config = read_config(folder)
        base = base_of(folder, config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

        try:  # a hub id's base is known only now, after its model_config.json came down
            tokenizer = AutoTokenizer.from_pretrained(base, cache_dir=cache_dir)
            with open(cached_file(base, "preprocessor_config.json", cache_dir=cache_dir)) as f:
                image_config = json.load(f)
            model_config = Qwen2VLConfig.from_pretrained(base, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"{os.path.join(folder, 'model_config.json')}: model_config.model_name_or_path {base}: "
                              f"cannot read its config, tokenizer and preprocessor ({reason}); expected "
                              f"{BASE_DEFAULT} or a local copy of it") from None
        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        path = checkpoint_file(folder, step)
        state = to_transformers(load_state(path))
        lora = config["peft_lora_config"]
        unpaired = {k.replace(".lora_A.", ".lora_B.") for k in state if ".lora_A." in k} ^ \
            {k for k in state if ".lora_B." in k}
        if unpaired:
            raise ConfigError(f"{path}: {min(unpaired)} has no pair; expected VideoAlign's LoRA model (lora_A and lora_B "
                              f"of each adapted layer)")
        if lora["lora_enable"]:
            r = lora["lora_r"]
            state = merge_lora(state, lora["lora_alpha"] / (math.sqrt(r) if lora.get("use_rslora") else r))
        embed = state.get("model.language_model.embed_tokens.weight")
        if embed is None or "rm_head.weight" not in state:
            raise ConfigError(f"{path}: no {'rm_head' if embed is not None else 'model.embed_tokens'} weight; expected "
                              f"VideoReward's model.pth (base_model.model.* keys of the LoRA model with its rm_head)")
        if len(embed) != len(tokenizer):
            raise ConfigError(f"{path}: embeddings of {len(embed)} tokens, but {base}'s tokenizer with the reward "
                              f"tokens has {len(tokenizer)}; expected the base model it was trained on")
        model_config.text_config.vocab_size = model_config.vocab_size = len(embed)
        with init_empty_weights(include_buffers=False):  # the weights come from the checkpoint, the buffers not
            model = VideoRewardModel(model_config, output_dim=state["rm_head.weight"].shape[0])
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or bad:
            what = f"no {missing[0]}" if missing else f"{bad[0]} of shape {tuple(state[bad[0]].shape)}, expected " \
                                                      f"{tuple(expected[bad[0]].shape)}"
            raise ConfigError(f"{path}: {what} ({len(missing)} keys missing, {len(bad)} of another shape); expected "
                              f"the LoRA model of {base} saved by VideoAlign")
        model.load_state_dict({k: state[k].to(dtype) for k in expected}, assign=True)
        model.to(device).eval().requires_grad_(False)
        norm = config.get("inference_config")
        return cls(model, tokenizer, config["data_config"], image_config, norm, video_fps, batch_size)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @staticmethod
    def on_1_to_4(score):
        """A normalised score on VideoScore's and the features' 1-4 scale, for an ensemble with them:
        the validation mean at the middle (2.5), two standard deviations at either end."""
        return 2.5 + 0.75 * score

    def unreadable(self, prompt):
        """Why VideoReward cannot read `prompt` (None: it can): its reward tokens or video markup."""
        bad = next((t for t in REWARD_TOKENS + ("<|video_pad|>", "<|vision_start|>") if t in prompt), None)
        return bad and f"contains {bad!r}, which VideoReward reads as its own token; remove it"

    def frames(self, video):
        """The frames the official inference reads from a video (an MP4 path, or uint8 frames at the
        config's fps), resized, as (T, 3, H, W) floats of whole values."""
        frames = common.video_frames(video, min_frames=FRAME_FACTOR)
        video_fps = common.video_fps(video) if isinstance(video, (str, os.PathLike)) else self.video_fps
        picked = frames[frame_indices(len(frames), num_frames(len(frames), video_fps, self.fps))]
        return resize(picked, *smart_resize(*frames.shape[1:3], max_pixels=self.max_pixels))

    def score(self, videos, prompts):
        return common.in_batches(self._score_batch, videos, prompts, self.batch_size)

    @torch.inference_mode()
    def _score_batch(self, videos, prompts):
        c = self.image_config
        pixels, grids = zip(*[patchify(self.frames(v), c["image_mean"], c["image_std"], c["patch_size"],
                                       c["temporal_patch_size"], c["merge_size"]) for v in videos])
        merge = c["merge_size"] ** 2
        texts = [chat_text(p).replace("<|video_pad|>", "<|video_pad|>" * int(g.prod() // merge))
                 for p, g in zip(prompts, grids)]
        inputs = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        logits = self.model(inputs["input_ids"], inputs["attention_mask"],
                            torch.cat(pixels).to(self.device, self.model.rm_head.weight.dtype),
                            torch.stack(grids).to(self.device), self.reward_token_ids).float().cpu()
        return [dict(zip(self.aspects, normalise(row.tolist(), self.norm))) for row in logits]


def normalise(values, norm):
    """The official `use_norm`: each head's output less its mean over the release's validation set,
    over its std (the raw outputs when the config gives none)."""
    if not norm:
        return values
    return [(v - norm[f"{h}_mean"]) / norm[f"{h}_std"] for v, h in zip(values, ASPECT_OF)]


def download(name_or_path, cache_dir=None):
    """A local VideoReward folder as it is; a hub id's model_config.json and every checkpoint's
    model.pth (the release has one; the highest step is loaded)."""
    if os.path.isdir(name_or_path):
        return os.fspath(name_or_path)
    from huggingface_hub import snapshot_download
    return snapshot_download(name_or_path, cache_dir=cache_dir, allow_patterns=["model_config.json",
                                                                              "checkpoint-*/model.pth"])


TINY_MARK = "vip_tiny.json"  # written into a tiny random one (videoreward_tiny.py), so no table calls it VideoReward


def is_tiny(path):
    return os.path.isfile(os.path.join(os.fspath(path), TINY_MARK))
