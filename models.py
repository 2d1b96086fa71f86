"""What the scripts do to any backend's denoiser (a UNet or a transformer): remove prunable blocks,
count parameters and FLOPs, choose what trains, checkpoint activations, save a student and load it
back, and generate videos with a diffusers pipeline. The backend is passed in: it says which
blocks are prunable and how a family's model is loaded and called (backends/README.md).
"""

import contextlib
import json
import logging
import os
import sys
import warnings

import torch
import torch.nn as nn
from accelerate.utils import DistributedType
from accelerate.utils.dataclasses import get_module_class_from_name
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from common import ConfigError, atomic_path, atomic_write_json


@contextlib.contextmanager
def quiet(logger_name):
    """A library's logger held at ERROR for a block: diffusers warns on every cast, even a no-op one."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def hub_kwargs(args, revision=True):
    """from_pretrained's hub arguments of a config: its cache_dir everywhere; its revision only for
    the base model, since a revision names a commit of one repository. Local folders ignore both."""
    kwargs = {"cache_dir": getattr(args, "cache_dir", None)}
    if revision and getattr(args, "revision", None):
        kwargs["revision"] = args.revision
    return kwargs


# -----------------------------------------------------------------------------
# Prunable blocks: removed by an identity in their place, listed by path in forward order.


class RemovedBlock(nn.Module):
    """Stands in for a removed block. Every candidate block is residual (its output is its input plus
    an update), so the identity is exactly 'the block is gone'; deleting it from its ModuleList
    instead would break the zip(resnets, attentions, motion_modules) pairing of AnimateDiff's up blocks."""

    def forward(self, hidden_states, *args, **kwargs):
        # Transformers called with return_dict=False are indexed: [0] must be the hidden states.
        return (hidden_states,) if kwargs.get("return_dict", True) is False else hidden_states


class RemovedBranch(RemovedBlock):
    """Stands in for a removed residual branch (a block's attention or feed-forward, whose output the
    block adds to its hidden states): a zero update is exactly the branch gone. A backend whose
    candidates are such branches says `STAND_IN = models.RemovedBranch`."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def _set_submodule(root, name, module):
    parent, _, child = name.rpartition(".")
    parent = root.get_submodule(parent)
    if child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def list_blocks(backend, model):
    """The prunable blocks still present, in forward order: [{"name", "params"}]."""
    blocks = []
    for name in backend.prunable_blocks(model):
        module = model.get_submodule(name)
        if not isinstance(module, RemovedBlock):
            blocks.append({"name": name, "params": count_parameters(module)})
    return blocks


def removed_blocks(backend, model):
    return [n for n in backend.prunable_blocks(model) if isinstance(model.get_submodule(n), RemovedBlock)]


def remove_blocks(backend, model, names, where="blocks"):
    """Replace the named blocks with the backend's stand-in (an identity unless it names another), in
    place. Returns the removed modules."""
    valid = backend.prunable_blocks(model)
    for name in names:
        if name not in valid:
            raise ConfigError(f"{where}: unknown block '{name}'; valid blocks look like {valid[0]} ... {valid[-1]}")
    old = {}
    for name in names:
        old[name] = model.get_submodule(name)
        _set_submodule(model, name, getattr(backend, "STAND_IN", RemovedBlock)())
    return old


@contextlib.contextmanager
def blocks_removed(backend, model, names):
    """Remove blocks for the duration of the block (the block scan in prune.py), then put them back."""
    old = remove_blocks(backend, model, names)
    try:
        yield model
    finally:
        for name, module in old.items():
            _set_submodule(model, name, module)


def with_blocks_zeroed(backend, model, zeroed=None, dtype=None):
    """The whole architecture of `model` (a student) with its weights, and every parameter of each
    removed block zero: the student's function (every candidate is residual, and a block of zeros
    adds nothing) in a model that the family's own class loads, for exports that cannot drop a block.
    `zeroed` (a model of the same class with fewer layers) takes the place of the full architecture;
    the result is in `dtype` (default: the student's)."""
    removed = removed_blocks(backend, model)
    full = zeroed if zeroed is not None else type(model).from_config(
        {k: v for k, v in model.config.items() if k != "_use_default_values"})
    missing, unexpected = full.load_state_dict(model.state_dict(), strict=False)
    stray = [k for k in missing if not any(k.startswith(name + ".") for name in removed)]
    if unexpected or stray:
        raise ValueError(f"the exported model does not hold the student: {(unexpected + stray)[:3]}")
    with torch.no_grad():
        for name in removed:
            for p in full.get_submodule(name).parameters():
                p.zero_()
    with quiet("diffusers.models.modeling_utils"):  # diffusers warns on every cast
        return full.to(dtype or next(model.parameters()).dtype).eval()


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def block_parameters(backend, model):
    """Parameters of the prunable blocks still present: for AnimateDiff, the paper's motion-module
    count (0.453B in full)."""
    return sum(b["params"] for b in list_blocks(backend, model))


def count_flops(backend, model, num_frames, height, width, batch_size=1):
    """FLOPs of one denoiser call (one denoising step, no guidance) for `batch_size` videos.

    Counted with torch.utils.flop_counter on a meta-device copy: no memory, no compute, any size,
    and attention counted as its matmuls (CPU's fused attention kernel has no FLOP formula)."""
    config = {k: v for k, v in model.config.items() if k != "_use_default_values"}
    with torch.device("meta"):
        ghost = type(model).from_config(config)
    remove_blocks(backend, ghost, removed_blocks(backend, model))
    inputs = backend.denoise_inputs(ghost, batch_size, num_frames, height, width, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ghost(*inputs)
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# Training: which parameters train, and activations recomputed instead of kept.


def set_trainable(backend, model, trainable):
    """Freeze `model` but for the parameters `trainable` names (a key of backend.TRAINABLE); returns them."""
    if trainable not in backend.TRAINABLE:
        raise ConfigError(f"train.trainable: expected one of {', '.join(backend.TRAINABLE)} for this backend; "
                          f"got {trainable!r}")
    keep = backend.TRAINABLE[trainable]
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))
    return [p for p in model.parameters() if p.requires_grad]


def checkpoint_blocks(backend, model):
    """Recompute each prunable block in the backward pass instead of keeping its activations.
    diffusers' gradient checkpointing leaves AnimateDiff's motion modules out, and they are the
    layers trained; its UNet3D (VideoCrafter2) has none, and there the blocks cover most of the UNet."""
    for block in list_blocks(backend, model):
        module = model.get_submodule(block["name"])
        # use_reentrant=False: the reentrant variant breaks under DDP and with frozen inputs.
        module.forward = lambda *a, _f=module.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


# -----------------------------------------------------------------------------
# Sharding: under accelerate's FSDP (configs/accelerate/fsdp.yaml, FSDP2), each of the family's
# blocks is a unit of its own, and the frozen teacher is sharded as the student is.


def is_sharded(accelerator):
    return accelerator.distributed_type == DistributedType.FSDP


def wrap_by_blocks(accelerator, backend):
    """FSDP wraps each module of the family's block classes (backend.FSDP_WRAP), not by a size
    threshold, unless the accelerate config names its own (fsdp_transformer_layer_cls_to_wrap)."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = list(backend.FSDP_WRAP)
    # The denoisers return views (`.sample`); the losses read them out of place, which FSDP2 allows.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def shard_frozen(accelerator, model):
    """FSDP2 over a frozen model (the teacher), unit by unit as the student, with the same mixed
    precision, and outside the training state (its checkpoints hold only the student): a 14B
    teacher is 28.6 GB in bf16, too much to keep whole beside a student's shards on every GPU."""
    plugin = accelerator.state.fsdp_plugin
    options = dict(mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(), reshard_after_forward=True)
    found = (get_module_class_from_name(model, name) for name in plugin.transformer_cls_names_to_wrap or ())
    units = tuple(cls for cls in found if cls is not None)
    for module in model.modules():
        if isinstance(module, units):
            fully_shard(module, **options)
    return fully_shard(model, **options)


def local(tensor):
    """A parameter's own shard (FSDP2's DTensor), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# -----------------------------------------------------------------------------
# Students: safetensors of the trained weights and a JSON naming the base model and removed blocks.


def _same_model(a, b):
    """Hub ids compare as written; local folders by absolute path."""
    norm = lambda p: os.path.abspath(p) if os.path.exists(p) else p  # noqa: E731
    return norm(str(a)) == norm(str(b))


def read_student_meta(student):
    path = os.path.join(student, "student.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except OSError:
        raise ConfigError(f"{path}: missing; expected a student folder written by train_redpo.py or prune.py") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    need = ("backend", "pretrained_model_name_or_path", "removed_blocks", "weights")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise ConfigError(f"{path}: expected a JSON object with keys {', '.join(need)}")
    if not isinstance(meta["removed_blocks"], list) or not all(isinstance(b, str) for b in meta["removed_blocks"]):
        raise ConfigError(f"{path}: 'removed_blocks' is {meta['removed_blocks']!r}; expected a list of block names")
    if not isinstance(meta["weights"], str):
        raise ConfigError(f"{path}: 'weights' is {meta['weights']!r}; expected the name of what was trained")
    return meta


def _student_state(backend, model, weights):
    keep = backend.TRAINABLE.get(weights)
    if keep is None:
        raise ConfigError(f"student.json: 'weights' is {weights!r}; expected one of {', '.join(backend.TRAINABLE)}")
    return {k: v for k, v in model.state_dict().items() if keep(k)}


def check_student(backend, args, student):
    """A student's student.json, checked to name the configured base model; returns it."""
    meta = read_student_meta(student)
    for key in ("backend", *backend.STUDENT_KEYS):
        if key not in meta or not _same_model(meta[key], getattr(args, key)):
            raise ConfigError(f"{student}/student.json: {key} is {meta.get(key)!r} but the config's is "
                              f"{getattr(args, key)!r}; expected a student of the configured base model")
    return meta


def load_model(backend, args, student=None, dtype=None):
    """The denoiser of `args` (the full model M0, built tiny first with build_tiny), or with
    `student`, a folder written by `save_student`, its blocks removed and its weights loaded."""
    meta = None if student is None else check_student(backend, args, student)
    if args.build_tiny:
        backend.build_tiny(args)
    model = backend.load_denoiser(args, dtype=dtype)
    if meta is not None:
        remove_blocks(backend, model, meta["removed_blocks"], f"{student}/student.json: removed_blocks")
        try:
            state = load_file(os.path.join(student, "student.safetensors"))
        except Exception as e:
            raise ConfigError(f"{student}/student.safetensors: cannot read ({str(e).splitlines()[0][:120]}); "
                              f"expected the safetensors file written with student.json") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        expected = set(_student_state(backend, model, meta["weights"]))
        if unexpected or expected & set(missing):
            raise ConfigError(f"{student}/student.safetensors: does not match student.json "
                              f"({len(unexpected)} unexpected, {len(expected & set(missing))} missing tensors)")
    return model


def stage_of(student):
    """How many stages of pruning made `student` (None, the full model M0: 0), read from the
    parents its student.json and theirs name: prune.py marks its students with pruned_this_stage."""
    stages, seen = 0, set()
    while student not in (None, "M0"):
        meta = read_student_meta(student)
        if os.path.realpath(student) in seen or "parent" not in meta:
            raise ConfigError(f"{student}/student.json: its parents do not lead back to M0; prune.num_blocks with one "
                              f"number a stage needs them (or give one number)")
        seen.add(os.path.realpath(student))
        stages += "pruned_this_stage" in meta
        student = meta["parent"]
    return stages


def save_student(backend, model, out_dir, args, weights, extra=None, state=None):
    """Save a student: `student.safetensors` (the weights `weights` names, a key of
    backend.TRAINABLE) and `student.json` naming the base model and the removed blocks. The JSON is
    written last, so a folder with it is complete."""
    os.makedirs(out_dir, exist_ok=True)
    # `state`: the full state dict where `model` holds only a shard of it (FSDP's get_state_dict)
    kept = _student_state(backend, model, weights)
    state = {k: v.detach().contiguous().cpu() for k, v in (state or kept).items() if k in kept}
    with atomic_path(os.path.join(out_dir, "student.safetensors")) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    meta = {
        "backend": args.backend,
        **{key: getattr(args, key) for key in ("pretrained_model_name_or_path", *backend.STUDENT_KEYS)},
        "removed_blocks": removed_blocks(backend, model),
        "weights": weights,
        "motion_parameters": block_parameters(backend, model),
        "unet_parameters": count_parameters(model),
        **(extra or {}),
    }
    atomic_write_json(os.path.join(out_dir, "student.json"), meta)


# -----------------------------------------------------------------------------
# Generation with a diffusers pipeline that takes AnimateDiffPipeline's call (AnimateDiff, VC2).


_CUT_WARNED = []


def warn_if_cut(tokenizer, prompts):
    """One line, once a process, where a prompt runs past the text encoder's window, which cuts it
    (the pipeline would log a kilobyte of the cut text for every batch)."""
    limit = getattr(tokenizer, "model_max_length", None)
    if _CUT_WARNED or not limit or limit > 10 ** 6:
        return
    cut = [p for p in prompts if len(tokenizer(p, verbose=False).input_ids) > limit]
    if cut:
        _CUT_WARNED.append(cut[0])
        print(f"warning: prompts longer than the text encoder's {limit} tokens are cut there (the first: "
              f"{cut[0][:60]!r}{'...' if len(cut[0]) > 60 else ''})", file=sys.stderr)


@torch.no_grad()
def generate(pipe, prompts, seeds, args, return_latents=False):
    """Generate one video per (prompt, seed): uint8 frames (B, F, H, W, 3), and with
    `return_latents` the scaled VAE latents (B, C, F, h, w) the frames were decoded from."""
    device = pipe._execution_device
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    warn_if_cut(pipe.tokenizer, prompts)
    with quiet(type(pipe).__module__):  # its warning of cut prompts, said once above
        latents = pipe(prompt=list(prompts), num_frames=args.num_frames, height=args.height, width=args.width,
                       num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       generator=generators, output_type="latent").frames
    video = pipe.decode_latents(latents.to(device))
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, C, F, H, W) -> (B, F, H, W, C)
    return (frames, latents.float().cpu()) if return_latents else frames
