"""Benchmark: whole transformer blocks, or their sub-layers (self-attention, cross-attention,
feed-forward), as Wan's pruning candidates: which set is better graded?

    python benchmarks/wan_candidates.py                                      # the tiny random Wan
    python benchmarks/wan_candidates.py --model weights/world_wan --frames 8 --size 16 --text 8   # the world's DiT

A candidate's cost here is how much removing it alone changes the transformer's output (the
relative RMS change of its velocity, on fixed noisy inputs at three noise levels): the denoiser-side
proxy of what prune.py measures with videos and a reward. Removing a sub-layer is zeroing its
output (its update to the hidden states), which is exact for these residual branches. For each
unit, the cheapest candidates are removed together until a share of the blocks' parameters is
gone, and the joint output change is measured: the lower the change at the same parameters, the
better the set lets a budget be met.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/wan_candidates.py`
import bench  # noqa: E402
import models  # noqa: E402
from backends import wan  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402

SUBLAYERS = {"attn1": lambda b: b.attn1.to_out[0], "attn2": lambda b: b.attn2.to_out[0], "ffn": lambda b: b.ffn.net[-1]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a Wan transformer folder (its transformer/); default: the tiny random Wan")
    p.add_argument("--frames", type=int, default=3, help="latent frames")
    p.add_argument("--size", type=int, default=8, help="latent height and width")
    p.add_argument("--text", type=int, default=32, help="text tokens")
    p.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.2, 0.34, 0.5])
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "runs" / "bench" / "wan_candidates.json"))
    args = p.parse_args(argv)
    args.command = " ".join(["python", "benchmarks/wan_candidates.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def zeroed(transformer, names):
    """A copy of `transformer` without the named candidates: blocks by an identity, sub-layers by a zero update."""
    other = copy.deepcopy(transformer)
    blocks = [n for n in names if n.count(".") == 1]
    models.remove_blocks(wan, other, blocks)
    for name in set(names) - set(blocks):
        _, i, kind = name.split(".")
        linear = SUBLAYERS[kind](other.blocks[int(i)])
        torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
    return other


def params_of(transformer, name):
    if name.count(".") == 1:
        return models.count_parameters(transformer.get_submodule(name))
    _, i, kind = name.split(".")
    return models.count_parameters(getattr(transformer.blocks[int(i)], kind))


def main(args):
    if args.model:
        transformer = WanTransformer3DModel.from_pretrained(args.model, subfolder="transformer").eval()
    else:
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(**wan.TINY_TRANSFORMER).eval()
        for p in transformer.parameters():
            torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    g = torch.Generator().manual_seed(0)
    c = transformer.config
    x = torch.randn(3, c.in_channels, args.frames, args.size, args.size, generator=g)
    t, text = torch.tensor([100.0, 500.0, 900.0]), torch.randn(3, args.text, c.text_dim, generator=g)

    def out(model):
        with torch.no_grad():
            return model(x, t, text).sample

    full = out(transformer)
    change = lambda model: ((out(model) - full).pow(2).mean() / full.pow(2).mean()).sqrt().item()  # noqa: E731
    blocks = [f"blocks.{i}" for i in range(len(transformer.blocks))]
    units = {"block": blocks, "sublayer": [f"{b}.{k}" for b in blocks for k in SUBLAYERS]}
    total = sum(params_of(transformer, b) for b in blocks)
    rows, singles = [], {}
    for unit, names in units.items():
        cost = {n: change(zeroed(transformer, [n])) for n in names}
        singles[unit] = {n: {"cost": cost[n], "params": params_of(transformer, n)} for n in names}
        ranked = sorted(names, key=cost.get)
        for share in args.shares:
            chosen, gone = [], 0
            for n in ranked:  # as prune.py's parameter budget: the cheapest first until the share is gone
                if gone >= share * total:
                    break
                chosen.append(n)
                gone += params_of(transformer, n)
            rows.append({"unit": unit, "share": share, "removed": len(chosen), "params_removed": gone / total,
                         "output_change": change(zeroed(transformer, chosen)), "chosen": chosen})
    print(bench.markdown_table(["unit", "budget (share of block params)", "candidates removed", "params removed",
                                "output change (rel. RMS)"],
                               [[r["unit"], f"{r['share']:.2f}", r["removed"], f"{r['params_removed']:.3f}",
                                 f"{r['output_change']:.4f}"] for r in rows]))
    for unit, table in singles.items():
        costs = sorted(v["cost"] for v in table.values())
        print(f"{unit}: {len(costs)} candidates, single-removal cost min {costs[0]:.4f}, median "
              f"{costs[len(costs) // 2]:.4f}, max {costs[-1]:.4f}")
    args.size_name = args.model or "tiny random Wan"
    args.device, args.dtype, args.warmup, args.iters, args.size = "cpu", "fp32", 0, 1, args.size_name
    return bench.write_results(args, "wan_candidates", rows, singles=singles)


if __name__ == "__main__":
    main(parse_args())
