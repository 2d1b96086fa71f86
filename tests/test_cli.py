"""The scripts as users run them: subprocesses, `accelerate launch` with 2 CPU processes, a resume
after a kill, a non-finite loss, and bad input. Run: python -m pytest -q tests/test_cli.py"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from stage import read_manifest
from conftest import ROOT, run_script

PY = sys.executable
# Two CPU processes of the DDP config (configs/accelerate/multi_gpu.yaml): accelerate's --cpu flag
# alone starts one; ACCELERATE_USE_CPU with the config starts two with the gloo backend.
LAUNCH2 = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "multi_gpu.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
CPU = {"ACCELERATE_USE_CPU": "1"}


@pytest.fixture(scope="module")
def stage(tiny_stage):
    return tiny_stage


def train_cmd(fast_config, stage, out, *extra):
    return [PY, "train_redpo.py", "--config", fast_config, "--output_dir", str(out), "--student",
            str(stage / "prune" / "student"), "--pairs", str(stage / "curate" / "pairs.jsonl"), *extra]


def test_curate_on_two_processes_matches_one(fast_config, stage, tmp_path):
    out = tmp_path / "curate 2"
    result = run_script(*LAUNCH2, "curate.py", "--config", fast_config, "--output_dir", str(out), "--student",
                        str(stage / "prune" / "student"), "--ranking", str(stage / "prune" / "ranking.json"), env=CPU)
    assert "curate: pairs: 4 items on 2 process(es)" in result.stdout
    one = (stage / "curate" / "candidates.jsonl").read_text().splitlines()
    two = (out / "candidates.jsonl").read_text().splitlines()
    # Scores, and the files' sizes and digests, up to float noise across batch shapes.
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in ("files", "latents_sha256")  # noqa: E731
                           and "scores" not in k} for r in rows]
    assert strip(two) == strip(one)
    assert [json.loads(r)["files"].keys() for r in two] == [json.loads(r)["files"].keys() for r in one]
    for a, b in zip(one, two):  # same videos, same scores, up to float noise across batch shapes
        for key in ("winner_scores", "loser_scores"):
            assert json.loads(b)[key] == pytest.approx(json.loads(a)[key], abs=1e-3)


def test_train_on_two_processes(fast_config, stage, tmp_path):
    out = tmp_path / "train 2"
    result = run_script(*LAUNCH2, *train_cmd(fast_config, stage, out, "--train_batch_size", "1")[1:], env=CPU)
    assert "effective batch 2 pairs" in result.stdout + result.stderr
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-2", "checkpoint-4", "config.yaml", "cost.json", "logs",
                                       "metrics.jsonl", "provenance.json", "student"]
    spent = json.loads((out / "cost.json").read_text())[-1]  # the ledger sums both processes' calls
    assert spent["processes"] == 2 and spent["denoiser_calls/teacher"] == 4 * 2 * 2  # steps x processes x 2 videos
    assert json.loads((out / "student" / "student.json").read_text())["steps"] == 4


# What travels with train_redpo.py into another project (README, "Copying the trainer").
TRAINER_FILES = ("train_redpo.py", "common.py", "stage.py", "provenance.py", "models.py", "backends/animatediff.py")


def test_train_redpo_and_its_five_files_alone_train_in_another_project(fast_config, stage, tmp_path):
    """Users copy train_redpo.py into their own projects with the five files the README names: they alone train."""
    assert all(f"`{name}`" in (ROOT / "README.md").read_text() for name in TRAINER_FILES)
    project = tmp_path / "their project"
    (project / "backends").mkdir(parents=True)
    for name in TRAINER_FILES:
        shutil.copy(ROOT / name, project / name)
    out = tmp_path / "trained"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(train_cmd(fast_config, stage, out, "--max_train_steps", "2"), cwd=project, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before = load_file(stage / "prune" / "student" / "student.safetensors")
    after = load_file(out / "student" / "student.safetensors")
    moved = [k for k in after if ".motion_modules." in k and not torch.equal(after[k], before[k])]
    assert moved and all(".motion_modules." in k for k in after)


def test_resume_after_kill_matches_an_uninterrupted_run(fast_config, stage, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    extra = ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"]
    run_script(*train_cmd(fast_config, stage, whole, *extra))
    proc = subprocess.Popen(train_cmd(fast_config, stage, cut, *extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoint-2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (cut / "checkpoint-2").exists() and not (cut / "student").exists()
    result = run_script(*train_cmd(fast_config, stage, cut, *extra))
    assert "resumed from" in result.stdout + result.stderr
    a, b = load_file(whole / "student" / "student.safetensors"), load_file(cut / "student" / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(fast_config, stage, tmp_path):
    out = tmp_path / "nan"
    result = run_script(*train_cmd(fast_config, stage, out, "--learning_rate", "1e30", "--checkpointing_steps", "1",
                                   "--max_grad_norm", "1e30", "--adam_epsilon", "1e-30"), check=False)
    assert result.returncode == 1
    assert "non-finite loss" in result.stderr and "Traceback" not in result.stderr
    assert "last good checkpoint" in result.stderr and (out / "checkpoint-1").exists()
    assert not (out / "student").exists()


def run_bad(*args):
    result = run_script(PY, *args, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    return lines[-1]


def test_bad_input_is_one_line_and_writes_nothing(fast_config, stage, tmp_path):
    out = tmp_path / "out"
    student, pairs = str(stage / "prune" / "student"), stage / "curate" / "pairs.jsonl"

    # unknown config key
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(fast_config).read().replace("num_blocks:", "num_blockz:"))
    line = run_bad("prune.py", "--config", str(bad), "--output_dir", str(out))
    assert str(bad) in line and "unknown key 'prune.num_blockz'" in line and "num_blocks" in line

    # a block name that does not exist
    line = run_bad("prune.py", "--config", fast_config, "--output_dir", str(out), "--candidates", "up_blocks.7.motion_modules.0")
    assert "prune.candidates: no block 'up_blocks.7.motion_modules.0'" in line

    # empty prompt file
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    line = run_bad("curate.py", "--config", fast_config, "--output_dir", str(out), "--student", student,
                   "--target_aspects", "dynamic_degree", "--curation_prompts", str(empty))
    assert f"{empty}: no prompts" in line

    # zero pairs after filtering: the threshold that removed them is named
    line = run_bad("curate.py", "--config", fast_config, "--output_dir", str(tmp_path / "zero"), "--student", student,
                   "--ranking", str(stage / "prune" / "ranking.json"), "--tau_p", "1000")
    assert "no pair kept of 4" in line and "failed S(v_pruned) > tau_p (1000.0)" in line
    assert not (tmp_path / "zero" / "pairs.jsonl").exists()

    # malformed manifest line
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(pairs.read_text() + '{"prompt": "half a line"\n')
    n = len(pairs.read_text().splitlines()) + 1
    line = run_bad(*train_cmd(fast_config, stage, out, "--pairs", str(manifest))[1:])
    assert f"{manifest}:{n}: expected a JSON object with id, prompt, seed" in line

    # missing and corrupt MP4 referenced by a manifest
    copy = tmp_path / "copy"
    shutil.copytree(stage / "curate", copy)
    row = read_manifest(copy / "pairs.jsonl")[0]
    (copy / row["winner"]).unlink()
    line = run_bad(*train_cmd(fast_config, stage, out, "--pairs", str(copy / "pairs.jsonl"))[1:])
    assert "pairs.jsonl:1: winner" in line and "is missing" in line
    (copy / row["winner"]).write_bytes(b"\x00" * 100)
    line = run_bad(*train_cmd(fast_config, stage, out, "--pairs", str(copy / "pairs.jsonl"))[1:])
    assert "is not a whole MP4" in line

    # a checkpoint whose base model does not match the config
    other = tmp_path / "other student"
    shutil.copytree(student, other)
    meta = json.loads((other / "student.json").read_text())
    meta["motion_adapter"] = "guoyww/animatediff-motion-adapter-v1-5-3"
    (other / "student.json").write_text(json.dumps(meta))
    line = run_bad("prune.py", "--config", fast_config, "--output_dir", str(out), "--student", str(other))
    assert f"{other}/student.json: motion_adapter is 'guoyww/animatediff-motion-adapter-v1-5-3'" in line

    # nothing half-written by any of them
    assert not (out / "ranking.json").exists() and not (out / "student").exists()
