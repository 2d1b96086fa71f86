"""A rerun after a change redoes exactly what depends on it: vip_loop.sh on tiny models, run once,
then again after a training value, the number of blocks cut, or the teacher's weights change in
place; each rerun ends as a fresh run with the new setting does, its every step newer than its
inputs, and a rerun with nothing changed redoes nothing. Run: python -m pytest -q tests/test_rerun.py"""
import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import provenance
from conftest import run_script

STEPS = ("prune", "curate", "train")


@pytest.fixture(scope="module")
def teacher(tiny_dir, tmp_path_factory):
    """The tiny teacher copied for this module: its last test trains it again in place."""
    root = tmp_path_factory.mktemp("rerun teacher")
    for name in ("sd", "motion_adapter"):
        shutil.copytree(tiny_dir / name, root / name)
    return root


def config(fast_config, teacher, folder, name="base", **changes):
    """The fast tiny config on this module's teacher, one video a call (batches the same however
    much a rerun reuses), with `changes` ({section: {key: value}})."""
    data = yaml.safe_load(open(fast_config))
    data["model"].update(pretrained_model_name_or_path=str(teacher / "sd"), motion_adapter=str(teacher / "motion_adapter"),
                         generation_batch_size=1)
    data["reward"]["reward_batch_size"] = 1
    data["curate"].update(relevance_filter="none", max_prompts=6)  # enough pairs at stage 2 of a random teacher
    for section, values in changes.items():
        data[section].update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def loop(config_path, run, stages):
    out = run_script("bash", "vip_loop.sh", "tiny", str(stages), env={"CONFIG": str(config_path), "RUN_DIR": str(run)})
    return out.stdout


@pytest.fixture(scope="module")
def base(fast_config, teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rerun base")
    path = config(fast_config, teacher, folder)
    loop(path, folder / "run", 2)
    return folder / "run", path


def copy_run(run, dest):
    shutil.copytree(run, dest, symlinks=True)
    return dest


def table(run):
    """What eval.md shows of each model, latency aside (a time, not a result)."""
    return [(m["label"], m["scores"], m["motion_parameters"], m["unet_parameters"], m["flops_per_step"])
            for m in json.loads((run / "eval" / "eval.json").read_text())["models"]]


def mtimes(run):
    """Every result's mtime: hidden files (locks, digests) and the run's cost aside."""
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and "replaced" not in p.parts
            and not p.name.startswith(".") and p.name != "cost.md"}


def assert_each_step_made_from_its_inputs_as_they_are(run, stages):
    """Every step's record names its inputs as they are now, and was written after them."""
    recorded = lambda folder: json.loads((folder / provenance.RECORD).read_text())  # noqa: E731
    for k in range(1, stages + 1):
        s = run / f"stage_{k}"
        parent = run / f"stage_{k - 1}" / "train" if k > 1 else None
        inputs = {"prune": [("prune", "student", parent)], "curate": [("curate", "student", s / "prune")],
                  "train": [("train", "student", s / "prune"), ("train", "pairs", s / "curate")]}
        for step in STEPS:
            record = recorded(s / step)
            assert record["outputs"] is not None, f"{s / step} unfinished"
            for section, key, source in inputs[step]:
                if source is None:
                    assert record["made_from"][section][key] is None
                    continue
                made = source / ("student" if key == "student" else "pairs.jsonl")
                value = record["made_from"][section][key]
                assert (value[0] if isinstance(value, list) else value) == provenance.digest(made), (s / step, key)
                assert (s / step / provenance.RECORD).stat().st_mtime_ns >= (source / provenance.RECORD).stat().st_mtime_ns
    students = recorded(run / "eval")["made_from"]["eval"]["students"]
    expected = [run / f"stage_{k}" / step / "student" for k in range(1, stages + 1) for step in ("prune", "train")]
    assert students == [provenance.digest(p) for p in expected]


def test_a_training_value_changed_redoes_training_and_what_follows(base, fast_config, teacher, tmp_path):
    run, _ = base
    rerun = copy_run(run, tmp_path / "rerun")
    before = mtimes(rerun)
    changed = config(fast_config, teacher, tmp_path, "beta", train={"beta": 500.0})
    out = loop(changed, rerun, 2)
    assert out.count("is done from this config and these inputs; skipping") == 2  # stage 1's prune and curate
    after = mtimes(rerun)
    s1, s2 = rerun / "stage_1", rerun / "stage_2"
    assert all(after[p] == before[p] for p in before if s1 / "prune" in p.parents or s1 / "curate" in p.parents)
    for folder in (s1 / "train", s2 / "prune", s2 / "curate", s2 / "train", rerun / "eval"):
        assert after[folder / provenance.RECORD] > before[folder / provenance.RECORD], folder
    assert_each_step_made_from_its_inputs_as_they_are(rerun, 2)

    fresh = tmp_path / "fresh"
    loop(changed, fresh, 2)
    assert table(rerun) == table(fresh) != table(run)


def test_a_cut_changed_redoes_the_stage_and_an_unchanged_rerun_redoes_nothing(base, fast_config, teacher, tmp_path):
    run, _ = base
    rerun = copy_run(run, tmp_path / "rerun")
    changed = config(fast_config, teacher, tmp_path, "cut", prune={"num_blocks": 2})
    out = loop(changed, rerun, 1)
    assert "skipping" not in out
    removed = json.loads((rerun / "stage_1" / "train" / "student" / "student.json").read_text())["removed_blocks"]
    assert len(removed) == 2  # the trained student has the new cut, not the old one
    assert_each_step_made_from_its_inputs_as_they_are(rerun, 1)
    fresh = tmp_path / "fresh"
    loop(changed, fresh, 1)
    assert table(rerun) == table(fresh)
    assert table(rerun)[1][2] == table(rerun)[2][2] < table(run)[1][2]  # pruned and trained: the same, smaller

    before, md = mtimes(rerun), (rerun / "eval" / "eval.md").read_text()
    out = loop(changed, rerun, 1)
    assert out.count("is done from this config and these inputs; skipping") == 5  # the four steps and the export
    assert mtimes(rerun) == before and (rerun / "eval" / "eval.md").read_text() == md


def test_the_teacher_trained_again_in_place_redoes_everything(base, fast_config, teacher, tmp_path):
    run, path = base
    rerun = copy_run(run, tmp_path / "rerun")
    keys = set(os.listdir(rerun / "teacher"))
    weights = teacher / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    torch.manual_seed(0)
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}, str(weights))  # the same path, new weights
    out = loop(path, rerun, 1)
    assert "skipping" not in out
    assert len(set(os.listdir(rerun / "teacher")) - keys) == 1  # another set of teacher videos beside the old
    assert_each_step_made_from_its_inputs_as_they_are(rerun, 1)
    fresh = tmp_path / "fresh"
    loop(path, fresh, 1)
    assert table(rerun) == table(fresh)
    assert table(rerun)[0][1] != table(run)[0][1]  # the teacher's own row is the new teacher's
