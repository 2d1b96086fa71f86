"""Benchmark: one ReDPO training step on a Wan transformer (--model 1.3b, 5b, 14b), and what it holds in memory.

    python benchmarks/wan_step.py                                   # GPU: full size, 81x480x832, bf16
    python benchmarks/wan_step.py --model 14b --num_layers 4        # GPU: the 14B at reduced depth
    python benchmarks/wan_step.py --flops_only                      # the full-size FLOPs, no GPU
    OMP_NUM_THREADS=1 python benchmarks/wan_step.py --device cpu --num_layers 2 --num_frames 5 \\
        --height 96 --width 160 --iters 1                           # CPU: full width, fewer layers and tokens

Full size is the 1.3B's published config with random weights, one pair (a winner and a loser, each
81 frames of 480x832 = 21 x 60 x 104 latents, 32,760 tokens after the 1x2x2 patches) and 512 text
tokens of UMT5's 4096 channels (cached at curation: no text encoder in the step). One step is what
train_redpo.py does per batch: the bf16 teacher under inference_mode on winners and losers, the
student (trainable, its master weights in --weights) on both under autocast, common.redpo_loss,
backward, gradient clipping, AdamW. Rows: with and without diffusers' gradient checkpointing.

Peak memory is CUDA's allocator peak (on a CPU, the peak of live tensor storage over the step),
printed beside what the README's arithmetic predicts for the same size (`predicted_bytes`): model
state, teacher and the checkpointed activations. Step time is the median of --iters.
"""

import argparse
import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import common  # noqa: E402
import models  # noqa: E402
from backends import wan  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_common_args(p)
    p.set_defaults(size="full")
    p.add_argument("--model", choices=sorted(MODELS), default="1.3b",
                   help="whose published config, at full width: 1.3b (Wan2.1), 5b (Wan2.2-TI2V, 48 latent channels), 14b")
    p.add_argument("--num_layers", type=int, default=None, help="transformer blocks (default: the model's)")
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text_length", type=int, default=512)
    p.add_argument("--pairs", type=int, default=1, help="pairs per step (one pair = 2 videos)")
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                   help="the student's master weights (and so its gradients and AdamW states)")
    p.add_argument("--variants", default="ckpt,no_ckpt", help="ckpt: diffusers' gradient checkpointing; no_ckpt: none")
    p.add_argument("--beta", type=float, default=50.0)
    p.add_argument("--w_sft", type=float, default=1.0)
    args = bench.finish_args(p.parse_args(argv), "wan_step", argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.num_layers = args.num_layers or MODELS[args.model]["num_layers"]
    return args


# The published transformer configs (backends/wan.py); a latent of the 5B spans 16 pixels a side, else 8.
MODELS = {"1.3b": wan.CONFIG_1_3B, "5b": wan.CONFIG_5B, "14b": wan.CONFIG_14B}


def latents(config, args):
    """(frames, h, w) of a video's latents."""
    factor = 16 if config["in_channels"] == 48 else 8
    return (args.num_frames - 1) // 4 + 1, args.height // factor, args.width // factor


def tokens(args, config=wan.CONFIG_1_3B):
    frames, h, w = latents(config, args)
    return frames * (h // 2) * (w // 2)  # the 1x2x2 patches


def activation_bytes(config, args, checkpointing):
    """What the backward holds beyond the weights: each block's bf16 input kept and one block
    recomputed at a time with checkpointing, every block's activations without."""
    n, layers = 2 * args.pairs * tokens(args, config), args.num_layers
    d, f = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    # One block's backward at its peak: q, k, v, outputs, norms and modulated copies (12d, bf16), the
    # FFN's hidden before and after GELU (2f, bf16), fp32 residual sums (4d).
    block = n * (12 * d * 2 + 2 * f * 2 + 4 * d * 4)
    # 30 d bytes a token a block without: measured (2 blocks of full width, 2,520 tokens a video, bf16)
    return layers * n * d * 2 + block if checkpointing else layers * n * 30 * d


def predicted_bytes(params, config, args, checkpointing):
    """The README's arithmetic: student state, bf16 teacher, and the larger of the backward's
    activations and AdamW's step, whose foreach ops hold one more fp32 copy of the weights (4 P;
    measured: the 14B's width at one block, 12.87 GB against 12.85)."""
    master = 4 if args.weights == "fp32" else 2
    state = params * (master + master + 2 * master)  # weights, gradients, AdamW's two moments
    return state + params * 2 + max(activation_bytes(config, args, checkpointing), master * params)


def main(args):
    dtype = bench.torch_dtype(args.dtype)
    config = dict(MODELS[args.model] if args.size == "full" else wan.TINY_TRANSFORMER, num_layers=args.num_layers)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    with torch.device(device):
        teacher = WanTransformer3DModel(**config).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).to(torch.float32 if args.weights == "fp32" else torch.bfloat16)
    teacher = teacher.to(torch.bfloat16)
    student.train().requires_grad_(True)
    params = models.count_parameters(student)
    pairs, lat, channels = args.pairs, latents(config, args), config["in_channels"]
    g = torch.Generator().manual_seed(args.seed)
    make = (lambda *s: torch.empty(*s, device=device)) if args.device == "meta" else (lambda *s: torch.randn(*s, generator=g).to(device))
    x0 = make(2 * pairs, channels, *lat)
    noise = make(pairs, channels, *lat).repeat(2, 1, 1, 1, 1)
    text = make(pairs, args.text_length, config["text_dim"]).repeat(2, 1, 1)
    objective = common.FlowMatching(shift=3.0, sampling="logit_normal")
    t = objective.sample_timesteps(pairs, torch.Generator().manual_seed(args.seed)).repeat(2).to(device)
    noisy, target = objective.add_noise(x0, noise, t), objective.target(x0, noise, t)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, foreach=args.device != "meta")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and args.device != "meta" else nullcontext()

    def step():
        with torch.inference_mode():
            ref = wan.predict(teacher, noisy.to(torch.bfloat16), t, text.to(torch.bfloat16))
        with autocast:
            pred = wan.predict(student, noisy, t, text)
        if pred.is_meta:
            loss = (pred.float() - ref.float().clone()).pow(2).mean()
        else:
            loss = common.redpo_loss(pred, ref.clone(), target, beta=args.beta, w_sft=args.w_sft)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0, foreach=args.device != "meta")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = []
    for variant in args.variants:
        if variant == "ckpt":
            student.enable_gradient_checkpointing()
        else:
            student.disable_gradient_checkpointing()
        row = {"variant": variant, "params": params, "tokens_per_video": tokens(args, config), "pairs": pairs,
               "predicted_bytes": predicted_bytes(params, config, args, variant == "ckpt")}
        if args.device == "meta":
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            rows.append({**row, "flops": counter.get_total_flops()})
            continue
        bench.peak_memory_reset(device)
        states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]  # an earlier variant's
        live = bench.PeakLiveBytes([*student.parameters(), *teacher.parameters(), *states, x0, noise, text, noisy,
                                    target]) if device.type == "cpu" else nullcontext()
        try:
            with live:
                step()  # the first step allocates AdamW's states: the peak of every later one
            times = bench.measure(step, device, args.warmup, args.iters)
        except torch.OutOfMemoryError:
            rows.append({**row, "oom": True})
            continue
        peak = bench.peak_memory(device) or live.peak
        rows.append({**row, "step_s": bench.median(times), "step_s_min": min(times), "peak_bytes": peak})
    gb = lambda b: bench.fmt(b and b / 1e9, ".2f")  # noqa: E731
    print(bench.markdown_table(
        ["variant", "params (M)", "tokens / video", "pairs", "TFLOP / step", "step (s)", "peak (GB)", "predicted (GB)"],
        [[r["variant"], f"{r['params'] / 1e6:.2f}", r["tokens_per_video"], r["pairs"],
          bench.fmt(r.get("flops") and r["flops"] / 1e12, ".1f"), "OOM" if r.get("oom") else bench.fmt(r.get("step_s"), ".3f"),
          gb(r.get("peak_bytes")), gb(r["predicted_bytes"])] for r in rows]))
    return bench.write_results(args, "wan_step", rows, weights=args.weights, model=args.model, num_layers=args.num_layers,
                               video=[args.num_frames, args.height, args.width])


if __name__ == "__main__":
    main(parse_args())
