"""Benchmark: per-GPU memory of one ReDPO training step for each Wan (1.3B, Wan2.2-TI2V-5B, 14B) under
each accelerate config, by arithmetic, and which configs fit a GPU. One pair (winner and loser) of
each model's videos (81 frames at 480x832; the 5B 121 at 704x1280, its only size), bf16 compute,
fp32 master weights, gradient checkpointing, 512 cached text tokens.

    python benchmarks/wan_memory.py                       # 8 GPUs of 80 GB
    python benchmarks/wan_memory.py --gpus 16 --gpu_gb 141

The terms, P parameters, N GPUs (per GPU):
- student: fp32 weights, gradients and AdamW's two moments, 16 P; DDP adds its fp32 gradient buckets
  (4 P); ZeRO-2 keeps bf16 weights whole (2 P) and partitions the fp32 copy, gradients and moments
  (14 P / N); ZeRO-3 and FSDP partition all of it (16 P / N, FSDP's gradients fp32 as its masters);
  CPU offload moves the partitions (and ZeRO-3's and FSDP's weights) to host memory.
- unit buffers: ZeRO-3 and FSDP gather a block at a time in bf16 (and prefetch the next, 4 B_block),
  and reduce its fp32 gradients (4 B_block); ZeRO-2's reduce bucket, 5e8 elements in bf16 (1 GB).
- teacher: bf16, whole (2 P) where it stays outside the sharding (DDP, ZeRO), sharded like the
  student under FSDP (train_redpo.py does it: 2 P / N, plus its gathered block).
- activations: benchmarks/wan_step.py's arithmetic (each block's bf16 input kept, one block
  recomputed at a time), checked against measured CPU peaks at reduced depth (docs/wan.md); AdamW's
  step holds one more fp32 copy of the weights it updates, and the peak is the larger of the two.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import common  # noqa: E402
import wan_step  # noqa: E402

# model: (config name, frames, height, width)
VIDEOS = {"1.3b": (81, 480, 832), "5b": (121, 704, 1280), "14b": (81, 480, 832)}
CONFIGS = ("DDP", "ZeRO-2", "ZeRO-2 + offload", "ZeRO-3", "ZeRO-3 + offload", "FSDP", "FSDP + offload")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu_gb", type=float, default=80.0)
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "runs" / "bench" / "wan_memory.json"))
    args = p.parse_args(argv)
    args.command = " ".join(["python", "benchmarks/wan_memory.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def counts(config):
    """(P, one block's parameters), counted on the meta device from the published config."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.blocks[0].parameters())


def per_gpu(params, block, activations, n, config):
    """Bytes a GPU holds at a step's peak under `config` with `n` GPUs (see the module docstring):
    the backward's activations or AdamW's step (one more fp32 copy of the weights it holds, on the
    GPU unless offloaded), whichever is larger."""
    shard = lambda b: b / n  # noqa: E731
    step = 0 if config.endswith("offload") else 4 * params if config == "DDP" else shard(4 * params)
    units = 4 * block + 4 * block  # a block gathered in bf16 and its prefetched next; its fp32 gradients
    student = {"DDP": 16 * params + 4 * params,
               "ZeRO-2": 2 * params + shard(14 * params) + 1e9, "ZeRO-2 + offload": 2 * params + shard(2 * params) + 1e9,
               "ZeRO-3": shard(16 * params) + units, "ZeRO-3 + offload": units,
               "FSDP": shard(16 * params) + units, "FSDP + offload": units}[config]
    teacher = shard(2 * params) + 4 * block if config.startswith("FSDP") else 2 * params
    return student + teacher + max(activations, step)


def main(args):
    rows = []
    for model, (frames, height, width) in VIDEOS.items():
        config = wan_step.MODELS[model]
        params, block = counts(config)
        video = argparse.Namespace(num_frames=frames, height=height, width=width, pairs=1, weights="fp32",
                                   num_layers=config["num_layers"])
        activations = wan_step.activation_bytes(config, video, checkpointing=True)
        row = {"model": model, "params": params, "block_params": block, "tokens_per_video": wan_step.tokens(video, config),
               "activations_bytes": activations}
        row.update({c: per_gpu(params, block, activations, args.gpus, c) for c in CONFIGS})
        rows.append(row)
    fits = lambda b: f"{b / 1e9:.1f}" + ("" if b <= args.gpu_gb * 1e9 else " ✗")  # noqa: E731
    print(f"Per-GPU GB of one ReDPO step, {args.gpus} GPUs; ✗: over {args.gpu_gb:g} GB\n")
    print(bench.markdown_table(["model", "params (M)", "tokens / video", "activations (GB)", *CONFIGS],
                               [[r["model"], f"{r['params'] / 1e6:,.2f}", r["tokens_per_video"],
                                 f"{r['activations_bytes'] / 1e9:.1f}", *[fits(r[c]) for c in CONFIGS]] for r in rows]))
    common.atomic_write_json(args.output, {"benchmark": "wan_memory", "command": args.command, "gpus": args.gpus,
                                           "gpu_gb": args.gpu_gb, "rows": rows})


if __name__ == "__main__":
    main(parse_args())
