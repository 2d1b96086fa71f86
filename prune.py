r"""Prune: remove the motion module(s) whose removal costs the student the least reward.

Each candidate block of the current student is removed alone; videos are generated for a fixed
prompt set with fixed seeds and scored; the block(s) that cost least are removed. The aspects on
which the pruned student now scores below the teacher M0 are the targets of curation and training.
`--scan output_change` or `--scan block_influence` ranks the candidates without a video each, from
denoiser calls on M0's noised latents (block_ranking.py); the cut's videos are then made once, for
the targets.

    python prune.py --config configs/tiny.yaml --output_dir runs/tiny/stage_1/prune [--scan output_change]
    accelerate launch prune.py --config configs/animatediff.yaml --output_dir runs/animatediff/stage_2/prune \
        --student runs/animatediff/stage_1/train/student

Each process takes a shard of the scan's items ((block, prompt) pairs; prompts for a ranking without
videos); the main process ranks. Writes to --output_dir: ranking.json and ranking.md (every candidate with its cost,
and with the video scan its per-aspect scores and deltas, the chosen block(s), the targets), student/
(the pruned student), config.yaml, scan/ (per-item results, so a killed run resumes; without
--teacher_cache, a ranking without videos keeps M0's videos and latents in scan/teacher/).
"""

import argparse
import hashlib
import os

import torch
from accelerate import Accelerator

import block_ranking
import common
import models
import provenance
import rewards
import stage
import teacher_cache

OPTIONS = {
    "output_dir": (None, "where ranking.json and the pruned student go"),
    "student": (None, "current student folder (default: the full model M0, stage 1)", {"input": True}),
    "prune_prompts": ("configs/prompts/curation.txt", "prompts of the block scan (the first --num_prune_prompts)",
                      {"input": True}),
    "num_prune_prompts": (16, "prompts per candidate block", {"min": 1}),
    "candidates": ([], "block names to consider (default: every motion module still present)"),
    "num_blocks": (1, "blocks removed this stage; several numbers: one a stage (the last one for later stages)",
                   {"type": "per_stage", "min": 1}),
    "prune_params": (None, "instead of --num_blocks: remove the best-ranked blocks until at least this many "
                           "motion-module parameters are gone", {"type": int, "min": 1}),
    "num_stages": (None, "the run's stages in all (vip_loop.sh passes STAGES): this stage's cut and the later "
                         "ones' are checked at once against the blocks the model has", {"type": int, "min": 1}),
    "seed": (0, "video i uses seed + i, the same for every candidate", {"min": 0}),
    "scan": ("videos", "how the candidates are ranked: videos (each removed alone, videos generated and scored), or "
                       "without a video: output_change (one denoiser call a candidate) or block_influence (forward "
                       "hooks on the full model's calls); docs/cost.md measures them",
             # the video scan is what ran before the choice existed: its finished results stand
             {"choices": ("videos", *block_ranking.MEASURES), "used": lambda args: args.scan != "videos"}),
    "scan_timesteps": (1, "output_change and block_influence: sampler timesteps each of M0's latents is noised to",
                       {"min": 1, "used": lambda args: args.scan != "videos"}),
    # A cheaper scan: the ranking's fidelity against the full settings is measured in README "Run cost".
    "scan_num_inference_steps": (None, "denoising steps of the scan's videos (default: model.num_inference_steps)",
                                 {"type": int, "min": 1}),
    "scan_num_frames": (None, "frames of the scan's videos (default: model.num_frames)", {"type": int, "min": 1}),
    "scan_height": (None, "height of the scan's videos (default: model.height)", {"type": int, "min": 1}),
    "scan_width": (None, "width of the scan's videos (default: model.width)", {"type": int, "min": 1}),
}


def parse_args(argv=None):
    return stage.parse_config(argv, __doc__, {"model": stage.MODEL_OPTIONS, "reward": rewards.OPTIONS,
                                               "prune": OPTIONS})


def mean_scores(results, aspects):
    return {a: sum(r["scores"][a] for r in results) / len(results) for a in aspects}


def choose_blocks(candidates, num_blocks, prune_params):
    """The cheapest blocks first; by count, or until the parameter budget is met."""
    ranked = sorted(candidates, key=lambda c: c["cost"])
    if prune_params is None:
        return [c["name"] for c in ranked[:num_blocks]]
    chosen, removed = [], 0
    for c in ranked:
        if removed >= prune_params:
            break
        chosen.append(c["name"])
        removed += c["params"]
    return chosen


def blocks_at(num_blocks, index):
    """num_blocks, or its entry for the stage of that index (0: the first; the last entry for later ones)."""
    return num_blocks if isinstance(num_blocks, int) else num_blocks[min(index, len(num_blocks) - 1)]


def check_cuts(present, num_blocks, prune_params, index, num_stages=None):
    """A cut that would leave the model no block (nothing left to train or prune), at this stage
    (`index`, 0 for M0's) or a later one of the run's `num_stages`, is an error before any work; a
    parameter budget cuts at least one block a stage, and every block where it covers them all."""
    left = len(present)
    for k in range(index, max(index + 1, num_stages or 0)):
        if prune_params is None:
            left -= blocks_at(num_blocks, k)
        else:
            left -= left if k == index and prune_params >= sum(b["params"] for b in present) else 1
        if left < 1:
            what = f"prune.prune_params {prune_params:,}" if prune_params is not None else f"prune.num_blocks {num_blocks}"
            raise common.ConfigError(f"{what}: stage {k + 1}{f' of {num_stages}' if num_stages else ''} would remove "
                                     f"the last of the {len(present)} blocks left at stage {index + 1}; nothing would be "
                                     f"left to train. Cut fewer blocks or run fewer stages")


def main(args):
    if args.output_dir is None:
        raise common.ConfigError("--output_dir is required (prune.output_dir in the config)")
    if "num_blocks" in getattr(args, "_cli", ()) and "prune_params" not in args._cli:
        args.prune_params = None  # --num_blocks on the command line beats a budget in the config
    # Inputs first: nothing in the output folder is touched until they are all good.
    prompts = stage.read_prompts(args.prune_prompts)[: args.num_prune_prompts]
    if args.student is not None:
        models.read_student_meta(args.student)
    backend = stage.backend_of(args)
    stage.check_models(args, backend.required_models(args) + rewards.required_models(args),
                       build=(backend.build_tiny, rewards.build_tiny))
    # The scan's videos: the model's settings, or the cheaper ones asked for.
    scan_args = argparse.Namespace(**vars(args))
    for key in ("num_inference_steps", "num_frames", "height", "width"):
        if getattr(args, f"scan_{key}") is not None:
            setattr(scan_args, key, getattr(args, f"scan_{key}"))
    backend.required_models(scan_args)  # the family's own checks of a video size (Wan: 4k + 1 frames)
    accelerator = Accelerator()
    with accelerator.main_process_first():  # the first to digest a model keeps the digest for the others
        made = provenance.made_from(args)
    if provenance.done(args.output_dir, made):
        accelerator.print(f"prune: {args.output_dir} is done from this config and these inputs; skipping")
        return
    aspects = args.aspects
    dtype = common.weight_dtype(args.mixed_precision)

    # The student to prune and, from stage 2 on, the teacher M0 it is compared with.
    unet = models.load_model(backend, args, student=args.student, dtype=dtype)
    pipe = backend.load_pipeline(args, unet, device=accelerator.device, dtype=dtype)
    pipes, denoisers = {"student": pipe}, [unet]
    if args.student is not None:
        denoisers.append(models.load_model(backend, args, dtype=dtype).to(accelerator.device))
        pipes["teacher"] = backend.with_denoiser(pipe, denoisers[-1])
    reward = rewards.load_reward(args, device=accelerator.device)
    rewards.check_prompts(reward, prompts, args.prune_prompts)
    cost = stage.Ledger("prune")
    cost.watch(*denoisers)
    present = models.list_blocks(backend, unet)
    blocks = present
    if args.candidates:
        for name in args.candidates:
            if name not in [b["name"] for b in present]:
                raise common.ConfigError(f"prune.candidates: no block '{name}' left to remove; blocks present: "
                                         f"{', '.join(b['name'] for b in present)}")
        blocks = [b for b in blocks if b["name"] in args.candidates]
    if not blocks:
        raise common.ConfigError(f"{args.student}: every block is already removed; nothing left to prune")
    index = models.stage_of(args.student)  # 0 for M0
    check_cuts(present, args.num_blocks, args.prune_params, index, args.num_stages)
    motion_before = models.block_parameters(backend, unet)
    scan_dir = os.path.join(args.output_dir, "scan")
    provenance.start(accelerator, args.output_dir, made, args, ["ranking.json", "ranking.md", "scan", "student",
                                                                 "cost.json"])
    if args.scan != "videos" and not args.teacher_cache:  # M0's latents are measured: kept with the scan
        scan_args.teacher_cache = os.path.join(scan_dir, "teacher")
    kept = teacher_cache.TeacherCache(scan_args, provenance.made_from(scan_args))

    def scan(variants, phase):
        """Mean scores of each variant ({name: the blocks it removes}) over the prompts."""
        items = [{"id": f"{v}__{i:04d}", "variant": v, "prompt": p, "seed": args.seed + i}
                 for v in variants for i, p in enumerate(prompts)]

        def work(chunk):
            results = {}
            for v in dict.fromkeys(c["variant"] for c in chunk):  # a shard may mix variants
                group = [c for c in chunk if c["variant"] == v]
                prompts_, seeds = [c["prompt"] for c in group], [c["seed"] for c in group]
                m0 = v == "teacher" or (v == "student" and args.student is None)  # M0 itself: made once a run
                with models.blocks_removed(backend, unet, variants[v]):  # none for M0
                    scores = teacher_cache.frames_and_scores(kept if m0 else None, backend, pipes.get(v, pipe), reward,
                                                             prompts_, seeds, scan_args, cost)[1]
                for c, s in zip(group, scores):
                    results[c["id"]] = {"variant": v, "prompt": c["prompt"], "seed": c["seed"], "scores": s}
            return [results[c["id"]] for c in chunk]

        results = stage.run_items(items, work, lambda i: os.path.join(scan_dir, f"{i}.json"), accelerator,
                                   desc=f"prune: {phase}", batch_size=args.generation_batch_size)
        return {v: mean_scores([r for r in results if r["variant"] == v], aspects) for v in variants}

    def rank_without_videos():
        """{block: the measure's mean over the scan's prompts}, from M0's latents (kept, or made once)."""
        names, objective = [b["name"] for b in blocks], backend.objective(args)
        timesteps = block_ranking.scan_timesteps(pipe.scheduler, scan_args.num_inference_steps, args.scan_timesteps)
        items = [{"id": f"{args.scan}__{i:04d}", "prompt": p, "seed": args.seed + i} for i, p in enumerate(prompts)]

        def work(chunk):
            prompts_, seeds = [c["prompt"] for c in chunk], [c["seed"] for c in chunk]
            latents = teacher_cache.videos(kept, backend, pipes.get("teacher", pipe), reward, prompts_, seeds, scan_args,
                                           cost)[1]
            text = backend.encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts_, accelerator.device).to(dtype)
            values = block_ranking.measure(args.scan, backend, unet, names, objective, timesteps,
                                           torch.stack(latents).to(accelerator.device, dtype), text, seeds)
            return [{"prompt": p, "seed": s, "values": {n: values[n][j] for n in names}}
                    for j, (p, s) in enumerate(zip(prompts_, seeds))]

        results = stage.run_items(items, work, lambda i: os.path.join(scan_dir, f"{i}.json"), accelerator,
                                   desc=f"prune: {args.scan}", batch_size=args.generation_batch_size)
        return {n: sum(r["values"][n] for r in results) / len(results) for n in names}

    if args.scan == "videos":
        means = scan({**{v: [] for v in pipes}, **{b["name"]: [b["name"]] for b in blocks}}, "block scan")
        base, teacher = means["student"], means.get("teacher", means["student"])
        candidates = []
        for b in blocks:
            delta = {a: means[b["name"]][a] - base[a] for a in aspects}
            candidates.append({**b, "scores": means[b["name"]], "delta": delta,
                               "cost": -sum(delta.values()) / len(aspects)})
    else:  # M0's videos first: their scores are the targets' reference, their latents what is measured
        base, teacher = None, scan({"teacher": []}, "teacher")["teacher"]
        candidates = [{**b, "cost": v} for b, v in zip(blocks, rank_without_videos().values())]
    chosen = choose_blocks(candidates, blocks_at(args.num_blocks, index), args.prune_params)
    if len(chosen) == len(present):  # a budget that, in the order the blocks ranked, takes them all
        raise common.ConfigError(f"prune.prune_params {args.prune_params:,}: it takes all {len(present)} blocks left; "
                                 f"nothing would be left to train. Give a smaller budget")
    tag = "pruned-" + hashlib.sha1("+".join(sorted(chosen)).encode()).hexdigest()[:8]
    # The cut's own videos, once: the video scan made them already where it removes one block.
    pruned = means[chosen[0]] if args.scan == "videos" and len(chosen) == 1 else \
        scan({tag: chosen}, "pruned student")[tag]

    # Targets: what the pruned student now does worse than the teacher.
    targets = [a for a in aspects if pruned[a] < teacher[a]]
    reason = "aspects on which the pruned student scores below the teacher M0"
    if not targets:
        targets, reason = list(aspects), "the pruned student is not below the teacher on any aspect: all aspects"

    if accelerator.is_main_process:
        models.remove_blocks(backend, unet, chosen)
        # Untrained, the student differs from M0 only by its removed blocks: the backend's first
        # trainable part (its default) is saved, so that training can start from it.
        models.save_student(backend, unet, os.path.join(args.output_dir, "student"), args, next(iter(backend.TRAINABLE)),
                            extra={"parent": args.student or "M0", "pruned_this_stage": chosen})
        ranking = {
            "student": args.student or "M0", "aspects": list(aspects), "scan": args.scan, "teacher": teacher,
            "unpruned": base,
            "candidates": sorted(candidates, key=lambda c: c["cost"]), "chosen": chosen, "pruned": pruned,
            "targets": targets, "targets_rule": reason,
            "motion_parameters": {"before": motion_before, "after": models.block_parameters(backend, unet)},
        }
        common.atomic_write_text(os.path.join(args.output_dir, "ranking.md"), ranking_markdown(ranking))
        common.atomic_write_json(os.path.join(args.output_dir, "ranking.json"), ranking)
        print(f"prune: removed {', '.join(chosen)}; targets: {', '.join(targets)}; motion parameters "
              f"{ranking['motion_parameters']['before'] / 1e6:.2f}M -> {ranking['motion_parameters']['after'] / 1e6:.2f}M")
    cost.write(accelerator, args.output_dir)
    if accelerator.is_main_process:
        provenance.finish(args.output_dir, made, ["ranking.json", "ranking.md", "student"])
    accelerator.wait_for_everyone()


MEANINGS = {"videos": "mean drop over the aspects when the block alone is removed (its videos scored)",
            "output_change": "relative change of one denoiser call's output when the block alone is removed, on "
                             "M0's noised latents",
            "block_influence": "size of the block's update relative to its input, on M0's noised latents"}


def ranking_markdown(r):
    aspects = r["aspects"] if r.get("scan", "videos") == "videos" else []
    head = "| rank | block | params (M) | cost |" + "".join(f" Δ {a} |" for a in aspects)
    rows = [head, "|" + "---|" * (4 + len(aspects))]
    for i, c in enumerate(r["candidates"], 1):
        mark = " (removed)" if c["name"] in r["chosen"] else ""
        rows.append(f"| {i} | `{c['name']}`{mark} | {c['params'] / 1e6:.3f} | {c['cost']:+.4g} |"
                    + "".join(f" {c['delta'][a]:+.4f} |" for a in aspects))
    return (f"# Block ranking (student: {r['student']})\n\nCost = {MEANINGS[r.get('scan', 'videos')]}; the cheapest "
            f"are removed.\n\n" + "\n".join(rows)
            + f"\n\nTargets: {', '.join(r['targets'])} ({r['targets_rule']}).\n")


if __name__ == "__main__":
    common.run_main(main, parse_args)
