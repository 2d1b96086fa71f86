"""Training beyond one process for real: accelerate's FSDP2 config (configs/accelerate/fsdp.yaml, as
users launch it) on 2 CPU processes trains the student a 1-process run of the same effective batch
trains, on the tiny AnimateDiff and the tiny Wan; a run killed after a sharded checkpoint and
resumed ends as the uninterrupted one; the student it saves exports. On CPU processes accelerate
would not turn FSDP on (it does only for accelerator devices): tests/cpu_fsdp/sitecustomize.py lets
its own FSDP path run there. Run: python -m pytest -q tests/test_sharded.py"""
import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

import curate
import export
import prune
from conftest import ROOT, loop_config, run_script

PY = sys.executable
FSDP = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29613"]
CPU_FSDP = {"ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT / "tests" / "cpu_fsdp")}


@pytest.fixture(scope="module")
def wan_stage(tmp_path_factory, tiny_reward):
    """A pruned tiny Wan and its pairs (prune.py and curate.py in-process), made once."""
    from accelerate.state import AcceleratorState, PartialState

    root = tmp_path_factory.mktemp("wan stage")
    config = loop_config("tiny_wan", root / "wan.yaml", fast_except=("build_tiny", "num_frames", "height", "width"),
                         model={"pretrained_model_name_or_path": str(root / "models" / "wan")},
                         reward={"reward_model": tiny_reward, "reward_num_frames": 9}, curate={"max_prompts": 4})
    for script, extra in ((prune, []), (curate, ["--student", str(root / "prune" / "student"),
                                                 "--ranking", str(root / "prune" / "ranking.json")])):
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        script.main(script.parse_args(["--config", config, "--output_dir", str(root / script.__name__), *extra]))
    return root, config


@pytest.fixture(params=["tiny", "tiny_wan"])
def family(request, tiny_stage, fast_config, wan_stage):
    """AnimateDiff with its motion modules training and the rest frozen; Wan whole, its blocks'
    activations recomputed in the backward pass."""
    return (tiny_stage, fast_config, []) if request.param == "tiny" else (*wan_stage, ["--gradient_checkpointing"])


def even_pairs(stage):
    """The stage's pairs, two of them: every batch whole in one process and in two (an odd last pair
    would be batched alone by one process and with a repeat by two)."""
    path = stage / "curate" / "pairs_even.jsonl"
    path.write_text("".join((stage / "curate" / "pairs.jsonl").read_text().splitlines(keepends=True)[:2]))
    return path


def train_argv(stage, config, out, *extra):
    # adam_epsilon 1e-4: AdamW divides by the gradient's running size, so at the default 1e-8 a
    # near-zero gradient summed in another order (two processes' halves) moves a weight by a
    # different step; at 1e-4 the students of one and of two processes agree to float precision.
    return ["train_redpo.py", "--config", config, "--output_dir", str(out), "--student", str(stage / "prune" / "student"),
            "--pairs", str(even_pairs(stage)), "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--report_to", "none", "--adam_epsilon", "1e-4", *extra]


def student(out):
    return load_file(out / "student" / "student.safetensors")


def test_fsdp_on_two_processes_trains_what_one_process_does_and_resumes(family, tmp_path):
    stage, config, extra = family
    run_script(PY, *train_argv(stage, config, tmp_path / "one", "--train_batch_size", "2", *extra))
    run_script(*FSDP, *train_argv(stage, config, tmp_path / "fsdp", "--train_batch_size", "1", *extra), env=CPU_FSDP)
    one, two = student(tmp_path / "one"), student(tmp_path / "fsdp")
    start = load_file(stage / "prune" / "student" / "student.safetensors")
    assert one.keys() == two.keys() and any(not torch.equal(one[k], start[k]) for k in one)
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)
    assert sorted(os.listdir(tmp_path / "fsdp" / "checkpoint-2")) == [
        "optimizer_0", "pytorch_model_fsdp_0", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin"]

    # Killed once its first sharded checkpoint is whole, then run again: the uninterrupted student.
    killed = tmp_path / "killed"
    cmd = [*FSDP, *train_argv(stage, config, killed, "--train_batch_size", "1", "--resume_from_checkpoint", "latest", *extra)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **CPU_FSDP}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoint-2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the kill"
    for child in [*psutil.Process(proc.pid).children(recursive=True), proc]:  # the launcher's workers run apart
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "student").exists()
    result = run_script(*cmd, env=CPU_FSDP)
    assert "resumed from" in result.stdout + result.stderr
    again = student(killed)
    assert all(torch.allclose(again[k], two[k], atol=1e-6) for k in two)

    # The student it saved whole is a student like any other: it exports.
    export.main(export.parse_args(["--config", config, "--student", str(tmp_path / "fsdp" / "student"),
                                   "--output_dir", str(tmp_path / "export")]))
    assert (tmp_path / "export" / "model_index.json").exists()
