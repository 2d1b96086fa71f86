"""The weight-free reward (features.py): each corruption lowers the aspect it should, and the ensemble
with a learned reward. Run: python -m pytest -q tests/test_features.py"""
import argparse

import cv2
import numpy as np
import pytest

import common
import features
import rewards
import stage
import world

PROMPTS = ["a red square moves left slowly", "a blue triangle moves up quickly", "a green circle moves right quickly",
           "a red circle moves down slowly"]


@pytest.fixture(scope="module")
def clips():
    return [world.render(p, i) for i, p in enumerate(PROMPTS)]


def mean_scores(clips):
    scores = features.FeatureReward().score(clips, [""] * len(clips))
    return {a: float(np.mean([s[a] for s in scores])) for a in features.ASPECTS}


def blur(c):
    return np.stack([cv2.GaussianBlur(f, (0, 0), 1.0) for f in c])


def flicker(c):  # brightness +-20% frame to frame
    return np.stack([np.clip(f * (1.2 if i % 2 else 0.8), 0, 255).astype(np.uint8) for i, f in enumerate(c)])


def frozen(c):
    return np.stack([c[0]] * len(c))


def noise(c):
    return np.clip(c + np.random.default_rng(0).normal(0, 20, c.shape), 0, 255).astype(np.uint8)


def test_clean_rendered_clips_score_high(clips):
    s = mean_scores(clips)
    assert s["visual_quality"] > 2.5 and s["temporal_consistency"] > 3.5 and s["dynamic_degree"] > 3.5


@pytest.mark.parametrize("corrupt,hit,spared", [
    (blur, "visual_quality", ["dynamic_degree"]),
    (noise, "visual_quality", ["dynamic_degree"]),
    (flicker, "temporal_consistency", ["visual_quality", "dynamic_degree"]),
    (frozen, "dynamic_degree", ["visual_quality", "temporal_consistency"]),
])
def test_each_corruption_lowers_its_aspect(clips, corrupt, hit, spared):
    clean, bad = mean_scores(clips), mean_scores([corrupt(c) for c in clips])
    assert bad[hit] < clean[hit] - 0.8
    assert all(abs(bad[a] - clean[a]) < 0.3 for a in spared)


def test_motion_does_not_cost_consistency(clips):
    moving, still = mean_scores(clips), mean_scores([frozen(c) for c in clips])
    assert moving["temporal_consistency"] > still["temporal_consistency"] - 0.4  # the warp follows the motion


def test_ensemble_averages_shared_aspects_and_keeps_the_rest(clips):
    ensemble = features.EnsembleReward(world.WorldReward(), "world")
    mixed = ensemble.score(clips, PROMPTS)
    exact = world.WorldReward().score(clips, PROMPTS)
    alone = features.FeatureReward().score(clips, PROMPTS)
    for m, e, f in zip(mixed, exact, alone):
        assert m["visual_quality"] == pytest.approx((e["visual_quality"] + f["visual_quality"]) / 2)
        assert m["text_alignment"] == e["text_alignment"]  # features has none
        assert m["dynamic_degree/world"] == e["dynamic_degree"] and m["dynamic_degree/features"] == f["dynamic_degree"]


def test_config_switches_and_their_errors():
    args = argparse.Namespace(reward="features", aspects=list(features.ASPECTS), ensemble_with="videoscore")
    assert isinstance(rewards.load_reward(args), features.FeatureReward)
    args.aspects = ["visual_quality", "text_alignment"]
    with pytest.raises(common.ConfigError, match="reward.aspects: reward features scores only"):
        rewards.load_reward(args)
    args.reward, args.ensemble_with = "ensemble", "world"
    assert isinstance(rewards.load_reward(args).learned, world.WorldReward)
    with pytest.raises(common.ConfigError, match="--ensemble_with: expected one of videoscore, videoreward, world; got 'clip'"):
        stage.parse_config(["--ensemble_with", "clip"], "t", {"reward": rewards.OPTIONS})
    with pytest.raises(common.ConfigError, match="--reward: expected one of videoscore, videoreward, world, features, ensemble"):
        stage.parse_config(["--reward", "clip"], "t", {"reward": rewards.OPTIONS})
