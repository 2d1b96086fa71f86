import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import videoreward as vr  # noqa: E402
import videoreward_tiny  # noqa: E402
from common import ConfigError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = json.loads((FIXTURES / "videoreward_official.json").read_text())


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return videoreward_tiny.build_tiny(str(tmp_path_factory.mktemp("videoreward") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def scorer(tiny):
    return vr.VideoRewardScorer.from_pretrained(tiny, batch_size=3)


def test_tiny_is_the_one_the_official_inference_scored(tiny):
    """The fixtures hold only outputs: they mean something only for this exact checkpoint."""
    state = torch.load(os.path.join(tiny, "checkpoint-1", "model.pth"), weights_only=True)
    assert len(state) == OFFICIAL["model_pth_keys"]
    assert sha(b"".join(k.encode() + state[k].numpy().tobytes() for k in sorted(state))) == OFFICIAL["model_pth_sha256"]


def test_reading_matches_the_official_inference(scorer):
    """Per MP4: the frame count and rate decord gave, the frames it picked, and the resized frames."""
    for name, official in zip(OFFICIAL["videos"], OFFICIAL["reading"]):
        path = FIXTURES / name
        frames, fps = common.read_video(path), common.video_fps(path)
        assert (len(frames), fps) == (official["total"], official["fps"])
        indices = vr.frame_indices(len(frames), vr.num_frames(len(frames), fps))
        assert indices == official["indices"]
        assert sha(np.ascontiguousarray(frames[indices]).tobytes()) == official["frames_sha256"]
        resized = scorer.frames(path)
        assert list(resized.shape) == official["resized_shape"]
        assert sha(resized.to(torch.uint8).numpy().tobytes()) == official["resized_sha256"]


def test_text_and_tokens_match_the_official_inference(scorer):
    for prompt, text_sha, ids_sha, grid in zip(OFFICIAL["prompts"], OFFICIAL["texts_sha256"], OFFICIAL["input_ids"],
                                               OFFICIAL["video_grid_thw"]):
        assert sha(vr.chat_text(prompt).encode()) == text_sha
        text = vr.chat_text(prompt).replace("<|video_pad|>", "<|video_pad|>" * (int(np.prod(grid)) // 4))
        assert sha(json.dumps(scorer.tokenizer(text)["input_ids"]).encode()) == ids_sha


def test_scores_match_the_official_inference(scorer):
    """The three MP4s in one batch and each alone: the official scores to float32 precision (ours
    merges the LoRA into the weights, the official keeps it beside them)."""
    videos = [str(FIXTURES / v) for v in OFFICIAL["videos"]]
    batched = scorer.score(videos, OFFICIAL["prompts"])
    alone = [scorer.score([v], [p])[0] for v, p in zip(videos, OFFICIAL["prompts"])]
    for got, one, ref, ref_one in zip(batched, alone, OFFICIAL["batched"], OFFICIAL["alone"]):
        assert list(got) == ["visual_quality", "temporal_consistency", "text_alignment"]
        np.testing.assert_allclose([got[vr.ASPECT_OF[h]] for h in vr.ASPECT_OF], [ref[h] for h in vr.ASPECT_OF],
                                   atol=2e-5, rtol=0)
        np.testing.assert_allclose([one[vr.ASPECT_OF[h]] for h in vr.ASPECT_OF], [ref_one[h] for h in vr.ASPECT_OF],
                                   atol=2e-5, rtol=0)
    # the videos differ by more than the tolerance, or the comparison proves little
    assert np.ptp([[s[a] for a in s] for s in batched], axis=0).min() > 1e-3
    for raw, normed in zip(OFFICIAL["batched_raw"], OFFICIAL["batched"]):
        np.testing.assert_allclose(vr.normalise([raw[h] for h in vr.ASPECT_OF], scorer.norm),
                                   [normed[h] for h in vr.ASPECT_OF], atol=1e-9)


def test_bf16_scores_are_the_official_ones_to_bf16_resolution(tiny):
    """In bf16 both round: ours after merging the LoRA, the official around it. They differ by what
    the official bf16 run differs from its own float32 one, a few bf16 steps, not more."""
    scorer = vr.VideoRewardScorer.from_pretrained(tiny, batch_size=3, dtype=torch.bfloat16)
    got = scorer.score([str(FIXTURES / v) for v in OFFICIAL["videos"]], OFFICIAL["prompts"])
    ours = np.array([[g[vr.ASPECT_OF[h]] for h in vr.ASPECT_OF] for g in got])
    official = np.array([[s[h] for h in vr.ASPECT_OF] for s in OFFICIAL["batched_bf16"]])
    exact = np.array([[s[h] for h in vr.ASPECT_OF] for s in OFFICIAL["batched"]])
    assert np.abs(official - exact).max() > 1e-3  # bf16 does round here
    assert np.abs(ours - official).max() < 0.02 and np.abs(ours - exact).max() < 0.02


def test_frames_in_memory_are_read_at_the_given_fps(scorer):
    frames = common.read_video(FIXTURES / OFFICIAL["videos"][0])
    from_file = scorer.score([str(FIXTURES / OFFICIAL["videos"][0])], ["a cat"])[0]
    assert scorer.video_fps == 8 and scorer.score([frames], ["a cat"])[0] == from_file
    scorer.video_fps = 16  # half as many frames read
    try:
        assert scorer.frames(frames).shape[0] == 6 and scorer.score([frames], ["a cat"])[0] != from_file
    finally:
        scorer.video_fps = 8.0


def test_frame_counts_and_sizes_match_vision_process():
    """smart_nframes + the uniform indices for every clip of 2-300 frames at 4-30 fps, and smart_resize
    for a grid of frame sizes, as VideoAlign's vision_process.py computes them."""
    for fps, official in OFFICIAL["indices_sha256"].items():
        ours = [vr.frame_indices(t, vr.num_frames(t, int(fps))) for t in range(2, 301)]
        assert sha(json.dumps(ours).encode()) == official, fps
    for key, official in OFFICIAL["indices_examples"].items():
        total, fps = map(int, key.split("@"))
        assert vr.frame_indices(total, vr.num_frames(total, fps)) == official
    for key, official in OFFICIAL["sizes"].items():
        assert list(vr.smart_resize(*map(int, key.split("x")))) == official, key
    with pytest.raises(ValueError, match="too short"):
        vr.num_frames(1, 8)


def test_prompt_is_the_official_text():
    text = vr.PROMPT.format(text_prompt="PROMPT_X")
    assert (len(text), sha(text.encode())) == (3992, "9ec58b932ba0d476318891a5fec478693bffb1fcc2d4bf22394c421b23150cd8")
    assert [text.index(t) for t in vr.REWARD_TOKENS] == [1432, 2779, 3974]


def test_patchify_is_qwen2vl_order():
    """Each row one temporal x spatial patch, rows in the merger's 2x2 order: row r of merged token
    m holds pixels of the 2x2 block m, read back here by hand."""
    frames = torch.arange(4 * 3 * 56 * 56, dtype=torch.float32).reshape(4, 3, 56, 56) % 255
    rows, grid = vr.patchify(frames, [0, 0, 0], [1 / 255] * 3)  # (x / 255 - 0) * 255: the pixels as they are
    assert grid.tolist() == [2, 4, 4] and rows.shape == (32, 3 * 2 * 14 * 14)
    patch = rows[5].reshape(3, 2, 14, 14)  # t 0, merged block (0, 1), its second patch: row 0, column 3
    torch.testing.assert_close(patch, frames[0:2, :, 0:14, 42:56].permute(1, 0, 2, 3), rtol=0, atol=1e-3)
    odd, _ = vr.patchify(frames[:3], [0, 0, 0], [1, 1, 1])  # an odd count repeats the last frame
    assert odd.shape[0] == 32


def test_merge_lora():
    base, a, b = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    merged = vr.merge_lora({"m.base_layer.weight": base, "m.base_layer.bias": torch.ones(6), "m.lora_A.default.weight": a,
                            "m.lora_B.default.weight": b}, scaling=2.0)
    assert set(merged) == {"m.weight", "m.bias"}
    torch.testing.assert_close(merged["m.weight"], base + 2 * b @ a)


def test_loading(scorer, tiny):
    assert scorer.model.rm_head.weight.dtype == torch.float32 and not scorer.model.training
    assert not any(p.requires_grad for p in scorer.model.parameters())
    assert scorer.reward_token_ids == [len(scorer.tokenizer) - 3 + i for i in range(3)]
    assert vr.is_tiny(tiny) and not vr.is_tiny(os.path.join(tiny, "base"))
    assert "<|TA_reward|>" in scorer.unreadable("a <|TA_reward|> cat") and scorer.unreadable("a cat") is None
    with pytest.raises(ValueError, match="F >= 2"):
        scorer.score([np.zeros((1, 8, 8, 3), np.uint8)], ["a cat"])
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        scorer.score([np.zeros((4, 8, 8, 3), np.uint8)] * 2, ["a cat"])


def broken(tiny, tmp_path, name):
    path = tmp_path / name
    shutil.copytree(tiny, path)
    return path


def one_line(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_a_wrong_layout_is_one_line_naming_what_is_missing(tiny, tmp_path):
    load = vr.VideoRewardScorer.from_pretrained
    path = broken(tiny, tmp_path, "no_config")
    os.remove(path / "model_config.json")
    with pytest.raises(ConfigError) as e:
        load(str(path))
    one_line(e, "no_config/model_config.json", "cannot read")

    path = broken(tiny, tmp_path, "adapter_only")
    os.remove(path / "checkpoint-1" / "model.pth")
    with pytest.raises(ConfigError) as e:
        load(str(path))
    one_line(e, "checkpoint-1/model.pth is missing", "adapter")

    path = broken(tiny, tmp_path, "no_checkpoint")
    shutil.rmtree(path / "checkpoint-1")
    with pytest.raises(ConfigError) as e:
        load(str(path))
    one_line(e, "no_checkpoint: no checkpoint-<step> folder")

    path = broken(tiny, tmp_path, "no_section")
    config = json.loads((path / "model_config.json").read_text())
    del config["peft_lora_config"]
    (path / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        load(str(path))
    one_line(e, "no_section/model_config.json", "peft_lora_config")

    path = broken(tiny, tmp_path, "other_prompt")
    config = json.loads((path / "model_config.json").read_text())
    config["data_config"]["prompt_template_type"] = "simple"
    (path / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        load(str(path))
    one_line(e, "prompt_template_type is 'simple'", "detailed_special")

    for what, edit, expected in [
        ("no_head", lambda s: s.pop("base_model.model.rm_head.weight"), "no rm_head weight"),
        ("no_layer", lambda s: s.pop("base_model.model.model.layers.1.mlp.up_proj.base_layer.weight"),
         "no model.language_model.layers.1.mlp.up_proj.weight (1 keys missing"),
        ("short_vocab", lambda s: s.update({"base_model.model.model.embed_tokens.weight":
                                            s["base_model.model.model.embed_tokens.weight"][:-3]}), "embeddings of"),
    ]:
        path = broken(tiny, tmp_path, what)
        state = torch.load(path / "checkpoint-1" / "model.pth", weights_only=True)
        edit(state)
        torch.save(state, path / "checkpoint-1" / "model.pth")
        with pytest.raises(ConfigError) as e:
            load(str(path))
        one_line(e, f"{what}/checkpoint-1/model.pth", expected)

    path = broken(tiny, tmp_path, "pickle")
    (path / "checkpoint-1" / "model.pth").write_bytes(b"not a state dict")
    with pytest.raises(ConfigError) as e:
        load(str(path))
    one_line(e, "pickle/checkpoint-1/model.pth: cannot read")


def test_a_base_that_is_not_there_is_one_line(tiny, tmp_path):
    path = broken(tiny, tmp_path, "no_base")
    shutil.rmtree(path / "base")
    with pytest.raises(ConfigError) as e:
        vr.VideoRewardScorer.from_pretrained(str(path))
    one_line(e, "no_base/model_config.json: model_config.model_name_or_path base: cannot read",
             "Qwen/Qwen2-VL-2B-Instruct")


def test_base_named_by_a_path_of_the_authors_cluster_falls_back_to_the_hub(tiny, tmp_path):
    path = broken(tiny, tmp_path, "pfs")
    config = json.loads((path / "model_config.json").read_text())
    config["model_config"]["model_name_or_path"] = "/pfs/somewhere/Qwen2-VL-2B-Instruct"
    (path / "model_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="reading the base model from Qwen/Qwen2-VL-2B-Instruct"):
        assert vr.base_of(str(path), config) == vr.BASE_DEFAULT
    assert vr.base_of(tiny, vr.read_config(tiny)) == os.path.join(tiny, "base")


# -----------------------------------------------------------------------------
# VideoReward in vip: a loop curated with it, evaluation by several rewards, checks before work.

def call_main(script, argv, capsys):
    with pytest.raises(SystemExit) as e:
        common.run_main(script.main, lambda: script.parse_args([str(a) for a in argv]))
    return e.value.code, capsys.readouterr().err


def test_missing_or_hub_only_checkpoints_are_one_line_before_any_folder(fast_config, tiny_videoreward, tmp_path,
                                                                        monkeypatch, capsys):
    import evaluate

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty cache" / "hub"))
    out = tmp_path / "out"
    base = ["--config", fast_config, "--output_dir", out, "--reward", "videoreward", "--rewards", "videoreward",
            "--aspects", "visual_quality", "text_alignment"]
    for model, expected in [("KwaiVGI/VideoReward", "reward.videoreward_model: KwaiVGI/VideoReward is not in the "
                                                    "Hugging Face cache"),
                            (tmp_path / "nowhere", f"reward.videoreward_model: {tmp_path / 'nowhere'}: no such folder")]:
        code, err = call_main(evaluate, base + ["--videoreward_model", model], capsys)
        assert code == 2 and err.count("\n") == 1 and expected in err, err
    layout = broken(tiny_videoreward, tmp_path, "adapter_only")
    os.remove(layout / "checkpoint-1" / "model.pth")
    code, err = call_main(evaluate, base + ["--videoreward_model", layout], capsys)
    assert code == 2 and err.count("\n") == 1 and "checkpoint-1/model.pth is missing" in err
    no_base = broken(tiny_videoreward, tmp_path, "no_base")
    shutil.rmtree(no_base / "base")
    code, err = call_main(evaluate, base + ["--videoreward_model", no_base], capsys)
    assert code == 2 and err.count("\n") == 1 and "model_config.model_name_or_path: base is not in the Hugging" in err
    assert not out.exists()


def test_evaluation_by_two_rewards_writes_both_tables(fast_config, tiny_stage, tmp_path):
    """configs/tiny.yaml curates with VideoScore and evaluates with it and with VideoReward: two
    tables, each model in both; then VideoReward alone, which did not curate, makes the main one."""
    import evaluate

    student = str(tiny_stage / "prune" / "student")
    out = tmp_path / "both"
    evaluate.main(evaluate.parse_args(["--config", fast_config, "--output_dir", str(out), "--students", student]))
    report = json.loads((out / "eval.json").read_text())
    assert list(report["rewards"]) == ["videoscore", "videoreward"]
    md = (out / "eval.md").read_text()
    assert "Reward: random tiny VideoScore" in md
    assert "Each model scored by random tiny VideoReward" in md and "a reward that did not curate" in md
    for m in report["models"]:
        by = m["by"]["videoreward"]
        assert set(by) == {"visual_quality", "temporal_consistency", "text_alignment", "average"}
        assert by["average"] == pytest.approx(sum(v for k, v in by.items() if k != "average") / 3)
    html = (out / "report.html").read_text()
    assert html.count("<table>") == 4  # VideoScore's, VideoReward's, the features', the videos side by side

    alone = tmp_path / "held_out"
    evaluate.main(evaluate.parse_args(["--config", fast_config, "--output_dir", str(alone), "--students", student,
                                       "--rewards", "videoreward"]))
    held = json.loads((alone / "eval.json").read_text())
    assert held["aspects"] == ["visual_quality", "temporal_consistency", "text_alignment"]
    for m, first in zip(held["models"], report["models"]):  # the same videos, scored by the same VideoReward
        assert m["by"] == {}
        for a in held["aspects"]:
            assert m["scores"][a] == pytest.approx(first["by"]["videoreward"][a], abs=1e-6)
    assert "Reward: random tiny VideoReward" in (alone / "eval.md").read_text()


def test_what_a_step_does_not_use_is_unused_in_what_it_is_made_from(fast_config):
    """A step records a model it does not score with as unused, not by its contents (which change
    when another step downloads or builds it); a record older than the option stands; one that used
    it differs when it is no longer used."""
    import evaluate
    import prune
    import provenance
    import teacher_cache

    both = provenance.made_from(evaluate.parse_args(["--config", fast_config]))
    assert both["eval"]["rewards"] == ["videoscore", "videoreward"]
    assert both["reward"]["videoreward_model"].startswith("sha256:") and both["reward"]["reward_model"].startswith("sha")
    args = evaluate.parse_args(["--config", fast_config])
    args.rewards = []  # as a config without eval.rewards
    alone = provenance.made_from(args)
    assert alone["eval"]["rewards"] == alone["reward"]["videoreward_model"] == provenance.UNUSED
    assert sorted(provenance.differing(both, alone)) == ["eval.rewards", "reward.videoreward_model"]  # used, not now

    curated = prune.parse_args(["--config", fast_config, "--output_dir", "x", "--reward", "videoreward",
                                "--aspects", "visual_quality", "text_alignment"])
    made = provenance.made_from(curated)
    assert made["reward"]["reward_model"] == provenance.UNUSED and made["reward"]["videoreward_model"].startswith("sha")
    older = json.loads(json.dumps(made))  # as a version before these rules wrote it
    older["reward"]["reward_model"] = "hub:TIGER-Lab/VideoScore-v1.1@main"
    assert provenance.differing(older, made) == []
    del older["reward"]["reward_model"]
    assert provenance.differing(older, made) == []

    # M0's videos are kept by what the curating reward reads: evaluate's extra rewards change nothing
    evaluated = provenance.made_from(evaluate.parse_args(["--config", fast_config, "--reward", "videoreward",
                                                          "--aspects", "visual_quality", "text_alignment",
                                                          "--rewards", "videoreward", "videoscore"]))
    assert evaluated["reward"]["reward_model"].startswith("sha")
    assert teacher_cache.settings_key(evaluated)[0] == teacher_cache.settings_key(made)[0]


def test_an_ensemble_with_videoreward_is_on_the_one_to_four_scale(fast_config):
    import evaluate
    import features
    import rewards

    args = evaluate.parse_args(["--config", fast_config, "--reward", "ensemble", "--ensemble_with", "videoreward",
                                "--aspects", "visual_quality", "text_alignment"])
    reward = rewards.load_reward(args)
    frames = [common.read_video(FIXTURES / v) for v in OFFICIAL["videos"]]
    mixed = reward.score(frames, OFFICIAL["prompts"])
    alone = reward.learned.score(frames, OFFICIAL["prompts"])
    plain = features.FeatureReward().score(frames, OFFICIAL["prompts"])
    for m, z, f in zip(mixed, alone, plain):
        assert m["visual_quality"] == pytest.approx((2.5 + 0.75 * z["visual_quality"] + f["visual_quality"]) / 2)
        assert m["text_alignment"] == pytest.approx(2.5 + 0.75 * z["text_alignment"])
        assert m["visual_quality/videoreward"] == z["visual_quality"]
    assert rewards.label(args).startswith("mean of random tiny VideoReward")


def test_vip_loop_curates_with_videoreward_and_a_rerun_redoes_nothing(tiny_dir, tiny_videoreward, tmp_path):
    """configs/tiny_videoreward.yaml (cut down): pruned, curated and trained by VideoReward, evaluated
    by it and by VideoScore, which did not curate and is built only then; the same command again
    skips every step."""
    import subprocess

    from conftest import ROOT, loop_config

    path = loop_config("tiny_videoreward", tmp_path / "videoreward.yaml", fast_except=("build_tiny",),
                       model={"pretrained_model_name_or_path": str(tiny_dir / "sd"),
                              "motion_adapter": str(tiny_dir / "motion_adapter")},
                       reward={"videoreward_model": tiny_videoreward, "reward_model": str(tmp_path / "videoscore")},
                       curate={"max_prompts": 12})  # a random reward prefers M0's video about one time in five
    run = tmp_path / "run"
    env = {**os.environ, "CONFIG": path, "RUN_DIR": str(run)}
    result = subprocess.run(["bash", "vip_loop.sh", "tiny_videoreward", "1"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ranking = json.loads((run / "stage_1" / "prune" / "ranking.json").read_text())
    assert set(ranking["targets"]) <= {"visual_quality", "temporal_consistency", "text_alignment"}
    pairs = [json.loads(line) for line in (run / "stage_1" / "curate" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(set(p["winner_scores"]) == {"visual_quality", "temporal_consistency", "text_alignment"}
                         for p in pairs)
    md = (run / "eval" / "eval.md").read_text()
    assert "Reward: random tiny VideoReward" in md and "Each model scored by random tiny VideoScore" in md
    assert (run / "export" / "model_index.json").exists() and (tmp_path / "videoscore" / "config.json").exists()

    again = subprocess.run(["bash", "vip_loop.sh", "tiny_videoreward", "1"], cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    for step in ("prune", "curate", "train", "evaluate"):
        assert f"{step}: " in again.stdout + again.stderr and "skipping" in again.stdout + again.stderr, step
    assert "pairs:" not in again.stderr and "block scan:" not in again.stderr  # no work was done again


def test_a_checkpoint_saved_by_newer_transformers_loads_the_same(scorer, tiny, tmp_path):
    """VideoAlign trained on transformers 4.45; a model.pth saved from 4.52 on names the language
    model `model.language_model.*` and the vision tower `model.visual.*`."""
    path = broken(tiny, tmp_path, "newer")
    state = torch.load(path / "checkpoint-1" / "model.pth", weights_only=True)
    renamed = {k.replace("base_model.model.model.", "base_model.model.model.language_model.")
                .replace("base_model.model.visual.", "base_model.model.model.visual."): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    torch.save(renamed, path / "checkpoint-1" / "model.pth")
    newer = vr.VideoRewardScorer.from_pretrained(str(path))
    video = str(FIXTURES / OFFICIAL["videos"][1])
    assert newer.score([video], ["a cat"]) == scorer.score([video], ["a cat"])
