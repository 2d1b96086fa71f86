"""Benchmark: what a cheaper block scan costs in fidelity. prune.py's stage-1 scan on the world
(configs/world.yaml) at its full settings and at cheaper ones (fewer denoising steps, fewer prompts),
over seeds: the rank correlation (Spearman) of each cheap ranking with the full one of the same seed,
whether it removes the same blocks, and what it spent (denoiser calls, seconds). The full rankings of
different seeds against one another are the noise floor a cheaper scan is judged by.

    python benchmarks/scan_fidelity.py --seeds 0 1 2        # writes runs/bench/scan_fidelity.json

Any config works (--config); on a GPU, configs/wan.yaml with --settings 50x16 20x16 10x8 10x4.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "world.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["10x8", "5x8", "3x8", "10x4", "10x2", "5x4"],
                   help="STEPSxPROMPTS, the first the full scan")
    p.add_argument("--output_dir", default=str(ROOT / "runs" / "bench" / "scan_fidelity"))
    args = p.parse_args(argv)
    args.settings = [tuple(int(x) for x in s.split("x")) for s in args.settings]
    args.command = " ".join(["python", "benchmarks/scan_fidelity.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def spearman(a, b):
    """Rank correlation of two {block: cost} dicts over their blocks."""
    names = sorted(a)
    ra = np.argsort(np.argsort([a[n] for n in names]))
    rb = np.argsort(np.argsort([b[n] for n in names]))
    return float(np.corrcoef(ra, rb)[0, 1])


def scan(args, steps, prompts, seed):
    out = os.path.join(args.output_dir, f"s{steps}_p{prompts}_seed{seed}")
    subprocess.run([sys.executable, str(ROOT / "prune.py"), "--config", args.config, "--output_dir", out,
                    "--scan_num_inference_steps", str(steps), "--num_prune_prompts", str(prompts), "--seed", str(seed)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    ranking = json.load(open(os.path.join(out, "ranking.json")))
    spent = json.load(open(os.path.join(out, "cost.json")))[-1]
    return {"cost": {c["name"]: c["cost"] for c in ranking["candidates"]}, "chosen": sorted(ranking["chosen"]),
            "denoiser_calls": spent.get("denoiser_calls/teacher", 0) + spent.get("denoiser_calls/student", 0),
            "wall_s": spent["wall_s"]}


def main(args):
    runs = {(s, p, seed): scan(args, s, p, seed) for (s, p), seed in itertools.product(args.settings, args.seeds)}
    full = args.settings[0]
    rows = []
    for s, p in args.settings:
        mine = [runs[(s, p, seed)] for seed in args.seeds]
        ref = [runs[(*full, seed)] for seed in args.seeds]
        rho = [spearman(m["cost"], r["cost"]) for m, r in zip(mine, ref)]
        rows.append({"steps": s, "prompts": p, "spearman": rho, "same_blocks": sum(m["chosen"] == r["chosen"] for m, r in zip(mine, ref)),
                     "denoiser_calls": float(np.mean([m["denoiser_calls"] for m in mine])),
                     "wall_s": float(np.mean([m["wall_s"] for m in mine]))})
    fulls = [runs[(*full, seed)] for seed in args.seeds]
    floor = [spearman(a["cost"], b["cost"]) for a, b in itertools.combinations(fulls, 2)]
    calls = rows[0]["denoiser_calls"]
    lines = ["| steps × prompts | denoiser calls (share of full) | wall (s) | Spearman with the full ranking, mean (min) | "
             "same blocks removed |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} × {r['prompts']} | {r['denoiser_calls']:,.0f} ({r['denoiser_calls'] / calls:.2f}) | "
                     f"{r['wall_s']:.1f} | {np.mean(r['spearman']):.2f} ({min(r['spearman']):.2f}) | "
                     f"{r['same_blocks']} of {len(args.seeds)} |")
    md = "\n".join(lines) + (f"\n\nFull scans of different seeds against one another: Spearman {np.mean(floor):.2f} "
                             f"(min {min(floor):.2f}).\n")
    print(md)
    common.atomic_write_json(os.path.join(args.output_dir, "..", "scan_fidelity.json"),
                             {"command": args.command, "rows": rows, "full_between_seeds": floor})
    return rows, floor


if __name__ == "__main__":
    main(parse_args())
