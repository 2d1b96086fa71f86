"""The benchmark scripts start on the tiny config, count FLOPs, and compare what they claim to
compare. No benchmark runs here: each script takes a step or two.
Run: python -m pytest -q tests/test_benchmarks.py"""
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import models
from backends import animatediff
import world
from benchmarks import (cpu_loop, generation, reward_cost, run_cost, time_stage, train_step, vc2_precision,
                        wan_candidates, wan_step, world_motion)

bench = train_step.bench


def test_train_step_starts_and_counts_flops(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    args = train_step.parse_args(["--size", "tiny", "--device", "cpu", "--warmup", "0", "--iters", "1",
                                  "--variants", "redpo,redpo_ckpt_all", "--output", str(out)])
    result = train_step.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["command"].startswith("python benchmarks/train_step.py --size tiny") and result["date"]
    assert "cores" in result["device"] and result["limits"]["matmul_flops"] > 0
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["redpo", "redpo_ckpt_all"]
    assert all(r["flops"] > 0 and r["step_s"] > 0 and r["peak_bytes"] > 0 for r in rows.values())
    # Checkpointing recomputes the forward (more FLOPs) to hold fewer activations.
    assert rows["redpo_ckpt_all"]["flops"] > rows["redpo"]["flops"]
    assert rows["redpo_ckpt_all"]["peak_bytes"] < 0.8 * rows["redpo"]["peak_bytes"]
    teacher = bench.build_unet("tiny", "meta")
    assert rows["redpo"]["trainable_params"] == models.block_parameters(animatediff, teacher) - models.count_parameters(
        teacher.get_submodule("mid_block.motion_modules.0"))
    assert "| redpo | 1 |" in capsys.readouterr().out

    # --flops_only counts the same step on the meta device (how the full-size FLOPs are had without a GPU).
    counted = train_step.main(train_step.parse_args(["--size", "tiny", "--flops_only", "--variants", "redpo",
                                                     "--output", str(tmp_path / "flops.json")]))
    assert counted["device"].startswith("meta") and counted["rows"][0]["flops"] == rows["redpo"]["flops"]


def test_naive_and_redpo_steps_compute_the_same_loss_and_gradients():
    args = train_step.parse_args(["--size", "tiny", "--device", "cpu"])
    nets = train_step.build_models(args)
    batch = train_step.make_batch(args, pairs=2)
    teacher = nets["teacher"]
    steps = {
        "naive": lambda s: train_step.naive_loss(s, teacher, batch, 2500.0, 1.0, nullcontext()),
        "teacher_once": lambda s: train_step.redpo_step_loss(s, teacher, batch, 2500.0, 1.0, nullcontext(),
                                                             torch.float32, batched=False),
        "redpo": lambda s: train_step.redpo_step_loss(s, teacher, batch, 2500.0, 1.0, nullcontext(), torch.float32),
    }
    results = {}
    for name, loss_fn in steps.items():
        student = train_step.make_student(nets, train_step.VARIANTS["redpo"], args)
        loss = loss_fn(student)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results[name] = (loss.item(), grads)
    loss, grads = results["redpo"]
    assert abs(loss - math.log(2)) > 0.1  # the student lacks a module: DPO is away from log 2, not trivially equal
    for name in ("naive", "teacher_once"):
        assert results[name][0] == pytest.approx(loss, rel=1e-3)
        assert torch.allclose(results[name][1], grads, atol=1e-3 * grads.abs().max().item())

    # The naive step's extra work is exactly one more teacher call on each winner (the SFT term's
    # reference); batching winners with losers changes no arithmetic.
    student = train_step.make_student(nets, train_step.VARIANTS["redpo"], args)
    flops = {name: train_step.count_flops(lambda: steps[name](student).backward(), "cpu")
             for name in ("naive", "redpo")}
    assert flops["naive"] - flops["redpo"] == models.count_flops(animatediff, teacher, 8, 64, 64, batch_size=2) > 0


def test_peak_live_bytes_counts_what_is_alive():
    base = torch.zeros(10)
    with bench.PeakLiveBytes([base]) as tracker:
        a = torch.empty(1000)
        b = torch.empty(2000)
        del a
        b.add_(1)  # in place: no new storage
        c = torch.empty(500)
    assert tracker.peak == 4 * (10 + 1000 + 2000)
    assert tracker.current == 4 * (10 + 2000 + 500)
    del b, c


def test_generation_starts_and_flops_fall_with_removed_modules(tmp_path):
    args = generation.parse_args(["--size", "tiny", "--device", "cpu", "--removed", "3", "--warmup", "0",
                                  "--iters", "1", "--video_runs", "1", "--num_inference_steps", "2",
                                  "--output", str(tmp_path / "generation.json")])
    result = generation.main(args)
    rows = result["rows"]
    assert [(r["order"], r["removed"]) for r in rows] == [("-", 0), ("flops", 3), ("params", 3)]
    assert all(r["step_s"] > 0 and r["video_s"] > 0 and len(r["blocks"]) == r["removed"] for r in rows)
    full, by_flops, by_params = rows
    assert full["flops"] > 0
    # A removed module saves exactly its own FLOPs, and the flops order removes the costliest.
    module_flops = sorted(result["module_flops"].values(), reverse=True)
    assert len(module_flops) == 11 and full["flops"] - by_flops["flops"] == sum(module_flops[:3])
    assert full["flops"] > by_params["flops"] >= by_flops["flops"]
    # The params order removes the largest modules: more parameters go than in the flops order.
    assert by_params["motion_params"] < by_flops["motion_params"] < full["motion_params"]

    # --flops_only counts the same students on the meta device (the full-size FLOPs without a GPU).
    counted = generation.main(generation.parse_args(["--size", "tiny", "--flops_only", "--removed", "3",
                                                     "--output", str(tmp_path / "flops.json")]))
    assert [(r["order"], r["flops"], r["blocks"]) for r in counted["rows"]] == \
        [(r["order"], r["flops"], r["blocks"]) for r in rows] and "step_s" not in counted["rows"][0]


def test_cpu_loop_times_a_stage_and_reads_rates(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("import sys; sys.exit(3)\n")
    log = tmp_path / "stages.jsonl"
    assert time_stage.time_stage(str(log), str(script), "--output_dir", "runs/x/prune") == 3  # to vip_loop.sh
    entry = json.loads(log.read_text())
    assert entry["stage"] == "stage" and entry["output_dir"] == "runs/x/prune"
    assert entry["seconds"] > 0 and 0 < entry["cpu_seconds"] < 30

    # Ten items written four at a time: the first chunk at t=100 is start-up, six more items by t=115.
    items = []
    for i, t in enumerate([100] * 4 + [110] * 4 + [115] * 2):
        items.append(tmp_path / f"item{i}.json")
        items[-1].write_text("{}")
        os.utime(items[-1], (t, t))
    assert cpu_loop.rate_after_first_chunk(items, chunk=4, per_item=2) == pytest.approx(6 * 2 / 15)
    assert cpu_loop.rate_after_first_chunk(items[:4], chunk=4) is None
    for step, t in ((10, 200.0), (20, 205.0)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_text("x")
        os.utime(tmp_path / f"checkpoint-{step}" / "model.safetensors", (t, t))
    assert cpu_loop.steps_per_second(str(tmp_path)) == pytest.approx(2.0)


def test_vc2_precision_compares_bf16_with_fp32_sampling(tmp_path):
    result = vc2_precision.main(vc2_precision.parse_args(["--steps", "2", "--seeds", "0", "--output",
                                                          str(tmp_path / "p.json")]))
    (row,) = result["rows"]
    assert row["steps"] == 2 and 0 < row["latents_rms_rel"] < 1 and row["video_max_levels"] >= row["video_mean_levels"]
    assert json.loads((tmp_path / "p.json").read_text())["rows"] == result["rows"]


def test_wan_step_measures_what_its_arithmetic_predicts(tmp_path):
    """A step of a 2-block tiny Wan on the CPU: checkpointing holds less, and the README's arithmetic
    (student state, bf16 teacher, checkpointed activations) is within a fifth of the measured peak."""
    args = wan_step.parse_args(["--size", "tiny", "--device", "cpu", "--num_layers", "2", "--num_frames", "9",
                                "--height", "64", "--width", "64", "--text_length", "32", "--warmup", "0",
                                "--iters", "1", "--output", str(tmp_path / "step.json")])
    rows = {r["variant"]: r for r in wan_step.main(args)["rows"]}
    assert rows["ckpt"]["peak_bytes"] < rows["no_ckpt"]["peak_bytes"]
    assert 0.8 < rows["ckpt"]["predicted_bytes"] / rows["ckpt"]["peak_bytes"] < 1.25
    full = wan_step.main(wan_step.parse_args(["--flops_only", "--num_layers", "1", "--output", str(tmp_path / "f.json")]))
    flops = {r["variant"]: r["flops"] for r in full["rows"]}
    assert flops["ckpt"] > flops["no_ckpt"]  # the recomputed forward


def test_wan_candidates_grades_blocks_and_sublayers(tmp_path):
    result = wan_candidates.main(wan_candidates.parse_args(["--shares", "0.2", "--output", str(tmp_path / "c.json")]))
    units = {r["unit"]: r for r in result["rows"]}
    assert set(units) == {"block", "sublayer"} and len(result["singles"]["sublayer"]) == 18
    assert all(0 < r["output_change"] and r["params_removed"] >= 0.2 for r in units.values())


def test_world_motion_measures_the_asked_motion_and_what_the_unet_teacher_reads(tmp_path):
    for prompt, seed in (("a red square moves left quickly", 3), ("a blue circle moves down slowly", 4)):
        speed = world.SPEEDS[world.parse_prompt(prompt)[3]]
        along, steps = world_motion.motion(world.render(prompt, seed), prompt)
        assert abs(along - speed) < 0.05
        assert np.allclose(steps, speed, atol=0.1)
    config = str(world_motion.ROOT / "configs" / "world.yaml")
    result = world_motion.main(world_motion.parse_args(["--config", config, "--videos_per_prompt", "1",
                                                        "--first_step_seeds", "4", "--output_dir", str(tmp_path)]))
    assert (tmp_path / "sd.json").exists() and set(result["by_speed"]) == {"slowly", "quickly"}
    rendered = result["first_step_centres"]["a red square moves left quickly"]["rendered"]
    assert rendered == sorted(rendered, reverse=True) and rendered[0] - rendered[-1] > 5
    assert len(result["mean_step_by_frame"]) == 7 and all(abs(v) < 2 for v in result["mean_step_by_frame"])
    for t in (500, 950):  # the committed UNet teacher reads the speed word, and the direction word hardly
        assert result["word_influence"][t]["speed"] > 5 * result["word_influence"][t]["direction"]


def test_run_cost_counts_fewer_teacher_calls_when_the_teacher_is_made_once(capsys):
    md = run_cost.main(run_cost.parse_args(["--runs", "animatediff:3"]))
    every, once, output_change, influence = [line.split("|") for line in md.splitlines() if line.startswith("| animatediff")]
    teacher, student = 7, 8
    assert int(once[teacher].replace(",", "")) < int(every[teacher].replace(",", "")) / 1.5
    assert once[student] <= every[student] and float(once[10]) < float(every[10])
    # stage 1 curates 320 prompts x 2 seeds x 25 steps x 2 (guidance): the teacher's share of curation
    assert int(once[4].replace(",", "")) == 3 * 32000 + 32000
    # Without a video a candidate, a stage's prune is M0's 16 videos (stage 1), the cut's 16 (25 steps,
    # guided) and the ranking's calls: one a prompt, and for output_change one more a candidate (21, 18, 15 left).
    number = lambda row, i: int(row[i].replace(",", ""))
    assert number(influence, 3) == 16 * 50 + 3 * (16 + 16 * 50)
    assert number(output_change, 3) == 16 * 50 + (22 + 19 + 16) * 16 + 3 * 16 * 50
    assert [number(r, i) for r in (once, output_change, influence) for i in (4, 5, 6, 7)] == [
        number(once, i) for i in (4, 5, 6, 7)] * 3  # curation, training, evaluation and the teacher: the same


def test_reward_cost_counts_what_the_flop_counter_counts():
    """The rewards' matmul count against FlopCounterMode on a real forward of each tiny model, and
    the full-size models' parameters (VideoReward 2.21B, VideoScore 8.27B)."""
    rows = {name: (counter, counted) for name, counter, counted in reward_cost.check_on_tiny()}
    assert rows["VideoReward (tiny)"][0] == rows["VideoReward (tiny)"][1] > 0
    counter, counted = rows["VideoScore (tiny)"]
    assert abs(counted / counter - 1) < 0.01
    params = sum(p.numel() for p in reward_cost.videoreward_model(reward_cost.QWEN2_VL_2B).parameters())
    assert round(params / 1e9, 2) == 2.21
    # a 81-frame Wan video at 16 fps: 10 frames read, resized to 336x588, 5 x 24 x 42 patches, a quarter merged
    assert reward_cost.videoreward_tokens(81, 480, 832, 16, 1000)[2] == 5 * 24 * 42 // 4
