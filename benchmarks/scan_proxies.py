"""Benchmark: block rankings that generate no video (prune.py --scan output_change | block_influence)
against the full video scan of the same seed, on both world teachers (the UNet's 7 motion modules,
the DiT's 12 sub-layers), and the students their cuts lead to.

For each config and seed:
1. Stage 1's ranking by every choice (prune.py on M0), and stage 2's from the full scan's stage-1
   student: denoiser calls of the ranking, wall time of the prune step, Spearman with the video
   scan's ranking, and whether the same blocks are removed.
2. The students: `vip_loop.sh` for a choice whose cut differs from the video scan's at stage 1 or 2
   (where both cuts are the same, so are the pairs, the training and the student: the video scan's
   run is that choice's run), then one evaluation a seed of every stage-1 and stage-2 student, with
   the standard error of each average over its videos.

    python benchmarks/scan_proxies.py                           # runs/bench/scan_proxies/
    python benchmarks/scan_proxies.py --full_runs world=runs/world-ablation world_wan=runs/world_wan-ablation

--full_runs takes the video scan's runs from ablation.py's folders (seed_<s>/redpo, the same
settings: --num_blocks 3 2 on the UNet, 1 1 on the DiT) instead of running them again.
A choice is NAME or NAME@K (K sampler timesteps, prune.scan_timesteps).
"""

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ablation  # noqa: E402
import common  # noqa: E402
import stage  # noqa: E402
from benchmarks.scan_fidelity import spearman  # noqa: E402

CUTS = {"world": [3, 2], "world_wan": [1, 1]}  # the ablation's: the students are comparable with its table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["world", "world_wan"], help="names in configs/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--choices", nargs="+", default=["output_change", "block_influence", "block_influence@3"])
    p.add_argument("--full_runs", nargs="*", default=[], help="CONFIG=ABLATION_DIR: the video scan's runs to reuse")
    p.add_argument("--students", nargs="*", default=None,
                   help="the choices whose students are trained and evaluated (default: every choice; none: rankings only)")
    p.add_argument("--output_dir", default=str(ROOT / "runs" / "bench" / "scan_proxies"))
    args = p.parse_args(argv)
    args.full_runs = dict(kv.split("=", 1) for kv in args.full_runs)
    args.command = " ".join(["python", "benchmarks/scan_proxies.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def choice_flags(choice):
    name, _, k = choice.partition("@")
    return {"scan": name, "scan_timesteps": int(k or 1)}


def launch(script, *flags):
    cmd = [*shlex.split(os.environ.get("LAUNCH", sys.executable)), str(ROOT / script), *map(str, flags)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def ranking(config, out, choice, seed, num_blocks, teacher, student=None):
    """prune.py with `choice` into `out`: the ranking, the cut and what the step spent."""
    flags = choice_flags(choice)
    launch("prune.py", "--config", config, "--output_dir", out, "--seed", seed, "--num_blocks", num_blocks,
           "--scan", flags["scan"], "--scan_timesteps", flags["scan_timesteps"], "--teacher_cache", teacher,
           *(["--student", student] if student else []))
    r = json.load(open(os.path.join(out, "ranking.json")))
    spent = json.load(open(os.path.join(out, "cost.json")))[-1]
    names = {c["name"] for c in r["candidates"]}
    return {"cost": {c["name"]: c["cost"] for c in r["candidates"]}, "chosen": sorted(r["chosen"]),
            "candidate_videos": sum(p.name.split("__")[0] in names for p in Path(out, "scan").glob("*.json")),
            "calls": {k: v for k, v in spent.items() if k.startswith(("denoiser_calls/", "videos/"))},
            "wall_s": spent["wall_s"]}


def ranking_calls(run, full, candidates_only=False):
    """The ranking's own denoiser calls: the video scan's all of them (M0's videos, each candidate's and
    the cut's), or with `candidates_only` its candidates' videos alone; another choice's, less the cut's
    videos (the targets' that every choice makes)."""
    c, f = run["calls"], full["calls"]
    per_video = f["denoiser_calls/student"] / f["videos/student"]  # the video scan makes student videos only
    if run is full:
        return c.get("denoiser_calls/teacher", 0) + c.get("denoiser_calls/student", 0) if not candidates_only \
            else run["candidate_videos"] * per_video
    return c.get("denoiser_calls/student", 0) - c.get("videos/student", 0) * per_video


def run_seed(args, name, seed):
    config = str(ROOT / "configs" / f"{name}.yaml")
    base = stage.read_config(config)
    root = os.path.join(args.output_dir, name, f"seed_{seed}")
    teacher, cuts = os.path.join(root, "teacher"), CUTS[name]
    full_run = os.path.join(args.full_runs[name], f"seed_{seed}", "redpo") if name in args.full_runs else \
        os.path.join(root, "videos")
    if name not in args.full_runs and args.students != []:
        ablation.run_loop(root, "videos", ablation.seed_config(base, seed, cuts), 2, False)  # M0's: root/teacher
    choices = ["videos", *args.choices]
    stage1 = {c: ranking(config, os.path.join(root, "rank1", c), c, seed, cuts[0], teacher) for c in choices}
    student1 = os.path.join(full_run, "stage_1", "train", "student")
    stage2 = {}
    if os.path.exists(os.path.join(student1, "student.json")):
        stage2 = {c: ranking(config, os.path.join(root, "rank2", c), c, seed, cuts[1], teacher, student1) for c in choices}
    result = {"stage_1": stage1, "stage_2": stage2, "students": {}, "same_cuts": {}}
    if args.students == [] or not stage2:
        return result
    students = {("videos", s): os.path.join(full_run, f"stage_{s}", "train", "student") for s in (1, 2)}
    for c in args.choices if args.students is None else args.students:
        same1 = stage1[c]["chosen"] == stage1["videos"]["chosen"]
        same = [same1, same1 and stage2[c]["chosen"] == stage2["videos"]["chosen"]]  # the same students up to stage s
        result["same_cuts"][c] = same
        if not same[1]:
            flags = choice_flags(c)
            config_c = ablation.seed_config(base, seed, cuts)
            config_c["prune"].update(flags)
            ablation.run_loop(root, c.replace("@", "_at"), config_c, 2, False)
            for s in (1, 2)[same[0]:]:
                students[(c, s)] = os.path.join(root, c.replace("@", "_at"), f"stage_{s}", "train", "student")
    order = list(students)
    launch("evaluate.py", "--config", os.path.join(root, "videos.yaml") if name not in args.full_runs else
           os.path.join(args.full_runs[name], f"seed_{seed}", "redpo.yaml"), "--output_dir", os.path.join(root, "eval"),
           "--students", *[students[k] for k in order], "--teacher_cache", teacher)
    scored = ablation.seed_result(os.path.join(root, "eval"), ["teacher", *[f"{c}/{s}" for c, s in order]])
    aspects = scored["aspects"]
    for (c, s) in order:
        result["students"][f"{c}/{s}"] = {"average": ablation.average(scored["scores"][f"{c}/{s}"], aspects),
                                          "se": scored["se"][f"{c}/{s}"]}
    return result


def table(name, results, choices):
    """One row a choice: calls, wall, Spearman and same blocks at stages 1 and 2; the students' averages."""
    rows = ["| ranking | denoiser calls (share of the video scan's; of its candidates' videos) | prune wall (s) | Spearman, stage 1 (min) | "
            "same cut, stage 1 | Spearman, stage 2 (min) | same cut, stage 2 | student after 1 stage ± s.e. (− the "
            "video scan's; seeds +, −) | after 2 stages |", "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for c in ["videos", *choices]:
        line = {}
        for s in ("stage_1", "stage_2"):
            pairs = [(r[s][c], r[s]["videos"]) for r in results if r[s]]
            if not pairs:
                continue
            rho = [spearman(a["cost"], b["cost"]) for a, b in pairs]
            line[s] = {"spearman": rho, "same": sum(a["chosen"] == b["chosen"] for a, b in pairs), "n": len(pairs),
                       "calls": float(np.mean([ranking_calls(a, b) for a, b in pairs])),
                       "full_calls": float(np.mean([ranking_calls(b, b) for a, b in pairs])),
                       "candidate_calls": float(np.mean([ranking_calls(b, b, True) for a, b in pairs])),
                       "wall_s": float(np.mean([a["wall_s"] for a, b in pairs]))}
        avg, diff = {}, {}
        for k in (1, 2):
            # a choice with the video scan's cuts has the video scan's student
            got = [r["students"].get(f"{c}/{k}") or (r["students"].get(f"videos/{k}") if c == "videos" or
                                                      r["same_cuts"].get(c, [False] * 2)[k - 1] else None) for r in results]
            if all(got) and got:
                avg[k] = (float(np.mean([g["average"] for g in got])), float(np.mean([g["se"] for g in got])))
                d = [g["average"] - r["students"][f"videos/{k}"]["average"] for g, r in zip(got, results)]
                diff[k] = (float(np.mean(d)), sum(x > 0 for x in d), sum(x < 0 for x in d))
        summary[c] = {**line, "students": avg, "minus_videos": diff}
        s1, s2 = line.get("stage_1"), line.get("stage_2")
        cell = lambda s: f"{np.mean(s['spearman']):.2f} ({min(s['spearman']):.2f}) | {s['same']} of {s['n']}" if s \
            else "– | –"
        stud = lambda k: (f"{avg[k][0]:.3f} ± {avg[k][1]:.3f}" + (f" ({diff[k][0]:+.3f}; {diff[k][1]} +, {diff[k][2]} −)"
                                                                   if c != "videos" else "")) if k in avg else "–"
        share = f"{s1['candidate_calls']:,.0f} its candidates'" if c == "videos" else \
            f"{s1['calls'] / s1['full_calls']:.3f}; {s1['calls'] / s1['candidate_calls']:.3f}"
        rows.append(f"| {c} | {s1['calls']:,.0f} ({share}) | {s1['wall_s']:.1f} | "
                    f"{cell(s1)} | {cell(s2)} | {stud(1)} | {stud(2)} |")
    # stage 2's students may differ between seeds, and so their candidates: only rankings of the same blocks compare
    floor = {s: [spearman(a[s]["videos"]["cost"], b[s]["videos"]["cost"]) for a, b in itertools.combinations(results, 2)
                 if a[s] and b[s] and set(a[s]["videos"]["cost"]) == set(b[s]["videos"]["cost"])]
             for s in ("stage_1", "stage_2")}
    summary["videos_between_seeds"] = floor
    note = "".join(f"\n\nVideo scans of different seeds against one another, {s.replace('_', ' ')}: Spearman "
                   f"{np.mean(v):.2f} (min {min(v):.2f})." for s, v in floor.items() if v)
    return f"### {name}\n\n" + "\n".join(rows) + note + "\n", summary


def main(args):
    for name in args.configs:
        results = [run_seed(args, name, seed) for seed in args.seeds]
        md, summary = table(name, results, args.choices)
        print(md, flush=True)
        common.atomic_write_json(os.path.join(args.output_dir, f"{name}.json"),
                                 {"command": args.command, "seeds": dict(zip(map(str, args.seeds), results)),
                                  "summary": summary})
        common.atomic_write_text(os.path.join(args.output_dir, f"{name}.md"), md)


if __name__ == "__main__":
    main(parse_args())
