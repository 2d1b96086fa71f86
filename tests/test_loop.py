"""vip_loop.sh end to end on tiny models: offline ablation over 2 stages, and a run killed mid-prune,
mid-curate and mid-train that, rerun each time, ends where an uninterrupted run does.
Run: python -m pytest -q tests/test_loop.py"""
import json
import os
import shlex
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, run_script


@pytest.fixture(scope="module")
def loop_config(fast_config, tmp_path_factory):
    # One video per call: batch shapes then never differ between a resumed and an uninterrupted
    # run, so their results can be compared bit for bit.
    config = yaml.safe_load(open(fast_config))
    config["model"]["generation_batch_size"] = 1
    config["reward"]["reward_batch_size"] = 1
    path = tmp_path_factory.mktemp("loop config") / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def loop(config, run_dir, *args):
    return ["bash", "vip_loop.sh", "tiny", *args], {**os.environ, "CONFIG": config, "RUN_DIR": str(run_dir)}


@pytest.fixture(scope="module")
def offline_run(loop_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "offline run"
    cmd, env = loop(loop_config, run, "2", "--offline")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_offline_reuses_stage_one_pairs(offline_run):
    assert not (offline_run / "stage_2" / "curate").exists()
    train2 = yaml.safe_load((offline_run / "stage_2" / "train" / "config.yaml").read_text())["train"]
    assert train2["pairs"] == [str(offline_run / "stage_1" / "curate" / "pairs.jsonl")]
    assert train2["student"] == str(offline_run / "stage_2" / "prune" / "student")
    prune2 = yaml.safe_load((offline_run / "stage_2" / "prune" / "config.yaml").read_text())["prune"]
    assert prune2["student"] == str(offline_run / "stage_1" / "train" / "student")  # stage 2 prunes the trained one
    removed = json.loads((offline_run / "stage_2" / "prune" / "student" / "student.json").read_text())["removed_blocks"]
    assert len(removed) == 2  # one block a stage
    report = json.loads((offline_run / "eval" / "eval.json").read_text())
    assert [m["label"] for m in report["models"]] == ["teacher (M0)", "stage_1/prune", "stage_1/train",
                                                      "stage_2/prune", "stage_2/train"]


def run_until(cmd, env, ready, timeout=300):
    """Start the loop, wait for `ready()`, then kill the whole process group (bash and its Python)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the loop ended before the kill point"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def count(folder):
    return len(list(folder.glob("*"))) if folder.exists() else 0


def test_killed_loop_finishes_like_an_uninterrupted_run(loop_config, offline_run, tmp_path):
    run = tmp_path / "killed run, #1"  # a comma (--students) and " #" (a YAML comment) in every path
    s1 = run / "stage_1"
    cmd, env = loop(loop_config, run, "1")
    run_until(cmd, env, lambda: count(s1 / "prune" / "scan") >= 5)                      # mid-prune
    assert not (s1 / "prune" / "ranking.json").exists()
    run_until(cmd, env, lambda: (s1 / "curate" / "config.yaml").exists() and count(s1 / "curate" / "items") >= 1)
    assert not (s1 / "curate" / "pairs.jsonl").exists()                                 # mid-curate
    run_until(cmd, env, lambda: (s1 / "train" / "checkpoint-2").exists())               # mid-train
    assert not (s1 / "train" / "student").exists()
    result = run_script(*cmd, env={"CONFIG": loop_config, "RUN_DIR": str(run)})
    assert "prune: " in result.stdout and "skipping" in result.stdout and "resumed from" in result.stdout + result.stderr

    ref = offline_run / "stage_1"
    for name in ("prune/ranking.json", "curate/pairs.jsonl", "prune/student/student.json"):
        assert (s1 / name).read_text().replace(str(run), "") == (ref / name).read_text().replace(str(offline_run), "")
    a, b = load_file(s1 / "train" / "student" / "student.safetensors"), load_file(ref / "train" / "student" / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours = json.loads((run / "eval" / "eval.json").read_text())["models"]
    theirs = json.loads((offline_run / "eval" / "eval.json").read_text())["models"][:3]
    assert [m["scores"] for m in ours] == [m["scores"] for m in theirs]
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name and p.name != "checkpoint-2.tmp"]
    assert leftovers == []  # a kill mid-write leaves at most a temporary that nothing reads


def test_loop_rejects_bad_arguments():
    out = subprocess.run(["bash", "vip_loop.sh", "tiny", "two"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "STAGES must be a whole number from 1 to 999" in out.stderr
    out = subprocess.run(["bash", "vip_loop.sh", "tiny", "99999999999999999999"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "STAGES must be a whole number from 1 to 999" in out.stderr
    out = subprocess.run(["bash", "vip_loop.sh", "nosuchmodel", "1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "configs/nosuchmodel.yaml: no such config" in out.stderr


def test_the_loops_last_student_loads_in_plain_diffusers(offline_run, loop_config, tmp_path):
    """vip_loop.sh ends with export.py: an AnimateDiffPipeline folder that diffusers loads with no vip
    module on the path and that generates what vip's student does; every tensor name accounted for."""
    import huggingface_hub

    import export
    import models
    import stage
    from conftest import plain_diffusers

    folder, trained = offline_run / "export", offline_run / "stage_2" / "train" / "student"
    args = export.parse_args(["--config", loop_config])
    call = dict(prompt=["a red ball bounces on the floor", "a cat walks in the rain"], num_frames=args.num_frames,
                height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, seeds=[0, 1])
    theirs = plain_diffusers(folder, dict(call), tmp_path)
    backend = stage.backend_of(args)
    student = models.load_model(backend, args, student=str(trained))
    ours = backend.generate(backend.load_pipeline(args, student), call["prompt"], call["seeds"], args, return_latents=True)[1]
    assert theirs["pipeline"] == "AnimateDiffPipeline" and torch.allclose(theirs["latents"], ours, atol=1e-5)
    removed = json.loads((trained / "student.json").read_text())["removed_blocks"]
    emptied = {f"{b}.{p}.{w}" for b in removed for p in ("norm", "proj_in", "proj_out") for w in ("weight", "bias")}
    assert set(theirs["keys"]) == set(student.state_dict()) | emptied and len(removed) == 2  # both ways
    card = huggingface_hub.ModelCard.load(folder / "README.md")  # as the hub parses it
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-video"
    rows = [line for line in card.text.splitlines() if line.startswith(("| teacher (M0) |", "| stage_2/train |"))]
    assert len(rows) == 2 and all(r in (offline_run / "eval" / "eval.md").read_text().splitlines() for r in rows)
    assert "python train_redpo.py --config" in card.text and "--output_dir " + shlex.quote(str(folder)) in card.text
