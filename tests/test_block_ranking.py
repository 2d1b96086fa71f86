"""Block rankings that generate no video (block_ranking.py, prune.py --scan): the measures by hand,
the sampler's timesteps, a block that adds nothing ranked first on a UNet's motion modules and a
DiT's sub-layers, prune.py with each (ranks, resumes after a kill to the same cut, refuses a bad
choice in one line). Run: python -m pytest -q tests/test_block_ranking.py"""
import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import block_ranking
import models
import prune
import stage
from conftest import ROOT, run_script
from test_faults import run_with_fault


def test_the_measures_by_hand():
    old = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    new = torch.tensor([[3.0, 5.0], [0.0, 0.0]])
    assert block_ranking.relative_change(new, old).tolist() == pytest.approx([1 / 25, 1.0])
    # a module that folds 2 frames of each of 2 samples into its batch is measured per sample
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    output = inputs + torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert block_ranking.update_size(output, inputs, inputs, 2).tolist() == pytest.approx([1 / math.sqrt(2), 0.0])
    # a branch's stand-in is zero: its update is its whole output
    assert block_ranking.update_size(output, torch.zeros_like(output), inputs, 2).tolist() == pytest.approx(
        [math.sqrt(3) / math.sqrt(2), 1.0])


def test_scan_timesteps_are_among_the_samplers_and_leave_its_scheduler_alone():
    ddim = DDIMScheduler(beta_schedule="linear", timestep_spacing="linspace", steps_offset=1)
    ddim.set_timesteps(4)
    before = ddim.timesteps.clone()
    visited = DDIMScheduler.from_config(ddim.config)
    visited.set_timesteps(10)
    assert block_ranking.scan_timesteps(ddim, 10, 1).tolist() == [visited.timesteps[5].item()]
    assert block_ranking.scan_timesteps(ddim, 10, 3).tolist() == visited.timesteps[[1, 5, 8]].tolist()
    visited.set_timesteps(3)
    assert block_ranking.scan_timesteps(ddim, 3, 5).tolist() == visited.timesteps.tolist()  # at most every one
    assert torch.equal(ddim.timesteps, before)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    t = block_ranking.scan_timesteps(flow, 10, 1)
    flow.set_timesteps(10)
    assert t.tolist() == [flow.timesteps[5].item()] and 0 < t.item() < 1000  # 1000 sigma, shifted


def world_denoiser(config):
    args = stage.parse_config(["--config", str(ROOT / "configs" / config)], "t", {"model": stage.MODEL_OPTIONS})
    backend = stage.backend_of(args)
    return backend, args, models.load_model(backend, args).eval()


@pytest.mark.parametrize("config,silenced,output", [
    ("world.yaml", "up_blocks.1.motion_modules.0", "proj_out"),  # a motion module: the identity when removed
    ("world_wan.yaml", "blocks.1.ffn", "net.2"),                  # a sub-layer: a zero update when removed
])
@pytest.mark.parametrize("kind", block_ranking.MEASURES)
def test_a_block_that_adds_nothing_costs_nothing_and_the_others_something(config, silenced, output, kind):
    backend, args, model = world_denoiser(config)
    with torch.no_grad():  # its last projection zero: the block's update is exactly zero
        for p in model.get_submodule(f"{silenced}.{output}").parameters():
            p.zero_()
    pipe = backend.load_pipeline(args, model)
    prompts = ["a red square moves left slowly", "a blue circle moves up fast"]
    latents = torch.randn(2, *backend.denoise_inputs(model, 1, args.num_frames, args.height, args.width)[0].shape[1:])
    text = backend.encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, "cpu")
    names = [b["name"] for b in models.list_blocks(backend, model)]
    timesteps = block_ranking.scan_timesteps(pipe.scheduler, args.num_inference_steps, 2)
    values = block_ranking.measure(kind, backend, model, names, backend.objective(args), timesteps, latents, text, [0, 1])
    assert set(values) == set(names) and all(len(v) == 2 for v in values.values())
    assert values[silenced] == [0.0, 0.0]  # exactly: nothing added, nothing taken away
    assert min(min(v) for n, v in values.items() if n != silenced) > 1e-8
    # the model is whole again afterwards, and its hooks are gone
    assert models.removed_blocks(backend, model) == [] and not model.get_submodule(names[0])._forward_hooks


@pytest.mark.parametrize("scan", block_ranking.MEASURES)
def test_prune_ranks_without_a_video_a_candidate(fast_config, tmp_path, scan, capsys):
    argv = ["--config", fast_config, "--output_dir", str(tmp_path), "--num_blocks", "2", "--scan", scan]
    prune.main(prune.parse_args(argv))
    r = json.loads((tmp_path / "ranking.json").read_text())
    assert r["scan"] == scan and len(r["candidates"]) == 11 and r["unpruned"] is None
    costs = [c["cost"] for c in r["candidates"]]
    assert costs == sorted(costs) and costs[-1] > 0 and r["chosen"] == [c["name"] for c in r["candidates"][:2]]
    assert r["targets"] == [a for a in r["aspects"] if r["pruned"][a] < r["teacher"][a]] or r["targets"] == r["aspects"]
    # the videos made: M0's and the pruned student's, for the 2 scan prompts; none a candidate
    spent = json.loads((tmp_path / "cost.json").read_text())[-1]
    assert spent["videos/student"] == 2 and spent["videos/teacher"] == 2
    calls = 2 * (1 + 11) if scan == "output_change" else 2  # one call a prompt, and one a candidate
    assert spent["denoiser_calls/student"] == 2 * 3 * 2 + calls  # the pruned videos: 3 guided steps
    assert sorted(p.name for p in (tmp_path / "scan").glob("*.json")) == sorted(
        [f"{scan}__0000.json", f"{scan}__0001.json", "teacher__0000.json", "teacher__0001.json"]
        + [f"{t}__000{i}.json" for t in {p.name.split("__")[0] for p in (tmp_path / "scan").glob("pruned-*")}
           for i in (0, 1)])
    assert prune.MEANINGS[scan] in (tmp_path / "ranking.md").read_text()
    student = json.loads((tmp_path / "student" / "student.json").read_text())
    assert sorted(student["removed_blocks"]) == sorted(r["chosen"])
    prune.main(prune.parse_args(argv))
    assert "skipping" in capsys.readouterr().out

    # stage 2: the student's blocks ranked on M0's latents; the removed ones are no candidates
    out2 = tmp_path / "stage 2"
    prune.main(prune.parse_args(["--config", fast_config, "--output_dir", str(out2), "--scan", scan,
                                 "--student", str(tmp_path / "student")]))
    r2 = json.loads((out2 / "ranking.json").read_text())
    assert len(r2["candidates"]) == 9 and not set(r2["chosen"]) & set(r["chosen"])


KILL_AT_SECOND_MEASURE = """
import block_ranking
_measure, calls = block_ranking.measure, []
def measure(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return _measure(*args, **kwargs)
block_ranking.measure = measure
"""


@pytest.mark.parametrize("scan", block_ranking.MEASURES)
def test_a_killed_scan_resumes_to_the_same_cut(fast_config, tmp_path, scan):
    argv = ["--config", fast_config, "--scan", scan, "--generation_batch_size", "1"]
    whole = tmp_path / "whole"
    run_script("python", "prune.py", *argv, "--output_dir", str(whole))
    killed = tmp_path / "killed"
    out = run_with_fault("prune", [*argv, "--output_dir", killed], KILL_AT_SECOND_MEASURE)
    assert out.returncode == -9 and not (killed / "ranking.json").exists()
    assert [p.name for p in (killed / "scan").glob(f"{scan}__*.json")] == [f"{scan}__0000.json"]
    first = (killed / "scan" / f"{scan}__0000.json").stat().st_mtime_ns
    run_script("python", "prune.py", *argv, "--output_dir", str(killed))
    assert (killed / "scan" / f"{scan}__0000.json").stat().st_mtime_ns == first  # kept, not measured again
    a, b = (json.loads((d / "ranking.json").read_text()) for d in (whole, killed))
    assert a["chosen"] == b["chosen"] and a["candidates"] == b["candidates"] and a["pruned"] == b["pruned"]


@pytest.mark.parametrize("flag,value,expected", [("--scan", "flops", "--scan: expected one of videos, "
                                                  "output_change, block_influence; got 'flops'"),
                                                 ("--scan_timesteps", "0", "--scan_timesteps: expected a number "
                                                  "at least 1; got '0'")])
def test_a_bad_scan_is_one_line(fast_config, tmp_path, flag, value, expected):
    out = run_script("python", "prune.py", "--config", fast_config, "--output_dir", str(tmp_path / "out"), flag, value,
                     check=False)
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "out").exists()


def test_scan_proxies_counts_the_rankings_own_calls_and_shares_a_student_only_on_the_same_cuts():
    from benchmarks import scan_proxies

    def run(chosen, calls, cost):
        return {"chosen": chosen, "calls": calls, "cost": cost, "wall_s": 1.0, "candidate_videos": 6}

    # the video scan: 3 candidates + M0, 2 prompts, 20 calls a video; a proxy: its calls and the cut's 2 videos
    videos = run(["a"], {"denoiser_calls/teacher": 40, "denoiser_calls/student": 120, "videos/student": 6},
                 {"a": 0.1, "b": 0.2, "c": 0.3})
    same = run(["a"], {"denoiser_calls/student": 8 + 40, "videos/student": 2}, {"a": 1.0, "b": 3.0, "c": 2.0})
    other = run(["b"], {"denoiser_calls/student": 8 + 40, "videos/student": 2}, {"a": 2.0, "b": 1.0, "c": 3.0})
    assert scan_proxies.ranking_calls(videos, videos) == 160 and scan_proxies.ranking_calls(same, videos) == 8
    assert scan_proxies.ranking_calls(videos, videos, candidates_only=True) == 120
    student = lambda x: {"average": x, "se": 0.01}
    results = [{"stage_1": {"videos": videos, "p": same}, "stage_2": {"videos": videos, "p": same},
                "students": {"videos/1": student(3.0), "videos/2": student(2.0)}, "same_cuts": {"p": [True, True]}},
               {"stage_1": {"videos": videos, "p": other}, "stage_2": {"videos": videos, "p": other},
                "students": {"videos/1": student(3.2), "videos/2": student(2.2), "p/1": student(3.5), "p/2": student(2.0)},
                "same_cuts": {"p": [False, False]}}]
    md, summary = scan_proxies.table("t", results, ["p"])
    assert summary["p"]["stage_1"]["calls"] == 8 and summary["p"]["stage_1"]["same"] == 1
    assert summary["p"]["stage_1"]["spearman"] == pytest.approx([0.5, 0.5])
    # seed 0's student is the video scan's (the same cuts), seed 1's its own
    assert summary["p"]["students"][1] == pytest.approx((3.25, 0.01)) and summary["p"]["minus_videos"][1] == (
        pytest.approx(0.15), 1, 0)
    assert "| p | 8 (0.050; 0.067) |" in md


def test_a_video_scan_made_before_the_choice_stands_and_another_choice_replaces_it(fast_config, tmp_path, capsys):
    argv = ["--config", fast_config, "--output_dir", str(tmp_path)]
    prune.main(prune.parse_args(argv))
    record = tmp_path / "provenance.json"
    made = json.loads(record.read_text())["made_from"]
    assert made["prune"]["scan"] == made["prune"]["scan_timesteps"] == "<unused>"
    prune.main(prune.parse_args([*argv, "--scan_timesteps", "3"]))  # nothing a video scan uses
    assert "skipping" in capsys.readouterr().out
    for key in ("scan", "scan_timesteps"):  # as a record from before the choice reads
        del made["prune"][key]
    record.write_text(json.dumps({**json.loads(record.read_text()), "made_from": made}))
    prune.main(prune.parse_args(argv))
    assert "skipping" in capsys.readouterr().out
    prune.main(prune.parse_args([*argv, "--scan", "block_influence"]))
    assert json.loads((tmp_path / "ranking.json").read_text())["scan"] == "block_influence"
    assert len(list((tmp_path / "replaced").iterdir())) == 1
