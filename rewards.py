"""The rewards, chosen in one place (`reward.reward`): VideoScore (videoscore.py), the world's
exact reward (world.py), the weight-free features (features.py), or the ensemble of a learned one
with the features. Each has `aspects` and `score(videos, prompts) -> [{aspect: score}]`.
"""

import argparse
import os

import common
import features
import videoscore
import world


def build_tiny(args):
    """With build_tiny, a tiny VideoScore at reward_model where the reward uses one and none is there."""
    if args.build_tiny and uses_videoscore(args) and not os.path.exists(os.path.join(args.reward_model, "config.json")):
        videoscore.build_tiny(args.reward_model)


def load_videoscore(args, device=None):
    """VideoScore from reward_model, built tiny first there when build_tiny is set."""
    build_tiny(args)
    dtype = common.weight_dtype(args.mixed_precision) if args.mixed_precision != "no" else None
    return videoscore.VideoScorer.from_pretrained(args.reward_model, num_frames=args.reward_num_frames, device=device,
                                              dtype=dtype, batch_size=args.reward_batch_size, cache_dir=args.cache_dir)


def ensemble(args, device=None):
    learned = REWARDS[args.ensemble_with](argparse.Namespace(**{**vars(args), "reward": args.ensemble_with}), device)
    return features.EnsembleReward(learned, args.ensemble_with)


REWARDS = {
    "videoscore": load_videoscore,
    "world": lambda args, device=None: world.WorldReward(),
    "features": lambda args, device=None: features.FeatureReward(),
    "ensemble": ensemble,
}
LEARNED = ("videoscore", "world")  # what the ensemble averages the features with

OPTIONS = {
    "reward": ("videoscore", "videoscore | world (world.py's exact reward, for the world's prompts) | features "
                             "(weight-free, features.py) | ensemble (the mean of ensemble_with and features)",
               {"choices": tuple(REWARDS)}),
    "ensemble_with": ("videoscore", "the learned reward reward: ensemble averages features with: videoscore | world",
                      {"choices": LEARNED}),
    "reward_model": ("TIGER-Lab/VideoScore-v1.1", "VideoScore hub id or local folder", {"input": True}),
    "reward_num_frames": (None, "frames the reward sees (default: 48 for v1.1, 16 for v1)", {"type": int, "min": 1}),
    "reward_batch_size": (4, "videos per reward forward", {"min": 1}),
    "aspects": (["visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment"],
                "aspects that count: block ranking, pair selection, the table's average (the paper's four)",
                {"choices": common.ASPECTS}),
}


def uses_videoscore(args):
    return "videoscore" in (args.reward, args.ensemble_with if args.reward == "ensemble" else None)


def required_models(args):
    """For stage.check_models: the VideoScore checkpoint, where the reward uses it."""
    if not uses_videoscore(args):
        return []
    return [dict(where="reward.reward_model", name=args.reward_model, files=["config.json"],
                 what="a VideoScore checkpoint (TIGER-Lab/VideoScore-v1.1)", tiny=True)]


def load_reward(args, device=None):
    """The reward of the config; it must score every aspect of `aspects`."""
    reward = REWARDS[args.reward](args, device)
    missing = [a for a in args.aspects if a not in reward.aspects]
    if missing:
        raise common.ConfigError(f"reward.aspects: reward {args.reward} scores only {', '.join(reward.aspects)}; got "
                                 f"{', '.join(missing)}" + (" (use reward: ensemble for text_alignment)"
                                                            if args.reward == "features" else ""))
    return reward


def beside(args):
    """The weight-free features, reported beside a learned reward (an ensemble reports them itself)."""
    return features.FeatureReward() if args.reward in LEARNED else None


def check_prompts(reward, prompts, where):
    """Every prompt is one the reward can score, checked before anything is generated."""
    for p in prompts:
        why = getattr(reward, "unreadable", lambda p: None)(p)
        if why:
            raise common.ConfigError(f"{where}: prompt {p[:80]!r} {why}")


def label(args):
    """What a table says it scored with: never a real model's name for a random tiny one."""
    names = {"world": "world (exact)", "features": "features (weight-free)"}
    if args.reward in names:
        return names[args.reward]
    learned = args.ensemble_with if args.reward == "ensemble" else "videoscore"
    name = names.get(learned) or (f"random tiny VideoScore ({args.reward_model}; its scores mean nothing)"
                                  if videoscore.is_tiny(args.reward_model) else args.reward_model)
    return f"mean of {name} and features (weight-free)" if args.reward == "ensemble" else name
