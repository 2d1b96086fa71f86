"""Benchmark: what a full V.I.P. run costs in denoiser calls, by script and stage, with the teacher
regenerated every stage (before teacher_cache.py) or made once a run, with the video scan or a
block ranking that generates no video (prune.scan), and the GPU-hours they come to. Calls are
counted per video (a guided step of one video is 2 calls); FLOPs per call are counted on the meta
device at the config's video size (the teacher's, an upper bound for pruned students); hours assume --mfu of an H100's dense bf16 rate (989 TFLOP/s): an estimate, not a
measurement. VAE decoding, text encoding and the reward are left out.

    python benchmarks/run_cost.py                 # AnimateDiff 3 stages, VideoCrafter2 2, the Wans 3

Assumes every stage's curation prompts are the same (relevance_filter none, or the same targets),
so that the stage-1 teacher videos serve every later stage; where they differ, a stage makes its
new prompts' teacher videos.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import curate  # noqa: E402
import evaluate  # noqa: E402
import models  # noqa: E402
import prune  # noqa: E402
import stage  # noqa: E402
import train_redpo  # noqa: E402
from backends import animatediff, videocrafter2, wan  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402

H100_BF16 = 989e12


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["animatediff:3", "videocrafter2:2", "wan:3", "wan_14b:3", "wan22_5b:3"], help="CONFIG:STAGES")
    p.add_argument("--mfu", type=float, default=0.4, help="share of the H100's bf16 rate a call reaches (an assumption)")
    p.add_argument("--curation_prompts", type=int, default=None,
                   help="prompts curated a stage (default: the config's max_prompts, or its prompt file's count)")
    return p.parse_args(argv)


def full_size_denoiser(name):
    with torch.device("meta"):
        if name == "animatediff":
            return animatediff, bench.build_unet("full", "meta")
        if name == "videocrafter2":
            return videocrafter2, videocrafter2.build_models(device="meta")[0]
        return wan, WanTransformer3DModel(**{"wan_14b": wan.CONFIG_14B, "wan22_5b": wan.CONFIG_5B}.get(name, wan.CONFIG_1_3B))


def counts(args, blocks, stages, curation_prompts, cached, scan="videos"):
    """{(stage, script): (teacher calls, student calls)} for one run; `cached`: the teacher made once;
    `scan`: prune.scan (another than videos makes only the cut's videos beside M0's)."""
    per_video = args.num_inference_steps * (2 if args.guidance_scale > 1 else 1)
    cuts = args.num_blocks if isinstance(args.num_blocks, list) else [args.num_blocks]
    P, N = args.num_prune_prompts, curation_prompts * args.seeds_per_prompt
    E = (args.num_eval_prompts or len(stage.read_prompts(str(ROOT / args.eval_prompts)))) * args.videos_per_prompt
    L = (args.latency_runs + 1) * per_video  # one model's latency: a warm-up and the timed runs
    pairs = args.max_train_steps * args.train_batch_size * args.gradient_accumulation_steps * 2
    rows, left = {}, blocks
    for k in range(1, stages + 1):
        cut, first = cuts[min(k - 1, len(cuts) - 1)], k == 1
        again = first or not cached  # the teacher's videos are made here
        # prune: M0 (stage 1: the student itself) and, from stage 2, the student; each candidate alone;
        # the pruned student again when it lost several blocks
        ranking = (left * P + (0 if first else P) + (P if cut > 1 else 0)) * per_video
        if scan != "videos":  # one call a noised latent with every block, and one a candidate for output_change
            ranking = (left + 1 if scan == "output_change" else 1) * P * args.scan_timesteps + P * per_video
        rows[(k, "prune")] = (P * again * per_video, ranking)
        rows[(k, "curate")] = (N * again * per_video, N * per_video)
        rows[(k, "train")] = (pairs, pairs)  # a forward each a video; the student's backward is in the FLOPs
        # evaluate: videos were kept per model before too; latency was measured for every model every stage
        latency_models = (1 if first else 0) + 2 if cached else 1 + 2 * k
        rows[(k, "evaluate")] = (E * first * per_video + L * (first or not cached),
                                 2 * E * per_video + L * (latency_models - (first or not cached)))
        left -= cut
    return rows


def main(args):
    lines = []
    for run in args.runs:
        name, stages = run.split(":")
        config = ROOT / "configs" / f"{name}.yaml"
        a = argparse.Namespace()
        for script in (prune, curate, train_redpo, evaluate):  # each step's section, as each script reads it
            vars(a).update(vars(script.parse_args(["--config", str(config), "--output_dir", "unused"])))
        backend, denoiser = full_size_denoiser(name)
        blocks = len(models.list_blocks(backend, denoiser))
        flops = models.count_flops(backend, denoiser, a.num_frames, a.height, a.width)
        prompts = args.curation_prompts or a.max_prompts or len(stage.read_prompts(str(ROOT / a.curation_prompts)))
        for label, cached, scan in (("every stage, videos", False, "videos"), ("once, videos", True, "videos"),
                                    ("once, output_change", True, "output_change"),
                                    ("once, block_influence", True, "block_influence")):
            rows = counts(a, blocks, int(stages), prompts, cached, scan)
            teacher = sum(t for t, _ in rows.values())
            student = sum(s for _, s in rows.values())
            train_flops = sum((t + 3 * s) * flops for (k, script), (t, s) in rows.items() if script == "train")
            other = sum((t + s) * flops for (k, script), (t, s) in rows.items() if script != "train")
            hours = (train_flops + other) / (args.mfu * H100_BF16) / 3600
            by_script = {script: sum(t + s for (k, sc), (t, s) in rows.items() if sc == script)
                         for script in ("prune", "curate", "train", "evaluate")}
            lines.append(f"| {name} × {stages} | {label} | " + " | ".join(f"{by_script[s]:,}" for s in by_script)
                         + f" | {teacher:,} | {student:,} | {flops / 1e12:.1f} | {hours:,.1f} |")
    head = ("| run | teacher made, block ranking | prune | curate | train | evaluate | teacher calls | student calls | TFLOP a call | "
            f"H100-hours at {args.mfu:.0%} (estimate) |")
    md = head + "\n|" + "---|" * 10 + "\n" + "\n".join(lines) + "\n"
    print(md)
    return md


if __name__ == "__main__":
    main(parse_args())
