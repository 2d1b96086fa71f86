"""The rewards, chosen in one place (`reward.reward`): VideoScore (videoscore.py), VideoReward
(videoreward.py), the world's exact reward (world.py), the weight-free features (features.py), or the
ensemble of a learned one with the features. Each has `aspects` and
`score(videos, prompts) -> [{aspect: score}]`. evaluate.py may score with several (`eval.rewards`).
"""

import argparse
import os

import common
import features
import videoreward
import videoreward_tiny
import videoscore
import world


def _dtype(args):
    return common.weight_dtype(args.mixed_precision) if args.mixed_precision != "no" else None


def load_videoscore(args, device=None):
    return videoscore.VideoScorer.from_pretrained(args.reward_model, num_frames=args.reward_num_frames, device=device,
                                                  dtype=_dtype(args), batch_size=args.reward_batch_size,
                                                  cache_dir=args.cache_dir)


def load_videoreward(args, device=None):
    # Frames handed over in memory are at the config's fps, as the MP4s vip writes of them.
    return videoreward.VideoRewardScorer.from_pretrained(args.videoreward_model, device=device, dtype=_dtype(args),
                                                         batch_size=args.reward_batch_size, video_fps=args.fps,
                                                         cache_dir=args.cache_dir)


def ensemble(args, device=None):
    learned = REWARDS[args.ensemble_with](argparse.Namespace(**{**vars(args), "reward": args.ensemble_with}), device)
    return features.EnsembleReward(learned, args.ensemble_with)


REWARDS = {
    "videoscore": load_videoscore,
    "videoreward": load_videoreward,
    "world": lambda args, device=None: world.WorldReward(),
    "features": lambda args, device=None: features.FeatureReward(),
    "ensemble": ensemble,
}
LEARNED = ("videoscore", "videoreward", "world")  # what the ensemble may average the features with

# The learned rewards with a checkpoint: the option naming it, what it must hold, a tiny builder.
CHECKPOINTS = {
    "videoscore": dict(option="reward_model", files=["config.json"], build=videoscore.build_tiny,
                       is_tiny=videoscore.is_tiny, title="VideoScore", label="{path}",
                       what="a VideoScore checkpoint (TIGER-Lab/VideoScore-v1.1)"),
    # a local VideoReward folder names its model file and its base model (videoreward.local_requirements)
    "videoreward": dict(option="videoreward_model", files=["model_config.json"], build=videoreward_tiny.build_tiny,
                        is_tiny=videoreward.is_tiny, title="VideoReward", label="VideoReward ({path})",
                        local=videoreward.local_requirements,
                        what="a VideoReward checkpoint (KwaiVGI/VideoReward: model_config.json beside "
                             "checkpoint-<step>/model.pth)"),
}


def in_use(args):
    """The rewards a step of `args` scores with: evaluate.py's `rewards`, or the config's reward;
    with an ensemble's learned part."""
    names = list(getattr(args, "rewards", None) or [args.reward])
    names += [args.ensemble_with for n in names if n == "ensemble"]
    return list(dict.fromkeys(names))


OPTIONS = {
    "reward": ("videoscore", "videoscore | videoreward | world (world.py's exact reward, for the world's prompts) | "
                             "features (weight-free, features.py) | ensemble (the mean of ensemble_with and features)",
               {"choices": tuple(REWARDS)}),
    "ensemble_with": ("videoscore", "the learned reward reward: ensemble averages features with: "
                                    + " | ".join(LEARNED), {"choices": LEARNED}),
    "reward_model": ("TIGER-Lab/VideoScore-v1.1", "VideoScore hub id or local folder",
                     {"input": True, "used": lambda args: "videoscore" in in_use(args)}),
    "videoreward_model": ("KwaiVGI/VideoReward", "VideoReward hub id or local folder (model_config.json beside "
                                                 "checkpoint-<step>/model.pth, as released)",
                          {"input": True, "used": lambda args: "videoreward" in in_use(args)}),
    "reward_num_frames": (None, "frames VideoScore sees (default: 48 for v1.1, 16 for v1)", {"type": int, "min": 1}),
    "reward_batch_size": (4, "videos per reward forward", {"min": 1}),
    "aspects": (["visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment"],
                "aspects that count: block ranking, pair selection, the table's average (the paper's four)",
                {"choices": common.ASPECTS}),
}


def build_tiny(args):
    """With build_tiny, a tiny random checkpoint of each learned reward in use where none is."""
    for name in in_use(args) if getattr(args, "build_tiny", False) else ():
        c = CHECKPOINTS.get(name)
        path = c and getattr(args, c["option"])
        if c and not os.path.exists(os.path.join(path, c["files"][0])):
            c["build"](path)


def required_models(args):
    """For stage.check_models: the checkpoint of each learned reward in use (and VideoReward's base
    Qwen2-VL, where its model_config.json can be read here)."""
    needed = []
    for name in in_use(args):
        c = CHECKPOINTS.get(name)
        if c is None:
            continue
        path = getattr(args, c["option"])
        files, more = (c["local"](path) if "local" in c and os.path.isdir(path) and not args.build_tiny
                       else (c["files"], []))
        needed += [dict(where=f"reward.{c['option']}", name=path, files=files, what=c["what"], tiny=True), *more]
    return needed


def load_reward(args, device=None, name=None, strict=True):
    """Reward `name` (the config's by default); strict: it must score every aspect of `aspects`."""
    name = name or args.reward
    build_tiny(args)
    reward = REWARDS[name](argparse.Namespace(**{**vars(args), "reward": name}), device)
    missing = [a for a in args.aspects if a not in reward.aspects]
    if strict and missing:
        raise common.ConfigError(f"reward.aspects: reward {name} scores only {', '.join(reward.aspects)}; got "
                                 f"{', '.join(missing)}" + (" (use reward: ensemble for text_alignment)"
                                                            if name == "features" else ""))
    return reward


def beside(args, name=None):
    """The weight-free features, reported beside a learned reward (an ensemble reports them itself)."""
    return features.FeatureReward() if (name or args.reward) in LEARNED else None


def check_prompts(reward, prompts, where):
    """Every prompt is one the reward can score, checked before anything is generated."""
    for p in prompts:
        why = getattr(reward, "unreadable", lambda p: None)(p)
        if why:
            raise common.ConfigError(f"{where}: prompt {p[:80]!r} {why}")


def label(args, name=None):
    """What a table says it scored with: never a real model's name for a random tiny one."""
    name = name or args.reward
    names = {"world": "world (exact)", "features": "features (weight-free)"}
    if name in names:
        return names[name]
    learned = args.ensemble_with if name == "ensemble" else name
    if learned in names:
        text = names[learned]
    else:
        c = CHECKPOINTS[learned]
        path = getattr(args, c["option"])
        text = (f"random tiny {c['title']} ({path}; its scores mean nothing)" if c["is_tiny"](path)
                else c["label"].format(path=path))
    return f"mean of {text} and features (weight-free)" if name == "ensemble" else text
