"""Benchmark: what decides the ablation's sign, seed by seed. Reads an ablation folder (ablation.py's
output) and, for each seed, gathers what each variant cut at each stage, how many pairs ReDPO's
stages curated and their margins, and each model's evaluation standard error; then trains SFT and
ReDPO on the same cut (ReDPO's stage-2 pruned student and pairs, so that the loss is the only
difference) and evaluates the three on more videos a prompt. Every step is the real script, so a
killed run resumes where it stopped.

    python benchmarks/ablation_seeds.py --ablation runs/world_wan-ablation --seeds 0 1 2 3 4 5 6 7 8 9

Writes <ablation>/seeds.md (the tables) and seeds.json; the same-cut runs in <ablation>/seed_<s>/same_cut/.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ablation  # noqa: E402
import common  # noqa: E402
import stage  # noqa: E402

LOSSES = ("sft", "redpo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ablation", required=True, help="an ablation.py output folder (runs/<config>-ablation)")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--stage", type=int, default=2, help="the stage whose ReDPO student and pairs both losses train on")
    p.add_argument("--videos_per_prompt", type=int, default=6, help="videos a held-out prompt in the same-cut evaluation")
    p.add_argument("--no_same_cut", action="store_true", help="only gather what the ablation's runs hold")
    args = p.parse_args(argv)
    args.command = " ".join(["python", "benchmarks/ablation_seeds.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def chosen(root, tag, k):
    path = os.path.join(root, tag, f"stage_{k}", "prune", "ranking.json")
    return "+".join(json.load(open(path))["chosen"]) if os.path.exists(path) else None


def pairs_and_margin(root, k):
    """The pairs ReDPO's stage k kept and their mean margin S(v_full) - S(v_pruned) on the stage's targets."""
    curate = os.path.join(root, "redpo", f"stage_{k}", "curate")
    targets = json.load(open(os.path.join(root, "redpo", f"stage_{k}", "prune", "ranking.json")))["targets"]
    rows = stage.read_manifest(os.path.join(curate, "pairs.jsonl"))
    margins = [np.mean([r["winner_scores"][a] - r["loser_scores"][a] for a in targets]) for r in rows]
    return len(rows), float(np.mean(margins))


def run(*cmd):
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def same_cut(args, root):
    """SFT and ReDPO trained on ReDPO's stage-N pruned student and pairs, evaluated beside it."""
    config = os.path.join(root, "redpo.yaml")
    base = os.path.join(root, "redpo", f"stage_{args.stage}")
    student, pairs = os.path.join(base, "prune", "student"), os.path.join(base, "curate", "pairs.jsonl")
    out = os.path.join(root, "same_cut")
    trained = []
    for loss in LOSSES:
        trained.append(os.path.join(out, loss, "student"))
        run("train_redpo.py", "--config", config, "--output_dir", os.path.join(out, loss), "--student", student,
            "--pairs", pairs, "--loss_type", loss, "--report_to", "none", "--resume_from_checkpoint", "latest")
    run("evaluate.py", "--config", config, "--output_dir", os.path.join(out, "eval"), "--students", student, *trained,
        "--videos_per_prompt", str(args.videos_per_prompt), "--teacher_cache", os.path.join(root, "teacher"))
    result = ablation.seed_result(os.path.join(out, "eval"), ["teacher (M0)", "pruned", "+SFT", "+ReDPO"])
    return {row: {"average": ablation.average(result["scores"][row], result["aspects"]), "se": result["se"][row]}
            for row in result["scores"]}


def main(args):
    rows = []
    for seed in args.seeds:
        root = os.path.join(args.ablation, f"seed_{seed}")
        if not os.path.exists(os.path.join(root, "result.json")):
            raise common.ConfigError(f"{root}: no result.json; run the ablation for seed {seed} first")
        result = ablation.seed_result(os.path.join(root, "eval"), ablation.ROWS)
        avg = {r: ablation.average(s, result["aspects"]) for r, s in result["scores"].items()}
        row = {"seed": seed, "cut_1": chosen(root, "redpo", 1),
               "cut_2": {tag: chosen(root, tag, 2) for tag in ("redpo", "sft", "dpo_only")},
               "pairs": [pairs_and_margin(root, k) for k in range(1, 3) if os.path.exists(
                   os.path.join(root, "redpo", f"stage_{k}", "curate", "pairs.jsonl"))],
               "average": avg, "se": result["se"],
               "redpo_sft": avg["+ReDPO"] - avg["+SFT"], "online_offline": avg["+ReDPO"] - avg["+ReDPO offline"]}
        if not args.no_same_cut:
            row["same_cut"] = same_cut(args, root)
        rows.append(row)
        print(f"seed {seed}: ReDPO - SFT {row['redpo_sft']:+.3f}", flush=True)
    common.atomic_write_json(os.path.join(args.ablation, "seeds.json"), {"command": args.command, "rows": rows})
    md = f"`{args.command}`\n\n" + seeds_table(rows) + ("" if args.no_same_cut else "\n" + same_cut_table(rows))
    common.atomic_write_text(os.path.join(args.ablation, "seeds.md"), md)
    print(md)


def seeds_table(rows):
    head = ["seed", "stage 1 cut", "stage 2 cut: ReDPO / SFT", "pairs (margin) stage 1 / 2", "ReDPO - SFT",
            "online - offline", "eval s.e. (ReDPO, SFT)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pairs = " / ".join(f"{n} ({m:.2f})" for n, m in r["pairs"])
        same = " (same)" if r["cut_2"]["redpo"] == r["cut_2"]["sft"] else ""
        lines.append(f"| {r['seed']} | {r['cut_1']} | {r['cut_2']['redpo']} / {r['cut_2']['sft']}{same} | {pairs} | "
                     f"{r['redpo_sft']:+.3f} | {r['online_offline']:+.3f} | {r['se']['+ReDPO']:.3f}, {r['se']['+SFT']:.3f} |")
    return "\n".join(lines) + "\n"


def same_cut_table(rows):
    """Each loss on the same pruned student and pairs, and the paired interval of their difference."""
    lines = ["| seed | pruned | SFT | ReDPO | ReDPO - SFT |", "|---|---|---|---|---|"]
    for r in rows:
        s = r["same_cut"]
        lines.append(f"| {r['seed']} | {s['pruned']['average']:.3f} | {s['+SFT']['average']:.3f} ± {s['+SFT']['se']:.3f} | "
                     f"{s['+ReDPO']['average']:.3f} ± {s['+ReDPO']['se']:.3f} | "
                     f"{s['+ReDPO']['average'] - s['+SFT']['average']:+.3f} |")
    mean, low, high = ablation.paired_interval([r["same_cut"]["+ReDPO"]["average"] for r in rows],
                                               [r["same_cut"]["+SFT"]["average"] for r in rows])
    return "\n".join(lines) + f"\n\nReDPO - SFT on the same cut: {mean:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}] " \
                              f"(paired t over {len(rows)} seeds)\n"


if __name__ == "__main__":
    common.run_main(main, parse_args)
