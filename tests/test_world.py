"""The exact-reward world: renderer, reward aspects under corruptions, pixel VAE, the teacher's
training script, a short loop on the committed teacher, and the ablation's plumbing. Run: python -m pytest -q tests/test_world.py"""
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import yaml

import ablation
import common
import features
import models
import prune
import stage
import train_world_teacher
import world
from conftest import ROOT, loop_config, run_script


def centre(frame):
    return world.frame_stats(frame)["centre"]


@pytest.mark.parametrize("prompt", ["a red square moves left slowly", "a blue triangle moves up quickly",
                                    "a green circle moves right quickly"])
def test_render_draws_the_prompt(prompt):
    colour, shape, direction, speed = world.parse_prompt(prompt)
    clip = world.render(prompt, seed=7)
    assert clip.shape == (8, 16, 16, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, world.render(prompt, seed=7)) and not np.array_equal(clip, world.render(prompt, seed=8))
    lit = clip.max(-1) > 0
    assert lit[:, 0, :].sum() + lit[:, -1, :].sum() + lit[:, :, 0].sum() + lit[:, :, -1].sum() < 8 * 12  # inside
    channel = list(world.COLOURS).index(colour)
    assert (clip[..., channel] >= clip.max(-1)).all() and clip[..., channel].max() == 255
    velocity = (centre(clip[-1]) - centre(clip[0])) / 7
    assert velocity == pytest.approx(np.array(world.DIRECTIONS[direction]) * world.SPEEDS[speed], abs=0.02)


def test_prompt_split_and_files():
    train, held = world.split_prompts()
    assert len(train) == 62 and len(held) == 10 and not set(train) & set(held)
    for words in (world.COLOURS, world.SHAPES, world.DIRECTIONS, world.SPEEDS):
        assert all(any(f" {w} " in f" {p} " for p in train) for w in words)  # every attribute is trained
    assert (ROOT / "configs/prompts/world_train.txt").read_text().splitlines() == train
    assert (ROOT / "configs/prompts/world_eval.txt").read_text().splitlines() == held
    with pytest.raises(ValueError, match="not a world prompt"):
        world.parse_prompt("a purple square moves left slowly")


def test_rendered_clips_score_near_the_top():
    scores = [world.score_clip(world.render(p, s), p) for p in world.all_prompts() for s in range(2)]
    for a in world.ASPECTS:
        values = np.array([s[a] for s in scores])
        assert values.mean() > 3.85 and values.min() > 3.2, a


def blur(clip):
    k = np.array([0.25, 0.5, 0.25])
    x = clip.astype(np.float32)
    for axis in (1, 2):
        x = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), axis, x)
    return x.round().astype(np.uint8)


def shake(clip, direction):
    """Each frame moved one pixel across the path, one way then the other (black comes in at the edge)."""
    dy, dx = (0, 1) if direction in ("up", "down") else (1, 0)
    padded = np.pad(clip, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.empty_like(clip)
    for t in range(len(clip)):
        k = 1 if t % 2 else -1
        out[t] = padded[t, 1 + k * dy:1 + k * dy + clip.shape[1], 1 + k * dx:1 + k * dx + clip.shape[2]]
    return out


def corruptions(prompt, clip, rng):
    colour, shape, direction, speed = world.parse_prompt(prompt)
    other = {"red": "green", "green": "blue", "blue": "red"}[colour]
    back = {"left": "right", "right": "left", "up": "down", "down": "up"}[direction]
    other_shape = {"square": "circle", "circle": "triangle", "triangle": "square"}[shape]
    other_speed = {"slowly": "quickly", "quickly": "slowly"}[speed]
    dim = clip.astype(np.float32)
    dim[1::2] *= 0.55
    return {
        "visual_quality": [blur(clip), np.clip(clip + rng.normal(0, 10, clip.shape), 0, 255).astype(np.uint8)],
        "temporal_consistency": [dim.round().astype(np.uint8), shake(clip, direction)],   # flicker, jitter
        "dynamic_degree": [np.repeat(clip[:1], len(clip), axis=0),                          # frozen
                           world.render(world.prompt_of(colour, shape, direction, other_speed), 1)],  # wrong speed
        "text_alignment": [world.render(world.prompt_of(other, shape, direction, speed), 1),   # wrong colour
                           world.render(world.prompt_of(colour, shape, back, speed), 1),      # wrong direction
                           world.render(world.prompt_of(colour, other_shape, direction, speed), 1)],  # wrong shape
    }


def test_each_corruption_lowers_its_aspect_and_not_the_others():
    rng = np.random.default_rng(0)
    prompts = world.all_prompts()[::3]
    clean = {p: world.score_clip(world.render(p, 1), p) for p in prompts}
    drops = {}  # (aspect corrupted, which corruption) -> mean drop of every aspect
    for p in prompts:
        for target, clips in corruptions(p, world.render(p, 1), rng).items():
            for i, clip in enumerate(clips):
                s = world.score_clip(clip, p)
                for a in world.ASPECTS:
                    drops.setdefault((target, i), {}).setdefault(a, []).append(clean[p][a] - s[a])
    for (target, i), by_aspect in drops.items():
        mean = {a: float(np.mean(v)) for a, v in by_aspect.items()}
        others = max(v for a, v in mean.items() if a != target)
        # Measured: each corruption costs its aspect 0.95-3.0 on average. Blur and noise also unsettle
        # temporal consistency (0.33, 0.54) and text alignment (0.32, 0.23): the object's measured
        # size and colour waver; every other cross-drop is under 0.1.
        assert mean[target] >= 0.9, (target, i, mean)
        assert others <= 0.6 and mean[target] >= 3 * max(others, 0.01), (target, i, mean)
        if target != "visual_quality":
            assert others <= 0.1, (target, i, mean)


def test_a_shape_like_no_prototype_scores_finite_not_nan():
    """A column of light whose third moment (64) is far from every shape's: every likeness underflows."""
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    frames[:, :, 3, 0] = np.linspace(255, 130, 16).astype(np.uint8)
    frames[:, 0:2, 2:5, 0] = 255
    scores = {shape: world.score_clip(frames, f"a red {shape} moves left slowly") for shape in world.SHAPES}
    assert all(np.isfinite(list(s.values())).all() for s in scores.values()), scores
    alignment = sorted(s["text_alignment"] for s in scores.values())
    assert alignment[-1] - alignment[0] == pytest.approx(1.0)  # one shape takes the whole share of likeness


def test_pixel_vae_is_lossless(tmp_path):
    vae = world.PixelVAE(block_out_channels=(2, 2, 2), layers_per_block=1, norm_num_groups=2, latent_channels=48,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    clips = np.stack([world.render("a red circle moves up slowly", 0), world.render("a blue square moves left quickly", 3)])
    latents = world.frames_to_latents(clips)
    assert latents.shape == (2, 48, 8, 4, 4) and latents.min() >= 0 and latents.max() <= 1
    frames = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)
    pixels = vae.decode(frames).sample  # [-1, 1]
    back = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(2, 8, 16, 16, 3)
    assert np.array_equal(back.numpy(), clips)
    x = torch.from_numpy(clips[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(vae.encode(x).latent_dist.mode(), frames[:8], atol=1e-6)
    videos = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, 3, F, H, W), as WanPipeline's
    for factor in (2, 4):  # the DiT's, Wan-shaped: 3 x factor^2 channels of (16 / factor)^2 latents a frame
        wan_vae = world.WanPixelVAE(scale_factor_spatial=factor)
        latents = world.frames_to_latents(clips, factor)
        assert latents.shape == (2, 3 * factor ** 2, 8, 16 // factor, 16 // factor)
        assert wan_vae.config.z_dim == 3 * factor ** 2 and len(wan_vae.config.latents_std) == 3 * factor ** 2
        assert torch.allclose(wan_vae.encode(videos), latents, atol=1e-6)
        assert torch.allclose(wan_vae.decode(latents).sample, videos, atol=1e-6)


def test_teacher_training_script_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "teacher"
    train_world_teacher.main(train_world_teacher.parse_args(["--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2",
                                 "--train_batch_size", "2", "--block_out_channels", "32", "32", "--snr_gamma", "5"]))
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    train_world_teacher.main(train_world_teacher.parse_args(["--output_dir", str(out), "--max_train_steps", "3", "--checkpointing_steps", "3",
                                 "--train_batch_size", "2", "--block_out_channels", "32", "32", "--snr_gamma", "5"]))
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert "resumed from" in capsys.readouterr().out
    assert state["step"] == 3 and {s["step"].item() for s in state["optimizer"]["state"].values()} == {3.0}  # 2 + 1, not 0 + 3
    # a kill between save_teacher's two renames leaves a folder as <folder>.old: the rerun puts it back
    os.replace(out / "motion_adapter", out / "motion_adapter.old")
    train_world_teacher.main(train_world_teacher.parse_args(["--output_dir", str(out), "--max_train_steps", "3",
                                 "--block_out_channels", "32", "32"]))
    assert (out / "motion_adapter" / "config.json").exists() and not (out / "motion_adapter.old").exists()
    args = stage.parse_config(["--config", str(ROOT / "configs/world.yaml"), "--pretrained_model_name_or_path",
                               str(out / "sd"), "--motion_adapter", str(out / "motion_adapter"),
                               "--num_inference_steps", "2"], "t", {"model": stage.MODEL_OPTIONS})
    backend = stage.backend_of(args)
    unet = models.load_model(backend, args)
    state = torch.load(out / "train_state.pt", weights_only=True)
    saved = unet.state_dict()
    assert set(state["ema"]) == {k for k, p in unet.named_parameters()}
    assert all(torch.equal(saved[k], v) for k, v in state["ema"].items())  # the teacher is the average, split and rejoined
    assert any(not torch.equal(saved[k], v) for k, v in state["unet"].items())  # which is not the last weights
    frames = backend.generate(backend.load_pipeline(args, unet), ["a red square moves left slowly"], [0], args)
    assert frames.shape == (1, 8, 16, 16, 3)


def test_dit_teacher_training_runs_resumes_and_loads_through_its_backend(tmp_path, capsys):
    out = tmp_path / "dit"
    flags = ["--model", "dit", "--output_dir", str(out), "--train_batch_size", "2", "--dim", "32", "--num_layers", "2",
             "--ffn_dim", "48", "--temporal_patch_size", "2"]  # a token two frames
    train_world_teacher.main(train_world_teacher.parse_args(flags + ["--max_train_steps", "2", "--checkpointing_steps", "2"]))
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2
    train_world_teacher.main(train_world_teacher.parse_args(flags + ["--max_train_steps", "3", "--checkpointing_steps", "3"]))
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert "resumed from" in capsys.readouterr().out
    assert state["step"] == 3 and {s["step"].item() for s in state["optimizer"]["state"].values()} == {3.0}
    args = stage.parse_config(["--config", str(ROOT / "configs/world_wan.yaml"), "--pretrained_model_name_or_path",
                               str(out), "--num_inference_steps", "2"], "t", {"model": stage.MODEL_OPTIONS})
    backend = stage.backend_of(args)
    transformer = models.load_model(backend, args)
    saved = transformer.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in state["ema"].items())  # the teacher is the average
    assert [b["name"] for b in models.list_blocks(backend, transformer)] == [  # the config's candidates: sub-layers
        f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn1", "attn2", "ffn")]
    assert transformer.config.patch_size == [2, 1, 1] and transformer.config.ffn_dim == 48
    with pytest.raises(common.ConfigError, match="3 x factor"):  # latents are 3 x factor^2 values: 16 is none
        backend.vae_scale_factor(transformer.from_config({**transformer.config, "in_channels": 16}))
    frames, latents = backend.generate(backend.load_pipeline(args, transformer), ["a red square moves left slowly"] * 2,
                                       [0, 0], args, return_latents=True)
    assert frames.shape == (2, 8, 16, 16, 3) and latents.shape == (2, 48, 8, 4, 4) and np.array_equal(frames[0], frames[1])
    decoded = (latents / world.SCALE).clamp(0, 1)  # the pixel VAE is lossless: the frames are the latents, rounded
    assert (world.frames_to_latents(frames) - decoded).abs().max() <= 0.5 / 255 + 1e-6
    # a rerun with its steps done trains nothing and saves the teacher again, here in half precision
    train_world_teacher.main(train_world_teacher.parse_args(flags + ["--max_train_steps", "3", "--save_dtype", "float16"]))
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 3
    half = models.load_model(backend, args)  # loads as the config's dtype
    assert all(p.dtype == torch.float32 for p in half.parameters())
    assert all(torch.equal(half.state_dict()[k], v.half().float()) for k, v in state["ema"].items())
    assert any(not torch.equal(half.state_dict()[k], v) for k, v in state["ema"].items())
    # a fine-tune starts from a saved teacher's weights (here at a learning rate that keeps them), in its layout only
    tuned = tmp_path / "tuned"
    train_world_teacher.main(train_world_teacher.parse_args(
        [*flags[:3], str(tuned), *flags[4:], "--pretrained_model_name_or_path", str(out), "--max_train_steps", "1",
         "--learning_rate", "1e-12", "--moment_weight", "1"]))
    tuned_state = torch.load(tuned / "train_state.pt", weights_only=True)
    assert tuned_state["step"] == 1
    assert all(torch.allclose(tuned_state["unet"][k], v, atol=1e-6) for k, v in half.state_dict().items())
    with pytest.raises(common.ConfigError, match="differs from the flags' layout in .*num_attention_heads"):
        train_world_teacher.main(train_world_teacher.parse_args(
            [*flags[:3], str(tmp_path / "other"), *flags[4:], "--dim", "64", "--pretrained_model_name_or_path", str(out)]))


def test_moment_loss_is_temporal_consistencys_drift_of_the_clip_estimate():
    """--moment_weight: the clip's own frames measure as world.frame_stats does, cost nothing, and a
    frame dimmed or a frame moved off the path costs what temporal consistency charges for it."""
    clip = world.render("a red square moves left slowly", 3)
    latents = world.frames_to_latents([clip], 2)
    moments = train_world_teacher.frame_moments(train_world_teacher.frame_light(latents, 2))[0]
    for frame, got in zip(clip, moments):
        stats = world.frame_stats(frame)
        want = [stats["mass"], *stats["centre"], *stats["spread"]]
        assert np.allclose(got.numpy(), want, rtol=1e-3, atol=1e-3)
    assert train_world_teacher.moment_loss(latents, latents, 2).item() < 1e-8
    dimmed = latents.clone()
    dimmed[:, :, 3] *= 0.9  # one frame of eight 10% darker: its mass ratio's variance is 7/64 of 0.01
    assert train_world_teacher.moment_loss(dimmed, latents, 2).item() == pytest.approx(7 / 64, rel=0.02)
    moved = latents.clone()
    moved[:, :, 3] = torch.roll(latents[:, :, 3], 1, dims=-1)  # one frame 2 pixels right: the centre jerks
    assert train_world_teacher.moment_loss(moved, latents, 2).item() > 1.0


def test_snr_weight_lifts_low_noise_steps_and_keeps_the_zero_snr_step():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    t = torch.tensor([0, 100, 200, 700, 999])  # SNR ~1e4, 6.3, 1.95, 0.02, 0
    w = train_world_teacher.snr_weight(scheduler, t, 5.0)
    assert w[-1] == 1.0  # min-SNR would give the zero-SNR step weight 0
    assert w[0] == w[1] == 5.0 and 1.9 < w[2] < 2.0 and w[3] == 1.0
    assert torch.equal(train_world_teacher.snr_weight(scheduler, t, None), torch.ones(5))


def mean_scores(frames, prompts):
    scores = [world.score_clip(f, p) for f, p in zip(frames, prompts)]
    return {a: float(np.mean([s[a] for s in scores])) for a in world.ASPECTS}


# The committed teacher on the held-out prompts (one video each) scored 3.50 / 3.32 / 3.91 / 3.29, and
# 1.61 / 1.00 / 2.14 / 3.25 without its motion modules; these floors sit about 0.3 below, at 3 or more.
TEACHER_FLOOR = {"visual_quality": 3.2, "temporal_consistency": 3.0, "dynamic_degree": 3.6, "text_alignment": 3.0}


def test_committed_teacher_is_small_and_its_motion_modules_matter():
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT / "weights" / "world") for f in fs
             if not f.startswith("train_state")]
    assert 0 < sum(sizes) <= 20 * 2 ** 20
    args = stage.parse_config(["--config", str(ROOT / "configs/world.yaml")], "t", {"model": stage.MODEL_OPTIONS})
    args.pretrained_model_name_or_path = str(ROOT / args.pretrained_model_name_or_path)
    args.motion_adapter = str(ROOT / args.motion_adapter)
    backend = stage.backend_of(args)
    unet = models.load_model(backend, args)
    blocks = [b["name"] for b in models.list_blocks(backend, unet)]
    assert len(blocks) == 7
    pipe = backend.load_pipeline(args, unet)
    _, held = world.split_prompts()
    seeds = list(range(len(held)))
    full = mean_scores(backend.generate(pipe, held, seeds, args), held)
    assert all(full[a] >= floor for a, floor in TEACHER_FLOOR.items()), full
    with models.blocks_removed(backend, unet, blocks):
        still = mean_scores(backend.generate(pipe, held, seeds, args), held)
    assert full["dynamic_degree"] - still["dynamic_degree"] >= 1.0, (full, still)
    assert full["temporal_consistency"] - still["temporal_consistency"] >= 1.0, (full, still)


# The committed DiT teacher on the held-out prompts (three videos each) scored 3.53 / 3.07 / 3.72 / 3.41. Without
# any one block: visual quality 1.00-1.36; without blocks.1's cross-attention: 3.45 / 2.87 / 3.03 / 3.31. The
# floors sit about 0.3 below, temporal consistency's at the bar itself.
DIT_TEACHER_FLOOR = {"visual_quality": 3.2, "temporal_consistency": 3.0, "dynamic_degree": 3.4, "text_alignment": 3.1}


def test_committed_dit_teacher_is_small_and_every_block_carries_the_clip():
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT / "weights" / "world_wan") for f in fs]
    assert 0 < sum(sizes) <= 20 * 2 ** 20
    args = stage.parse_config(["--config", str(ROOT / "configs/world_wan.yaml")], "t", {"model": stage.MODEL_OPTIONS})
    args.pretrained_model_name_or_path = str(ROOT / args.pretrained_model_name_or_path)
    backend = stage.backend_of(args)
    transformer = models.load_model(backend, args)
    pipe = backend.load_pipeline(args, transformer)
    _, held = world.split_prompts()
    prompts = [p for p in held for _ in range(3)]
    full = mean_scores(backend.generate(pipe, prompts, list(range(len(prompts))), args), prompts)
    assert all(full[a] >= floor for a, floor in DIT_TEACHER_FLOOR.items()), full
    seeds = list(range(len(held)))
    full = mean_scores(backend.generate(pipe, held, seeds, args), held)
    for i in range(transformer.config.num_layers):  # a block's three sub-layers gone: the block gone
        with models.blocks_removed(backend, transformer, [f"blocks.{i}.{layer}" for layer in ("attn1", "attn2", "ffn")]):
            still = mean_scores(backend.generate(pipe, held, seeds, args), held)
        assert full["visual_quality"] - still["visual_quality"] >= 1.5, (i, full, still)
    with models.blocks_removed(backend, transformer, ["blocks.1.attn2"]):  # the motion, not the picture
        still = mean_scores(backend.generate(pipe, held, seeds, args), held)
    assert full["dynamic_degree"] - still["dynamic_degree"] >= 0.4 and abs(full["visual_quality"] - still["visual_quality"]) <= 0.2


def test_a_short_loop_on_the_world(tmp_path):
    path = loop_config("world", tmp_path / "world.yaml",
                       model={"num_inference_steps": 4, "pretrained_model_name_or_path": str(ROOT / "weights/world/sd"),
                              "motion_adapter": str(ROOT / "weights/world/motion_adapter")},
                       prune={"num_prune_prompts": 2, "num_blocks": 1, "prune_params": None},
                       curate={"max_prompts": 16, "seeds_per_prompt": 1, "tau_p": 1.0},
                       train={"max_train_steps": 2, "train_batch_size": 2},
                       eval={"num_eval_prompts": 2, "videos_per_prompt": 1, "latency_runs": 1})
    run_script("bash", "vip_loop.sh", "world", "1", env={"CONFIG": path, "RUN_DIR": str(tmp_path / "run")})
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert [m["label"] for m in report["models"]] == ["teacher (M0)", "stage_1/prune", "stage_1/train"]
    assert set(report["models"][0]["scores"]) == set(world.ASPECTS) | {f"{a}/features" for a in features.ASPECTS}
    assert all(1.0 <= v <= 4.0 for m in report["models"] for v in m["scores"].values())
    table = (tmp_path / "run" / "eval" / "eval.md").read_text()  # the paper's table, one row a model
    assert "| Model | Visual Quality | Temporal Consist. | Dynamic Degree | Text Align. | Average |" in table
    teacher = report["models"][0]["scores"]
    assert f"| teacher (M0) | {teacher['visual_quality']:.3f} |" in table and "| stage_1/train |" in table


def test_a_short_loop_on_the_world_dit(tmp_path):
    """The loop's plumbing on the world's DiT: a teacher of a few steps, trained here, its token the whole
    clip of a 2x2-pixel latent (12 channels)."""
    teacher = tmp_path / "teacher"
    train_world_teacher.main(train_world_teacher.parse_args(["--model", "dit", "--output_dir", str(teacher),
                                                             "--max_train_steps", "3", "--train_batch_size", "2",
                                                             "--dim", "32", "--num_layers", "3", "--temporal_patch_size", "8",
                                                             "--vae_scale_factor", "2"]))
    path = loop_config("world_wan", tmp_path / "world_wan.yaml",
                       model={"num_inference_steps": 4, "pretrained_model_name_or_path": str(teacher)},
                       prune={"num_prune_prompts": 2, "num_blocks": 1},
                       curate={"max_prompts": 16, "tau_p": -1.0, "pair_score": "mean"},  # a 3-step teacher: any pair
                       train={"max_train_steps": 2, "train_batch_size": 2},
                       eval={"num_eval_prompts": 2, "videos_per_prompt": 1, "latency_runs": 1})
    run_script("bash", "vip_loop.sh", "world_wan", "1", env={"CONFIG": path, "RUN_DIR": str(tmp_path / "run")})
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert [m["label"] for m in report["models"]] == ["teacher (M0)", "stage_1/prune", "stage_1/train"]
    student = json.loads((tmp_path / "run" / "stage_1" / "train" / "student" / "student.json").read_text())
    assert student["backend"] == "world_wan_sublayers" and len(student["removed_blocks"]) == 1
    assert re.fullmatch(r"blocks\.[0-2]\.(attn1|attn2|ffn)", student["removed_blocks"][0]), student["removed_blocks"]
    assert "| Sub-layer params |" in (tmp_path / "run" / "eval" / "eval.md").read_text()


def test_ablation_shares_what_variants_share_and_gathers_seeds(tmp_path, monkeypatch):
    """The ablation's plumbing, through the real vip_loop.sh with each script a record of its call
    (tests/fake_stage.py): stage 1 prunes and curates once for all variants, offline ReDPO trains on
    stage 1's pairs at stage 2 while every online variant curates its own, --num_blocks reaches each
    stage's prune, and the table is the mean and spread of the seeds' results."""
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("LAUNCH", f"{sys.executable} {ROOT / 'tests' / 'fake_stage.py'}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(ablation, "pruned_baseline", lambda config, root, final: os.path.join(root, "pruned_untrained"))
    out = tmp_path / "ablation"
    ablation.main(ablation.parse_args(["--seeds", "0", "--num_blocks", "3", "2", "--output_dir", str(out)]))

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    seed = os.path.realpath(out / "seed_0")
    ran = lambda script: [os.path.relpath(c["out"], seed) for c in calls if c["script"] == script and not c["done"]]  # noqa: E731
    assert sorted(ran("prune.py")) == ["dpo_only/stage_2/prune", "redpo/stage_2/prune", "sft/stage_2/prune",
                                       "shared/stage_1/prune"]
    assert sorted(ran("curate.py")) == ["dpo_only/stage_2/curate", "redpo/stage_2/curate", "sft/stage_2/curate",
                                        "shared/stage_1/curate"]
    assert sorted(ran("train_redpo.py")) == sorted(  # stage 1: offline's is ReDPO's run; stage 2: all four
        f"{tag}/stage_{k}/train" for k in (1, 2) for tag in ("redpo", "sft", "dpo_only", "redpo_offline")
        if (tag, k) != ("redpo_offline", 1))
    trains = {os.path.relpath(c["out"], seed): c["flags"]["pairs"][0] for c in calls if c["script"] == "train_redpo.py"}
    assert os.path.realpath(trains["redpo_offline/stage_2/train"]) == os.path.join(seed, "shared/stage_1/curate/pairs.jsonl")
    assert os.path.realpath(trains["redpo/stage_2/train"]) == os.path.join(seed, "redpo/stage_2/curate/pairs.jsonl")
    losses = {tag: yaml.safe_load((out / "seed_0" / f"{tag}.yaml").read_text())["train"]["loss_type"]
              for tag in ("sft", "dpo_only", "redpo", "redpo_offline")}
    assert losses == {"sft": "sft", "dpo_only": "dpo", "redpo": "redpo", "redpo_offline": "redpo"}
    config = yaml.safe_load((out / "seed_0" / "redpo.yaml").read_text())
    assert config["prune"]["num_blocks"] == [3, 2] and config["prune"]["prune_params"] is None
    assert config["prune"]["seed"] == config["curate"]["seed"] == config["train"]["seed"] == 0

    # a second seed's result, as a separate process would leave it; gathering reads both back
    scores = {r: {a: 2.0 for a in common.ASPECTS[:4]} for r in ablation.ROWS}
    common.atomic_write_json(str(out / "seed_1" / "result.json"), {"seconds": 60.0, "scores": scores,
                                                                   "se": dict.fromkeys(ablation.ROWS, 0.25)})
    n = len(log.read_text().splitlines())
    ablation.main(ablation.parse_args(["--seeds", "0", "1", "--num_blocks", "3", "2", "--output_dir", str(out)]))
    assert len(log.read_text().splitlines()) == n  # both seeds done: nothing runs again
    table = (out / "ablation.md").read_text()
    assert "2 stages cutting 3+2 blocks" in table
    assert "| teacher (M0) | 2.500 ± 0.707 |" in table and "| +ReDPO offline | 2.250 ± 0.354 |" in table
    assert table.count(" | 0.150 |") == 6  # eval s.e.: seed 0 two videos 0.1 apart (0.05), seed 1 0.25
    assert "| 0 | ReDPO - SFT | -0.200 |" in table and "| 1 | online - offline | +0.000 |" in table  # the fake's rows
    assert "| ReDPO - SFT | -0.100 | [-1.371, +1.171] | 0 / 1 | not resolved |" in table  # -0.2 and 0.0

    with pytest.raises(common.ConfigError, match="seed_0/settings.json: made with other --stages, --num_blocks"):
        ablation.main(ablation.parse_args(["--seeds", "0", "--num_blocks", "2", "--output_dir", str(out)]))

    log.write_text("")  # without --num_blocks, the config's budget decides
    ablation.main(ablation.parse_args(["--seeds", "3", "--output_dir", str(out)]))
    assert "num_blocks" not in yaml.safe_load((out / "seed_3" / "redpo.yaml").read_text())["prune"]
    assert "2 stages each cutting at least 250,000 block parameters" in (out / "ablation.md").read_text()

    with pytest.raises(common.ConfigError, match="--num_blocks: expected one number or 2"):
        ablation.parse_args(["--num_blocks", "1", "2", "3", "--output_dir", str(out)])


def test_the_paired_interval_is_students_t_by_hand():
    mean, low, high = ablation.paired_interval([3.0, 3.2, 2.9, 3.4, 3.1], [2.9, 3.0, 3.0, 3.1, 2.8])
    # d = 0.1, 0.2, -0.1, 0.3, 0.3: mean 0.16, sample variance 0.112 / 4, t(0.975, 4 d.f.) = 2.776445
    half = 2.776445 * math.sqrt(0.112 / 4) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((0.16, 0.16 - half, 0.16 + half), abs=1e-6)
    assert ablation.paired_interval([1.0], [0.5]) == (0.5, -math.inf, math.inf)  # one seed bounds nothing
    results = {r: [dict.fromkeys(common.ASPECTS[:4], v) for v in values] for r, values in {
        "+ReDPO": (3.4, 3.5, 3.45), "+SFT": (3.3, 3.4, 3.3), "+ReDPO offline": (3.5, 3.3, 3.45),
        "pruned": (2.0, 2.1, 2.2)}.items()}
    table = ablation.comparison_table(results, common.ASPECTS[:4])
    assert "| ReDPO - SFT | +0.117 | [+0.045, +0.188] | 3 / 0 | ReDPO above |" in table
    assert "| online - offline | +0.033 | [-0.346, +0.413] | 1 / 1 | not resolved |" in table  # t(0.975, 2) = 4.3027
    results["+ReDPO offline"] = [dict.fromkeys(common.ASPECTS[:4], v + 0.2) for v in (3.4, 3.5, 3.45)]
    assert "| online - offline | -0.200 | [-0.200, -0.200] | 0 / 3 | offline above |" in \
        ablation.comparison_table(results, common.ASPECTS[:4])  # each side named as the comparison names it


def test_a_list_of_num_blocks_cuts_by_stage(tiny_stage, tmp_path):
    """prune.num_blocks [3, 2]: a student's stage is the number of prune.py runs among its parents."""
    first = tiny_stage / "prune" / "student"
    assert models.stage_of(None) == 0 and models.stage_of(str(first)) == 1
    assert prune.blocks_at([3, 2], models.stage_of(None)) == 3 and prune.blocks_at([3, 2], models.stage_of(str(first))) == 2
    assert prune.blocks_at(4, models.stage_of(str(first))) == 4
    trained = tmp_path / "trained"  # a trained student names the pruned one as its parent
    trained.mkdir()
    meta = json.loads((first / "student.json").read_text())
    meta.pop("pruned_this_stage")
    (trained / "student.json").write_text(json.dumps({**meta, "parent": str(first)}))
    assert models.stage_of(str(trained)) == 1 and prune.blocks_at([3, 2, 1], models.stage_of(str(trained))) == 2


def test_ablation_jobs_runs_each_unfinished_seed_in_its_own_process(tmp_path, monkeypatch):
    """--jobs: one process a seed not yet done, with its flags, its share of the cores and its own
    log; a failed seed stops the gathering with a message naming it."""
    import subprocess

    out, launched = tmp_path / "ablation", []
    scores = {r: {a: 3.0 for a in common.ASPECTS[:4]} for r in ablation.ROWS}
    common.atomic_write_json(str(out / "seed_0" / "result.json"), {"seconds": 60.0, "scores": scores})

    def fake_run(cmd, stdout, stderr, env):
        seed = int(cmd[cmd.index("--seeds") + 1])
        launched.append((seed, cmd, env["OMP_NUM_THREADS"], stdout.name))
        if seed == 9:
            return subprocess.CompletedProcess(cmd, 1)
        common.atomic_write_json(str(out / f"seed_{seed}" / "result.json"), {"seconds": 60.0, "scores": scores})
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    argv = ["--seeds", "0", "1", "2", "2", "--num_blocks", "3", "2", "--jobs", "2", "--output_dir", str(out)]
    ablation.main(ablation.parse_args(argv))
    assert sorted(s for s, *_ in launched) == [1, 2]  # seed 0 was done; seed 2 named twice runs once
    for seed, cmd, threads, log in launched:
        assert cmd[cmd.index("--num_blocks"):cmd.index("--num_blocks") + 3] == ["--num_blocks", "3", "2"]
        assert "--jobs" not in cmd and "--seed_only" in cmd  # the processes leave the table to the gathering
        assert threads == "2" and log == str(out / f"seed_{seed}" / "log.txt")
    assert "seeds [0, 1, 2]" in (out / "ablation.md").read_text()

    with pytest.raises(common.ConfigError, match=r"seed\(s\) \[9\] failed"):
        ablation.main(ablation.parse_args(["--seeds", "9", "--jobs", "2", "--output_dir", str(out)]))
