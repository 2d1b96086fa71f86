"""Training beyond one process for real: accelerate's FSDP2 config (configs/accelerate/fsdp.yaml, as
users launch it) on 2 CPU processes trains the student a 1-process run of the same effective batch
trains, on the tiny AnimateDiff and the tiny Wan; a run killed after a sharded checkpoint and
resumed ends as the uninterrupted one; the student it saves exports. On CPU processes accelerate
would not turn FSDP on (it does only for accelerator devices): tests/cpu_sharding/sitecustomize.py lets
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


def launch(config, port, *extra):
    """accelerate launch with a config of the repo, on 2 processes, its numbers in float32."""
    return [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{config}.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port), *extra]


FSDP = launch("fsdp", 29613)
CPU_FSDP = {"ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT / "tests" / "cpu_sharding")}
CPU_DEEPSPEED = {"PYTHONPATH": str(ROOT / "tests" / "cpu_sharding")}  # DeepSpeed finds no GPU: its CPU accelerator


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


def killed_and_resumed(cmd, out, env):
    """Run `cmd` (a launch of train_redpo.py into `out`), kill every process of it once its first
    checkpoint is whole, run it again with --resume_from_checkpoint latest; returns the student."""
    cmd = [*cmd, "--resume_from_checkpoint", "latest"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the kill"
    for child in [*psutil.Process(proc.pid).children(recursive=True), proc]:  # the launcher's workers run apart
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "student").exists()
    result = run_script(*cmd, env=env)
    assert "resumed from" in result.stdout + result.stderr
    return student(out)


def close(a, b, atol=1e-6):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def test_fsdp_on_two_processes_trains_what_one_process_does_and_resumes(family, tmp_path):
    stage, config, extra = family
    run_script(PY, *train_argv(stage, config, tmp_path / "one", "--train_batch_size", "2", *extra))
    run_script(*FSDP, *train_argv(stage, config, tmp_path / "fsdp", "--train_batch_size", "1", *extra), env=CPU_FSDP)
    one, two = student(tmp_path / "one"), student(tmp_path / "fsdp")
    start = load_file(stage / "prune" / "student" / "student.safetensors")
    assert one.keys() == two.keys() and any(not torch.equal(one[k], start[k]) for k in one)
    assert close(one, two)
    assert sorted(os.listdir(tmp_path / "fsdp" / "checkpoint-2")) == [
        "optimizer_0", "pytorch_model_fsdp_0", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin"]

    killed = tmp_path / "killed"
    assert close(killed_and_resumed([*FSDP, *train_argv(stage, config, killed, "--train_batch_size", "1", *extra)],
                                    killed, CPU_FSDP), two)

    # The student it saved whole is a student like any other: it exports.
    export.main(export.parse_args(["--config", config, "--student", str(tmp_path / "fsdp" / "student"),
                                   "--output_dir", str(tmp_path / "export")]))
    assert (tmp_path / "export" / "model_index.json").exists()


@pytest.mark.parametrize("zero, port", [(2, 29621), (3, 29623)])
def test_deepspeed_zero_on_two_processes_trains_what_one_process_does_and_resumes(zero, port, tiny_stage, fast_config,
                                                                                 tmp_path):
    """DeepSpeed's ZeRO-2 and ZeRO-3 configs, through accelerate on its CPU accelerator (gradient
    accumulation given as the launch flag the configs ask to match)."""
    ds = launch(f"deepspeed_zero{zero}", port, "--gradient_accumulation_steps", "1")
    run_script(PY, *train_argv(tiny_stage, fast_config, tmp_path / "one", "--train_batch_size", "2"))
    run_script(*ds, *train_argv(tiny_stage, fast_config, tmp_path / "zero", "--train_batch_size", "1"), env=CPU_DEEPSPEED)
    one, two = student(tmp_path / "one"), student(tmp_path / "zero")
    assert close(one, two) and (tmp_path / "zero" / "checkpoint-2" / "pytorch_model").is_dir()  # DeepSpeed's own layout
    if zero == 3:
        killed = tmp_path / "killed"
        assert close(killed_and_resumed([*ds, *train_argv(tiny_stage, fast_config, killed, "--train_batch_size", "1")],
                                        killed, CPU_DEEPSPEED), two)


def two_machines(argv, port):
    """`argv` (a script and its flags) launched as users launch it on two machines of one process
    each (ranks 0 and 1, the main process at 127.0.0.1), both on this host."""
    base = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "multi_gpu.yaml"),
            "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port",
            str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]
    procs = [subprocess.Popen([*base, "--machine_rank", str(rank), *argv], cwd=ROOT, text=True,
                              env={**os.environ, "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-2000:] for _, err in outs)
    return outs


def test_two_machines_make_what_one_process_makes(tiny_stage, fast_config, tmp_path):
    """prune, curate, train and evaluate across two machines (one host, ranks 0 and 1): each writes
    its results once, splits its items over both, and makes what one process makes."""
    import json

    import evaluate

    out = tmp_path / "two machines"
    outs = two_machines(["prune.py", "--config", fast_config, "--output_dir", str(out / "prune")], 29671)
    assert "prune: block scan: 24 items on 2 process(es)" in outs[0][0] and "prune: removed" not in outs[1][0]
    ours, theirs = (json.loads((s / "prune" / "ranking.json").read_text()) for s in (out, tiny_stage))
    assert ours["chosen"] == theirs["chosen"]
    assert [c["cost"] for c in ours["candidates"]] == pytest.approx([c["cost"] for c in theirs["candidates"]], abs=1e-3)

    two_machines(["curate.py", "--config", fast_config, "--output_dir", str(out / "curate"), "--student",
                  str(out / "prune" / "student"), "--ranking", str(out / "prune" / "ranking.json")], 29672)
    rows = [[json.loads(line) for line in (s / "curate" / "candidates.jsonl").read_text().splitlines()]
            for s in (out, tiny_stage)]
    assert [(r["prompt"], r["seed"], r["kept"]) for r in rows[0]] == [(r["prompt"], r["seed"], r["kept"]) for r in rows[1]]
    assert [r["loser_scores"] for r in rows[0]] == [pytest.approx(r["loser_scores"], abs=1e-3) for r in rows[1]]

    run_script(PY, *train_argv(tiny_stage, fast_config, tmp_path / "one", "--train_batch_size", "2"))
    two_machines([*train_argv(tiny_stage, fast_config, out / "train", "--train_batch_size", "1")], 29673)
    one, two = student(tmp_path / "one"), student(out / "train")
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)

    argv = ["--config", fast_config, "--students", str(tiny_stage / "prune" / "student")]
    two_machines(["evaluate.py", *argv, "--output_dir", str(out / "eval")], 29674)
    evaluate.main(evaluate.parse_args([*argv, "--output_dir", str(tmp_path / "eval")]))
    ours, theirs = (json.loads((d / "eval.json").read_text())["models"] for d in (out / "eval", tmp_path / "eval"))
    # other batches, other rounding: a frame's pixel can round the other way, and the random reward reads it
    assert [m["scores"] for m in ours] == [pytest.approx(m["scores"], abs=1e-2) for m in theirs]
