r"""Evaluate: the teacher M0 and any students on held-out prompts, in the paper's table shape.

Per model: VideoScore per aspect (mean over prompts), their average, motion-module and UNet
parameters, FLOPs of one denoising step, and the latency of generating one video.

    python evaluate.py --config configs/tiny.yaml --output_dir runs/tiny/eval \
        --students runs/tiny/stage_1/prune/student,runs/tiny/stage_1/train/student
    accelerate launch evaluate.py --config configs/animatediff.yaml --output_dir runs/animatediff/eval \
        --students runs/animatediff/stage_3/train/student

The held-out prompts (configs/prompts/eval.txt) are not curation prompts. Each process generates
a shard of the (model, prompt) pairs; results are kept per model's weights and prompt's text, so
adding a student to the list only evaluates the new one, a student retrained in place is evaluated
again, and a folder given twice (or through a symlink) is evaluated once and listed as given.
Writes to --output_dir: eval.json, eval.md (the table),
report.html (the table, aspects.png with each aspect across the models, and the models' videos side
by side for the same prompts and seeds), videos/<model>/ (every evaluated video), config.yaml.
"""

import gc
import hashlib
import html
import json
import os
import time

import matplotlib
import torch
from accelerate import Accelerator

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

import common
import ledger
import models
import provenance
import rewards
import stage
import teacher_cache

OPTIONS = {
    "output_dir": (None, "where eval.json, eval.md and the videos go"),
    "students": ([], "student folders to evaluate beside the teacher M0; comma-separated or a YAML list",
                 {"input": True}),
    "eval_prompts": ("configs/prompts/eval.txt", "held-out prompts (never the curation prompts)", {"input": True}),
    "num_eval_prompts": (None, "use the first this many prompts (default: all)", {"type": int, "min": 1}),
    "videos_per_prompt": (1, "videos per prompt, each with its own seed", {"min": 1}),
    "latency_runs": (3, "timed generations per model (after one warm-up); the median is reported", {"min": 1}),
    "seed": (1234, "video i uses seed + i, for every model", {"min": 0}),
    "rewards": ([], "rewards to evaluate with, each in its own table, the first the main one (default: the config's "
                    "reward); one that did not curate is the held-out check, e.g. [videoscore, videoreward]",
                {"choices": tuple(rewards.REWARDS), "used": lambda args: bool(args.rewards)}),
}

ASPECT_TITLES = {"visual_quality": "Visual Quality", "temporal_consistency": "Temporal Consist.",
                 "dynamic_degree": "Dynamic Degree", "text_alignment": "Text Align.",
                 "factual_consistency": "Factual Consist."}


def parse_args(argv=None):
    return stage.parse_config(argv, __doc__, {"model": stage.MODEL_OPTIONS, "reward": rewards.OPTIONS,
                                               "eval": OPTIONS})


def model_key(identity):
    """The key of a model's results: M0's (which the folder's own record pins), or a student's by the
    digest of its weights and student.json (provenance.digest), never by its path."""
    return "teacher" if identity is None else "student-" + identity.split(":")[-1][:16]


def prompt_key(prompt, seed):
    """An item's key within a model's: the prompt's text and the seed, so an edited prompt is made again."""
    return f"{hashlib.sha256(prompt.encode()).hexdigest()[:12]}_{seed}"


def holds_more(out, made):
    """How many students past these the folder's finished table holds, when it holds these first and
    the rest are still what they were made from (None otherwise). vip_loop.sh evaluates after every
    stage, the students so far: an unchanged rerun finds the last stage's table, which is current."""
    record = provenance.read(out)
    if record is None or record["outputs"] is None or not common.intact(out, record["outputs"]) or \
            provenance.differing(record["made_from"], made, ignore=["students"]):
        return None
    asked, tabled = made["eval"]["students"], record["made_from"]["eval"].get("students") or []
    try:
        rest = [m["path"] for m in json.loads(open(os.path.join(out, "eval.json")).read())["models"][1 + len(asked):]]
        same = len(rest) == len(tabled) - len(asked) and all(provenance.digest(p) == d for p, d in
                                                              zip(rest, tabled[len(asked):]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return len(rest) if tabled[:len(asked)] == asked and same else None


def label(path):
    if path is None:
        return "teacher (M0)"
    parts = os.path.normpath(path).split(os.sep)
    return "/".join(parts[-3:-1]) if len(parts) >= 3 else path  # e.g. stage_2/train


def measure_latency(backend, pipe, args, runs, prompt):
    """Wall times of generating one video (all steps, guidance, decoding), `runs` of them after one
    untimed warm-up: the median is reported, the others say how noisy the machine was."""
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(runs + 1):
        sync()
        start = time.perf_counter()
        backend.generate(pipe, [prompt], [i], args)
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])


def median(times):
    return times[len(times) // 2]


class OneStudentAtATime:
    """The teacher's pipeline, and one student's around it at a time (`held[k]`, the pipeline of
    model k): a table of many large students (six 14B ones after three stages) holds two denoisers,
    not all. The items come in the models' order, so each is loaded once."""

    def __init__(self, backend, args, paths, device, dtype, cost):
        self.backend, self.args, self.paths, self.device, self.dtype, self.cost = backend, args, paths, device, dtype, cost
        self.teacher = models.load_model(backend, args, dtype=dtype).to(device)
        self.pipe = backend.load_pipeline(args, self.teacher, device=device, dtype=dtype)
        cost.watch(self.teacher)
        self.key = self.model = self.student_pipe = None

    def __getitem__(self, key):
        return self.pipe if key == "teacher" else self._student(key)[1]

    def model_of(self, key):
        return self.teacher if key == "teacher" else self._student(key)[0]

    def _student(self, key):
        if key != self.key:
            self.model = self.student_pipe = None  # the one held so far goes first
            gc.collect()
            self.model = models.load_model(self.backend, self.args, student=self.paths[key], dtype=self.dtype).to(self.device)
            self.cost.watch(self.model)
            self.student_pipe, self.key = self.backend.with_denoiser(self.pipe, self.model), key
        return self.model, self.student_pipe


def measure(backend, held, key, args, prompt, path):
    """A model's parameters, FLOPs and latencies, measured once and kept in `path`: a later
    evaluation with more students does not measure the models it has measured."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    model, pipe = held.model_of(key), held[key]
    result = {"motion_parameters": models.block_parameters(backend, model), "unet_parameters": models.count_parameters(model),
              "flops_per_step": models.count_flops(backend, model, args.num_frames, args.height, args.width),
              "latency_runs_s": measure_latency(backend, pipe, args, args.latency_runs, prompt)}
    common.atomic_write_json(path, result)
    return result


def table(entries, aspects, blocks="Motion params", denoiser="UNet params"):
    head = ["Model"] + [ASPECT_TITLES[a] for a in aspects] + ["Average", blocks, denoiser, "GFLOPs/step", "Latency (s)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in entries:
        rows.append("| " + " | ".join([m["label"]] + [f"{m['scores'][a]:.3f}" for a in aspects] + [
            f"{m['average']:.3f}", f"{m['motion_parameters'] / 1e6:.3f}M", f"{m['unet_parameters'] / 1e6:.2f}M",
            f"{m['flops_per_step'] / 1e9:.2f}", f"{m['latency_s']:.3f} ({min(m['latency_runs_s']):.3f}-"
            f"{max(m['latency_runs_s']):.3f})"]) + " |")
    return "\n".join(rows) + "\n"


def write_report(out, report, md, side_by_side=4):
    """report.html in `out`, beside the files it shows: the table, aspects.png (each aspect across
    the entries, in the loop's order) and, for the first prompts, every model's video of the same
    prompt and (first) seed in one row."""
    entries, aspects = report["models"], report["aspects"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for a in aspects:
        ax.plot(range(len(entries)), [m["scores"][a] for m in entries], marker="o", label=ASPECT_TITLES.get(a, a))
    ax.set_xticks(range(len(entries)), [m["label"] for m in entries], rotation=20, ha="right")
    ax.set_ylabel("score"), ax.grid(alpha=0.3), ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with common.atomic_path(os.path.join(out, "aspects.png")) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    tables = []  # each markdown table of eval.md, as HTML, with the sentence before it
    for block in md.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|---")]
        if lines:
            cells = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines]
            tables.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:]) + "</table>")
        elif tables or block.startswith("Each"):
            tables.append(f"<p>{html.escape(block)}</p>")
    table = "\n".join(tables)
    header = "<tr><th>prompt, seed</th>" + "".join(f"<th>{html.escape(m['label'])}</th>" for m in entries) + "</tr>"
    rows = []
    prompts = [item.rsplit(" (seed", 1)[0] for item in report["items"]]
    firsts = [q for q in range(len(prompts)) if q == 0 or prompts[q] != prompts[q - 1]]  # one video per prompt
    for q in firsts[:side_by_side]:
        videos = "".join(f'<td><video src="{html.escape(m["videos"][q])}" autoplay loop muted playsinline></video></td>'
                         for m in entries)
        rows.append(f"<tr><td class=p>{html.escape(report['items'][q])}</td>{videos}</tr>")
    intro = html.escape(md.split("\n\n")[1]) if "\n\n" in md else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(md.splitlines()[0].lstrip('# '))}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin:12px 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td.p{{text-align:left;max-width:220px}}
video{{width:160px;image-rendering:pixelated;background:#000}} p{{max-width:900px}}</style></head><body>
<h1>{html.escape(md.splitlines()[0].lstrip('# '))}</h1>
<p>{intro}</p>
{table}
<h2>Each aspect across the stages</h2>
<img src="aspects.png" alt="aspects across the stages" width="720">
<h2>The same prompt and seed, model by model</h2>
<table>{header}{''.join(rows)}</table>
</body></html>
"""
    common.atomic_write_text(os.path.join(out, "report.html"), page)


def reward_table(entries, name, label, aspects, curated):
    """One more reward's scores of every model, with their average over `aspects`."""
    head = ["Model"] + [ASPECT_TITLES[a] for a in entries[0]["by"][name] if a != "average"] + ["Average"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows += ["| " + " | ".join([m["label"]] + [f"{v:.3f}" for a, v in m["by"][name].items() if a != "average"]
                               + [f"{m['by'][name]['average']:.3f}"]) + " |" for m in entries]
    role = "the reward that curated" if curated else "a reward that did not curate"
    return (f"\nEach model scored by {label}, {role}; average over {', '.join(aspects)}:\n\n"
            + "\n".join(rows) + "\n")


def features_table(entries):
    """The weight-free features (features.py) of each model, and the learned reward's part of an ensemble."""
    parts = [k for k in entries[0]["scores"] if "/" in k]
    if not parts:
        return ""
    head = ["Model"] + [f"{ASPECT_TITLES.get(k.split('/')[0], k)} ({k.split('/')[1]})" for k in parts]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows += ["| " + " | ".join([m["label"]] + [f"{m['scores'][k]:.3f}" for k in parts]) + " |" for m in entries]
    return "\nEach reward on its own (features: weight-free, features.py):\n\n" + "\n".join(rows) + "\n"


def main(args):
    if args.output_dir is None:
        raise common.ConfigError("--output_dir is required (eval.output_dir in the config)")
    # Inputs first: nothing in the output folder is touched until they are all good.
    prompts = stage.read_prompts(args.eval_prompts)[: args.num_eval_prompts]
    backend = stage.backend_of(args)
    for s in args.students:
        models.check_student(backend, args, s)
    stage.check_models(args, backend.required_models(args) + rewards.required_models(args),
                       build=(backend.build_tiny, rewards.build_tiny))
    accelerator = Accelerator()
    out = args.output_dir
    with accelerator.main_process_first():  # the first to digest a model keeps the digest for the others
        made = provenance.made_from(args)
    more = holds_more(out, made)
    if more is not None:
        held = f" (its table holds {more} more student{'s' * (more != 1)}, unchanged)" if more else ""
        accelerator.print(f"evaluate: {out} is done from this config and these inputs{held}; skipping")
        return
    dtype = common.weight_dtype(args.mixed_precision)
    # The first reward makes the main table; the curating one must score every aspect, another may score fewer.
    judges = list(dict.fromkeys(args.rewards or [args.reward]))
    loaded = {n: rewards.load_reward(args, accelerator.device, n, strict=n == args.reward) for n in judges}
    for r in loaded.values():
        rewards.check_prompts(r, prompts, args.eval_prompts)
    reward, others = loaded[judges[0]], {n: loaded[n] for n in judges[1:]}
    scored = {n: [a for a in args.aspects if a in r.aspects] or list(r.aspects) for n, r in loaded.items()}
    # The weight-free features are reported beside any learned reward (the ensemble scores them itself).
    second = rewards.beside(args, judges[0])
    paths = [None] + list(args.students)
    keys = [model_key(i) for i in [None] + made["eval"]["students"]]  # one a path; a model given twice, one key
    # Items are keyed by the model's contents, the prompt's text and the seed: they stay valid whichever
    # students and prompts a later call lists.
    provenance.start(accelerator, out, made, args, ["eval.json", "eval.md", "report.html", "aspects.png", "items",
                                                    "videos", "cost.json"],
                     work=["items", "videos"], work_ignores=["students", "eval_prompts", "num_eval_prompts"])

    n = args.videos_per_prompt
    items = [{"id": f"{k}__{prompt_key(p, args.seed + i * n + j)}", "model": k, "prompt": p, "seed": args.seed + i * n + j}
             for k in dict.fromkeys(keys) for i, p in enumerate(prompts) for j in range(n)]

    cost, kept = stage.Ledger("evaluate"), teacher_cache.TeacherCache(args, made)
    held = OneStudentAtATime(backend, args, dict(zip(keys, paths)), accelerator.device, dtype, cost)

    def work(chunk):
        results = {}
        for k in dict.fromkeys(c["model"] for c in chunk):
            group = [c for c in chunk if c["model"] == k]
            prompts_, seeds = [c["prompt"] for c in group], [c["seed"] for c in group]
            # M0's are made once a run, with the scores of the config's reward
            cache = kept if k == "teacher" and judges[0] == args.reward else None
            frames, scores = teacher_cache.frames_and_scores(cache, backend, held[k], reward, prompts_, seeds, args, cost)
            by = {n: r.score(list(frames), prompts_) for n, r in others.items()}
            cost.scored(len(frames) * len(others))
            if second is not None:
                scores = [{**s, **{f"{a}/features": v for a, v in t.items()}} for s, t in
                          zip(scores, second.score(list(frames), [c["prompt"] for c in group]))]
            for i, (c, f, s) in enumerate(zip(group, frames, scores)):
                video = os.path.join("videos", k, c["id"].split("__")[1] + ".mp4")
                common.write_video(os.path.join(out, video), f, fps=args.fps)
                results[c["id"]] = {"model": k, "prompt": c["prompt"], "seed": c["seed"], "video": video, "scores": s,
                                    "by": {n: v[i] for n, v in by.items()},
                                    "files": {video: os.path.getsize(os.path.join(out, video))}}
        return [results[c["id"]] for c in chunk]

    results = stage.run_items(items, work, lambda i: os.path.join(out, "items", f"{i}.json"), accelerator,
                               desc="evaluate", batch_size=args.generation_batch_size, files_root=out)

    if accelerator.is_main_process:
        entries = []
        for path, k in zip(paths, keys):
            mine = [r for r in results if r["model"] == k]
            scores = {a: sum(r["scores"][a] for r in mine) / len(mine) for a in mine[0]["scores"]}
            by = {n: {a: sum(r["by"][n][a] for r in mine) / len(mine) for a in others[n].aspects} for n in others}
            with cost.as_role("teacher" if k == "teacher" else "student"):
                measured = measure(backend, held, k, args, prompts[0], os.path.join(out, "items", f"{k}.measured.json"))
            entries.append({
                "label": label(path), "path": path or "M0", "key": k, "scores": scores,
                "average": sum(scores[a] for a in scored[judges[0]]) / len(scored[judges[0]]), **measured,
                "by": {n: {**v, "average": sum(v[a] for a in scored[n]) / len(scored[n])} for n, v in by.items()},
                "latency_s": median(measured["latency_runs_s"]), "videos": [r["video"] for r in mine],
            })
        report = {"aspects": scored[judges[0]], "rewards": {n: rewards.label(args, n) for n in judges},
                  "prompts": args.eval_prompts, "num_prompts": len(prompts),
                  "device": str(accelerator.device), "models": entries,
                  "items": [f"{r['prompt']} (seed {r['seed']})" for r in results if r["model"] == "teacher"]}
        names = backend.TABLE
        md = (f"# Evaluation on {len(prompts)} held-out prompts ({args.eval_prompts})\n\n"
              f"Reward: {rewards.label(args, judges[0])}; average over {', '.join(scored[judges[0]])}; parameters of "
              f"{names['blocks_are']} and of the whole {names['denoiser']}; "
              f"FLOPs of one {names['denoiser']} call for one video "
              f"({args.num_frames} frames, {args.height}x{args.width}); latency: one video, "
              f"{args.num_inference_steps} steps with guidance, median (min-max) of {args.latency_runs} after a warm-up, "
              f"on {accelerator.device}; each model measured once.\n\n"
              + table(entries, scored[judges[0]], names["blocks"], names["denoiser"][:1].upper() + names["denoiser"][1:]
                      + " params")
              + "".join(reward_table(entries, n, rewards.label(args, n), scored[n],
                                     n in (args.reward, args.ensemble_with if args.reward == "ensemble" else None))
                        for n in others)
              + features_table(entries))
        spent = ledger.run_costs(os.path.dirname(os.path.abspath(out)))  # inside a vip_loop.sh run folder
        if spent:
            md += "\nWhat the run has cost before this evaluation (ledger.py):\n\n" + ledger.table(spent)
        common.atomic_write_text(os.path.join(out, "eval.md"), md)
        write_report(out, report, md)
        common.atomic_write_json(os.path.join(out, "eval.json"), report)
        print(md + f"\nreport: {os.path.join(out, 'report.html')}")
    cost.write(accelerator, out)
    if accelerator.is_main_process:
        provenance.finish(out, made, ["eval.json", "eval.md", "report.html", "aspects.png",
                                      *[r["video"] for r in results]])
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    common.run_main(main, parse_args)
