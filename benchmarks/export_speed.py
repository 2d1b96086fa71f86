"""Benchmark: what export.py's AnimateDiff form costs. diffusers' UNetMotionModel cannot drop a motion
module, so the export keeps each removed one as a module of no transformer layers with zero norm and
projections (animatediff.motion_modules_emptied): the student's outputs, but a norm and two C x C
projections still run. Per student (1, 3, 6, 10 modules removed, the ones that save the most FLOPs
first, as generation.py's `flops` order): FLOPs of one UNet call on one video for the full model,
vip's student and the export, and with --device the latency of one denoising step (the guidance
batch of two; median of --iters, the three taking turns).

    python benchmarks/export_speed.py --flops_only                                  # full size, meta device
    nice -n 19 python benchmarks/export_speed.py --size tiny --device cpu --iters 30 # tiny, timed on a CPU
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import generation  # noqa: E402
import models  # noqa: E402
from backends import animatediff  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_common_args(parser)
    parser.add_argument("--removed", default="1,3,6,10", help="students: how many motion modules each lacks")
    args = parser.parse_args(argv)
    args = bench.finish_args(args, "export_speed", argv)
    args.removed = sorted({int(n) for n in args.removed.split(",") if n} - {0})
    return args


def main(args):
    device = args.device  # meta with --flops_only
    unet = bench.build_unet(args.size, device).eval()
    size = bench.SIZES[args.size]
    video = (size["num_frames"], size["height"], size["width"])
    order = generation.removal_order(unet, generation.module_flops(unet, video), "flops")
    full = models.count_flops(animatediff, unet, *video)
    rows = []
    for n in args.removed:
        with models.blocks_removed(animatediff, unet, order[:n]):
            student = models.count_flops(animatediff, unet, *video)
            with torch.device(device):  # on meta, only the export's architecture: its FLOPs are counted
                exported = animatediff.motion_modules_emptied(unet)
        row = {"removed": n, "flops_full": full, "flops_student": student,
               "flops_export": models.count_flops(animatediff, exported, *video)}
        if device != "meta":
            row.update(times(unet, order[:n], exported, video, args))
        rows.append(row)
    head = ["removed", "GFLOPs full", "GFLOPs student", "GFLOPs export", "export's share of the saving"]
    head += [] if device == "meta" else ["step full (ms)", "step student (ms)", "step export (ms)"]
    table = []
    for r in rows:
        cells = [r["removed"], f"{r['flops_full'] / 1e9:.1f}", f"{r['flops_student'] / 1e9:.1f}",
                 f"{r['flops_export'] / 1e9:.1f}",
                 f"{(r['flops_full'] - r['flops_export']) / (r['flops_full'] - r['flops_student']):.3f}"]
        cells += [] if device == "meta" else [f"{r[k] * 1e3:.1f}" for k in ("full_s", "student_s", "export_s")]
        table.append(cells)
    print(bench.markdown_table(head, table))
    bench.write_results(args, "export_speed", rows)


def times(unet, removed, exported, video, args):
    """Median step times of the full model, vip's student (its blocks removed) and the export, taking
    turns one call each, so that a slow spell of a shared machine hits the three alike."""
    sample, t, text = animatediff.denoise_inputs(unet, 2, *video, device=args.device, dtype=unet.dtype)
    runs = {"full_s": (unet, []), "student_s": (unet, removed), "export_s": (exported, [])}
    seconds = {k: [] for k in runs}
    for r in range(args.warmup + args.iters):
        for key, (model, blocks) in runs.items():
            with models.blocks_removed(animatediff, model, blocks), torch.inference_mode():
                took = bench.time_once(lambda: model(sample, t, text), args.device)
            if r >= args.warmup:
                seconds[key].append(took)
    return {k: bench.median(v) for k, v in seconds.items()}


if __name__ == "__main__":
    main(parse_args())
