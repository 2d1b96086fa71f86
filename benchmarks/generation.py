"""Benchmark: generation latency and FLOPs per denoising step of the full model and of students with
1, 3, 6 and 10 motion modules removed. The claim tested: latency falls with FLOPs.

    python benchmarks/generation.py                                           # GPU: full size, bf16
    nice -n 19 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python benchmarks/generation.py --size tiny --device cpu              # CPU: tiny, float32

Full size is SD1.5 + motion adapter v1.5-2 (random weights from the public configs) generating 16
frames at 512x512 with 25 DDIM steps and guidance 7.5, as configs/animatediff.yaml; tiny is
configs/tiny.yaml's models and video.

Which modules a student lacks, by --orders:
  flops   the modules whose removal saves the most FLOPs first (each module's FLOPs counted in
          one call), so each student is the cheapest one with that many modules removed
  params  the largest modules first (what a parameter budget cuts first): at full size the 36M
          modules at the two lowest resolutions
ties kept in forward order. Per student: FLOPs of one UNet call on one video (models.count_flops,
the figure evaluate.py reports), the latency of one denoising step (one UNet call on the guidance
batch of two, under inference_mode; median of --iters) and of one video (models.generate: text
encoder, every step with guidance, VAE decode; median of --video_runs after one warm-up), each next
to its ratio to the full model. The students take turns, one call each per round, so that a slow
spell of a shared machine hits them all alike. Prints a markdown table; writes a JSON with device,
command and date (--output). --flops_only counts on the meta device and times nothing (the
full-size FLOPs columns without a GPU):

    python benchmarks/generation.py --flops_only
"""

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import models  # noqa: E402
from backends import animatediff  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_common_args(parser)
    parser.add_argument("--removed", default="1,3,6,10",
                        help="students: how many motion modules each lacks (the full model is always measured)")
    parser.add_argument("--orders", default="flops,params", help="removal orders to run: flops, params")
    parser.add_argument("--video_runs", type=int, default=3, help="timed videos per student (median reported)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="DDIM steps (default: 25 full, 8 tiny)")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale")
    args = parser.parse_args(argv)
    args = bench.finish_args(args, "generation", argv)
    args.removed = sorted({int(n) for n in args.removed.split(",") if n} - {0})
    args.orders = [o for o in args.orders.split(",") if o]
    if any(o not in ("flops", "params") for o in args.orders):
        parser.error(f"--orders: expected flops and/or params; got {args.orders}")
    return args


def module_flops(unet, video):
    """FLOPs of each motion module in one UNet call on one video, which is what removing it saves
    (it becomes an identity): all of them from one count on a meta-device copy, as count_flops."""
    from diffusers import UNetMotionModel

    config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}
    with torch.device("meta"):
        ghost = UNetMotionModel.from_config(config)
    models.remove_blocks(animatediff, ghost, models.removed_blocks(animatediff, unet))
    sample, t, text = animatediff.denoise_inputs(ghost, 1, *video, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ghost(sample, t, text)
    counts = counter.get_flop_counts()  # keyed by module path under the class name
    return {b["name"]: sum(counts.get(f"{type(ghost).__name__}.{b['name']}", {}).values())
            for b in models.list_blocks(animatediff, ghost)}


def removal_order(unet, flops, key):
    """Motion module names, first to remove first (see the module docstring); sorts are stable,
    so ties stay in forward order."""
    blocks = models.list_blocks(animatediff, unet)
    if key == "params":
        return [b["name"] for b in sorted(blocks, key=lambda b: -b["params"])]
    return [b["name"] for b in sorted(blocks, key=lambda b: -flops[b["name"]])]


def count_students(unet, students, video):
    """One row per student, (name, removed blocks): what it lacks, its parameters and FLOPs."""
    rows = []
    for (order, _), blocks in students:
        with models.blocks_removed(animatediff, unet, blocks):
            rows.append({"order": order, "removed": len(blocks), "blocks": blocks,
                         "motion_params": models.block_parameters(animatediff, unet), "flops": models.count_flops(animatediff, unet, *video)})
    return rows


def time_students(unet, pipe, students, gen_args, args):
    """Step and video times of each student. Students take turns, one call each per round, so that a
    slow spell of a shared machine hits them all alike."""
    video = (gen_args.num_frames, gen_args.height, gen_args.width)
    sample, t, text = animatediff.denoise_inputs(unet, 2, *video, device=args.device, dtype=unet.dtype)

    def denoise_step():
        with torch.inference_mode():
            unet(sample, t, text)

    def one_video():
        models.generate(pipe, ["a red car drives along a coastal road"], [0], gen_args)

    times = {(name, kind): [] for name, _ in students for kind in ("step", "video")}
    for kind, fn, warmup, runs in (("step", denoise_step, args.warmup, args.iters),
                                   ("video", one_video, 1, args.video_runs)):
        for r in range(warmup + runs):
            for name, blocks in students:
                with models.blocks_removed(animatediff, unet, blocks):
                    seconds = bench.time_once(fn, args.device)
                if r >= warmup:
                    times[name, kind].append(seconds)
    return [{"step_s": bench.median(times[name, "step"]), "video_s": bench.median(times[name, "video"]),
             "step_times_s": times[name, "step"], "video_times_s": times[name, "video"]} for name, _ in students]


def table(rows, args):
    unit, prefix = (1e12, "T") if args.size == "full" else (1e9, "G")
    full = rows[0]
    out = []
    for r in rows:
        timed = [f"{r['step_s'] * 1e3:.1f}", f"{r['step_s'] / full['step_s']:.3f}", f"{r['video_s']:.3f}",
                 f"{r['video_s'] / full['video_s']:.3f}"] if "step_s" in r else ["-"] * 4
        out.append([r["order"], r["removed"], f"{r['motion_params'] / 1e6:.2f}", f"{r['flops'] / unit:.3f}",
                    f"{r['flops'] / full['flops']:.3f}"] + timed)
    header = ["order", "removed", "motion params (M)", f"{prefix}FLOP/step", "FLOPs ratio", "step (ms)",
              "step latency ratio", "video (s)", "video latency ratio"]
    return bench.markdown_table(header, out)


def main(args):
    size = bench.SIZES[args.size]
    dtype = bench.torch_dtype(args.dtype)
    gen_args = SimpleNamespace(num_frames=size["num_frames"], height=size["height"], width=size["width"],
                               guidance_scale=args.guidance_scale,
                               num_inference_steps=args.num_inference_steps or size["num_inference_steps"])
    video = (gen_args.num_frames, gen_args.height, gen_args.width)
    unet = bench.build_unet(args.size, args.device, dtype, args.seed).eval().requires_grad_(False)
    if args.removed and max(args.removed) > len(models.list_blocks(animatediff, unet)):
        raise SystemExit(f"--removed: the {args.size} model has {len(models.list_blocks(animatediff, unet))} motion modules")
    flops = module_flops(unet, video)
    students = [(("-", 0), [])] + [((key, n), removal_order(unet, flops, key)[:n])
                                   for key in args.orders for n in args.removed]
    rows, limits = count_students(unet, students, video), None
    if not args.flops_only:
        limits = bench.limits(args.device, dtype)
        pipe = bench.build_pipeline(args.size, unet, args.device, dtype, args.seed)
        for row, timing in zip(rows, time_students(unet, pipe, students, gen_args, args)):
            row.update(timing)
        print(f"matmul {limits['matmul_flops'] / 1e12:.3f} TFLOP/s ({limits['matmul_dtype']}), "
              f"copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"device: {bench.describe_device(args.device)}; {args.size} size, {args.dtype}, {gen_args.num_frames} frames "
          f"at {gen_args.height}x{gen_args.width}, {gen_args.num_inference_steps} steps")
    print(table(rows, args))
    return bench.write_results(args, "generation", rows, limits=limits, video=vars(gen_args), module_flops=flops)


if __name__ == "__main__":
    main(parse_args())
