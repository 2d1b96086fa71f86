"""What an artifact was made from: digests of files and folders kept beside them, hub models by the
commit their revision names, the teacher cache keyed by the teacher's contents, temporaries unique
and cleaned, and the readers that must not sink a run (configs, prompts, the ledger).
Run: python -m pytest -q tests/test_provenance.py"""
import json
import shutil
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import common
import ledger
import provenance
import stage
import teacher_cache
from common import ConfigError
from conftest import ROOT, model_args


def test_digest_of_a_folder_is_kept_beside_it_and_follows_its_contents(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_bytes(os.urandom(provenance.SMALL + 10))
    (folder / "config.json").write_text("{}")
    first = provenance.digest(folder)
    assert first.startswith("sha256:") and (folder / provenance.SIDECAR).exists()
    os.symlink(folder, tmp_path / "link")
    assert provenance.digest(tmp_path / "link") == first  # the same folder, another name

    hashed = []
    real = provenance.sha256_file
    monkeypatch.setattr(provenance, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    assert provenance.digest(folder) == first
    assert hashed == ["config.json"]  # the big file's digest is read, not computed again

    # Rewritten in place with other bytes of the same size, as a retrained student is.
    data = bytearray((folder / "unet" / "weights.bin").read_bytes())
    data[0] ^= 1
    (folder / "unet" / "weights.bin").write_bytes(bytes(data))
    assert provenance.digest(folder) != first
    (folder / "unet" / "weights.bin").write_bytes(bytes(data[:-1]))
    assert len({provenance.digest(folder), first}) == 2


def fake_hub_cache(cache, repo, commit, files=("config.json",)):
    """A Hugging Face cache holding `repo` at `commit` as its main, as `hf download` leaves it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    for f in files:
        path = folder / "snapshots" / commit / f
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"commit": commit}))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def test_a_hub_model_is_the_commit_its_revision_names(tmp_path):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/teacher", "a" * 40)
    args = model_args("--pretrained_model_name_or_path", "org/teacher", "--cache_dir", str(cache),
                      "--motion_adapter", str(tmp_path / "none"))
    before = provenance.made_from(args)["model"]["pretrained_model_name_or_path"]
    assert before == "hub:org/teacher@" + "a" * 40
    fake_hub_cache(cache, "org/teacher", "b" * 40)  # main moved on the hub, and the checks fetched it
    assert provenance.made_from(args)["model"]["pretrained_model_name_or_path"] == "hub:org/teacher@" + "b" * 40
    pinned = model_args("--pretrained_model_name_or_path", "org/teacher", "--cache_dir", str(cache), "--revision", "a" * 40)
    assert provenance.made_from(pinned)["model"]["pretrained_model_name_or_path"] == before
    assert "revision" not in provenance.made_from(pinned)["model"]  # the commit says it


def cache_args(tmp_path, teacher):
    args = model_args("--pretrained_model_name_or_path", str(teacher / "sd"), "--motion_adapter", str(teacher / "ma"))
    args.teacher_cache = str(tmp_path / "cache")
    return args


def test_the_teacher_cache_follows_the_teachers_weights_and_survives_damage(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    for name in ("sd", "ma"):
        (teacher / name).mkdir(parents=True)
        save_file({"w": torch.zeros(3)}, str(teacher / name / "model.safetensors"))
    args = cache_args(tmp_path, teacher)
    cache = teacher_cache.TeacherCache(args, provenance.made_from(args))
    frames, latents = np.zeros((2, 4, 4, 3), np.uint8), torch.ones(1, 2, 2, 2)
    cache.save("a red ball", 0, frames, latents, {"visual_quality": 3.0})
    assert cache.load("a red ball", 0)[2] == {"visual_quality": 3.0}

    # The teacher trained again at the same path: another key, so its stale videos are never served.
    save_file({"w": torch.ones(3)}, str(teacher / "sd" / "model.safetensors"))
    retrained = teacher_cache.TeacherCache(args, provenance.made_from(args))
    assert retrained.folder != cache.folder and retrained.load("a red ball", 0) is None

    # A file cut short outside vip: one line naming it, and it is made again (the caller gets None).
    path = cache.path("a red ball", 0)
    with open(path, "r+b") as f:
        f.truncate(20)
    assert cache.load("a red ball", 0) is None and not os.path.exists(path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"teacher cache: {path} cannot be read") and "making it again" in err[0]


def test_temporaries_are_unique_and_only_dead_writers_ones_are_removed(tmp_path):
    names = {common.tmp_name(tmp_path / "x.mp4").name for _ in range(100)}
    assert len(names) == 100 and all(common.TEMPORARY.match(n) and n.endswith(".mp4") for n in names)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    killed = tmp_path / f".a.tmp-{common.WRITER}-{pid}-0123abcd.safetensors"      # this host, writer gone
    live = tmp_path / f".b.tmp-{common.WRITER}-{os.getpid()}-0123abcd.safetensors"  # this very process
    elsewhere = tmp_path / ".c.tmp-ffffffff-1-0123abcd.safetensors"              # another host: by age only
    old = tmp_path / ".d.tmp-ffffffff-1-0123abcd.safetensors"
    keep = tmp_path / "e.safetensors"
    for p in (killed, live, elsewhere, old, keep):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - common.STALE_AFTER_S - 60,) * 2)
    common.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, elsewhere, keep))

    # The teacher cache clears what its killed writers left when a run opens it.
    args = cache_args(tmp_path, tmp_path / "t")
    args.teacher_cache = str(tmp_path / "cache")
    folder = os.path.join(args.teacher_cache, teacher_cache.settings_key(provenance.made_from(args))[0])
    os.makedirs(folder)
    (open(os.path.join(folder, killed.name), "w")).close()
    teacher_cache.TeacherCache(args, provenance.made_from(args))
    assert not os.path.exists(os.path.join(folder, killed.name))


@pytest.mark.parametrize("text, message", [
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
     "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
     "train: {max_train_steps: *h}\n", "an alias (*a); write the value out at line 2"),
    ("train:\n  max_train_steps: 5\n  max_train_steps: 6\n", "'max_train_steps' is given twice at line 3"),
    ("train:\n  max_train_steps: 5\nmodel:\n  width: 96\ntrain:\n  learning_rate: 1\n", "'train' is given twice at line 5"),
    ("model: [1, 2]\n", "section 'model' must be a mapping of key: value; got [1, 2]"),
    ("model:\n  backend: [x]\n", "model.backend: expected a module name such as animatediff"),
    ("model:\n  backend: 5\n", "model.backend: expected a module name such as animatediff"),
    ("model:\n  backend: ../x\n", "model.backend: expected a module name such as animatediff (letters, digits, _ and dots); "
                                  "got '../x'"),
    ("train:\n  max_train_steps: [" + ", ".join(["1"] * 20000) + "]\n", "train.max_train_steps: expected int, got [1, 1"),
])
def test_configs_that_would_mislead_or_explode_are_one_short_line(tmp_path, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    sections = {"model": stage.MODEL_OPTIONS, "train": {"max_train_steps": (100, "steps"), "learning_rate": (1e-5, "lr")}}
    start = time.time()
    with pytest.raises(ConfigError) as e:
        stage.parse_config(["--config", str(path)], "t", sections)
    assert message in str(e.value) and len(str(e.value)) < 400 and "\n" not in str(e.value)
    assert time.time() - start < 5


def test_prompts_read_as_their_format_defines_them(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffa red ball rolls\fslowly away\r\na cat\u2028naps here\rthe last one\n".encode())
    assert stage.read_prompts(txt) == ["a red ball rolls slowly away", "a cat naps here", "the last one"]
    csv = tmp_path / "p.csv"  # Excel's UTF-8 export: a byte-order mark, CRLF, a quoted cell over two lines
    csv.write_bytes('\ufeffid,prompt\r\n1,"a red ball\r\nbounces high"\r\n2,a blue cube\r\n'.encode())
    assert stage.read_prompts(csv) == ["a red ball bounces high", "a blue cube"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes('\ufeff{"prompt": "one\u2028line"}\n{"prompt": "two"}\n'.encode())
    assert stage.read_prompts(jsonl) == ["one line", "two"]


def test_list_flags_take_an_existing_path_as_written(tmp_path):
    manifest = tmp_path / "[r] x, y" / "pairs.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("")
    sections = {"train": {"pairs": ([], "pairs"), "aspects": ([], "a")}}
    args = stage.parse_config(["--pairs", str(manifest), "--aspects", "[a, b]"], "t", sections)
    assert args.pairs == [str(manifest)] and args.aspects == ["a", "b"]


def test_the_ledger_reports_what_it_cannot_read_and_goes_on(tmp_path, capsys):
    run = tmp_path / "runs" / "exp[1]"
    entry = {"script": "prune", "wall_s": 2.0, "cpu_s": 1.0, "videos/teacher": 3}
    for folder, text in (("stage_1/prune", json.dumps([entry])), ("stage_1/curate", '[{"wall_s": 1.'),
                         ("stage_1/train", "{}"), ("stage_2/prune", json.dumps([{**entry, "wall_s": "2.0"}])),
                         ("stage_2.bak/prune", json.dumps([entry])), ("eval", json.dumps([entry]))):
        (run / folder).mkdir(parents=True)
        (run / folder / "cost.json").write_text(text)
    rows = ledger.run_costs(str(run))
    assert [(s, script) for s, script, _ in rows] == [("stage_1", "prune"), ("stage_1", "curate"), ("stage_1", "train"),
                                                     ("stage_2", "prune"), ("all", "eval")]
    assert rows[0][2]["wall_s"] == 2.0 and rows[1][2]["wall_s"] == 0 and rows[3][2]["wall_s"] == 0
    assert rows[3][2]["videos/teacher"] == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("ledger: ") for line in err)
    ledger.main(ledger.parse_args([str(run)]))
    assert "| **total** |" in (run / "cost.md").read_text()


# -----------------------------------------------------------------------------
# The steps themselves, in-process on the tiny models.


def test_a_deleted_latents_file_is_made_again_by_the_rerun(fast_config, tiny_stage, tmp_path, capsys):
    import curate

    out = tmp_path / "curate"
    shutil.copytree(tiny_stage / "curate", out)
    rows = stage.read_manifest(out / "pairs.jsonl")
    before = {r["latents"]: (out / r["latents"]).read_bytes() for r in rows}
    pairs = (out / "pairs.jsonl").read_text()
    (out / rows[0]["latents"]).unlink()
    argv = ["--config", fast_config, "--output_dir", str(out), "--student", str(tiny_stage / "prune" / "student"),
            "--ranking", str(tiny_stage / "prune" / "ranking.json")]
    curate.main(curate.parse_args(argv))
    assert "skipping" not in capsys.readouterr().out
    assert {r: (out / r).read_bytes() for r in before} == before and (out / "pairs.jsonl").read_text() == pairs
    curate.main(curate.parse_args(argv))
    assert "skipping" in capsys.readouterr().out


def evaluate_argv(config, out, prompts, *students):
    return ["--config", config, "--output_dir", str(out), "--eval_prompts", str(prompts), "--students", *map(str, students)]


def test_evaluation_lists_students_as_given_and_follows_prompts_and_weights(fast_config, tiny_stage, tmp_path, capsys):
    """A student given twice or through a symlink is a row each, under its own label; an eval prompt
    edited in place, or a student retrained at its path, is evaluated again, never read from before."""
    import evaluate

    student = tmp_path / "stage_1" / "prune" / "student"
    shutil.copytree(tiny_stage / "prune" / "student", student)
    os.makedirs(tmp_path / "stage_1" / "link")
    os.symlink(student, tmp_path / "stage_1" / "link" / "student")
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red ball bounces on the floor\na blue cube slides to the left\n")
    out = tmp_path / "eval"
    evaluate.main(evaluate.parse_args(evaluate_argv(fast_config, out, prompts, student, student,
                                                    tmp_path / "stage_1" / "link" / "student")))
    report = json.loads((out / "eval.json").read_text())
    assert [m["label"] for m in report["models"]] == ["teacher (M0)", "stage_1/prune", "stage_1/prune", "stage_1/link"]
    assert report["models"][1]["scores"] == report["models"][2]["scores"] == report["models"][3]["scores"]
    assert report["models"][0]["scores"] != report["models"][1]["scores"]
    assert len(list((out / "items").glob("student-*__*.json"))) == 2  # one model, made once

    # The loop's evaluation of an earlier stage, rerun unchanged: the later table holds it, and is kept.
    capsys.readouterr()
    evaluate.main(evaluate.parse_args(evaluate_argv(fast_config, out, prompts, student)))
    assert "(its table holds 2 more students, unchanged); skipping" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text()) == report

    prompts.write_text("a red ball bounces on the floor\na green cone spins in place\n")  # edited in place
    fresh = tmp_path / "fresh"
    for folder in (out, fresh):
        evaluate.main(evaluate.parse_args(evaluate_argv(fast_config, folder, prompts, student)))
    ours, theirs = (json.loads((f / "eval.json").read_text()) for f in (out, fresh))
    assert ours["items"] == theirs["items"] and "a green cone spins in place (seed 1235)" in ours["items"]
    assert [m["scores"] for m in ours["models"]] == [m["scores"] for m in theirs["models"]]

    # The student retrained in place (other weights, the same student.json): evaluated again.
    from safetensors.torch import load_file

    weights = load_file(student / "student.safetensors")
    save_file({k: v + 0.05 for k, v in weights.items()}, str(student / "student.safetensors"))
    evaluate.main(evaluate.parse_args(evaluate_argv(fast_config, out, prompts, student)))
    again = json.loads((out / "eval.json").read_text())
    assert again["models"][1]["scores"] != ours["models"][1]["scores"]
    assert again["models"][1]["key"] != ours["models"][1]["key"]


def test_a_cut_that_leaves_no_block_is_refused_before_any_work(fast_config, tmp_path, capsys):
    import prune

    for extra, message in ((["--num_blocks", "11"], "prune.num_blocks 11: stage 1 would remove the last of the 11 blocks"),
                           (["--num_blocks", "4", "--num_stages", "3"], "stage 3 of 3 would remove the last of the 11"),
                           (["--prune_params", str(10 ** 9)], "prune.prune_params 1,000,000,000: stage 1 would remove")):
        out = tmp_path / "prune"
        code = None
        with pytest.raises(SystemExit) as e:
            common.run_main(prune.main, lambda: prune.parse_args(["--config", fast_config, "--output_dir", str(out), *extra]))
        code = e.value.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1] and not out.exists(), err[-1]


def test_a_prompt_past_the_text_encoders_window_is_one_warning(tiny_args, capfd):
    import models
    from backends import animatediff

    unet = models.load_model(animatediff, tiny_args)
    pipe = animatediff.load_pipeline(tiny_args, unet)
    tiny_args.num_inference_steps = 1
    long = "a very long prompt about a red ball that rolls and rolls across the wide green field " * 3
    models._CUT_WARNED.clear()
    capfd.readouterr()
    for _ in range(2):
        models.generate(pipe, [long, "a cat"], [0, 1], tiny_args)
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: prompts longer than the text encoder's 77 tokens are cut")


def test_the_loop_takes_the_callers_paths(tmp_path):
    (tmp_path / "my.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "CONFIG": "my.yaml", "RUN_DIR": "[r] x", "LAUNCH": f"{sys.executable} tests/fake_stage.py",
           "FAKE_LOG": str(log)}
    result = subprocess.run(["bash", str(ROOT / "vip_loop.sh"), "tiny", "1"], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(c["flags"]["config"] == [str(tmp_path / "my.yaml")] for c in calls)
    assert calls[0]["out"] == str(tmp_path / "[r] x" / "stage_1" / "prune") and calls[0]["flags"]["num_stages"] == ["1"]
