r"""Train: ReDPO, the pruned student learning from the frozen teacher M0 on curated pairs.

    loss = Diffusion-DPO(student vs teacher, winner vs loser) + w_sft * ||student - teacher||^2 (winners)

The teacher is the reference of both terms and runs once per step under no_grad; winners and
losers of a pair share one batch, one noise and one timestep. Latents and prompt embeddings come
from curate.py, so neither the VAE nor the text encoder runs here.

    python train_redpo.py --config configs/tiny.yaml --output_dir runs/tiny/stage_1/train \
        --student runs/tiny/stage_1/prune/student --pairs runs/tiny/stage_1/curate/pairs.jsonl
    accelerate launch --num_processes 8 train_redpo.py --config configs/animatediff.yaml \
        --output_dir runs/animatediff/stage_1/train --student runs/animatediff/stage_1/prune/student \
        --pairs runs/animatediff/stage_1/curate/pairs.jsonl --resume_from_checkpoint latest

Effective batch = train_batch_size (pairs per process) x processes x gradient_accumulation_steps.
Ablations are switches: --loss_type sft | dpo | redpo. Writes to --output_dir: student/
(student.safetensors + student.json), checkpoint-<step>/ (accelerator.save_state), metrics.jsonl,
config.yaml.
"""

import gc
import importlib.util
import json
import math
import os
import re
import shutil
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

import common
import models
import provenance
import stage

OPTIONS = {
    "output_dir": (None, "where the trained student, checkpoints and logs go"),
    "student": (None, "student to train: a folder from prune.py (student/)", {"input": True}),
    "pairs": ([], "pair manifest(s) from curate.py (pairs.jsonl); several: space- or comma-separated, or a YAML list",
              {"input": True}),
    "trainable": ("motion_modules", "what trains, as the backend names its parts: motion_modules (AnimateDiff's "
                                    "motion modules; VideoCrafter2's temporal layers) | unet"),
    "loss_type": ("redpo", "redpo | dpo (w/o SFT) | sft (w/o DPO)", {"choices": common.LOSS_TYPES}),
    "beta": (2500.0, "DPO temperature, no 0.5 factor: 2500 here = beta_dpo 5000 of Diffusion-DPO, diffusers' SDXL "
                     "script and VideoDPO (0.5 x beta_dpo); = beta_dpo of diffusers' SD1.5 script", {"gt": 0}),
    "w_sft": (1.0, "weight of the SFT term (student to teacher on winners)", {"min": 0}),
    "learning_rate": (1e-5, "AdamW learning rate", {"gt": 0}),
    "scale_lr": (False, "multiply the learning rate by the effective batch size"),
    "lr_scheduler": ("constant_with_warmup", "diffusers scheduler name: constant, constant_with_warmup, cosine, ...",
                     {"choices": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                  "constant_with_warmup")}),
    "lr_warmup_steps": (0, "warmup steps", {"min": 0}),
    "adam_beta1": (0.9, "AdamW beta1", {"min": 0, "lt": 1}),
    "adam_beta2": (0.999, "AdamW beta2", {"min": 0, "lt": 1}),
    "adam_weight_decay": (1e-2, "AdamW weight decay", {"min": 0}),
    "adam_epsilon": (1e-8, "AdamW epsilon", {"gt": 0}),
    "max_grad_norm": (1.0, "gradient clipping norm", {"gt": 0}),
    "train_batch_size": (1, "pairs per process per step", {"min": 1}),
    "gradient_accumulation_steps": (1, "steps accumulated per update", {"min": 1}),
    "max_train_steps": (500, "optimizer updates", {"min": 1}),
    "gradient_checkpointing": (False, "trade compute for memory in the student"),
    "checkpointing_steps": (100, "save resumable state every this many updates", {"min": 1}),
    "checkpoints_total_limit": (None, "keep at most this many checkpoints", {"type": int, "min": 1}),
    "resume_from_checkpoint": (None, "a checkpoint folder, or 'latest' (starts fresh when there is none)"),
    "report_to": ("tensorboard", "tensorboard (logs in <output_dir>/logs) | wandb (pip install wandb) | none",
                  {"choices": ("tensorboard", "wandb", "none")}),
    "logging_steps": (10, "print and log metrics every this many updates", {"min": 1}),
    "validation_steps": (None, "every this many updates, sample validation videos with the student (None: never)",
                         {"type": int, "min": 1}),
    "validation_prompts": ([], "prompts of the validation videos (default: the first pairs' prompts)"),
    "num_validation_videos": (2, "validation videos per validation, seeds 0, 1, ...", {"min": 1}),
    "dataloader_num_workers": (0, "data loader worker processes", {"min": 0}),
    "seed": (0, "seed of noise, timesteps and data order", {"min": 0}),
}


def parse_args(argv=None):
    return stage.parse_config(argv, __doc__, {"model": stage.MODEL_OPTIONS, "train": OPTIONS})


class PairDataset(torch.utils.data.Dataset):
    """Pairs from curate.py manifests: the winner and loser latents of one prompt and seed, and the
    prompt's embedding where curation stored it (`cached`: every pair has one, so training never
    runs the text encoder; manifests from before it stored them are encoded as they train). Every
    row is checked here, before any model loads: its videos are whole MP4s, its latents file holds
    a winner and a loser of one shape, the same for every pair (a batch stacks them)."""

    def __init__(self, manifests):
        self.rows, shapes, embeds = [], {}, set()
        for manifest in manifests:
            root = os.path.dirname(manifest)
            for i, row in enumerate(stage.read_manifest(manifest), 1):
                where = f"{manifest}:{i}"
                for key in ("winner", "loser"):  # a pair whose videos are gone or broken is not a pair
                    check_mp4(os.path.join(root, row[key]), f"{where}: {key}")
                path = os.path.join(root, row["latents"])
                try:
                    with safe_open(path, "pt") as f:
                        shape = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                except Exception as e:
                    raise common.ConfigError(f"{where}: latents {path}: cannot read ({str(e).splitlines()[0][:120]}); "
                                             f"expected the safetensors file curate.py wrote") from None
                if set(shape) < {"winner", "loser"} or shape["winner"] != shape["loser"]:
                    raise common.ConfigError(f"{where}: latents {path}: expected 'winner' and 'loser' tensors of one "
                                             f"shape; got {shape}")
                shapes.setdefault(shape["winner"], where)
                if len(shapes) > 1:
                    (first, at), = list(shapes.items())[:1]
                    raise common.ConfigError(f"{where}: latents of shape {shape['winner']}, but {at} has {first}; "
                                             f"every pair must have one shape (curated with one model config)")
                embeds.add(shape.get("prompt_embeds"))
                self.rows.append({"prompt": row["prompt"], "latents": path})
        if not self.rows:
            raise common.ConfigError(f"{', '.join(manifests)}: no pairs to train on")
        self.cached = None not in embeds and len(embeds) == 1

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        try:
            latents = load_file(row["latents"])
            item = {"winner": latents["winner"], "loser": latents["loser"], "prompt": row["prompt"]}
            return {**item, "prompt_embeds": latents["prompt_embeds"]} if self.cached else item
        except Exception as e:  # changed since it was checked; a worker's error reaches the user as one line too
            raise common.ConfigError(f"{row['latents']}: cannot read latents ({str(e).splitlines()[0][:120]}); "
                                     f"expected a safetensors file with 'winner' and 'loser' tensors") from None


def check_mp4(path, where):
    """Cheap, without decoding: the file is a whole MP4, its top-level boxes covering it exactly,
    with the movie header (moov) and the media data (mdat) a truncated or corrupt file lacks."""
    try:
        size = os.path.getsize(path)
        boxes, offset = set(), 0
        with open(path, "rb") as f:
            while offset < size:
                f.seek(offset)
                head = f.read(16)
                length, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if length == 1:
                    length = int.from_bytes(head[8:16], "big")
                elif length == 0:
                    length = size - offset
                if length < 8 or offset + length > size:
                    break
                boxes.add(kind)
                offset += length
    except OSError:
        raise common.ConfigError(f"{where}: {path} is missing; expected the MP4 curate.py wrote") from None
    if offset != size or not {b"ftyp", b"moov", b"mdat"} <= boxes:
        raise common.ConfigError(f"{where}: {path} is not a whole MP4 (corrupt or truncated)")


def pair_noise(objective, seed, micro_step, pairs, rank, world, shape):
    """Each pair's noise and timestep: drawn for the whole global batch (every process's pairs) from
    one generator of (seed, micro-step) and sliced to this process's, so the same pairs get the same
    draws however many processes share them (a 1-process run of the same effective batch trains the
    same student), and a resumed run draws what the uninterrupted one did, whatever the loaders read."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + micro_step * 1009)
    mine = slice(rank * pairs, (rank + 1) * pairs)
    noise = torch.randn((pairs * world, *shape), generator=gen)[mine]
    return noise, objective.sample_timesteps(pairs * world, gen)[mine]


def collate(rows):
    # Diffusion-DPO layout: the B winners first, then their B losers.
    latents = torch.stack([r["winner"] for r in rows] + [r["loser"] for r in rows])
    batch = {"latents": latents, "prompts": [r["prompt"] for r in rows]}
    return {**batch, "prompt_embeds": torch.stack([r["prompt_embeds"] for r in rows])} if "prompt_embeds" in rows[0] \
        else batch


CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(output_dir):
    """The steps of the finished checkpoints in `output_dir`, oldest first."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(int(m.group(1)) for d in names if (m := CHECKPOINT.fullmatch(d)))


def latest_checkpoint(output_dir):
    steps = checkpoints(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def check_resume(value):
    """--resume_from_checkpoint: None, 'latest', or an existing checkpoint-<step> folder."""
    if value in (None, "latest"):
        return value
    if not os.path.isdir(value) or not CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(value))):
        raise common.ConfigError(f"train.resume_from_checkpoint: {value}: expected 'latest' or an existing "
                                 f"checkpoint-<step> folder written by train_redpo.py")
    return os.path.abspath(value)


def save_checkpoint(accelerator, args, step):
    """save_state on every rank (rank-0-only hangs DeepSpeed), into a temporary folder renamed
    when complete; only then are checkpoints beyond checkpoints_total_limit deleted, oldest first,
    so a kill at any moment leaves at least one whole checkpoint."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"  # one run per folder (its lock); what a killed run left is removed first
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):  # the same step of an earlier run, resumed from before it
            shutil.rmtree(final)
        os.replace(tmp, final)
        if args.checkpoints_total_limit is not None:
            for old in checkpoints(args.output_dir)[:-args.checkpoints_total_limit]:
                shutil.rmtree(os.path.join(args.output_dir, f"checkpoint-{old}"))
    accelerator.wait_for_everyone()
    return final


def logged_step(line):
    """The step of a metrics.jsonl line; a line cut short by a kill or a full disk counts as unlogged."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def check_finite(accelerator, args, ok, what, step):
    """Stop, on every process at once, when the loss or the updated weights are not finite; the
    newest checkpoint was checked before it was saved, so it is named as the one to go on from."""
    if accelerator.gather(torch.tensor([ok], device=accelerator.device)).all():
        return
    last = latest_checkpoint(args.output_dir)
    resume = f"; to go on from it, add --resume_from_checkpoint {last}" if last else ""
    sys.exit(f"train: non-finite {what} at step {step}; last good checkpoint: {last or 'none'}{resume}. "
             f"Try a lower --learning_rate or --beta, or --mixed_precision bf16 (a rerun with other settings keeps "
             f"this folder's results in {os.path.join(args.output_dir, 'replaced')})")


def check_tracker(report_to):
    package = {"tensorboard": "tensorboard", "wandb": "wandb", "none": None}
    if report_to not in package:
        raise common.ConfigError(f"train.report_to: expected tensorboard, wandb or none; got {report_to!r}")
    if package[report_to] and importlib.util.find_spec(package[report_to]) is None:
        raise common.ConfigError(f"train.report_to: {report_to} is not installed; pip install {package[report_to]}, "
                                 f"or --report_to none")


def validate(accelerator, args, backend, student, step, prompts, pipe):
    """Sample the validation videos with the student: MP4s in <output_dir>/validation/step-<step>/,
    the same prompts and seeds every time, and to the tracker (frames side by side for
    TensorBoard, the MP4s for wandb)."""
    unet = accelerator.unwrap_model(student)
    unet.eval()
    with accelerator.autocast():  # the student trains in float32, the frozen parts run in the training dtype
        frames = backend.generate(backend.with_denoiser(pipe, unet), prompts, list(range(len(prompts))), args)
    unet.train()
    if not accelerator.is_main_process:  # a sharded student's other processes only lend their shards
        return []
    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    paths = []
    for i, (video, prompt) in enumerate(zip(frames, prompts)):
        paths.append(os.path.join(folder, f"{i}.mp4"))
        with common.atomic_path(paths[-1]) as tmp:
            common.write_video(tmp, video, fps=args.fps)
    common.atomic_write_json(os.path.join(folder, "prompts.json"), prompts)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, (video, prompt) in enumerate(zip(frames, prompts)):
                strip = video.transpose(1, 0, 2, 3).reshape(video.shape[1], -1, 3)  # (H, F*W, 3)
                tracker.writer.add_image(f"validation/{i}: {prompt}"[:120], strip, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Video(p, caption=q) for p, q in zip(paths, prompts)]}, step=step)
    return paths


def main(args):
    for key in ("output_dir", "student", "pairs"):
        if not getattr(args, key):
            raise common.ConfigError(f"--{key} is required (train.{key} in the config)")
    # Inputs first: nothing in the output folder is touched until they are all good.
    check_tracker(args.report_to)
    resume = check_resume(args.resume_from_checkpoint)
    dataset = PairDataset(args.pairs)
    models.read_student_meta(args.student)
    backend = stage.backend_of(args)
    if args.trainable not in backend.TRAINABLE:
        raise common.ConfigError(f"train.trainable: expected one of {', '.join(backend.TRAINABLE)} for backend "
                                 f"{args.backend}; got {args.trainable!r}")
    stage.check_models(args, backend.required_models(args), build=(backend.build_tiny,))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    with accelerator.main_process_first():  # the first to digest a model keeps the digest for the others
        made = provenance.made_from(args)
    if provenance.done(args.output_dir, made):
        accelerator.print(f"train: {args.output_dir} is done from this config and these inputs; skipping")
        return
    set_seed(args.seed)

    # Models: the student trains; the teacher M0 and the text encoder are frozen and stay outside prepare.
    dtype = common.weight_dtype(args.mixed_precision)
    teacher = models.load_model(backend, args, dtype=dtype).to(accelerator.device).eval().requires_grad_(False)
    student = models.load_model(backend, args, student=args.student)
    params = models.set_trainable(backend, student, args.trainable)
    # The DPO term compares the student with the reference, which runs without dropout (VC2's
    # temporal convolutions have some): with it, equal weights would give unequal predictions.
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if args.gradient_checkpointing:
        backend.enable_checkpointing(student)
    text_encoder, tokenizer = None, None  # pairs curated before prompt embeddings were stored: encoded here
    if not dataset.cached:
        text_encoder, tokenizer = backend.load_text_encoder(args, dtype=dtype)
        text_encoder.to(accelerator.device)
    objective = backend.objective(args)  # noising, timesteps and target: DDPM or flow matching

    aside = provenance.start(accelerator, args.output_dir, made, args,
                             ["student", "checkpoint-*", "metrics.jsonl", "logs", "validation", "cost.json"])
    if resume not in (None, "latest") and not os.path.isdir(resume) and aside:  # moved aside with the rest
        resume = os.path.join(aside, os.path.relpath(resume, os.path.abspath(args.output_dir)))

    # Optimizer, data, schedule.
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    cost = stage.Ledger("train")
    cost.watch(teacher, role="teacher"), cost.watch(student, role="student")
    if models.is_sharded(accelerator):  # FSDP: each of the family's blocks a unit, the teacher sharded too
        models.wrap_by_blocks(accelerator, backend)
    student, optimizer, loader, lr_scheduler = accelerator.prepare(student, optimizer, loader, lr_scheduler)
    params = [p for p in student.parameters() if p.requires_grad]  # FSDP has replaced them by their shards
    if models.is_sharded(accelerator):
        teacher = models.shard_frozen(accelerator, teacher)
    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)

    # Resume: restore the state, then skip the batches this epoch has already seen.
    global_step, first_epoch, skip = 0, 0, 0
    path = latest_checkpoint(args.output_dir) if resume == "latest" else resume
    if resume == "latest" and path is None:
        accelerator.print("train: no checkpoint to resume from; starting fresh")
    elif path is not None:
        accelerator.load_state(path)
        global_step = int(CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path))).group(1))
        first_epoch = global_step // updates_per_epoch
        skip = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
        accelerator.print(f"train: resumed from {path} (step {global_step})")
    log = None
    if accelerator.is_main_process:
        # The log holds the steps of this run's history only: what a killed run logged after its
        # last checkpoint is dropped, in metrics.jsonl and (purge_step) in TensorBoard.
        log = os.path.join(args.output_dir, "metrics.jsonl")
        kept = [r for r in (open(log).read().splitlines() if os.path.exists(log) else []) if logged_step(r) <= global_step]
        common.atomic_write_text(log, "".join(r + "\n" for r in kept))
        log = open(log, "a")
        if args.report_to != "none":
            accelerator.init_trackers("vip", config={k: v for k, v in vars(args).items()
                                                     if isinstance(v, (int, float, str, bool))},
                                      init_kwargs={"tensorboard": {"purge_step": global_step + 1}})

    accelerator.print(f"train: {len(dataset)} pairs, {args.max_train_steps} steps, effective batch "
                      f"{args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps} pairs, "
                      f"loss {args.loss_type} (beta {args.beta}, w_sft {args.w_sft})")
    micro_step = global_step * args.gradient_accumulation_steps
    validation_prompts = args.validation_prompts or [row["prompt"] for row in dataset.rows[:args.num_validation_videos]]
    validation_prompts, validation_pipe = validation_prompts[:args.num_validation_videos], None
    bar = tqdm(total=args.max_train_steps, initial=global_step, desc="train", disable=not accelerator.is_main_process)
    try:  # closed before any exit, so a stop's message is the last line
        for epoch in range(first_epoch, num_epochs):
            student.train()
            loader.set_epoch(epoch)  # the shuffle of epoch k is fixed by (seed, k), resumed or not
            epoch_loader = loader
            if epoch == first_epoch and skip:
                epoch_loader = accelerator.skip_first_batches(loader, skip)
                epoch_loader.set_epoch(epoch)
            for batch in epoch_loader:
                if global_step >= args.max_train_steps:  # before the update, so a resumed run never takes one more
                    break
                with accelerator.accumulate(student):
                    latents = batch["latents"]  # (2B, C, F, h, w): winners then losers
                    n = latents.shape[0] // 2
                    noise, timesteps = pair_noise(objective, args.seed, micro_step, n, accelerator.process_index,
                                                  accelerator.num_processes, latents.shape[1:])
                    micro_step += 1
                    noise = noise.to(latents).repeat(2, 1, 1, 1, 1)  # one per pair: winner and loser share it
                    timesteps = timesteps.to(latents.device).repeat(2)
                    noisy = objective.add_noise(latents, noise, timesteps)
                    target = objective.target(latents, noise, timesteps)
                    with torch.no_grad():
                        text = batch["prompt_embeds"].to(accelerator.device) if dataset.cached else \
                            backend.encode_prompts(text_encoder, tokenizer, batch["prompts"], accelerator.device)
                        text = text.repeat(2, *[1] * (text.dim() - 1))  # the same prompt for winner and loser
                        ref_pred = backend.predict(teacher, noisy.to(dtype), timesteps, text.to(dtype))  # both terms'
                    model_pred = backend.predict(student, noisy, timesteps, text)
                    loss, metrics = common.redpo_loss(model_pred, ref_pred, target, beta=args.beta, w_sft=args.w_sft,
                                                      loss_type=args.loss_type)
                    check_finite(accelerator, args, math.isfinite(metrics["loss"]), f"loss ({metrics['loss']})",
                                 global_step + 1)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                if accelerator.sync_gradients:
                    global_step += 1
                    # The updated weights, before anything saves them: a checkpoint is always a good one.
                    check_finite(accelerator, args, all(bool(models.local(p.detach()).isfinite().all()) for p in params),
                                 "weights", global_step)
                    bar.update(1)
                    metrics["lr"] = lr_scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
                    if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                        accelerator.log(metrics, step=global_step)
                        if log:
                            log.write(json.dumps({"step": global_step, **metrics}) + "\n")
                            log.flush()
                    if global_step % args.checkpointing_steps == 0:
                        save_checkpoint(accelerator, args, global_step)
                    # A sharded student generates on every process (each call gathers its shards); a whole one on the main.
                    if args.validation_steps and global_step % args.validation_steps == 0 and (
                            accelerator.is_main_process or models.is_sharded(accelerator)):
                        if validation_pipe is None:  # the frozen VAE and text encoder, loaded on first use
                            validation_pipe = backend.load_pipeline(args, teacher, accelerator.device, dtype)
                        validate(accelerator, args, backend, student, global_step, validation_prompts, validation_pipe)
            if global_step >= args.max_train_steps:
                break
    finally:
        bar.close()

    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(student)  # on every rank: FSDP gathers the shards here
    if accelerator.is_main_process:
        models.save_student(backend, accelerator.unwrap_model(student), os.path.join(args.output_dir, "student"), args,
                            weights=args.trainable, state=state,
                            extra={"parent": args.student, "steps": global_step, "loss_type": args.loss_type,
                                   "beta": args.beta, "w_sft": args.w_sft, "pairs": args.pairs})
        print(f"train: saved {args.output_dir}/student after {global_step} steps")
        log.close()
    cost.write(accelerator, args.output_dir)
    if accelerator.is_main_process:
        provenance.finish(args.output_dir, made, ["student"])
    # DDP's reducer holds the process group and, freed at return, would destroy it holding the GIL
    # while gloo's threads may still need the GIL to drop the ledger's gathered tensors: a deadlock
    # (pytorch/pytorch#56297). Freed here, the group goes in end_training, which lets go of the GIL.
    del student
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    common.run_main(main, parse_args)
