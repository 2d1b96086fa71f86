import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import ASPECTS, read_video  # noqa: E402
from videoscore import (REGRESSION_QUERY_PROMPT, Idefics2ForSequenceClassification, VideoScorer,  # noqa: E402
                        sample_frames)
from videoscore import build_tiny as build_tiny_videoscore  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_videoscore(str(tmp_path_factory.mktemp("videoscore") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def scorer(tiny):
    return VideoScorer.from_pretrained(tiny, batch_size=2)


def clip(num_frames, seed, height=24, width=32):
    """A moving gradient with noise: smooth enough to survive H.264, different in every frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    frames = [np.stack([(x * 8 + t * 9) % 256, (y * 10 + t * 5) % 256, (x + y) * 4 % 256], -1)
              + rng.integers(0, 40, (height, width, 3)) for t in range(num_frames)]
    return np.clip(frames, 0, 255).astype(np.uint8)


def reference_scores(scorer, frames, prompt):
    """One video alone, unpadded, read at the final token; sampling as the official script does."""
    n, k = len(frames), scorer.num_frames
    picked = frames[np.arange(0, n, n / k).astype(int)] if n > k else frames
    text = REGRESSION_QUERY_PROMPT.replace("{text_prompt}", prompt) + "<image> " * len(picked)
    inputs = scorer.processor(text=text, images=[Image.fromarray(f) for f in picked], return_tensors="pt")
    model = scorer.model
    with torch.no_grad():
        hidden = model.model(**inputs, use_cache=False).last_hidden_state[:, -1]
        return model.score(hidden)[0].tolist()


def test_prompt_is_the_official_text():
    assert REGRESSION_QUERY_PROMPT.startswith("\nSuppose you are an expert in judging")
    assert "the better the video performs in that sub-score, \nthe lowest 1.0 means Bad" in REGRESSION_QUERY_PROMPT
    assert REGRESSION_QUERY_PROMPT.endswith(
        'the text prompt is "{text_prompt}",\nall the frames of video are as follows:\n')
    assert REGRESSION_QUERY_PROMPT.format(text_prompt="x").count('"x"') == 1


def test_scores_match_direct_forward_and_batching(scorer, tmp_path):
    assert scorer.num_frames == 16  # no "v1.1" in the folder name
    path = str(tmp_path / "short.mp4")
    imageio.mimwrite(path, list(clip(10, 1)), fps=8, codec="libx264", macro_block_size=2)
    long_clip, exact_clip = clip(37, 2), clip(16, 3)
    videos = [long_clip, path, exact_clip]
    # "<unk>" is the pad token: a pooling that searched for the pad id would stop inside this prompt.
    prompts = ["a cat walks in the park", "a robot <unk> dances at night", "two people jump"]

    batched = scorer.score(videos, prompts)
    alone = [scorer.score([v], [p])[0] for v, p in zip(videos, prompts)]
    decoded = np.stack(imageio.mimread(path))
    expected = [reference_scores(scorer, f, p) for f, p in zip([long_clip, decoded, exact_clip], prompts)]

    for got, one, ref in zip(batched, alone, expected):
        assert list(got) == list(ASPECTS) and all(type(v) is float for v in got.values())
        np.testing.assert_allclose(list(got.values()), ref, atol=1e-4)
        np.testing.assert_allclose(list(got.values()), list(one.values()), atol=1e-4)
    # the tiny model must tell the videos apart, or the comparisons above prove little
    assert np.ptp([list(s.values()) for s in batched], axis=0).min() > 1e-2


def test_head_reads_last_real_token_on_either_padding_side(scorer):
    frames = [Image.fromarray(f) for f in clip(2, 6)]
    texts = ["a dog <image> <image> ", "a small bird flies on the beach at night <image> <image> "]
    tokenizer, logits = scorer.processor.tokenizer, {}
    try:
        for side in ("left", "right"):
            tokenizer.padding_side = side
            inputs = scorer.processor(text=texts, images=[frames, frames], padding=True, return_tensors="pt")
            assert inputs["attention_mask"].min() == 0
            with torch.no_grad():
                logits[side] = scorer.model(**inputs)
    finally:
        tokenizer.padding_side = "right"
    torch.testing.assert_close(logits["left"], logits["right"], atol=1e-4, rtol=0)


def test_checkpoint_loads_without_missing_keys(tiny):
    with open(os.path.join(tiny, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Idefics2ForSequenceClassification"]
    assert len(config["id2label"]) == len(ASPECTS)
    model, info = Idefics2ForSequenceClassification.from_pretrained(tiny, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with safe_open(os.path.join(tiny, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # Mantis' names: everything under `model.` plus the head
    assert {k for k in keys if not k.startswith("model.")} == {"score.weight", "score.bias"}
    assert keys == set(model.state_dict())
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 400_000


def test_loading_defaults(scorer, tiny, tmp_path):
    model = scorer.model
    assert model.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    os.symlink(tiny, tmp_path / "VideoScore-v1.1")
    assert VideoScorer.from_pretrained(str(tmp_path / "VideoScore-v1.1")).num_frames == 48
    assert VideoScorer.from_pretrained(tiny, num_frames=8, dtype="float32").num_frames == 8


def test_build_is_deterministic(tiny, tmp_path):
    again = build_tiny_videoscore(str(tmp_path / "again"), seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        with open(os.path.join(tiny, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def test_sample_frames():
    frames = np.arange(20)
    assert sample_frames(frames, 8).tolist() == [0, 2, 5, 7, 10, 12, 15, 17]
    assert sample_frames(np.arange(48), 16).tolist() == list(range(0, 48, 3))
    assert sample_frames(np.arange(17), 16).tolist() == list(range(16))
    assert sample_frames(np.arange(10), 16).tolist() == list(range(10))
    assert sample_frames(np.arange(16), 16).tolist() == list(range(16))


def test_prompt_and_frames_are_what_the_official_script_gives():
    """Against examples/run_videoscore.py's own output (tests/fixtures/videoscore_official.json): the
    frame indices for every clip length up to 300 at 16 and 48 frames, the whole prompt it assembles
    for two prompts (hashed), and the frames its PyAV reader returns for one MP4 (hashed)."""
    import hashlib

    ref = json.loads((FIXTURES / "videoscore_official.json").read_text())
    for m, by_length in ref["indices"].items():
        for n, indices in by_length.items():
            assert sample_frames(np.arange(int(n)), int(m)).tolist() == indices, (m, n)
    for key, official in ref["prompts"].items():
        k, prompt = key.split("|", 1)
        ours = REGRESSION_QUERY_PROMPT.format(text_prompt=prompt) + "<image> " * int(k)  # as VideoScorer builds it
        assert hashlib.sha256(ours.encode()).hexdigest() == official["sha256"]
    frames = read_video(FIXTURES / "videoscore_clip.mp4")
    assert len(frames) == ref["clip_total_frames"]
    for m, official in ref["clip_frames"].items():
        ours = np.ascontiguousarray(sample_frames(frames, int(m)))
        assert list(ours.shape) == official["shape"]
        assert hashlib.sha256(ours.tobytes()).hexdigest() == official["sha256"]  # the same pixels as PyAV's


def test_read_video(tmp_path):
    frames = clip(6, 4)
    path = str(tmp_path / "ok.mp4")
    imageio.mimwrite(path, list(frames), fps=8, codec="libx264", macro_block_size=2)
    got = read_video(path)
    assert got.dtype == np.uint8 and got.shape == frames.shape
    small = clip(8, 5, height=16, width=16)  # the world's size, which decord misread
    imageio.mimwrite(str(tmp_path / "small.mp4"), list(small), fps=4, codec="libx264", macro_block_size=2)
    got = read_video(str(tmp_path / "small.mp4"))
    assert got.shape == small.shape and np.abs(got.astype(int) - small).mean() < 20

    missing = str(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="missing.mp4: cannot read video") as e:
        read_video(missing)
    assert "\n" not in str(e.value)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(2048))
    with pytest.raises(ValueError, match="corrupt.mp4: cannot read video.*expected an MP4 file") as e:
        read_video(str(corrupt))
    assert "\n" not in str(e.value)


def test_score_rejects_bad_input(scorer):
    good = clip(4, 5)
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        scorer.score([good, good], ["a cat"])
    with pytest.raises(ValueError, match="uint8"):
        scorer.score([good.astype(np.float32)], ["a cat"])
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        scorer.score([good[0]], ["a cat"])
