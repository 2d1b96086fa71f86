"""Benchmark: how far VideoCrafter2's sampling drifts when its UNet runs in bf16 instead of fp32.

    python benchmarks/vc2_precision.py                # tiny random VC2 (the tiny_videocrafter2 config's), CPU
    python benchmarks/vc2_precision.py --device cuda --model weights/videocrafter2   # a converted real one

The same prompts, initial noise and DDIM noise for both: the sampler's state, guidance and update
stay fp32 either way (as in the official code); only the UNet's weights and activations change.
Per step count: the final latents' relative difference (max |bf16 - fp32| / max |fp32|, and the
same in RMS), and the decoded videos' mean and max difference in 8-bit levels.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/vc2_precision.py`
import bench  # noqa: E402
from backends import videocrafter2 as vc2  # noqa: E402

PROMPTS = ["a corgi running on the beach", "an astronaut riding a horse on the moon"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a converted VC2 folder (default: a tiny random one, built here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "runs" / "bench" / "vc2_precision.json"))
    args = p.parse_args(argv)
    args.command = " ".join(["python", "benchmarks/vc2_precision.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def main(args):
    folder = args.model or os.path.join(tempfile.mkdtemp(), "vc2")
    if args.model is None:
        vc2.build_tiny_checkpoint(folder)
    model_args = argparse.Namespace(pretrained_model_name_or_path=folder)
    unet32 = vc2.VideoCrafter2UNet.from_pretrained(folder, subfolder="unet").to(args.device).eval()
    unet16 = vc2.VideoCrafter2UNet.from_pretrained(folder, subfolder="unet", torch_dtype=torch.bfloat16).to(args.device).eval()
    text_encoder, tokenizer = vc2.load_text_encoder(model_args)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(args.device)
    pipe = vc2.VideoCrafter2Pipeline(vae, text_encoder.to(args.device), tokenizer, unet32, vc2.scheduler_of())
    text = vc2.encode_prompts(text_encoder, tokenizer, PROMPTS, args.device)
    uncond = vc2.encode_prompts(text_encoder, tokenizer, [""] * len(PROMPTS), args.device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    rows = []
    for steps in args.steps:
        for seed in args.seeds:
            out = {}
            for name, unet in (("fp32", unet32), ("bf16", unet16)):
                gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(len(PROMPTS))]
                x_t = torch.cat([torch.randn(1, 4, args.frames, args.height // factor, args.width // factor, generator=g)
                                 for g in gens]).to(args.device)
                with torch.no_grad():
                    latents = vc2.sample(unet, pipe.scheduler, text, uncond, x_t, fps=28, num_inference_steps=steps,
                                         guidance_scale=12.0, eta=1.0, generator=gens)
                    video = pipe.decode_latents(latents)
                out[name] = latents.float().cpu(), ((video.clamp(-1, 1) + 1) * 127.5).round().cpu()
            (a, va), (b, vb) = out["fp32"], out["bf16"]
            rows.append({"steps": steps, "seed": seed,
                         "latents_max_rel": ((b - a).abs().max() / a.abs().max()).item(),
                         "latents_rms_rel": ((b - a).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item(),
                         "video_mean_levels": (vb - va).abs().mean().item(), "video_max_levels": (vb - va).abs().max().item()})
    print(f"device: {bench.describe_device(args.device)}; model: {args.model or 'tiny random VC2'}")
    print(bench.markdown_table(["steps", "seed", "latents max rel", "latents RMS rel", "video mean (levels)",
                                "video max (levels)"],
                               [[r["steps"], r["seed"], f"{r['latents_max_rel']:.4f}", f"{r['latents_rms_rel']:.4f}",
                                 f"{r['video_mean_levels']:.2f}", f"{r['video_max_levels']:.0f}"] for r in rows]))
    args.size, args.dtype, args.warmup, args.iters = "tiny" if args.model is None else args.model, "bf16 vs fp32", 0, 1
    return bench.write_results(args, "vc2_precision", rows)


if __name__ == "__main__":
    main(parse_args())
