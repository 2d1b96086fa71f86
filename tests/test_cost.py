"""What a run costs: the teacher's videos made once a run and reused exactly, and the ledger every
script writes. Run: python -m pytest -q tests/test_cost.py"""
import argparse
import json

import numpy as np
import torch
import yaml

import provenance
import rewards
import stage
import teacher_cache
from conftest import run_script


def costs(folder):
    entries = json.loads((folder / "cost.json").read_text())
    return {k: sum(e.get(k, 0) for e in entries) for k in {k for e in entries for k in e} if k not in ("script", "date")}


def test_stage_2_makes_no_teacher_video_and_keeps_the_same_pairs(fast_config, tmp_path):
    config = yaml.safe_load(open(fast_config))
    config["curate"].update(relevance_filter="none", max_prompts=10)  # the same prompts at both stages: all reusable
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    out = run_script("bash", "vip_loop.sh", "tiny", "2", env={"CONFIG": str(path), "RUN_DIR": str(run)}).stdout
    assert "What the run cost" in out and (run / "cost.md").exists() and "| **total** |" in (run / "cost.md").read_text()
    first, second = costs(run / "stage_1" / "curate"), costs(run / "stage_2" / "curate")
    assert first["videos/teacher"] == 10 - 2 and first["denoiser_calls/teacher"] > 0
    assert second.get("videos/teacher", 0) == 0 and second.get("denoiser_calls/teacher", 0) == 0
    assert second["videos/student"] == 10 and second["videos_scored"] == 10  # only the losers made and scored
    assert costs(run / "stage_2" / "prune").get("videos/teacher", 0) == 0
    train = costs(run / "stage_1" / "train")
    assert train["denoiser_calls/teacher"] == 4 * 2 * 2  # 4 steps of 2 pairs, winners and losers, one teacher call
    assert train["wall_s"] > 0 and train["cpu_s"] > 0

    # The same stage without the kept videos: the same pairs, to the byte.
    fresh = tmp_path / "fresh"
    run_script("python", "curate.py", "--config", str(path), "--output_dir", str(fresh),
               "--student", str(run / "stage_2" / "prune" / "student"),
               "--ranking", str(run / "stage_2" / "prune" / "ranking.json"))
    kept = run / "stage_2" / "curate"
    assert (fresh / "pairs.jsonl").read_text() == (kept / "pairs.jsonl").read_text()
    rows = stage.read_manifest(kept / "pairs.jsonl")
    assert rows and all((fresh / r["latents"]).read_bytes() == (kept / r["latents"]).read_bytes() for r in rows)
    assert costs(fresh)["videos/teacher"] == 10


def test_another_generation_setting_is_another_set_of_teacher_videos(fast_config, tmp_path):
    args = stage.parse_config(["--config", fast_config, "--teacher_cache", str(tmp_path / "teacher")], "",
                              {"model": stage.MODEL_OPTIONS, "reward": rewards.OPTIONS})
    cache = teacher_cache.TeacherCache(args, provenance.made_from(args))
    frames = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    cache.save("a cat", 3, frames, torch.zeros(4, 4, 8, 8), {"visual_quality": 2.5})
    assert cache.load("a cat", 3)[2] == {"visual_quality": 2.5} and cache.load("a cat", 4) is None
    for key, value in (("num_inference_steps", 5), ("guidance_scale", 2.0), ("reward", "world")):
        other_args = argparse.Namespace(**{**vars(args), key: value})
        other = teacher_cache.TeacherCache(other_args, provenance.made_from(other_args))
        assert other.folder != cache.folder and other.load("a cat", 3) is None, key
    same_args = argparse.Namespace(**{**vars(args), "generation_batch_size": 1, "output_dir": "elsewhere"})
    same = teacher_cache.TeacherCache(same_args, provenance.made_from(same_args))
    assert same.folder == cache.folder  # how a run goes is not what it makes


def test_a_cheaper_scan_generates_at_its_own_settings(fast_config, tmp_path):
    """prune.scan_num_inference_steps: the scan's videos at 1 step instead of the model's 3, a third of the calls."""
    calls = {}
    for steps in (None, 1):
        out = tmp_path / f"scan{steps}"
        run_script("python", "prune.py", "--config", fast_config, "--output_dir", str(out),
                   *(["--scan_num_inference_steps", str(steps)] if steps else []))
        spent = costs(out)
        calls[steps] = spent["denoiser_calls/teacher"] + spent["denoiser_calls/student"]
    assert calls[None] == 3 * calls[1] > 0
    bad = run_script("python", "prune.py", "--config", fast_config, "--output_dir", str(tmp_path / "bad"),
                     "--scan_num_inference_steps", "0", check=False)
    assert bad.returncode == 2 and "scan_num_inference_steps" in bad.stderr.strip().splitlines()[-1]
