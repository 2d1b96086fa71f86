"""The ablation on the exact-reward world (its UNet teacher, or with --config configs/world_wan.yaml its DiT): teacher, pruned, +SFT, +DPO only, +ReDPO and offline
ReDPO after --stages stages, over seeds, as the paper's Table 3. Each variant is a run of
vip_loop.sh (the loop itself, not a copy of it) with its own config; what variants have in common
is made once, by pointing their run folders at one another's (symlinks), where every stage skips
what is done: stage 1's pruning and pairs (all variants), online and offline ReDPO's stage-1
training and stage-2 pruning, and the evaluations (one folder a seed).

    python ablation.py --seeds 0 1 2 --stages 2 --num_blocks 3 2 --jobs 3
    python ablation.py --config configs/world_wan.yaml --seeds 0 1 2 --stages 2 --num_blocks 1 1 --jobs 3

Writes <output_dir> (default runs/<config name>-ablation)/ablation.md and, per seed, seed_<s>/ (a run
folder and a config per variant, eval/, result.json, log.txt with --jobs). The table gives each
model's mean ± sample std over seeds and its evaluation's standard error (over its videos, from the
per-video scores evaluate.py keeps); each comparison (ReDPO - SFT, online - offline, ReDPO - pruned,
SFT - pruned) its mean over seeds, a 95% confidence interval paired by seed (Student's t with n - 1
degrees of freedom), its signs seed by seed, and a verdict only where the interval excludes 0.
"""

import argparse
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import yaml
from scipy import stats

import common
import models
import stage

ROOT = os.path.dirname(os.path.abspath(__file__))
ROWS = ["teacher (M0)", "pruned", "+SFT", "+DPO only", "+ReDPO", "+ReDPO offline"]
# row: (run folder, loss_type, offline); ReDPO first, as offline ReDPO reuses its stage 1.
VARIANTS = {"+ReDPO": ("redpo", "redpo", False), "+ReDPO offline": ("redpo_offline", "redpo", True),
            "+SFT": ("sft", "sft", False), "+DPO only": ("dpo_only", "dpo", False)}
# (variant, the folder of its run it takes from another's): what is the same run in both.
SHARED = [(tag, f"stage_1/{step}", "shared") for tag, *_ in VARIANTS.values() for step in ("prune", "curate")] + \
         [("redpo_offline", "stage_1/train", "redpo"), ("redpo_offline", "stage_2/prune", "redpo")] + \
         [(tag, "eval", None) for tag, *_ in VARIANTS.values()]
# (name, a, b): the differences a - b of the average that the ablation reports, paired by seed.
COMPARISONS = (("ReDPO - SFT", "+ReDPO", "+SFT"), ("online - offline", "+ReDPO", "+ReDPO offline"),
               ("ReDPO - pruned", "+ReDPO", "pruned"), ("SFT - pruned", "+SFT", "pruned"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/world.yaml")
    p.add_argument("--output_dir", default=None, help="default: runs/<config name>-ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--num_blocks", type=int, nargs="+", default=None,
                   help="blocks cut at each stage, one number a stage, or one for all, instead of "
                        "the config's prune.num_blocks / prune.prune_params")
    p.add_argument("--seed_only", action="store_true", help=argparse.SUPPRESS)  # a --jobs process: no table
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once, each in its own process with cores/jobs threads and its log in seed_<s>/log.txt")
    args = p.parse_args(argv)
    if args.num_blocks and len(args.num_blocks) not in (1, args.stages):
        raise common.ConfigError(f"--num_blocks: expected one number or {args.stages} (one a stage); "
                                 f"got {len(args.num_blocks)}")
    args.output_dir = args.output_dir or os.path.join("runs", f"{os.path.splitext(os.path.basename(args.config))[0]}-ablation")
    if args.stages < 1 or args.jobs < 1 or any(n < 1 for n in args.num_blocks or []):
        raise common.ConfigError("--stages, --jobs and --num_blocks: expected numbers of at least 1")
    return args


def seed_config(base, seed, cuts):
    """The config of a seed: its seed in every stage, and the cuts as prune.num_blocks, one a stage."""
    config = {k: dict(v) for k, v in base.items()}
    for section in ("prune", "curate", "train"):
        config[section]["seed"] = seed
    if cuts:
        config["prune"].update(num_blocks=list(cuts), prune_params=None)  # the cuts decide, not a budget
    return config


def run_loop(root, tag, config, stages, offline):
    """One variant: `bash vip_loop.sh MODEL STAGES [--offline]` on its own config and run folder."""
    path = os.path.join(root, f"{tag}.yaml")
    common.atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, CONFIG=os.path.abspath(path), RUN_DIR=os.path.abspath(os.path.join(root, tag)),
               TEACHER_CACHE=os.path.abspath(os.path.join(root, "teacher")))  # M0's videos: one set a seed
    cmd = ["bash", os.path.join(ROOT, "vip_loop.sh"), tag, str(stages)] + ["--offline"] * offline
    subprocess.run(cmd, env=env, check=True)
    return os.path.join(root, tag, f"stage_{stages}", "train", "student")


def share(root):
    """Point each variant's folders at the run they have in common with another (see SHARED)."""
    for tag, folder, source in SHARED:
        link = os.path.join(root, tag, folder)
        target = os.path.join(root, source or "", folder)
        os.makedirs(target, exist_ok=True)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.islink(link):
            os.symlink(os.path.relpath(target, os.path.dirname(link)), link)


def pruned_baseline(config_path, root, final_student):
    """M0 with the final ReDPO student's blocks removed and no training, saved as a student."""
    student = os.path.join(root, "pruned_untrained")
    if not os.path.exists(os.path.join(student, "student.json")):
        args = stage.parse_config(["--config", config_path], "", {"model": stage.MODEL_OPTIONS})
        backend = stage.backend_of(args)
        model = models.load_model(backend, args)
        models.remove_blocks(backend, model, models.read_student_meta(final_student)["removed_blocks"])
        models.save_student(backend, model, student, args, next(iter(backend.TRAINABLE)))
    return student


def run_seed(args, seed, config):
    """Every variant of one seed, then one evaluation of the final students; returns the scores."""
    root = os.path.join(args.output_dir, f"seed_{seed}")
    share(root)
    common.remove_stale_temporaries(root)
    finals = {}
    for row, (tag, loss, offline) in VARIANTS.items():
        variant = {**config, "train": {**config["train"], "loss_type": loss}}
        finals[row] = run_loop(root, tag, variant, args.stages, offline)
    config_path = os.path.join(root, "redpo.yaml")
    finals["pruned"] = pruned_baseline(config_path, root, finals["+ReDPO"])
    launch = shlex.split(os.environ.get("LAUNCH", sys.executable))  # as vip_loop.sh starts the scripts
    subprocess.run([*launch, os.path.join(ROOT, "evaluate.py"), "--config", config_path, "--output_dir",
                    os.path.join(root, "eval"), "--students", *[finals[r] for r in ROWS[1:]],
                    "--teacher_cache", os.path.join(root, "teacher")], check=True)
    result = seed_result(os.path.join(root, "eval"), ROWS)
    return {"scores": result["scores"], "se": result["se"]}


def average(scores, aspects):
    return float(np.mean([scores[a] for a in aspects]))


def seed_result(eval_dir, rows):
    """An evaluation's models as `rows` (in the order evaluate.py was given them): their mean scores,
    and the standard error of their average over their videos, from the per-video scores in items/."""
    report = json.load(open(os.path.join(eval_dir, "eval.json")))
    aspects, listed = report["aspects"], set(report["items"])
    videos = {}
    for path in glob.glob(os.path.join(glob.escape(eval_dir), "items", "*__*.json")):
        item = json.load(open(path))
        if f"{item['prompt']} (seed {item['seed']})" in listed:  # this table's prompts and seeds only
            videos.setdefault(item["model"], []).append(average(item["scores"], aspects))
    scores, se = {}, {}
    for row, model in zip(rows, report["models"]):
        v = np.array(videos[model["key"]])
        scores[row], se[row] = model["scores"], float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return {"aspects": aspects, "scores": scores, "se": se}


def paired_interval(x, y, level=0.95):
    """The mean over seeds of x - y (paired by seed) and its confidence interval at `level`: Student's
    t with n - 1 degrees of freedom times the standard error of the mean difference. (mean, low, high);
    one seed bounds nothing."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if len(d) < 2:
        return float(d.mean()), -math.inf, math.inf
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def main(args):
    base = stage.read_config(args.config)
    aspects = base["reward"]["aspects"]
    cuts = (args.num_blocks * args.stages if len(args.num_blocks) == 1 else args.num_blocks) if args.num_blocks else None
    seeds = list(dict.fromkeys(args.seeds))  # a seed named twice would run twice in one folder
    settings = {}
    for seed in seeds:  # every folder checked before anything runs
        # Every step inside a seed skips what it finds done, so a seed's folder only ever serves
        # the settings it was started with.
        settings[seed] = {"stages": args.stages, "num_blocks": cuts, "config": seed_config(base, seed, cuts)}
        path = os.path.join(args.output_dir, f"seed_{seed}", "settings.json")
        if os.path.exists(path) and json.load(open(path)) != json.loads(json.dumps(settings[seed])):
            raise common.ConfigError(f"{path}: made with other --stages, --num_blocks or --config; use another "
                                     f"--output_dir, or remove {os.path.dirname(path)} to start the seed over")
    if args.jobs > 1:
        run_seeds_in_parallel(args, seeds)
    results, errors, seconds = {}, {}, 0.0
    for seed in seeds:
        done = os.path.join(args.output_dir, f"seed_{seed}", "result.json")
        if not os.path.exists(done):
            start = time.time()
            common.atomic_write_json(os.path.join(args.output_dir, f"seed_{seed}", "settings.json"), settings[seed])
            result = run_seed(args, seed, settings[seed]["config"])
            common.atomic_write_json(done, {"seconds": time.time() - start, **result})
        result = json.load(open(done))
        if "se" not in result:  # a seed finished before the ablation kept its evaluation's errors
            try:
                result["se"] = seed_result(os.path.join(args.output_dir, f"seed_{seed}", "eval"), ROWS)["se"]
            except (OSError, ValueError, KeyError):
                result["se"] = dict.fromkeys(ROWS, math.nan)
        seconds += result["seconds"]
        for row, scores in result["scores"].items():
            results.setdefault(row, []).append(scores)
            errors.setdefault(row, []).append(result["se"][row])
    if cuts:
        cut = f"cutting {'+'.join(map(str, cuts))} blocks"
    elif base["prune"].get("prune_params"):
        cut = f"each cutting at least {base['prune']['prune_params']:,} block parameters"
    else:
        cut = f"each cutting {base['prune'].get('num_blocks', 1)} blocks"
    table = (f"Held-out prompts; {args.stages} stages {cut}; seeds {seeds}; mean ± sample std over seeds, and the "
             f"evaluation's standard error of each average (over its videos, mean over seeds); "
             f"{seconds / 60:.1f} CPU-process minutes in all\n\n" + ablation_table(results, errors, aspects)
             + "\n" + comparison_table(results, aspects) + "\n" + per_seed_table(results, aspects, seeds))
    if not args.seed_only:
        common.atomic_write_text(os.path.join(args.output_dir, "ablation.md"), table)
    print(table)


def ablation_table(results, errors, aspects):
    lines = [f"| model | {' | '.join(aspects)} | average | eval s.e. |", "|" + "---|" * (len(aspects) + 3)]
    for row in ROWS:
        runs = results[row]
        cells = [np.array([r[a] for r in runs]) for a in aspects] + [np.array([average(r, aspects) for r in runs])]
        se = np.mean(errors[row])  # nan: a seed that kept no per-video scores
        # The sample standard deviation: the seeds are a sample of the seeds there could be.
        lines.append(f"| {row} | " + " | ".join(f"{c.mean():.3f} ± {c.std(ddof=1) if len(c) > 1 else 0:.3f}"
                                                 for c in cells) + f" | {'–' if math.isnan(se) else f'{se:.3f}'} |")
    return "\n".join(lines) + "\n"


def comparison_table(results, aspects):
    """Each comparison on the average: mean over seeds, its paired 95% interval, the seeds above and
    below 0, and a verdict only where the interval excludes 0."""
    n = len(results["+ReDPO"])
    lines = [f"| comparison | mean | 95% CI (paired t, {n} seeds) | seeds + / − | verdict |", "|---|---|---|---|---|"]
    for name, a, b in COMPARISONS:
        x, y = [average(r, aspects) for r in results[a]], [average(r, aspects) for r in results[b]]
        mean, low, high = paired_interval(x, y)
        d = np.subtract(x, y)
        first, second = name.split(" - ")
        verdict = f"{first} above" if low > 0 else f"{second} above" if high < 0 else "not resolved"
        lines.append(f"| {name} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] | {(d > 0).sum()} / {(d < 0).sum()} | {verdict} |")
    return "\n".join(lines) + "\n"


def per_seed_table(results, aspects, seeds):
    """ReDPO against SFT and online against offline, seed by seed: the comparisons the paper makes."""
    lines = [f"| seed | comparison | {' | '.join(aspects)} | average |", "|" + "---|" * (len(aspects) + 3)]
    for name, a, b in (("ReDPO - SFT", "+ReDPO", "+SFT"), ("online - offline", "+ReDPO", "+ReDPO offline")):
        for k, seed in enumerate(seeds):
            x, y = results[a][k], results[b][k]
            diffs = [x[t] - y[t] for t in aspects] + [np.mean([x[t] for t in aspects]) - np.mean([y[t] for t in aspects])]
            lines.append(f"| {seed} | {name} | " + " | ".join(f"{d:+.3f}" for d in diffs) + " |")
    return "\n".join(lines) + "\n"


def run_seeds_in_parallel(args, seeds):
    """Each unfinished seed in a process of its own, --jobs at a time; the caller then gathers."""
    pending = [s for s in seeds if not os.path.exists(os.path.join(args.output_dir, f"seed_{s}", "result.json"))]
    # The cores are split between the processes: processes that each start a thread per core slow
    # one another down several times over.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // args.jobs)))
    flags = ["--config", args.config, "--output_dir", args.output_dir, "--stages", str(args.stages), "--seed_only"]
    flags += ["--num_blocks", *map(str, args.num_blocks)] if args.num_blocks else []

    def run(seed):
        log = os.path.join(args.output_dir, f"seed_{seed}", "log.txt")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        print(f"ablation: seed {seed} running, log in {log}", flush=True)
        with open(log, "a") as f:
            cmd = [sys.executable, os.path.abspath(__file__), "--seeds", str(seed), *flags]
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode

    pool = ThreadPoolExecutor(args.jobs)
    try:
        failed = [s for s, rc in zip(pending, pool.map(run, pending)) if rc != 0]
    except BaseException:  # Ctrl-C: start no further seed
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()
    if failed:
        raise common.ConfigError(f"seed(s) {failed} failed; see {args.output_dir}/seed_<s>/log.txt")


if __name__ == "__main__":
    common.run_main(main, parse_args)
