"""Faults and bad input: the loop loses no finished work. Kills at exact moments (a fault injected
into a subprocess that SIGKILLs itself), non-finite weights, two runs on one folder, bad values,
bad files and models that are not there. Run: python -m pytest -q tests/test_faults.py"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import common
import provenance
import stage
import curate
import evaluate
import prune
import train_redpo
from conftest import ROOT, run_script

PY = sys.executable


def run_with_fault(script, argv, fault="", env=None):
    """`script`'s main, as run_main runs it, in a subprocess where `fault` (Python run first)
    patches something to SIGKILL the process at a chosen moment."""
    code = (f"import os, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport common, {script}\n{fault}\n"
            f"common.run_main({script}.main, lambda: {script}.parse_args({[str(a) for a in argv]!r}))\n")
    return subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


KILL_IN_SAVE_OF_CHECKPOINT_4 = """
import accelerate
_save = accelerate.Accelerator.save_state
def save_state(self, output_dir=None, **kwargs):
    out = _save(self, output_dir, **kwargs)  # the state is written whole, not yet renamed into place
    if os.path.basename(output_dir).startswith("checkpoint-4"):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
accelerate.Accelerator.save_state = save_state
"""
KILL_BEFORE_STUDENT = "import models; models.save_student = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)"
NAN_AFTER_STEP_3 = """
import torch
_step, calls = torch.optim.AdamW.step, []
def step(self, *args, **kwargs):
    out = _step(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 3:
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
    return out
torch.optim.AdamW.step = step
"""


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


def call_main(script, argv, capsys):
    """`script`'s main in-process, as run_main runs it: (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        common.run_main(script.main, lambda: script.parse_args([str(a) for a in argv]))
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def pairs3(tiny_stage, tmp_path_factory):
    """The stage's pairs as a 3-row manifest: with 1 pair a step, 3 updates an epoch, so 5 steps
    end mid-epoch (where a resume at the last checkpoint used to take one step more)."""
    folder = tmp_path_factory.mktemp("pairs3") / "curate"
    shutil.copytree(tiny_stage / "curate", folder)
    rows = stage.read_manifest(folder / "pairs.jsonl")
    rows = [{**rows[i % len(rows)], "id": f"row{i}"} for i in range(3)]
    (folder / "pairs3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs3.jsonl"


def train_argv(fast_config, stage, pairs, out, *extra):
    return ["--config", fast_config, "--output_dir", out, "--student", stage / "prune" / "student", "--pairs", pairs,
            "--train_batch_size", "1", "--max_train_steps", "5", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "1", "--logging_steps", "1", "--resume_from_checkpoint", "latest", *extra]


@pytest.fixture(scope="module")
def whole(fast_config, tiny_stage, pairs3, tmp_path_factory):
    """An uninterrupted training run, the reference of the killed ones."""
    out = tmp_path_factory.mktemp("whole") / "train"
    run_script(PY, "train_redpo.py", *map(str, train_argv(fast_config, tiny_stage, pairs3, out)))
    return out


def same_student(a, b):
    x, y = load_file(a / "student" / "student.safetensors"), load_file(b / "student" / "student.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_kills_at_the_last_checkpoint_and_mid_save_finish_like_an_uninterrupted_run(
        fast_config, tiny_stage, pairs3, whole, tmp_path, capsys):
    assert json.loads((whole / "student" / "student.json").read_text())["steps"] == 5

    # Killed between the last checkpoint and the student's save: the rerun takes no step more.
    before_student = tmp_path / "before student"
    argv = train_argv(fast_config, tiny_stage, pairs3, before_student)
    assert run_with_fault("train_redpo", argv, KILL_BEFORE_STUDENT).returncode == -signal.SIGKILL
    assert (before_student / "checkpoint-5").is_dir() and not (before_student / "student").exists()
    result = run_script(PY, "train_redpo.py", *map(str, argv))
    assert "resumed from" in result.stdout and "(step 5)" in result.stdout and "after 5 steps" in result.stdout
    assert same_student(before_student, whole)

    # A finished run whose student/ was removed: the same.
    removed = tmp_path / "removed"
    shutil.copytree(whole, removed)
    shutil.rmtree(removed / "student")
    result = run_script(PY, "train_redpo.py", *map(str, train_argv(fast_config, tiny_stage, pairs3, removed)))
    assert "after 5 steps" in result.stdout and same_student(removed, whole)

    # Killed inside the save of checkpoint-4 with checkpoints_total_limit 1: checkpoint-3 is still
    # there, the rerun resumes from it, removes the half-saved folder and logs each step once.
    mid_save = tmp_path / "mid save"
    argv = train_argv(fast_config, tiny_stage, pairs3, mid_save)
    assert run_with_fault("train_redpo", argv, KILL_IN_SAVE_OF_CHECKPOINT_4).returncode == -signal.SIGKILL
    assert (mid_save / "checkpoint-3").is_dir() and (mid_save / "checkpoint-4.tmp").is_dir()
    (mid_save / "videos").mkdir()
    (mid_save / "videos" / ".x.tmp4242.mp4").write_bytes(b"half")  # a killed process's temporary
    result = run_script(PY, "train_redpo.py", *map(str, argv))
    assert "resumed from" in result.stdout and "checkpoint-3 (step 3)" in result.stdout
    assert same_student(mid_save, whole)
    assert not (mid_save / "checkpoint-4.tmp").exists() and not (mid_save / "videos" / ".x.tmp4242.mp4").exists()
    assert [c.name for c in mid_save.glob("checkpoint-*")] == ["checkpoint-5"]
    steps = [json.loads(line)["step"] for line in (mid_save / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert (mid_save / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()

    # The three students evaluate to the same scores, to the last bit.
    out = tmp_path / "eval"
    evaluate.main(evaluate.parse_args(["--config", fast_config, "--output_dir", str(out), "--students",
                                       *(str(d / "student") for d in (whole, before_student, mid_save))]))
    models = json.loads((out / "eval.json").read_text())["models"]
    assert models[1]["scores"] == models[2]["scores"] == models[3]["scores"]
    assert "random tiny VideoScore" in (out / "eval.md").read_text()  # never named as the real one


def test_non_finite_weights_stop_before_a_checkpoint_and_the_named_one_is_good(
        fast_config, tiny_stage, pairs3, tmp_path):
    out = tmp_path / "nan"
    argv = train_argv(fast_config, tiny_stage, pairs3, out, "--checkpoints_total_limit", "3")
    result = run_with_fault("train_redpo", argv, NAN_AFTER_STEP_3)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite weights at step 3" in line and "last good checkpoint" in line
    named = out / "checkpoint-2"
    assert str(named) in line and not (out / "checkpoint-3").exists()
    weights = load_file(named / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())

    # Following the advice (another learning rate) keeps it, and it can be resumed from.
    result = run_script(PY, "train_redpo.py", *map(str, argv), "--learning_rate", "5e-5", "--resume_from_checkpoint",
                        str(named))
    kept = list((out / "replaced").glob("*/checkpoint-2"))
    assert len(kept) == 1 and "resumed from" in result.stdout and "(step 2)" in result.stdout
    assert f"its results are kept in {kept[0].parent}" in result.stderr
    assert json.loads((out / "student" / "student.json").read_text())["steps"] == 5


def test_bad_input_on_a_rerun_leaves_finished_work_as_it_was(fast_config, tiny_stage, whole, tmp_path, capsys):
    def snapshot(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name != ".lock"}

    train = tmp_path / "train"
    shutil.copytree(whole, train)
    before = snapshot(train)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "half a line"\n')
    code, err = call_main(train_redpo, train_argv(fast_config, tiny_stage, bad, train), capsys)
    assert code == 2 and f"{bad}:1: expected a JSON object" in err
    assert snapshot(train) == before

    prune_dir = tmp_path / "prune"
    shutil.copytree(tiny_stage / "prune", prune_dir)
    before = snapshot(prune_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, err = call_main(prune, ["--config", fast_config, "--output_dir", prune_dir, "--prune_prompts", empty], capsys)
    assert code == 2 and "no prompts" in err
    assert snapshot(prune_dir) == before

    # A config that really changes the result: the old one is moved aside, whole, and said so.
    prune.main(prune.parse_args(["--config", fast_config, "--output_dir", str(prune_dir), "--num_blocks", "2"]))
    err = capsys.readouterr().err
    assert "made from another config or other inputs (prune.num_blocks)" in err and "its results are kept in" in err
    aside, = (prune_dir / "replaced").iterdir()
    assert snapshot(aside) == before
    assert len(json.loads((prune_dir / "ranking.json").read_text())["chosen"]) == 2


def test_two_runs_on_one_folder_the_second_names_the_first(fast_config, tiny_stage, pairs3, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    provenance.lock_folder(out)  # this test process holds it, as a running stage would
    result = run_script(PY, "train_redpo.py", *map(str, train_argv(fast_config, tiny_stage, pairs3, out)), check=False)
    line = one_line_error(result)
    assert f"{out}: in use by pid {os.getpid()}" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]

    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("pid 1 on elsewhere (bash vip_loop.sh tiny 3)\n")
        f.flush()
        result = subprocess.run(["bash", "vip_loop.sh", "tiny", "1"], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "RUN_DIR": str(run)})
    assert result.returncode == 2 and "in use by pid 1 on elsewhere" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_path_flags_are_strings_whatever_they_hold(fast_config, tmp_path):
    options = {"eval": {"output_dir": (None, "out"), "students": ([], "students"),
                        "max_prompts": (None, "n", {"type": int})}}
    for path in ("/x/run #1", "a: b", "[x]", "2024", "yes"):
        args = stage.parse_config(["--output_dir", path], "t", options)
        assert args.output_dir == path
    comma = tmp_path / "a,b" / "student"
    comma.mkdir(parents=True)
    args = stage.parse_config(["--students", str(comma), "--max_prompts", "null"], "t", options)
    assert args.students == [str(comma)] and args.max_prompts is None
    args = stage.parse_config(["--students", "x #1", str(comma)], "t", options)
    assert args.students == ["x #1", str(comma)]
    assert stage.parse_config(["--students", "a,b"], "t", options).students == ["a", "b"]
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("eval:\n  output_dir: 2024\n")
    with pytest.raises(common.ConfigError, match=r"eval.output_dir: expected a string .* got 2024"):
        stage.parse_config(["--config", str(yaml_path)], "t", options)

    # A run folder with " #" in its name gets the outputs, not the folder before the '#'.
    out = tmp_path / "run #1" / "prune"
    prune.main(prune.parse_args(["--config", fast_config, "--output_dir", str(out)]))
    assert (out / "ranking.json").is_file() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script, argv, message", [
    (evaluate, ["--num_eval_prompts", "abc"], "--num_eval_prompts: expected int, got 'abc'"),
    (train_redpo, ["--checkpointing_steps", "0"], "--checkpointing_steps: expected a number at least 1; got '0'"),
    (train_redpo, ["--train_batch_size", "0"], "--train_batch_size: expected a number at least 1"),
    (train_redpo, ["--beta", "-1"], "--beta: expected a number above 0"),
    (train_redpo, ["--resume_from_checkpoint", "/no/such/checkpoint-5"],
     "train.resume_from_checkpoint: /no/such/checkpoint-5: expected 'latest' or an existing checkpoint-<step> folder"),
    (prune, ["--aspects", "[visual_qualty]"], "--aspects: expected a list of visual_quality, temporal_consistency"),
    (prune, ["--num_blocks", "0"], "--num_blocks: expected a number at least 1"),
    (curate, ["--min_words", "9", "--max_words", "3"], "curate.min_words (9) is above curate.max_words (3)"),
])
def test_bad_values_are_one_line_before_anything_runs(script, argv, message, fast_config, tiny_stage, tmp_path,
                                                       capsys):
    out = tmp_path / "out"
    needs = {train_redpo: ["--student", tiny_stage / "prune" / "student", "--pairs", tiny_stage / "curate" / "pairs.jsonl"],
             curate: ["--student", tiny_stage / "prune" / "student", "--target_aspects", "dynamic_degree"]}
    code, err = call_main(script, ["--config", fast_config, "--output_dir", out, *needs.get(script, []), *argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_files_are_one_line_before_anything_runs(fast_config, tiny_stage, tmp_path, capsys):
    src = tiny_stage / "curate"
    copy = tmp_path / "curate"
    shutil.copytree(src, copy)
    rows = stage.read_manifest(copy / "pairs.jsonl")
    out = tmp_path / "out"

    def train_error(rows_):
        (copy / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
        code, err = call_main(train_redpo, ["--config", fast_config, "--output_dir", out, "--student",
                                            tiny_stage / "prune" / "student", "--pairs", copy / "bad.jsonl"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists(), err
        return err

    assert "'winner' is None; expected a path relative to the manifest's folder" in train_error([{**rows[0], "winner": None}])
    assert "'latents' is '../../etc/passwd'" in train_error([{**rows[0], "latents": "../../etc/passwd"}])
    assert "'seed' is 'x'; expected an integer seed" in train_error([{**rows[0], "seed": "x"}])
    # latents of another shape than the first pair's
    latents = load_file(copy / rows[0]["latents"])
    save_file({k: torch.cat([v, v], dim=-1) for k, v in latents.items()}, str(copy / "latents" / "wide.safetensors"))
    err = train_error([rows[0], {**rows[0], "id": "wide", "latents": "latents/wide.safetensors"}])
    assert "every pair must have one shape" in err
    # a truncated latents file, and a truncated MP4 (whose first bytes are fine)
    data = (copy / rows[0]["latents"]).read_bytes()
    (copy / "latents" / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "cannot read" in train_error([{**rows[0], "latents": "latents/cut.safetensors"}])
    video = (copy / rows[0]["winner"]).read_bytes()
    (copy / "videos" / "cut.mp4").write_bytes(video[: len(video) - 50])
    assert "is not a whole MP4" in train_error([{**rows[0], "winner": "videos/cut.mp4"}])

    # a student.json whose removed_blocks is not a list
    student = tmp_path / "student"
    shutil.copytree(tiny_stage / "prune" / "student", student)
    meta = json.loads((student / "student.json").read_text())
    (student / "student.json").write_text(json.dumps({**meta, "removed_blocks": None}))
    code, err = call_main(prune, ["--config", fast_config, "--output_dir", out, "--student", student], capsys)
    assert code == 2 and "student.json: 'removed_blocks' is None; expected a list of block names" in err

    # a prompt VideoScore's processor would take for an image slot
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat runs across a field in the rain\na dog <image> jumps over a fence in the park\n")
    code, err = call_main(evaluate, ["--config", fast_config, "--output_dir", out, "--eval_prompts", prompts], capsys)
    assert code == 2 and "contains '<image>'" in err.strip().splitlines()[-1] and err.count("error:") == 1
    assert not out.exists()


def test_a_data_loader_workers_error_is_one_line_too(tiny_stage, tmp_path, capsys):
    copy = tmp_path / "curate"
    shutil.copytree(tiny_stage / "curate", copy)
    dataset = train_redpo.PairDataset([str(copy / "pairs.jsonl")])
    os.remove(dataset.rows[0]["latents"])  # gone after it was checked
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=train_redpo.collate)
    with pytest.raises(SystemExit):
        common.run_main(lambda _: list(loader), lambda: None)
    err = capsys.readouterr().err
    assert err.startswith(f"error: {dataset.rows[0]['latents']}: cannot read latents") and err.count("\n") == 1


def test_models_that_are_not_there_are_one_line_before_any_folder(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty cache")}
    out = tmp_path / "out"
    line = one_line_error(run_script(PY, "prune.py", "--config", "configs/animatediff.yaml", "--output_dir", str(out),
                                     env=env, check=False))
    assert "model.pretrained_model_name_or_path: stable-diffusion-v1-5/stable-diffusion-v1-5 is not in the Hugging " \
           "Face cache" in line and "HF_HUB_OFFLINE is set" in line and "hf download" in line
    assert not out.exists()
    line = one_line_error(run_script(PY, "convert_videocrafter2.py", "--output_dir", str(out), env=env, check=False))
    assert "VideoCrafter/VideoCrafter2 is not in the Hugging Face cache" in line and not out.exists()
    line = one_line_error(run_script(PY, "prune.py", "--config", "configs/animatediff.yaml", "--output_dir", str(out),
                                     "--motion_adapter", str(tmp_path / "no adapter"), "--pretrained_model_name_or_path",
                                     str(tmp_path), env=env, check=False))
    assert f"{tmp_path / 'unet/config.json'} is missing" in line

    # build_tiny never writes a random model at a hub id (a local folder of that name would then
    # pass for the real model in every later run from here)
    line = one_line_error(run_script(PY, "evaluate.py", "--config", "configs/tiny.yaml", "--output_dir", str(out),
                                     "--reward_model", "TIGER-Lab/VideoScore-v1.1", env=env, check=False))
    assert "reward.reward_model: 'TIGER-Lab/VideoScore-v1.1' reads as a hub id" in line
    assert not (ROOT / "TIGER-Lab").exists() and not out.exists()


def test_vip_loop_refuses_a_model_that_is_a_path(tmp_path):
    result = subprocess.run(["bash", "vip_loop.sh", "../x", "1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "MODEL must be a config name" in result.stderr
    assert not (ROOT / "x").exists()


@pytest.fixture()
def small_disk(tmp_path):
    """A tmpfs of a few kilobytes to fill up, grown with grow(size); skips where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def grow(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    yield mount, grow
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_the_rerun_ends_as_an_uninterrupted_run(
        small_disk, fast_config, tiny_stage, pairs3, whole):
    disk, grow = small_disk
    # Curation into a disk too small for its videos, then with room enough.
    out = disk / "curate"
    argv = ["--config", fast_config, "--output_dir", out, "--student", tiny_stage / "prune" / "student",
            "--ranking", tiny_stage / "prune" / "ranking.json"]
    line = one_line_error(run_with_fault("curate", argv))
    assert "no space left on the device" in line and "rerun the same command" in line
    grow("4m")
    assert run_with_fault("curate", argv).returncode == 0
    assert (out / "candidates.jsonl").read_text().replace(str(out), "") == \
        (tiny_stage / "curate" / "candidates.jsonl").read_text().replace(str(tiny_stage / "curate"), "")

    # A checkpoint save that fills the disk (each is about 12 MB here), then with room enough.
    grow("20m")
    out = disk / "train"
    argv = train_argv(fast_config, tiny_stage, pairs3, out)
    line = one_line_error(run_with_fault("train_redpo", argv))
    assert "no space left on the device" in line
    assert list(out.glob("checkpoint-*")) and not (out / "student").exists()
    grow("64m")
    result = run_with_fault("train_redpo", argv)
    assert result.returncode == 0 and "resumed from" in result.stdout
    assert same_student(out, whole) and (out / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
