"""Benchmark: the tiny loop on a CPU, so that regressions show: the wall time of each stage of
`bash vip_loop.sh tiny STAGES`, curation and block-scan videos per second, training steps per second.

    nice -n 19 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/cpu_loop.py      # 1 stage

It runs vip_loop.sh itself, on configs/tiny.yaml with the models and the run under --output_dir
(wiped first, so no stage skips), with LAUNCH set to time_stage.py, which starts each
stage as `python <script> ...` would and logs its wall time and CPU time (user + system: on a
shared machine the steadier figure). The tiny models are built before the loop starts and timed
apart. Rates come from the stages' own artifacts, after their start-up:
  curation videos/s   (items finished after the first chunk x 2 videos) / (time from the first
                      chunk's last item to the last item), from the mtimes of curate's items/*.json;
                      each pair is a winner and a loser generated, decoded, scored and written as MP4
  block-scan videos/s the same over prune's scan/*.json (one video per item)
  training steps/s    steps between the first and last checkpoint / the time between them (one
                      checkpoint save included), from train's checkpoint-<step>/ folders
Prints a markdown table; writes a JSON with device, command and date (--output).
"""

import argparse
import datetime
import glob
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as `python benchmarks/cpu_loop.py`
import bench  # noqa: E402
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=1, help="STAGES of vip_loop.sh")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="the loop's config")
    parser.add_argument("--output_dir", default=str(ROOT / "runs" / "bench" / "cpu_loop"),
                        help="models and run go here (wiped first); no whitespace: LAUNCH is split on it")
    parser.add_argument("--output", default=None, help="JSON result file (default: <output_dir>/cpu_loop.json)")
    args = parser.parse_args(argv)
    args.output = args.output or os.path.join(args.output_dir, "cpu_loop.json")
    argv = sys.argv[1:] if argv is None else list(argv)
    args.command = shlex.join(["python", "benchmarks/cpu_loop.py", *argv])
    return args


def rate_after_first_chunk(paths, chunk, per_item=1):
    """Items/s (x per_item) from files written `chunk` at a time, excluding start-up: counted from
    the first chunk's end to the last file. None with fewer than two chunks."""
    mtimes = sorted(os.path.getmtime(p) for p in paths)
    if len(mtimes) <= chunk or mtimes[-1] <= mtimes[chunk - 1]:
        return None
    return (len(mtimes) - chunk) * per_item / (mtimes[-1] - mtimes[chunk - 1])


def steps_per_second(train_dir):
    """Steps between the first and last checkpoint over the time between their newest files."""
    points = []
    for path in glob.glob(os.path.join(glob.escape(train_dir), "checkpoint-*")):
        step = path.rsplit("-", 1)[1]
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        if step.isdigit() and files:
            points.append((int(step), max(os.path.getmtime(f) for f in files)))
    points.sort()
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        return None
    return (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])


def write_config(args, models):
    """The loop's config with its models moved under --output_dir (a running loop's models are not touched)."""
    config = yaml.safe_load(Path(args.config).read_text())
    config["model"]["pretrained_model_name_or_path"] = os.path.join(models, "sd")
    config["model"]["motion_adapter"] = os.path.join(models, "motion_adapter")
    config["reward"]["reward_model"] = os.path.join(models, "videoscore")
    path = os.path.join(args.output_dir, "config.yaml")
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


def main(args):
    out = os.path.abspath(args.output_dir)
    if any(c.isspace() for c in out):
        raise SystemExit(f"--output_dir {out!r}: no whitespace (vip_loop.sh splits LAUNCH on it)")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    models, run, log = os.path.join(out, "models"), os.path.join(out, "run"), os.path.join(out, "stages.jsonl")
    config_path, config = write_config(args, models)

    start = time.perf_counter()
    build = ("import rewards, stage, videoscore; import sys; a = stage.parse_config(['--config', sys.argv[1]], '', "
             "{'model': stage.MODEL_OPTIONS, 'reward': rewards.OPTIONS}); stage.backend_of(a).build_tiny(a); "
             "videoscore.build_tiny(a.reward_model)")
    subprocess.run([sys.executable, "-c", build, config_path], cwd=ROOT, check=True)
    build_s = time.perf_counter() - start

    launch = shlex.join([sys.executable, str(Path(__file__).resolve().parent / "time_stage.py"), log])
    env = {**os.environ, "LAUNCH": launch, "RUN_DIR": run, "CONFIG": config_path}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["bash", str(ROOT / "vip_loop.sh"), "tiny", str(args.stages)], env=env, check=True)
    loop_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    loop_cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

    stages = [json.loads(line) for line in Path(log).read_text().splitlines()]
    batch = config["model"]["generation_batch_size"]
    rates = []
    for k in range(1, args.stages + 1):
        stage = os.path.join(run, f"stage_{k}")
        rates.append({
            "stage": k,
            "scan_videos_per_s": rate_after_first_chunk(
                glob.glob(os.path.join(stage, "prune", "scan", "*.json")), batch),
            "curation_videos_per_s": rate_after_first_chunk(
                glob.glob(os.path.join(stage, "curate", "items", "*.json")), batch, per_item=2),
            "train_steps_per_s": steps_per_second(os.path.join(stage, "train"))})

    rows = [["build tiny models", "-", f"{build_s:.1f}", "-"]]
    rows += [[s["stage"], os.path.relpath(s["output_dir"], run) if s["output_dir"] else "-", f"{s['seconds']:.1f}",
              f"{s['cpu_seconds']:.1f}"] for s in stages]
    rows.append(["whole loop", f"vip_loop.sh tiny {args.stages}", f"{loop_s:.1f}", f"{loop_cpu:.1f}"])
    print(f"device: {bench.describe_device('cpu')}")
    print(bench.markdown_table(["stage", "output", "wall (s)", "CPU (s)"], rows))
    print(bench.markdown_table(["stage", "block-scan videos/s", "curation videos/s", "training steps/s"],
                               [[r["stage"]] + [bench.fmt(r[k], ".2f") for k in list(r)[1:]] for r in rates]))
    result = {"benchmark": "cpu_loop", "command": args.command, "device": bench.describe_device("cpu"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "build_s": build_s, "loop_s": loop_s,
              "loop_cpu_s": loop_cpu,
              "stages": stages, "rates": rates}
    common.atomic_write_json(args.output, result)
    return result


if __name__ == "__main__":
    main(parse_args())
