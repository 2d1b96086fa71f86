"""The four stage scripts, called in-process on tiny models, checked on what they write.
Run: python -m pytest -q tests/test_stages.py"""
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

import common
from stage import read_manifest
import curate
import evaluate
import prune
import train_redpo
from conftest import run_script


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    return tmp_path_factory.mktemp("stage 1")


def test_prune_ranks_every_block_and_removes_the_cheapest(fast_config, stage, capsys):
    out = stage / "prune"
    args = prune.parse_args(["--config", fast_config, "--output_dir", str(out), "--num_blocks", "2"])
    prune.main(args)
    r = json.loads((out / "ranking.json").read_text())
    aspects = r["aspects"]
    assert len(r["candidates"]) == 11
    for c in r["candidates"]:
        assert c["delta"] == pytest.approx({a: c["scores"][a] - r["unpruned"][a] for a in aspects})
        assert c["cost"] == pytest.approx(-sum(c["delta"].values()) / len(aspects))
    costs = sorted(c["cost"] for c in r["candidates"])
    assert [c["cost"] for c in r["candidates"]] == costs
    assert r["chosen"] == [c["name"] for c in r["candidates"][:2]]
    assert r["teacher"] == r["unpruned"]  # stage 1 prunes M0 itself
    assert r["targets"] == [a for a in aspects if r["pruned"][a] < r["teacher"][a]] or r["targets"] == aspects
    student = json.loads((out / "student" / "student.json").read_text())
    assert sorted(student["removed_blocks"]) == sorted(r["chosen"])
    assert r["motion_parameters"]["after"] == r["motion_parameters"]["before"] - sum(
        c["params"] for c in r["candidates"][:2])
    assert yaml.safe_load((out / "config.yaml").read_text())["prune"]["num_blocks"] == 2
    assert "(removed)" in (out / "ranking.md").read_text()

    # A rerun with the same config does nothing; the scan is one JSON per (variant, prompt).
    before = (out / "ranking.json").stat().st_mtime_ns
    prune.main(prune.parse_args(["--config", fast_config, "--output_dir", str(out), "--num_blocks", "2"]))
    assert "skipping" in capsys.readouterr().out
    assert (out / "ranking.json").stat().st_mtime_ns == before
    assert len(list((out / "scan").glob("*.json"))) == 12 * 2 + 2  # (11 blocks + unpruned) x 2 prompts + pruned


def test_prune_by_parameter_budget_and_candidates(fast_config, tmp_path):
    ups = ["up_blocks.1.motion_modules.0", "up_blocks.1.motion_modules.1", "up_blocks.0.motion_modules.0"]
    prune.main(prune.parse_args(["--config", fast_config, "--output_dir", str(tmp_path), "--candidates", ",".join(ups),
                                 "--prune_params", "100000"]))
    r = json.loads((tmp_path / "ranking.json").read_text())
    assert sorted(c["name"] for c in r["candidates"]) == sorted(ups)
    removed = sum(c["params"] for c in r["candidates"] if c["name"] in r["chosen"])
    assert removed >= 100000 and removed - r["candidates"][len(r["chosen"]) - 1]["params"] < 100000
    assert r["motion_parameters"]["before"] - r["motion_parameters"]["after"] == removed  # all modules, not the candidates'

    # a budget in the config gives way to --num_blocks on the command line, and the config beside
    # the output says which one decided
    config = yaml.safe_load(open(fast_config))
    config["prune"]["prune_params"] = 10 ** 9
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "by count"
    prune.main(prune.parse_args(["--config", str(path), "--output_dir", str(out), "--candidates", ",".join(ups),
                                 "--num_blocks", "1"]))
    assert len(json.loads((out / "ranking.json").read_text())["chosen"]) == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["prune"]["prune_params"] is None


def test_curate_keeps_pairs_where_teacher_wins(fast_config, stage):
    out = stage / "curate"
    args = curate.parse_args(["--config", fast_config, "--output_dir", str(out), "--student",
                              str(stage / "prune" / "student"), "--ranking", str(stage / "prune" / "ranking.json")])
    curate.main(args)
    targets = json.loads((stage / "prune" / "ranking.json").read_text())["targets"]
    rows = read_manifest(out / "pairs.jsonl")
    candidates = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(candidates) == 4 and len(rows) == sum(c["kept"] for c in candidates) >= 1
    for row in rows:
        w = sum(row["winner_scores"][a] for a in targets) / len(targets)
        l = sum(row["loser_scores"][a] for a in targets) / len(targets)
        assert w > l > -1000.0
        assert 5 <= len(row["prompt"].split()) <= 25
        frames = common.read_video(out / row["winner"])
        assert frames.shape == (4, 64, 64, 3)
        latents = load_file(out / row["latents"])
        assert latents["winner"].shape == latents["loser"].shape == (4, 4, 8, 8)
        assert not torch.equal(latents["winner"], latents["loser"])  # teacher and student differ
    # Scores in the manifest are the reward's scores of the MP4s' source frames.
    assert all(c["reason"] in ("kept", "teacher_not_better", "margin_below_min_margin", "loser_below_tau_p") for c in candidates)
    kept_prompts = (out / "prompts.txt").read_text().splitlines()
    assert all(curate.keyword_relevant([p], targets)[0] for p in kept_prompts)


def test_keyword_filter_and_pair_rule():
    assert curate.keyword_relevant(["a horse gallops across a field", "a quiet empty room"],
                                   ["dynamic_degree"]) == [True, False]
    assert curate.keyword_relevant(["three red apples on a wooden table"], ["text_alignment"]) == [True]
    w, l = {"a": 3.0, "b": 2.0}, {"a": 2.5, "b": 2.2}
    assert curate.pair_passes(w, l, ["a", "b"], 2.0, "mean") == (True, "kept")          # 2.5 > 2.35 > 2.0
    assert curate.pair_passes(w, l, ["a", "b"], 2.0, "each") == (False, "teacher_not_better")  # b: 2.0 < 2.2
    assert curate.pair_passes(w, l, ["a", "b"], 2.4, "mean") == (False, "loser_below_tau_p")
    assert curate.pair_passes(w, l, ["a", "b"], 2.0, "mean", min_margin=0.1) == (True, "kept")   # 0.15 > 0.1
    assert curate.pair_passes(w, l, ["a", "b"], 2.0, "mean", min_margin=0.2) == (False, "margin_below_min_margin")
    assert curate.pair_passes(w, {"a": 2.5, "b": 1.9}, ["a", "b"], 1.5, "each", 0.05) == (True, "kept")
    assert curate.pair_passes(w, {"a": 2.5, "b": 1.9}, ["a", "b"], 1.5, "each", 0.2) == (False, "margin_below_min_margin")


def test_train_moves_the_student_and_keeps_the_pruned_layout(fast_config, stage):
    out = stage / "train"
    train_redpo.main(train_redpo.parse_args([
        "--config", fast_config, "--output_dir", str(out), "--student", str(stage / "prune" / "student"),
        "--pairs", str(stage / "curate" / "pairs.jsonl"), "--validation_steps", "2"]))
    meta = json.loads((out / "student" / "student.json").read_text())
    init = json.loads((stage / "prune" / "student" / "student.json").read_text())
    assert meta["removed_blocks"] == init["removed_blocks"] and meta["steps"] == 4 and meta["loss_type"] == "redpo"
    trained = load_file(out / "student" / "student.safetensors")
    start = load_file(stage / "prune" / "student" / "student.safetensors")
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-2", "checkpoint-4", "config.yaml", "cost.json", "logs", "metrics.jsonl",
                                       "provenance.json", "student",
                                       "validation"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    names = {"loss", "dpo_loss", "sft_loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
             "mse/model_winner", "mse/model_loser", "mse/ref_winner", "mse/ref_loser", "lr"}
    assert names <= logged[0].keys()

    # TensorBoard (the default tracker) got the same numbers, and the validation videos as images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert names <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("rewards/margins")] == pytest.approx([m["rewards/margins"] for m in logged])
    assert len(events.Tags()["images"]) == 2 and all(len(events.Images(t)) == 2 for t in events.Tags()["images"])
    # The same prompts and seeds at steps 2 and 4.
    prompts = json.loads((out / "validation" / "step-2" / "prompts.json").read_text())
    assert prompts == json.loads((out / "validation" / "step-4" / "prompts.json").read_text()) and len(prompts) == 2
    early, late = (common.read_video(out / "validation" / s / "0.mp4") for s in ("step-2", "step-4"))
    assert early.shape == late.shape == (4, 64, 64, 3)


def test_report_to_names_a_missing_tracker_in_one_line(fast_config, stage, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = run_script("python", "train_redpo.py", "--config", fast_config, "--output_dir", str(tmp_path),
                     "--student", str(stage / "prune" / "student"), "--pairs", str(stage / "curate" / "pairs.jsonl"),
                     "--report_to", "wandb", check=False)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: train.report_to: wandb is not installed; pip install wandb, or --report_to none")
    assert not (tmp_path / "student").exists()


def test_training_takes_the_prompt_embeddings_curation_stored(fast_config, stage, tmp_path, monkeypatch):
    """Curation stores each pair's prompt embedding beside its latents, so training runs no text
    encoder; a manifest from before (latents without embeddings) still trains, encoding its prompts
    as it goes, to the same student."""
    import shutil

    from backends import animatediff
    from safetensors.torch import save_file

    old = tmp_path / "old curate"
    shutil.copytree(stage / "curate", old)
    for row in read_manifest(old / "pairs.jsonl"):
        latents = load_file(old / row["latents"])
        assert latents["prompt_embeds"].shape == (77, 32)  # the tiny CLIP's (tokens, width)
        save_file({k: v for k, v in latents.items() if k != "prompt_embeds"}, str(old / row["latents"]))
    argv = ["--config", fast_config, "--student", str(stage / "prune" / "student"), "--max_train_steps", "2",
            "--report_to", "none"]
    train_redpo.main(train_redpo.parse_args([*argv, "--output_dir", str(tmp_path / "old"), "--pairs",
                                             str(old / "pairs.jsonl")]))

    def no_text_encoder(*a, **k):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(animatediff, "load_text_encoder", no_text_encoder)
    train_redpo.main(train_redpo.parse_args([*argv, "--output_dir", str(tmp_path / "cached"), "--pairs",
                                             str(stage / "curate" / "pairs.jsonl")]))
    a, b = (load_file(tmp_path / d / "student" / "student.safetensors") for d in ("old", "cached"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss_type", ["sft", "dpo"])
def test_ablations_are_switches(fast_config, stage, tmp_path, loss_type):
    train_redpo.main(train_redpo.parse_args([
        "--config", fast_config, "--output_dir", str(tmp_path), "--student", str(stage / "prune" / "student"),
        "--pairs", str(stage / "curate" / "pairs.jsonl"), "--loss_type", loss_type, "--max_train_steps", "2"]))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    term = {"sft": "sft_loss", "dpo": "dpo_loss"}[loss_type]
    assert all(m["loss"] == pytest.approx(m[term]) for m in logged)


def test_evaluate_writes_the_paper_table(fast_config, stage):
    out = stage / "eval"
    students = [str(stage / "prune" / "student"), str(stage / "train" / "student")]
    evaluate.main(evaluate.parse_args(["--config", fast_config, "--output_dir", str(out), "--students", ",".join(students)]))
    report = json.loads((out / "eval.json").read_text())
    teacher, pruned, trained = report["models"]
    assert teacher["label"] == "teacher (M0)" and pruned["path"] == students[0]
    assert pruned["motion_parameters"] < teacher["motion_parameters"]
    assert pruned["flops_per_step"] < teacher["flops_per_step"]
    assert trained["motion_parameters"] == pruned["motion_parameters"]
    for m in report["models"]:
        assert m["average"] == pytest.approx(sum(m["scores"][a] for a in report["aspects"]) / 4)
        assert m["latency_s"] > 0 and len(m["videos"]) == 2
        assert all(common.read_video(out / v).shape == (4, 64, 64, 3) for v in m["videos"])
    table = (out / "eval.md").read_text()
    assert "| Model | Visual Quality | Temporal Consist. | Dynamic Degree | Text Align. | Average |" in table
    # the reward's table, VideoReward's (which did not curate: eval.rewards) and the features', each header + 3 models
    assert table.count("\n| ") == 12 and "Each model scored by random tiny VideoReward" in table
    assert "| Model | Visual Quality (features) | Temporal Consist. (features) | Dynamic Degree (features) |" in table
    assert all(1 <= m["scores"][f"{a}/features"] <= 4 for m in report["models"]
               for a in ("visual_quality", "temporal_consistency", "dynamic_degree"))
    check_report_in_a_browser(out / "report.html", expect_videos=3 * 2, tmp=stage / "browser", tables=4)

    # Adding a student reuses the cached results of the others.
    cached = sorted(p.name for p in (out / "items").iterdir())
    evaluate.main(evaluate.parse_args(["--config", fast_config, "--output_dir", str(out), "--students", students[1]]))
    assert sorted(p.name for p in (out / "items").iterdir()) == cached
    assert len(json.loads((out / "eval.json").read_text())["models"]) == 2


def check_report_in_a_browser(page, expect_videos, tmp, tables=3):
    """The page references only files that exist, and headless Chromium renders it to a screenshot
    that is not blank. Without Chromium the test skips, except under .ci/run, where it must run."""
    import re
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    text = page.read_text()
    videos = re.findall(r'<video src="([^"]+)"', text)
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(videos) == expect_videos and images == ["aspects.png"] and text.count("<table>") == tables
    assert all((page.parent / ref).is_file() for ref in videos + images)
    assert "<td>teacher (M0)</td>" in text
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("VIP_REQUIRE_BROWSER"):
            raise AssertionError("VIP_REQUIRE_BROWSER is set but no chromium is on PATH")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    tmp.mkdir(parents=True, exist_ok=True)
    shot = tmp / "report.png"
    # Flags: headless as root, and no background connections (this machine's network is closed).
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,1400", "--hide-scrollbars",
                    f"--screenshot={shot}", page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1400, 1280)
    assert pixels.std() > 10 and (pixels < 100).mean() > 0.01  # text, lines and videos drawn on the white page
