"""Shared pieces of the benchmarks: AnimateDiff built from the public configs (full size) or from the
tiny ones, the machine's own limits (matmul rate, copy bandwidth), timing with warm-up and medians,
and result files that carry their device, command and date.

Every benchmark runs the same code on a GPU (full size, bf16, CUDA events) and on a CPU at a small
scale (`--size tiny --device cpu`, float32, perf_counter)."""

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py`: the project lives one level up
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from backends.animatediff import TINY_ADAPTER, TINY_TEXT, TINY_UNET, TINY_VAE, tiny_clip_tokenizer  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()  # casting random models to bf16 warns about from_pretrained

# Public configs of SD1.5's UNet, VAE and text encoder (CLIP ViT-L/14) and of
# guoyww/animatediff-motion-adapter-v1-5-2 (the same as tests/test_animatediff.py).
SD15_UNET = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                 cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2, norm_num_groups=32,
                 in_channels=4, out_channels=4, sample_size=64, flip_sin_to_cos=True, freq_shift=0)
ADAPTER_V152 = dict(block_out_channels=[320, 640, 1280, 1280], motion_layers_per_block=2,
                    motion_mid_block_layers_per_block=1, motion_num_attention_heads=8, motion_norm_num_groups=32,
                    motion_max_seq_length=32, use_motion_mid_block=True)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
                sample_size=512, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")

# Video size of each scale: full is configs/animatediff.yaml's (16 frames at 512x512 = 64x64 latents),
# tiny is configs/tiny.yaml's.
SIZES = {
    "full": dict(unet=SD15_UNET, adapter=ADAPTER_V152, vae=SD15_VAE, text=SD15_TEXT,
                 num_frames=16, height=512, width=512, num_inference_steps=25),
    "tiny": dict(unet=TINY_UNET, adapter=TINY_ADAPTER, vae=TINY_VAE, text=TINY_TEXT,
                 num_frames=8, height=64, width=64, num_inference_steps=8),
}


def add_common_args(parser):
    """Flags every benchmark takes: scale, device, precision, timing."""
    cuda = torch.cuda.is_available()
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: SD1.5 + motion adapter v1.5-2 at 16x512x512; tiny: configs/tiny.yaml's models")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda | cpu (default: cuda if present)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="compute precision (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 3 on cuda, 1 on cpu)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs; the median is reported "
                                                                "(default: 10 on cuda, 5 on cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--flops_only", action="store_true",
                        help="count FLOPs and parameters on the meta device, time nothing: full size without a GPU")
    parser.add_argument("--output", default=None, help="JSON result file (default: runs/bench/<benchmark>-<size>.json)")


def finish_args(args, name, argv):
    """Fill the device-dependent defaults and record the command that made the results."""
    args.device = "meta" if args.flops_only else args.device
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.iters = (10 if cuda else 5) if args.iters is None else args.iters
    counted_only = "-flops" if args.device == "meta" else ""  # a file of its own beside the timed one
    args.output = args.output or str(ROOT / "runs" / "bench" / f"{name}-{args.size}{counted_only}.json")
    argv = sys.argv[1:] if argv is None else list(argv)
    args.command = shlex.join(["python", f"benchmarks/{name}.py", *argv])
    return args


def torch_dtype(name):
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def build_unet(size, device, dtype=torch.float32, seed=0):
    """A UNetMotionModel with random weights from the configs of `size`, built on `device`."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    cfg = SIZES[size]
    with torch.device("meta"):  # only the configs are needed from these two
        unet2d, adapter = UNet2DConditionModel(**cfg["unet"]), MotionAdapter(**cfg["adapter"])
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=False)  # PyTorch's default init
    return unet.to(dtype)


def build_pipeline(size, unet, device, dtype=torch.float32, seed=0):
    """An AnimateDiffPipeline around `unet` with a random VAE and text encoder of `size`, and
    AnimateDiff's DDIM settings (as backends/animatediff.py's). The tokenizer is the tiny byte-level
    one: every prompt is padded to 77 tokens, so it costs what CLIP's does."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = SIZES[size]
    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**cfg["text"], "bos_token_id": 512, "eos_token_id": 513,
                                                       "pad_token_id": 513}))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="linspace")
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(),
                               unet=unet, motion_adapter=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn, device):
    """Seconds of one call of fn(): CUDA events on a GPU (what the kernels took, not the host's
    queueing), perf_counter on a CPU."""
    if str(device).startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(fn, device, warmup, iters):
    """Seconds of each of `iters` calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [time_once(fn, device) for _ in range(iters)]


def median(times):
    return statistics.median(times)


def matmul_rate(device, dtype, n=None, iters=None):
    """FLOP/s of a large square matmul in `dtype` on this machine, now: the limit a step is held to."""
    cuda = str(device).startswith("cuda")
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = measure(lambda: torch.mm(a, b), device, warmup=3, iters=iters or (20 if cuda else 5))
    return 2 * n ** 3 / median(times)


def copy_bandwidth(device, nbytes=None, iters=None):
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    cuda = str(device).startswith("cuda")
    nbytes = nbytes or (2 ** 30 if cuda else 2 ** 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = measure(lambda: dst.copy_(src), device, warmup=3, iters=iters or (20 if cuda else 5))
    return 2 * nbytes / median(times)


def limits(device, dtype):
    """The machine's measured limits, taken in the same run as the benchmark."""
    return {"matmul_flops": matmul_rate(device, dtype), "matmul_dtype": str(dtype).removeprefix("torch."),
            "copy_bytes_per_s": copy_bandwidth(device)}


def describe_device(device):
    if str(device) == "meta":
        return "meta device (FLOPs counted, nothing run)"
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}"
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, torch using {torch.get_num_threads()} thread(s)"


def peak_memory_reset(device):
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """Peak bytes allocated since the last reset (CUDA only; None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) if str(device).startswith("cuda") else None


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive while the mode is on, on any device (the CPU has no
    allocator statistics): `base` (tensors alive before, e.g. weights) plus every storage an op
    creates, counted until it is freed."""

    def __init__(self, base_tensors=()):
        super().__init__()
        self.live = {}
        for t in base_tensors:
            self.live.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        self.current = self.peak = sum(self.live.values())

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.live:  # in-place ops and views reuse a counted storage
                    self.live[key] = nbytes
                    self.current += nbytes
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def write_results(args, name, rows, **extra):
    """One JSON per run: what ran, where, when, and every row."""
    result = {"benchmark": name, "command": args.command, "device": describe_device(args.device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "size": args.size, "dtype": args.dtype, "warmup": args.warmup,
              "iters": args.iters, **extra, "rows": rows}
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    common.atomic_write_json(path, result)
    return result


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)
