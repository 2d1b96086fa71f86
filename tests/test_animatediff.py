"""AnimateDiff backend on tiny models and, on the meta device, at full size.
Run: python -m pytest -q tests/test_animatediff.py"""
import json

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models
from backends import animatediff
from benchmarks.bench import ADAPTER_V152, SD15_UNET  # SD1.5's and motion adapter v1.5-2's public configs
from common import ConfigError


def test_full_size_counts_on_meta_device():
    with torch.device("meta"):
        unet2d, adapter = UNet2DConditionModel(**SD15_UNET), MotionAdapter(**ADAPTER_V152)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=False)
    assert round(models.count_parameters(adapter) / 1e6, 2) == 453.21
    assert round(models.count_parameters(unet2d) / 1e6, 2) == 859.52
    assert round(models.count_parameters(unet) / 1e6, 2) == 1312.73
    blocks = models.list_blocks(animatediff, unet)
    assert len(blocks) == 21 and models.block_parameters(animatediff, unet) == models.count_parameters(adapter)
    sizes = sorted(round(b["params"] / 1e6, 2) for b in blocks)
    assert sizes == [2.26] * 5 + [9.02] * 5 + [36.07] * 11
    assert [b["name"] for b in blocks][7:12] == ["down_blocks.3.motion_modules.1", "mid_block.motion_modules.0",
                                                 "up_blocks.0.motion_modules.0", "up_blocks.0.motion_modules.1",
                                                 "up_blocks.0.motion_modules.2"]
    full = models.count_flops(animatediff, unet, 16, 512, 512)
    models.remove_blocks(animatediff, unet, ["up_blocks.3.motion_modules.0"])  # 320 channels at 64x64: the costliest per param
    assert models.count_flops(animatediff, unet, 16, 512, 512) < full
    assert 10e12 < full < 30e12  # SD1.5 is ~0.7 TFLOPs per 512px frame; 16 frames plus motion modules


@pytest.fixture()
def unet(tiny_args):
    return models.load_model(animatediff, tiny_args)


def forward(unet, seed=0):
    torch.manual_seed(seed)
    sample, t, text = animatediff.denoise_inputs(unet, 2, 4, 64, 64)
    with torch.no_grad():
        return unet(sample, t, text).sample


def test_blocks_listed_removed_and_restored(unet):
    names = [b["name"] for b in models.list_blocks(animatediff, unet)]
    assert len(names) == 11 and names[4] == "mid_block.motion_modules.0" and names[0] == "down_blocks.0.motion_modules.0"
    before = forward(unet)
    total = models.block_parameters(animatediff, unet)
    with models.blocks_removed(animatediff, unet, [names[1], names[7]]):
        assert models.removed_blocks(animatediff, unet) == [names[1], names[7]]
        assert len(models.list_blocks(animatediff, unet)) == 9
        removed_out = forward(unet)
    assert models.removed_blocks(animatediff, unet) == [] and torch.equal(forward(unet), before)
    assert models.block_parameters(animatediff, unet) == total  # the removed modules came back whole
    assert not torch.allclose(removed_out, before)
    with pytest.raises(ConfigError, match="unknown block 'up_blocks.9.motion_modules.0'"):
        models.remove_blocks(animatediff, unet, ["up_blocks.9.motion_modules.0"])


def test_removed_block_is_exactly_a_zeroed_residual_branch(unet):
    # A motion module returns proj_out(...) + input, so zeroing proj_out must equal removing it.
    name = "up_blocks.1.motion_modules.1"
    with models.blocks_removed(animatediff, unet, [name]):
        removed = forward(unet)
    proj_out = unet.get_submodule(name).proj_out
    torch.nn.init.zeros_(proj_out.weight)
    torch.nn.init.zeros_(proj_out.bias)
    assert torch.allclose(forward(unet), removed, atol=1e-6)


def test_parameter_counts_after_removal(unet):
    blocks = models.list_blocks(animatediff, unet)
    total = models.block_parameters(animatediff, unet)
    models.remove_blocks(animatediff, unet, [blocks[2]["name"], blocks[9]["name"]])
    assert models.block_parameters(animatediff, unet) == total - blocks[2]["params"] - blocks[9]["params"]
    assert models.count_parameters(unet) == sum(p.numel() for p in unet.parameters())
    assert all(p.numel() == 0 for p in unet.get_submodule(blocks[2]["name"]).parameters())


def test_flops_counted_on_meta_match_a_real_forward(unet):
    models.remove_blocks(animatediff, unet, ["mid_block.motion_modules.0"])
    sample, t, text = animatediff.denoise_inputs(unet, 1, 8, 64, 64)
    counter = FlopCounterMode(display=False)
    # CPU's fused attention kernel has no FLOP formula; the math kernel is what the meta count sees
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        unet(sample, t, text)
    assert models.count_flops(animatediff, unet, 8, 64, 64) == counter.get_total_flops() > 0


@pytest.mark.parametrize("weights", ["motion_modules", "unet"])
def test_student_round_trips_exactly(unet, tiny_args, tmp_path, weights):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if weights == "unet" or ".motion_modules." in name:
                p.add_(0.01 * torch.randn_like(p))
    models.remove_blocks(animatediff, unet, ["down_blocks.1.motion_modules.0", "up_blocks.0.motion_modules.2"])
    out = tmp_path / "student dir"
    models.save_student(animatediff, unet, str(out), tiny_args, weights, extra={"stage": 1})
    meta = json.loads((out / "student.json").read_text())
    assert meta["removed_blocks"] == ["down_blocks.1.motion_modules.0", "up_blocks.0.motion_modules.2"]
    assert meta["weights"] == weights and meta["stage"] == 1
    assert meta["motion_parameters"] == models.block_parameters(animatediff, unet)
    loaded = models.load_model(animatediff, tiny_args, student=str(out))
    assert models.removed_blocks(animatediff, loaded) == meta["removed_blocks"]
    a, b = unet.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(forward(unet), forward(loaded))


def test_student_of_another_base_is_refused(unet, tiny_args, tmp_path):
    models.save_student(animatediff, unet, str(tmp_path), tiny_args, "motion_modules")
    tiny_args.motion_adapter = "guoyww/animatediff-motion-adapter-v1-5-2"
    with pytest.raises(ConfigError, match=r"student.json: motion_adapter is .* expected a student of the configured"):
        models.load_model(animatediff, tiny_args, student=str(tmp_path))
    with pytest.raises(ConfigError, match="student.json: missing"):
        models.load_model(animatediff, tiny_args, student=str(tmp_path / "nothing"))


def test_generation_is_seeded(unet, tiny_args):
    pipe = animatediff.load_pipeline(tiny_args, unet)
    frames, latents = models.generate(pipe, ["a red ball rolls left", "a cat"], [3, 4], tiny_args, return_latents=True)
    assert frames.shape == (2, 8, 64, 64, 3) and frames.dtype.name == "uint8"
    assert latents.shape == (2, 4, 8, 8, 8)
    again = models.generate(pipe, ["a red ball rolls left", "a cat"], [3, 5], tiny_args)
    assert (again[0] == frames[0]).all() and not (again[1] == frames[1]).all()
    decoded = pipe.decode_latents(latents)  # the stored latents are exactly what the frames came from
    assert torch.equal(((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1),
                       torch.from_numpy(frames))


def test_checkpointed_motion_modules_give_the_same_gradients(tiny_args):
    # diffusers' checkpointing skips the motion modules; ours recomputes them in backward instead.
    def grads(unet):
        unet.train()
        for name, p in unet.named_parameters():
            p.requires_grad_(".motion_modules." in name)
        torch.manual_seed(0)
        sample, t, text = animatediff.denoise_inputs(unet, 2, 4, 64, 64)
        unet(sample, t, text).sample.square().mean().backward()
        return {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}

    plain = grads(models.load_model(animatediff, tiny_args))
    unet = models.load_model(animatediff, tiny_args)
    unet.enable_gradient_checkpointing()
    models.checkpoint_blocks(animatediff, unet)
    block = unet.get_submodule("mid_block.motion_modules.0")
    assert block.forward.__name__ == "<lambda>"  # wrapped
    checkpointed = grads(unet)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def _as_hub_cache(cache, repo, folder, commit):
    """`folder` laid out as the Hugging Face cache holds a downloaded repo at `commit` (refs/main too),
    with the marker a download leaves for a file the repo lacks that the tokenizer looks for."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / ".no_exist" / commit / "tokenizer").mkdir(parents=True)
    (root / ".no_exist" / commit / "tokenizer" / "config.json").touch()
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def test_hub_ids_load_offline_from_cache_dir_at_a_revision(tiny_args, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old, new = "1" * 40, "2" * 40
    cache = tmp_path / "hub cache"
    _as_hub_cache(cache, "vip-test/tiny-sd", tiny_dir / "sd", old)
    _as_hub_cache(cache, "vip-test/tiny-sd", tiny_dir / "sd", new)  # refs/main -> new
    _as_hub_cache(cache, "vip-test/tiny-adapter", tiny_dir / "motion_adapter", new)
    from safetensors.torch import load_file, save_file

    weights = cache / "models--vip-test--tiny-sd" / "snapshots" / old / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = state["conv_out.bias"] + 1  # the old revision differs in one tensor
    save_file(state, weights)

    local = models.load_model(animatediff, tiny_args)
    tiny_args.pretrained_model_name_or_path, tiny_args.motion_adapter = "vip-test/tiny-sd", "vip-test/tiny-adapter"
    tiny_args.cache_dir = str(cache)
    at_main = models.load_model(animatediff, tiny_args)
    assert torch.equal(at_main.conv_out.bias, local.conv_out.bias)
    tiny_args.revision = old
    at_old = models.load_model(animatediff, tiny_args)
    assert torch.equal(at_old.conv_out.bias, local.conv_out.bias + 1)
    text_encoder, tokenizer = animatediff.load_text_encoder(tiny_args)  # the rest of the base model, same revision
    assert tokenizer("a cat").input_ids[0] == tokenizer.bos_token_id
    tiny_args.cache_dir = str(tmp_path / "empty")  # offline, nothing cached: fails, never downloads
    with pytest.raises(OSError):
        models.load_model(animatediff, tiny_args)


def test_a_removed_motion_module_generates_what_diffusers_own_pipeline_does_with_it_zeroed(tiny_args, tiny_dir):
    """prune.py's removal (an identity in the module's place, in our pipeline) against diffusers' own
    AnimateDiffPipeline, built as its docs build it (from_pretrained of the SD folder with a motion
    adapter), whose module has its output projection zeroed: a residual module with a zero update
    is the identity, so the two must generate the same video."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    name, prompts, seeds = "up_blocks.1.motion_modules.1", ["a red ball rolls left", "a cat jumps"], [3, 4]
    unet = models.load_model(animatediff, tiny_args)
    models.remove_blocks(animatediff, unet, [name])
    ours = models.generate(animatediff.load_pipeline(tiny_args, unet), prompts, seeds, tiny_args, return_latents=True)

    adapter = MotionAdapter.from_pretrained(tiny_args.motion_adapter)
    module = adapter.up_blocks[1].motion_modules[1]
    torch.nn.init.zeros_(module.proj_out.weight), torch.nn.init.zeros_(module.proj_out.bias)
    scheduler = DDIMScheduler.from_pretrained(tiny_args.pretrained_model_name_or_path, subfolder="scheduler",
                                              beta_schedule="linear", clip_sample=False, timestep_spacing="linspace",
                                              steps_offset=1)
    pipe = AnimateDiffPipeline.from_pretrained(tiny_args.pretrained_model_name_or_path, motion_adapter=adapter,
                                               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=prompts, num_frames=tiny_args.num_frames, height=tiny_args.height, width=tiny_args.width,
                  num_inference_steps=tiny_args.num_inference_steps, guidance_scale=tiny_args.guidance_scale)
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    latents = pipe(**kwargs, generator=gens(), output_type="latent").frames
    video = pipe(**kwargs, generator=gens(), output_type="np").frames  # (B, F, H, W, 3) in [0, 1]
    assert (latents - ours[1]).abs().max() <= 1e-5 * latents.abs().max()
    assert abs(ours[0] / 255.0 - video).max() <= 1 / 255 + 1e-6  # ours rounds to uint8
