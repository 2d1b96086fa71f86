"""VideoScore (TIGER-Lab/VideoScore, VideoScore-v1.1) on plain transformers: Mantis' Idefics2 with a
5-output regression head, the released checkpoints as they are, the official prompt and frame
sampling, so that `mantis-vl` is not needed; and a tiny random VideoScore of the real layout for
tests and the CPU demo.

    VideoScorer.from_pretrained("TIGER-Lab/VideoScore-v1.1").score(["a.mp4", frames_uint8], prompts)
"""

import json
import os
from itertools import product

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import (AutoProcessor, Idefics2Config, Idefics2ImageProcessor, Idefics2Model, Idefics2PreTrainedModel,
                          Idefics2Processor, PreTrainedTokenizerFast)

import common
from common import ASPECTS


def sample_frames(frames, num_frames):
    """The frames the official script picks: np.arange(0, F, F / num_frames) as integers, float step
    and all (it picks one frame earlier than exact arithmetic for some lengths: 116 of 208 at 48
    frames, not 117); clips of at most num_frames are kept whole."""
    n = len(frames)
    if n <= num_frames:
        return frames
    return frames[np.arange(0, n, n / num_frames).astype(int)]


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
        return sample_frames(common.video_frames(video), self.num_frames)

    def score(self, videos, prompts):
        return common.in_batches(self._score_batch, videos, prompts, self.batch_size)

    @torch.inference_mode()
    def _score_batch(self, videos, prompts):
        clips = [self._clip(v) for v in videos]
        texts = [REGRESSION_QUERY_PROMPT.format(text_prompt=p) + "<image> " * len(c) for p, c in zip(prompts, clips)]
        images = [[Image.fromarray(f) for f in c] for c in clips]  # the processor takes PIL images only
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        logits = self.model(**inputs).float().cpu()
        return [dict(zip(ASPECTS, row.tolist())) for row in logits]


# -----------------------------------------------------------------------------
# A tiny VideoScore of the real layout, random, for tests and the CPU demo.

TINY_MARK = "vip_tiny.json"  # written into the folder, so that no table calls it VideoScore


def is_tiny(path):
    return os.path.isfile(os.path.join(os.fspath(path), TINY_MARK))


def _tiny_bpe_tokenizer(vocab_size=400):
    """A byte-level BPE tokenizer trained here, on the scoring prompt and a few hundred generated
    captions; byte-level so no text is out of vocabulary. BOS added like Idefics2's Mistral one."""
    subjects = ["a cat", "a dog", "two people", "a red car", "an old man", "a small bird", "the ocean", "a robot"]
    actions = ["walks", "runs", "jumps", "dances", "sleeps", "flies"]
    places = ["in the park", "on the beach", "at night", "under the rain", "in a city", "near a house"]
    lines = REGRESSION_QUERY_PROMPT.splitlines() + [" ".join(t) + "." for t in product(subjects, actions, places)]
    tok = Tokenizer(BPE(unk_token="<unk>"))
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


def build_tiny(out_dir, seed=0, image_size=32, image_seq_len=4, hidden_size=56):
    """Write a tiny random VideoScore checkpoint (model, processor, tokenizer) into out_dir, with
    the real layout, so VideoScorer.from_pretrained(out_dir) takes the same path as the real one."""
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
    tmp = common.tmp_name(out_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    # Released checkpoints predate transformers 5 and keep the image processor in its own file
    # beside a two-key processor_config.json: write that layout so loading takes the same path.
    image_processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "processor_config.json"), "w") as f:
        json.dump({"image_seq_len": image_seq_len, "processor_class": "Idefics2Processor"}, f, indent=2)
    with open(os.path.join(tmp, TINY_MARK), "w") as f:  # so no table calls it VideoScore
        json.dump({"random": True, "built_by": "videoscore.build_tiny"}, f)
    os.replace(tmp, out_dir)
    return str(out_dir)

