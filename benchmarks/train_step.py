"""Benchmark: the ReDPO training step against a naive Diffusion-DPO step, and against the machine's
bf16 matmul rate measured in the same run.

    python benchmarks/train_step.py --compile --batch_search                 # GPU: full size, bf16
    nice -n 19 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python benchmarks/train_step.py --size tiny --device cpu              # CPU: tiny, float32

Full size is SD1.5's UNet + motion adapter v1.5-2 with random weights from the public configs,
one pair (a winner and a loser, each 16 frames of 64x64 latents = 512x512 video). One step is the
teacher's and the student's forward, the loss, backward, gradient clipping and an AdamW update:
what train_redpo.py does per batch, minus the text encoder (77 tokens per prompt; the embeddings are
random inputs here). The student is the teacher with --remove's motion modules removed.

Variants (rows):
  naive           Diffusion-DPO written plainly: the student called on winners, then on losers; the
                  reference (the teacher, fp32 weights, no_grad) called per loss term: on winners
                  and losers for DPO, on winners again for SFT; the loss written out here
  teacher_once    the teacher in the compute dtype under inference_mode, one call on winners and
                  losers, its prediction shared by both terms (student still called twice)
  redpo           + winners and losers in one student call, common.redpo_loss: train_redpo.py's step
  redpo_ckpt      + diffusers' gradient checkpointing (it covers resnets and spatial transformers)
  redpo_ckpt_all  + the motion modules checkpointed too (diffusers does not)
  unet            redpo, training the whole UNet instead of the motion modules
  unet_ckpt       unet + diffusers' gradient checkpointing
  math_attention  redpo with diffusers' classic attention (scores materialised) instead of SDPA
  compile         redpo with torch.compile on student and teacher (only with --compile)

FLOPs are counted with torch.utils.flop_counter on one real step of each variant (checkpointing's
recomputed forward included; on a CPU with the math attention kernel, the fused one having no
formula). Step time is the median of --iters (min beside it: on a shared machine the least
disturbed); TFLOP/s = counted FLOPs / median step time; its fraction is of the matmul rate measured
in this run. Peak memory: CUDA's allocator peak over the timed steps; on a CPU, the peak of live
tensor storage over one step (weights, inputs, activations, gradients, optimizer state). The
teacher in the compute dtype stays in device memory in every row, and the naive row adds its fp32
copy. --batch_search doubles the pairs per step until memory runs out. Prints a markdown table;
writes a JSON with device, command and date (--output). --flops_only counts on the meta device and
times nothing (the full-size FLOPs without a GPU):

    python benchmarks/train_step.py --flops_only
"""

import argparse
import copy
import gc
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import common  # noqa: E402
import models  # noqa: E402
from backends import animatediff  # noqa: E402

BASE = dict(loss="redpo", trainable="motion_modules", checkpointing=None, attention="sdpa", compile=False)
VARIANTS = {
    "naive": dict(BASE, loss="naive"),
    "teacher_once": dict(BASE, loss="teacher_once"),
    "redpo": dict(BASE),
    "redpo_ckpt": dict(BASE, checkpointing="diffusers"),
    "redpo_ckpt_all": dict(BASE, checkpointing="all"),
    "unet": dict(BASE, trainable="unet"),
    "unet_ckpt": dict(BASE, trainable="unet", checkpointing="diffusers"),
    "math_attention": dict(BASE, attention="math"),
    "compile": dict(BASE, compile=True),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_common_args(parser)
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "compile"),
                        help="comma-separated rows to run (naive first: the others are compared with it)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step (one pair = 2 videos)")
    parser.add_argument("--batch_search", action="store_true",
                        help="also double the pairs per step of --search_variants until memory runs out")
    parser.add_argument("--search_variants", default="redpo,redpo_ckpt,redpo_ckpt_all")
    parser.add_argument("--max_pairs", type=int, default=None, help="stop the search here (default: 64 cuda, 2 cpu)")
    parser.add_argument("--remove", default="mid_block.motion_modules.0",
                        help="motion modules the student lacks (comma-separated; '' for none)")
    parser.add_argument("--beta", type=float, default=2500.0, help="DPO temperature, as train_redpo.py")
    parser.add_argument("--w_sft", type=float, default=1.0, help="SFT weight, as train_redpo.py")
    args = parser.parse_args(argv)
    args = bench.finish_args(args, "train_step", argv)
    args.variants = [v for v in args.variants.split(",") if v] + (["compile"] if args.compile else [])
    args.search_variants = [v for v in args.search_variants.split(",") if v]
    for v in args.variants + args.search_variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; variants: {', '.join(VARIANTS)}")
    args.remove = [b for b in args.remove.split(",") if b]
    args.max_pairs = args.max_pairs or (64 if args.device.startswith("cuda") else 2)
    return args


# -----------------------------------------------------------------------------
# Inputs and models


def make_batch(args, pairs, seed=0):
    """A Diffusion-DPO batch: B winners then their B losers, each pair sharing noise, timestep and
    prompt; text embeddings repeated per frame, as train_redpo.py feeds UNetMotionModel."""
    from diffusers import DDPMScheduler

    size = bench.SIZES[args.size]
    frames, h, w = size["num_frames"], size["height"] // 8, size["width"] // 8
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2 * pairs, 4, frames, h, w, generator=g)
    noise = torch.randn(pairs, 4, frames, h, w, generator=g).repeat(2, 1, 1, 1, 1)
    timesteps = torch.randint(0, 1000, (pairs,), generator=g).repeat(2)
    dim = size["unet"]["cross_attention_dim"]
    text = torch.randn(pairs, 77, dim, generator=g).repeat(2, 1, 1).repeat_interleave(frames, dim=0)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    to = lambda t: t.to(args.device)  # noqa: E731
    return {"noisy": to(noisy), "timesteps": to(timesteps), "text": to(text), "target": to(noise), "frames": frames}


def build_models(args):
    """The teacher in the compute dtype (ReDPO's reference, on the device) and its fp32 master copy
    (the student's initialisation and the naive reference), kept on the CPU next to a GPU so that
    only the naive row holds an fp32 teacher in device memory."""
    teacher = bench.build_unet(args.size, args.device, torch.float32, args.seed).eval().requires_grad_(False)
    dtype = bench.torch_dtype(args.dtype)
    teacher_lp = teacher if dtype == torch.float32 else copy.deepcopy(teacher).to(dtype)
    master = teacher if dtype == torch.float32 or args.device == "meta" else teacher.to("cpu")
    return {"master": master, "teacher": teacher_lp, "dtype": dtype}


def set_attention(unet, kind):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def make_student(nets, spec, args):
    student = copy.deepcopy(nets["master"]).to(args.device)
    models.remove_blocks(animatediff, student, args.remove)
    student.train()
    for name, p in student.named_parameters():
        p.requires_grad_(spec["trainable"] == "unet" or ".motion_modules." in name)
    if spec["checkpointing"]:
        student.enable_gradient_checkpointing()
    if spec["checkpointing"] == "all":
        models.checkpoint_blocks(animatediff, student)
    set_attention(student, spec["attention"])
    return student


# -----------------------------------------------------------------------------
# The two losses


def _split(batch):
    n = batch["noisy"].shape[0] // 2
    nf = n * batch["frames"]
    x, t, c, y = batch["noisy"], batch["timesteps"], batch["text"], batch["target"]
    return (x[:n], t[:n], c[:nf], y[:n]), (x[n:], t[n:], c[nf:], y[n:])


def naive_loss(student, teacher_fp32, batch, beta, w_sft, autocast):
    """Diffusion-DPO as commonly written: one call per input and per term, reference in fp32."""
    (x_w, t_w, c_w, y_w), (x_l, t_l, c_l, y_l) = _split(batch)
    with autocast:
        pred_w = student(x_w, t_w, c_w).sample.float()
        pred_l = student(x_l, t_l, c_l).sample.float()
    with torch.no_grad():
        ref_w = teacher_fp32(x_w, t_w, c_w).sample
        ref_l = teacher_fp32(x_l, t_l, c_l).sample

    def mse(a, b):  # per sample, over C, F, H and W
        return (a - b).pow(2).mean(dim=tuple(range(1, a.ndim)))

    logits = -beta * ((mse(pred_w, y_w) - mse(ref_w, y_w)) - (mse(pred_l, y_l) - mse(ref_l, y_l)))
    dpo = -F.logsigmoid(logits).mean()
    with torch.no_grad():  # the SFT term's own reference call
        ref_sft = teacher_fp32(x_w, t_w, c_w).sample
    return dpo + w_sft * mse(pred_w, ref_sft).mean()


def redpo_step_loss(student, teacher, batch, beta, w_sft, autocast, dtype, batched=True):
    """train_redpo.py's step: the teacher once for both terms, winners and losers batched."""
    x, t, c = batch["noisy"], batch["timesteps"], batch["text"]
    with torch.inference_mode():
        ref = teacher(x.to(dtype), t, c.to(dtype)).sample
    with autocast:
        if batched:
            pred = student(x, t, c).sample
        else:
            (x_w, t_w, c_w, _), (x_l, t_l, c_l, _) = _split(batch)
            pred = torch.cat([student(x_w, t_w, c_w).sample, student(x_l, t_l, c_l).sample])
    if pred.is_meta:  # no values for redpo_loss's metrics; its elementwise math counts no FLOPs anyway
        return (pred.float() - ref.float()).pow(2).mean()
    return common.redpo_loss(pred, ref, batch["target"], beta=beta, w_sft=w_sft)[0]


def loss_closure(spec, student, teacher, batch, args):
    """The loss of a variant as a closure; `teacher` is the fp32 reference for the naive one."""
    device_type = torch.device(args.device).type
    dtype = bench.torch_dtype(args.dtype)
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if spec["loss"] == "naive":
        return lambda: naive_loss(student, teacher, batch, args.beta, args.w_sft, autocast)
    batched = spec["loss"] == "redpo"
    return lambda: redpo_step_loss(student, teacher, batch, args.beta, args.w_sft, autocast, dtype, batched)


# -----------------------------------------------------------------------------
# Measuring


def train_step(loss_fn, optimizer, params):
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def count_flops(step, device):
    """FLOPs of one step. On a CPU under the math attention kernel: the fused one has no formula."""
    counter = FlopCounterMode(display=False)
    with counter, (sdpa_kernel(SDPBackend.MATH) if torch.device(device).type == "cpu" else nullcontext()):
        step()
    return counter.get_total_flops()


def cpu_peak_bytes(step, alive):
    """Peak tensor memory of one step on a CPU, counted from the tensors `alive` before it. Apart
    from the FLOP count: under FlopCounterMode, recomputed checkpoints stay alive longer."""
    with bench.PeakLiveBytes(alive) as tracker:
        step()
    return tracker.peak


def run_variant(name, nets, args, pairs):
    spec = VARIANTS[name]
    batch = make_batch(args, pairs, args.seed)
    student = make_student(nets, spec, args)
    teacher = nets["teacher"]
    if spec["loss"] == "naive":
        teacher = copy.deepcopy(nets["master"]).to(args.device)
    set_attention(teacher, spec["attention"])
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    step = lambda: train_step(loss_closure(spec, student, teacher, batch, args), optimizer, params)  # noqa: E731
    flops, peak = count_flops(step, args.device), None
    if args.flops_only:
        return {"variant": name, "pairs": pairs, "flops": flops, "trainable_params": sum(p.numel() for p in params)}
    if torch.device(args.device).type == "cpu":
        alive = [*student.parameters(), *student.buffers(), *teacher.parameters(), *teacher.buffers(),
                 *(t for state in optimizer.state.values() for t in state.values()), *batch.values()]
        peak = cpu_peak_bytes(step, [t for t in alive if isinstance(t, torch.Tensor)])
    if spec["compile"]:  # counted eagerly above: compiling changes kernels, not the arithmetic
        student, teacher = torch.compile(student), torch.compile(teacher)
    bench.peak_memory_reset(args.device)
    times = bench.measure(step, args.device, args.warmup, args.iters)
    if torch.device(args.device).type == "cuda":
        peak = bench.peak_memory(args.device)
    seconds = bench.median(times)
    return {"variant": name, "pairs": pairs, "step_s": seconds, "times_s": times, "flops": flops,
            "flops_per_s": flops / seconds, "peak_bytes": peak, "trainable_params": sum(p.numel() for p in params)}


def try_variant(name, nets, args, pairs):
    """run_variant, or an 'out of memory' row: the batch search ends on one."""
    try:
        return run_variant(name, nets, args, pairs)
    except torch.OutOfMemoryError:
        pass
    gc.collect()  # outside the except block, so the traceback's tensors are already gone
    torch.cuda.empty_cache()
    return {"variant": name, "pairs": pairs, "oom": True}


def table(rows, limits, args):
    unit, prefix = (1e12, "T") if args.size == "full" else (1e9, "G")
    if limits is None:  # counted only
        return bench.markdown_table(["variant", "pairs", "trainable params (M)", f"{prefix}FLOP/step"], [
            [r["variant"], r["pairs"], f"{r['trainable_params'] / 1e6:.2f}", f"{r['flops'] / unit:.2f}"] for r in rows])
    mem_unit, mem_name = (2 ** 30, "GiB") if args.size == "full" else (2 ** 20, "MiB")
    naive = next((r for r in rows if r["variant"] == "naive" and not r.get("oom")), None)
    out = []
    for r in rows:
        if r.get("oom"):
            out.append([r["variant"], r["pairs"], "out of memory"] + ["-"] * 6)
            continue
        per_naive = naive["step_s"] * r["pairs"] / naive["pairs"] / r["step_s"] if naive else None
        out.append([r["variant"], r["pairs"], f"{r['step_s'] * 1e3:.1f}", f"{min(r['times_s']) * 1e3:.1f}",
                    bench.fmt(per_naive, ".2f"), bench.fmt(r["peak_bytes"] and r["peak_bytes"] / mem_unit, ".1f"),
                    f"{r['flops'] / unit:.2f}", f"{r['flops_per_s'] / unit:.2f}",
                    f"{100 * r['flops_per_s'] / limits['matmul_flops']:.1f}"])
    header = ["variant", "pairs", "step (ms)", "min (ms)", "x naive (pairs/s)", f"peak mem ({mem_name})",
              f"{prefix}FLOP/step", f"{prefix}FLOP/s", "% of matmul rate"]
    return bench.markdown_table(header, out)


def main(args):
    torch.manual_seed(args.seed)
    dtype = bench.torch_dtype(args.dtype)
    limits = None if args.flops_only else bench.limits(args.device, dtype)
    nets = build_models(args)
    rows = [try_variant(name, nets, args, args.pairs) for name in args.variants]
    for name in args.search_variants if args.batch_search else []:
        pairs = 2 * args.pairs
        while pairs <= args.max_pairs:
            rows.append(try_variant(name, nets, args, pairs))
            if rows[-1].get("oom"):
                break
            pairs *= 2
    print(f"device: {bench.describe_device(args.device)}; {args.size} size, {args.dtype}")
    if limits:
        print(f"matmul {limits['matmul_flops'] / 1e12:.3f} TFLOP/s ({limits['matmul_dtype']}), "
              f"copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    print(table(rows, limits, args))
    return bench.write_results(args, "train_step", rows, limits=limits, remove=args.remove, beta=args.beta,
                               w_sft=args.w_sft)


if __name__ == "__main__":
    main(parse_args())
