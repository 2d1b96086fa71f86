"""Benchmark: does a world teacher move its object the way the prompt asks, and can its first step
place it? For any world config (configs/world.yaml: the UNet; configs/world_wan.yaml: the DiT):

- its clips on the held-out prompts: the four aspects, the share that moves the asked way (faster
  than 0.15 pixels a frame along the direction), and the median speed along it, by speed word; the
  mean step along it from each frame to the next (where tokens of several frames meet, a jump);
- how much its prediction on a noisy rendered clip of "a red square moves left slowly" moves (RMS,
  in its own parameterisation) when one word is swapped for another of its kind, at timesteps 500
  and 950 of 1000: the words it reads;
- its first step from pure noise (one denoising step, whose output is the model's estimate of the
  clip): the object's mean horizontal centre in each frame over many seeds, for a prompt moving
  left and one moving right, beside the rendered clips' own. A model that knows which frame is
  first starts the left-moving object on the right; one that cannot tell the frames apart draws
  it in the same place in every frame, and the direction is left to the noise.

    python benchmarks/world_motion.py --config configs/world.yaml      # writes runs/bench/world_motion/
    python benchmarks/world_motion.py --config configs/world_wan.yaml --pretrained_model_name_or_path runs/dit_teacher
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models  # noqa: E402
import stage  # noqa: E402
import world  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "world_wan.yaml"))
    p.add_argument("--pretrained_model_name_or_path", default=None, help="another teacher folder than the config's")
    p.add_argument("--videos_per_prompt", type=int, default=6)
    p.add_argument("--first_step_seeds", type=int, default=64)
    p.add_argument("--output_dir", default=str(ROOT / "runs" / "bench" / "world_motion"))
    args = p.parse_args(argv)
    args.command = " ".join(["python", "benchmarks/world_motion.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def motion(frames, prompt):
    """A clip's speed along the asked direction (pixels a frame), from the path the reward fits, and
    its step along it from each frame to the next (None where a frame has no object)."""
    direction = np.array(world.DIRECTIONS[world.parse_prompt(prompt)[2]])
    stats = [world.frame_stats(f) for f in frames]
    drawn = sum(s is not None for s in stats)
    speed = float(world.fitted_velocity(stats) @ direction) if drawn >= 2 else 0.0
    steps = np.diff(np.stack([s["centre"] for s in stats]), axis=0) @ direction if drawn == len(stats) else None
    return speed, steps


def mean_centres(clips):
    """The light-weighted horizontal centre of each frame of the mean clip (B, F, H, W, 3)."""
    light = np.asarray(clips, dtype=np.float64).max(-1).mean(0)  # (F, H, W)
    xs = np.arange(light.shape[-1])
    return [round(float((f * xs).sum() / max(f.sum(), 1e-9)), 2) for f in light]


SWAPS = {"colour": "a blue square moves left slowly", "shape": "a red circle moves left slowly",
         "direction": "a red square moves right slowly", "speed": "a red square moves left quickly"}


@torch.no_grad()
def word_influence(backend, config, pipe, denoiser, timesteps=(500, 950), n=8):
    base = "a red square moves left slowly"
    factor = world.latent_factor(denoiser.config.in_channels)
    clean = world.frames_to_latents([world.render(base, s) for s in range(n)], factor) * world.SCALE
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    objective = backend.objective(config)
    text = {k: backend.encode_prompts(pipe.text_encoder, pipe.tokenizer, [p] * n, "cpu")
            for k, p in {"base": base, **SWAPS}.items()}
    result = {}
    for t in timesteps:
        t = torch.full((n,), t, dtype=torch.long)
        noisy = objective.add_noise(clean, noise, t)
        ref = backend.predict(denoiser, noisy, t, text["base"])
        result[int(t[0])] = {k: round(float((backend.predict(denoiser, noisy, t, text[k]) - ref).pow(2).mean().sqrt()), 3)
                             for k in SWAPS}
    return result


def main(args):
    model_args = ["--config", args.config] + (["--pretrained_model_name_or_path", args.pretrained_model_name_or_path]
                                              if args.pretrained_model_name_or_path else [])
    config = stage.parse_config(model_args, "", {"model": stage.MODEL_OPTIONS})
    backend = stage.backend_of(config)
    denoiser = models.load_model(backend, config).eval()
    pipe = backend.load_pipeline(config, denoiser)
    _, held = world.split_prompts()
    prompts = [p for p in held for _ in range(args.videos_per_prompt)]
    clips = backend.generate(pipe, prompts, list(range(len(prompts))), config)
    scores = [world.score_clip(f, p) for f, p in zip(clips, prompts)]
    along, steps = zip(*(motion(f, p) for f, p in zip(clips, prompts)))
    along = np.array(along)
    result = {"command": args.command, "teacher": config.pretrained_model_name_or_path,
              "aspects": {a: round(float(np.mean([s[a] for s in scores])), 3) for a in world.ASPECTS}, "by_speed": {}}
    for word in world.SPEEDS:
        mine = np.array([word in p for p in prompts])
        result["by_speed"][word] = {"asked": world.SPEEDS[word],
                                    "moves_the_asked_way": round(float((along[mine] > 0.15).mean()), 2),
                                    "median_speed_along": round(float(np.median(along[mine])), 2)}
    steps = [s for s in steps if s is not None]
    result["mean_step_by_frame"] = [round(float(v), 2) for v in np.mean(steps, 0)]  # a token boundary shows as a jump
    result["word_influence"] = word_influence(backend, config, pipe, denoiser)
    one_step = argparse.Namespace(**{**vars(config), "num_inference_steps": 1})
    seeds = list(range(10_000, 10_000 + args.first_step_seeds))
    result["first_step_centres"] = {}
    for prompt in ("a red square moves left quickly", "a red square moves right quickly"):
        result["first_step_centres"][prompt] = {
            "rendered": mean_centres([world.render(prompt, s) for s in seeds]),
            "first_step": mean_centres(backend.generate(pipe, [prompt] * len(seeds), seeds, one_step))}
    os.makedirs(args.output_dir, exist_ok=True)
    name = Path(config.pretrained_model_name_or_path).name
    with open(os.path.join(args.output_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print_result(name, result)
    return result


def print_result(name, result):
    print(f"{name}: " + ", ".join(f"{a} {v}" for a, v in result["aspects"].items()))
    for word, r in result["by_speed"].items():
        print(f"  {word} (asked {r['asked']}): {r['moves_the_asked_way']:.0%} move the asked way, "
              f"median speed along it {r['median_speed_along']}")
    print(f"  mean step along the asked direction, frame k to k+1: {result['mean_step_by_frame']}")
    for t, r in result["word_influence"].items():
        print(f"  timestep {t}: RMS change of the prediction when a word is swapped: "
              + ", ".join(f"{k} {v}" for k, v in r.items()))
    for prompt, r in result["first_step_centres"].items():
        print(f"  {prompt}: centre x by frame, rendered {r['rendered']}, first step {r['first_step']}")


if __name__ == "__main__":
    main(parse_args())
