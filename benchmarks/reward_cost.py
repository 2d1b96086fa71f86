"""Benchmark: the learned rewards beside the generator: VideoScore-v1.1 (Mantis' Idefics2-8B) and
VideoReward (Qwen2-VL-2B), their size, memory and cost of scoring one video of each config.

Parameters are counted on the full-size architectures, built on the meta device from their released
configs. FLOPs per video are counted from the model (2 x each linear layer's weights x the tokens it
sees, plus attention's 4 x width x length^2 a layer); on the tiny models the linear part is checked
against torch's FlopCounterMode on a real forward (attention it does not count on a CPU). Seconds assume --mfu of
an H100's dense bf16 rate: an estimate, not a measurement.

    python benchmarks/reward_cost.py
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from torch.utils.flop_counter import FlopCounterMode
from transformers import Idefics2Config, Qwen2VLConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402
import run_cost  # noqa: E402
import videoreward  # noqa: E402
import videoreward_tiny  # noqa: E402
import videoscore  # noqa: E402
from backends import videocrafter2  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, UMT5Config, UMT5EncoderModel  # noqa: E402

H100_BF16 = 989e12

# Qwen/Qwen2-VL-2B-Instruct's config.json (VideoReward's base; the checkpoint keeps its shapes, 151,660 tokens).
QWEN2_VL_2B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, vocab_size=151660, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                   tie_word_embeddings=True, vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16,
                                                                hidden_size=1536, patch_size=14, spatial_merge_size=2,
                                                                temporal_patch_size=2))
# HuggingFaceM4/idefics2-8b's config, which Mantis-8B-Idefics2 and VideoScore-v1.1 keep (Mistral-7B, SigLIP-so400m,
# a perceiver of 64 latents), with VideoScore's five-output head.
IDEFICS2_8B = dict(
    text_config=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32003, max_position_embeddings=32768),
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=980, patch_size=14),
    perceiver_config=dict(hidden_size=4096, resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16,
                          resampler_head_dim=96, num_key_value_heads=4),
    num_labels=5)
IDEFICS2_SIZE = {"longest_edge": 980, "shortest_edge": 378}  # Idefics2's processor, no image splitting
VIDEOSCORE_TEXT, VIDEOREWARD_TEXT = 300, 1000  # prompt tokens, estimated (no tokenizer files here)

# google/umt5-xxl's encoder, Wan's text encoder (its text_encoder/config.json).
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=32,
                feed_forward_proj="gated-gelu")

VIDEOS = {"animatediff": (16, 512, 512, 8), "videocrafter2": (16, 320, 512, 8), "wan": (81, 480, 832, 16),
          "wan22_5b": (121, 704, 1280, 24)}  # frames, height, width, fps of the MP4s vip writes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mfu", type=float, default=0.4, help="share of the H100's bf16 rate a forward reaches (assumed)")
    p.add_argument("--output", default=None, help="where the JSON goes (default: print only)")
    return p.parse_args(argv)


def linear_weights(module):
    """Weights of the matmuls of `module` (linear and convolution layers), biases left out."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d,
                                                                             torch.nn.Conv2d)))


def videoreward_model(config):
    with init_empty_weights():
        return videoreward.VideoRewardModel(Qwen2VLConfig(**json.loads(json.dumps(config))))


def videoreward_tokens(frames, height, width, fps, text):
    """(patches, their attention lengths, merged tokens, LLM tokens) of one video, as the official
    inference reads it: 2 fps, resized to 28-multiples within 100,352-200,704 pixels a frame."""
    n = videoreward.num_frames(frames, fps)
    h, w = videoreward.smart_resize(height, width)
    groups, per = n // 2, (h // 14) * (w // 14)
    return groups * per, [per] * groups, groups * per // 4, groups * per // 4 + text


def videoreward_flops(model, frames, height, width, fps, text=VIDEOREWARD_TEXT):
    """(linear, attention) FLOPs of scoring one video."""
    patches, lengths, merged, tokens = videoreward_tokens(frames, height, width, fps, text)
    visual, language = model.model.visual, model.model.language_model
    linear = 2 * (linear_weights(visual.patch_embed) * patches + linear_weights(visual.blocks) * patches
                  + linear_weights(visual.merger) * merged + linear_weights(language.layers) * tokens
                  + model.rm_head.weight.numel() * tokens)
    vision = visual.config
    attention = 4 * vision.embed_dim * sum(n * n for n in lengths) * vision.depth \
        + 4 * language.config.hidden_size * tokens * tokens * language.config.num_hidden_layers
    return linear, attention


def idefics2_frame(height, width, size=IDEFICS2_SIZE):
    """A frame's size after Idefics2's resize: the longest edge at most, the shortest at least."""
    scale = min(1.0, size["longest_edge"] / max(height, width))
    h, w = height * scale, width * scale
    if min(h, w) < size["shortest_edge"]:
        up = size["shortest_edge"] / min(h, w)
        h, w = h * up, w * up
    return int(h), int(w)


def videoscore_model(config):
    with init_empty_weights():
        return videoscore.Idefics2ForSequenceClassification(Idefics2Config(**json.loads(json.dumps(config))))


def videoscore_flops(model, frames, height, width, fps=None, num_frames=48, text=VIDEOSCORE_TEXT,
                     size=IDEFICS2_SIZE):
    """(linear, attention) FLOPs of scoring one video: num_frames frames, whatever its `fps`, each
    through SigLIP at Idefics2's size and the perceiver to image_seq_len tokens."""
    n = min(frames, num_frames)
    h, w = idefics2_frame(height, width, size)
    patch = model.config.vision_config.patch_size
    patches = (h // patch) * (w // patch)
    latents = model.config.perceiver_config.resampler_n_latents
    tokens = n * latents + text
    m = model.model
    resampler = m.connector.perceiver_resampler
    keys = sum(linear_weights(layer.self_attn.k_proj) + linear_weights(layer.self_attn.v_proj) for layer in resampler.layers)
    # the perceiver's keys and values read the frame's patches and the latents; everything else the latents
    per_frame = (linear_weights(m.vision_model) + linear_weights(m.connector.modality_projection)) * patches \
        + keys * (patches + latents) + (linear_weights(resampler) - keys) * latents
    linear = 2 * (per_frame * n + linear_weights(m.text_model.layers) * tokens + model.score.weight.numel() * tokens)
    vision, text_config = model.config.vision_config, model.config.text_config
    attention = 4 * vision.hidden_size * patches * patches * n * vision.num_hidden_layers \
        + 4 * text_config.hidden_size * tokens * tokens * text_config.num_hidden_layers
    return linear, attention


def check_on_tiny():
    """Each count's linear part against FlopCounterMode's on a real forward of the tiny model."""
    rows = []
    frames = np.random.default_rng(0).integers(0, 255, (16, 64, 96, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        scorer = videoreward.VideoRewardScorer.from_pretrained(videoreward_tiny.build_tiny(f"{tmp}/vr"), video_fps=8)
        with FlopCounterMode(display=False) as counter:
            scorer.score([frames], ["a cat walks in the park"])
        text = len(scorer.tokenizer(videoreward.chat_text("a cat walks in the park"))["input_ids"]) - 1
        counted = videoreward_flops(scorer.model, 16, 64, 96, 8, text=text)[0]
        rows.append(("VideoReward (tiny)", counter.get_total_flops(), counted))
        scorer = videoscore.VideoScorer.from_pretrained(videoscore.build_tiny(f"{tmp}/vs"), num_frames=8)
        with FlopCounterMode(display=False) as counter:
            scorer.score([frames], ["a cat walks in the park"])
        from PIL import Image
        prompt = videoscore.REGRESSION_QUERY_PROMPT.format(text_prompt="a cat walks in the park") + "<image> " * 8
        ids = scorer.processor(text=[prompt], images=[[Image.fromarray(f) for f in frames[:8]]])["input_ids"][0]
        text = len(ids) - 8 * scorer.model.config.perceiver_config.resampler_n_latents
        size = scorer.processor.image_processor.size
        counted = videoscore_flops(scorer.model, 16, 64, 96, num_frames=8, text=text, size=size)[0]
        rows.append(("VideoScore (tiny)", counter.get_total_flops(), counted))
    return rows


def generator_parameters(config):
    """Parameters of what evaluate.py holds of a config's generator: the teacher's denoiser and a
    student's (counted as large as the teacher's: an upper bound), the text encoder and the VAE."""
    _, denoiser = run_cost.full_size_denoiser(config)
    with torch.device("meta"):
        if config == "videocrafter2":
            _, vae, text = videocrafter2.build_models(device="meta")
        elif config == "animatediff":
            text, vae = CLIPTextModel(CLIPTextConfig(**bench.SD15_TEXT)), None
        else:
            text, vae = UMT5EncoderModel(UMT5Config(**UMT5_XXL)), None
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
    return {"denoisers": 2 * count(denoiser), "text encoder": count(text), "vae": count(vae)}


def main(args):
    models = {"VideoScore-v1.1": videoscore_model(IDEFICS2_8B), "VideoReward": videoreward_model(QWEN2_VL_2B)}
    print("| reward | parameters (B) | weights in bf16 (GiB) |\n|---|---|---|")
    sizes = {}
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        sizes[name] = params
        print(f"| {name} | {params / 1e9:.2f} | {params * 2 / 2**30:.1f} |")
    print("\n| config (frames, HxW, fps) | reward | TFLOP (linear + attention) | s at "
          f"{args.mfu:.0%} of an H100 |\n|---|---|---|---|")
    results = {"parameters": sizes, "videos": {}}
    for config, (frames, height, width, fps) in VIDEOS.items():
        for name, count in (("VideoScore-v1.1", videoscore_flops), ("VideoReward", videoreward_flops)):
            linear, attention = count(models[name], frames, height, width, fps)
            total = linear + attention
            results["videos"][f"{config}/{name}"] = {"linear": linear, "attention": attention}
            print(f"| {config} ({frames}, {height}x{width}, {fps}) | {name} | {linear / 1e12:.2f} + "
                  f"{attention / 1e12:.2f} | {total / (H100_BF16 * args.mfu):.3f} |")
    print("\nThe counts' linear part against FlopCounterMode on a real forward of the tiny models (CPU):\n")
    print("| model | FlopCounterMode | counted | ratio |\n|---|---|---|---|")
    for name, counter, counted in check_on_tiny():
        print(f"| {name} | {counter:,} | {counted:,} | {counted / counter:.4f} |")
    print("\nWeights in bf16 (GiB) that evaluate.py holds on one GPU with both rewards (the VAE left out where "
          "it is not counted: under 0.5 GiB):\n")
    print("| config | M0 + a student | text encoder | VAE | VideoScore + VideoReward | total | of 80 GiB |\n"
          "|---|---|---|---|---|---|---|")
    rewards = (sizes["VideoScore-v1.1"] + sizes["VideoReward"]) * 2 / 2**30
    for config in ("animatediff", "videocrafter2", "wan", "wan_14b", "wan22_5b"):
        g = {k: v * 2 / 2**30 for k, v in generator_parameters(config).items()}
        total = sum(g.values()) + rewards
        results.setdefault("beside", {})[config] = {**g, "rewards": rewards}
        print(f"| {config} | {g['denoisers']:.1f} | {g['text encoder']:.1f} | {g['vae']:.1f} | {rewards:.1f} | "
              f"{total:.1f} | {total / 80:.0%} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(parse_args())
