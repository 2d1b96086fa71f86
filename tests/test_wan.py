"""Wan2.1: the full-size transformer counted on the meta device, flow-matching training's
formulas, a tiny Wan against diffusers' own WanPipeline, and a stage of the loop on it.
Run: python -m pytest -q tests/test_wan.py"""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from safetensors import safe_open

import common
import export
import models
import stage
from backends import wan, wan_sublayers
from conftest import ROOT, loop_config, plain_diffusers, run_script


def test_full_size_counts_on_meta_device():
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**wan.CONFIG_1_3B)
    assert round(models.count_parameters(transformer) / 1e6, 2) == 1419.00
    blocks = models.list_blocks(wan, transformer)
    assert [b["name"] for b in blocks] == [f"blocks.{i}" for i in range(30)]
    assert {round(b["params"] / 1e6, 2) for b in blocks} == {46.44}
    flops = models.count_flops(wan, transformer, 81, 480, 832)  # 21 x 30 x 52 = 32,760 tokens
    models.remove_blocks(wan, transformer, ["blocks.29"])
    assert 200e12 < flops < 400e12 and flops - models.count_flops(wan, transformer, 81, 480, 832) > flops / 40


@pytest.mark.parametrize("config, total, layers, block, name", [
    (wan.CONFIG_14B, 14288.49, 40, 351.39, "wan_14b"), (wan.CONFIG_5B, 4999.79, 30, 163.66, "wan22_5b")])
def test_the_large_wans_count_as_published_and_their_configs_name_them(config, total, layers, block, name):
    """Wan2.1-T2V-14B and Wan2.2-TI2V-5B from their published configs, on the meta device."""
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**config)
    blocks = models.list_blocks(wan, transformer)
    assert round(models.count_parameters(transformer) / 1e6, 2) == total and len(blocks) == layers
    assert {round(b["params"] / 1e6, 2) for b in blocks} == {block}
    args = stage.parse_config(["--config", str(ROOT / "configs" / f"{name}.yaml")], "", {"model": stage.MODEL_OPTIONS})
    wan.required_models(args)  # its video size is one Wan takes
    sample = wan.denoise_inputs(transformer, 1, args.num_frames, args.height, args.width, device="meta")[0]
    assert sample.shape[1] == config["in_channels"] and sample.shape[3] * wan.vae_factor(transformer) == args.height


def test_flow_matching_noises_and_targets_as_rectified_flow():
    x0, noise = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    objective = common.FlowMatching(shift=3.0, sampling="logit_normal")
    t = objective.sample_timesteps(2, torch.Generator().manual_seed(0))
    u = torch.randn(2, generator=torch.Generator().manual_seed(0)).sigmoid()
    sigma = 3.0 * u / (1 + 2.0 * u)  # the shift
    assert torch.allclose(t, 1000 * sigma)
    s = sigma.view(-1, 1, 1, 1, 1)
    assert torch.allclose(objective.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    assert torch.equal(objective.target(x0, noise, t), noise - x0)  # the velocity
    uniform = common.FlowMatching(shift=1.0, sampling="uniform").sample_timesteps(4, torch.Generator().manual_seed(1))
    assert torch.allclose(uniform, 1000 * torch.rand(4, generator=torch.Generator().manual_seed(1)))
    # the DDPM backends keep their draw, noising and target exactly
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    ddpm = common.DDPMObjective(scheduler)
    t = ddpm.sample_timesteps(2, torch.Generator().manual_seed(5))
    assert torch.equal(t, torch.randint(0, 1000, (2,), generator=torch.Generator().manual_seed(5)))
    assert torch.equal(ddpm.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t))
    assert torch.equal(ddpm.target(x0, noise, t), noise)


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    args = stage.parse_config(["--config", str(ROOT / "configs" / "tiny_wan.yaml"), "--pretrained_model_name_or_path",
                               str(tmp_path_factory.mktemp("tiny wan") / "wan")], "t", {"model": stage.MODEL_OPTIONS})
    wan.build_tiny(args)
    return args


def test_a_removed_block_is_the_block_with_its_three_updates_zeroed(tiny_wan):
    """Each block adds gated updates to the hidden states: zeroing its self-attention, cross-attention
    and feed-forward outputs leaves it the identity, which is what removing it gives."""
    transformer = wan.load_denoiser(tiny_wan).eval()
    inputs = wan.denoise_inputs(transformer, 2, 9, 32, 32, text_length=32)
    with torch.no_grad():
        with models.blocks_removed(wan, transformer, ["blocks.2"]):
            removed = transformer(*inputs).sample
        block = transformer.blocks[2]
        for linear in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[-1]):
            torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
        zeroed = transformer(*inputs).sample
    assert torch.allclose(removed, zeroed, atol=1e-6)


def test_sampling_takes_the_configs_flow_shift(tiny_wan):
    """The folder's scheduler at the config's shift, whichever flow scheduler the folder names."""
    for cls in ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"):
        timesteps = {}
        for shift in (1.0, 5.0):
            args = argparse.Namespace(**{**vars(tiny_wan), "flow_shift": shift})
            if cls != "UniPCMultistepScheduler":
                args.pretrained_model_name_or_path = str(_euler_folder(tiny_wan))
            scheduler = wan.sampling_scheduler(args)
            assert type(scheduler).__name__ == cls
            scheduler.set_timesteps(4)
            timesteps[shift] = scheduler.timesteps.float()
        if cls == "UniPCMultistepScheduler":  # Wan's: the shift maps each unshifted sigma
            sigma = timesteps[1.0] / 1000
            assert torch.allclose(timesteps[5.0] / 1000, 5 * sigma / (1 + 4 * sigma), atol=2e-3)
        else:
            own = FlowMatchEulerDiscreteScheduler(shift=5.0)
            own.set_timesteps(4)
            assert torch.equal(timesteps[5.0], own.timesteps.float()) and not torch.equal(timesteps[1.0], timesteps[5.0])


def _euler_folder(tiny_wan):
    folder = Path(tiny_wan.pretrained_model_name_or_path).parent / "euler"
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    return folder


def test_a_removed_sublayer_is_its_branch_zeroed_and_a_student_keeps_it(tiny_wan, tmp_path):
    """backends/wan_sublayers.py: each block's attn1, attn2 and ffn a candidate, removed as a zero update."""
    transformer = wan_sublayers.load_denoiser(tiny_wan).eval()
    assert len(models.list_blocks(wan_sublayers, transformer)) == 18
    inputs = wan.denoise_inputs(transformer, 2, 9, 32, 32, text_length=32)
    full_flops = models.count_flops(wan_sublayers, transformer, 9, 32, 32)
    with torch.no_grad():
        full = transformer(*inputs).sample
        models.remove_blocks(wan_sublayers, transformer, ["blocks.1.ffn", "blocks.4.attn2"])
        removed = transformer(*inputs).sample
        reference = wan.load_denoiser(tiny_wan).eval()
        for linear in (reference.blocks[1].ffn.net[-1], reference.blocks[4].attn2.to_out[0]):
            torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
        zeroed = reference(*inputs).sample
    assert torch.allclose(removed, zeroed, atol=1e-6) and not torch.allclose(removed, full, atol=1e-3)
    assert models.count_flops(wan_sublayers, transformer, 9, 32, 32) < full_flops
    args = argparse.Namespace(**{**vars(tiny_wan), "backend": "wan_sublayers"})
    models.save_student(wan_sublayers, transformer, tmp_path / "student", args, "transformer")
    again = models.load_model(wan_sublayers, args, student=str(tmp_path / "student")).eval()
    assert models.removed_blocks(wan_sublayers, again) == ["blocks.1.ffn", "blocks.4.attn2"]
    with torch.no_grad():
        assert torch.allclose(again(*inputs).sample, removed, atol=1e-6)


def test_the_tiny_wan_generates_what_diffusers_own_pipeline_does(tiny_wan):
    """Our encoding and generation against WanPipeline.from_pretrained's own, same prompts and seeds."""
    pipe = wan.load_pipeline(tiny_wan, wan.load_denoiser(tiny_wan))
    prompts, seeds = ["a red car drives along a coastal road", "a cat!"], [3, 4]
    frames, latents = wan.generate(pipe, prompts, seeds, tiny_wan, return_latents=True)
    assert frames.shape == (2, 9, 32, 32, 3) and latents.shape == (2, 16, 3, 4, 4)
    theirs = WanPipeline.from_pretrained(tiny_wan.pretrained_model_name_or_path)
    theirs.set_progress_bar_config(disable=True)
    ours_text = wan.encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, "cpu")
    their_text = theirs.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=32)[0]
    assert torch.allclose(ours_text, their_text, atol=1e-5)  # no_grad against grad mode: float noise
    kwargs = dict(prompt=prompts, negative_prompt=[""] * 2, num_frames=9, height=32, width=32, num_inference_steps=8,
                  guidance_scale=5.0, max_sequence_length=32)
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    assert torch.allclose(theirs(**kwargs, generator=gens(), output_type="latent").frames, latents, atol=1e-6)
    video = theirs(**kwargs, generator=gens(), output_type="np").frames  # (B, F, H, W, 3) in [0, 1]
    assert np.abs(frames / 255.0 - video).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("backend", ["wan", "wan_sublayers"])
def test_vip_loop_runs_one_stage_on_a_tiny_wan_and_exports_it(tmp_path, tiny_reward, backend):
    config = loop_config("tiny_wan", tmp_path / "wan.yaml", fast_except=("build_tiny", "num_frames", "height", "width"),
                         model={"pretrained_model_name_or_path": str(tmp_path / "models" / "wan"), "backend": backend},
                         reward={"reward_model": tiny_reward, "reward_num_frames": 9},
                         train={"gradient_checkpointing": True})
    run = tmp_path / "run"
    run_script("bash", "vip_loop.sh", "tiny_wan", "1", env={"CONFIG": config, "RUN_DIR": str(run)},
               timeout=900)
    pruned = json.loads((run / "stage_1" / "prune" / "student" / "student.json").read_text())
    assert pruned["backend"] == backend and pruned["removed_blocks"] == json.loads(
        (run / "stage_1" / "prune" / "ranking.json").read_text())["chosen"] and len(pruned["removed_blocks"]) == 1
    rows = stage.read_manifest(run / "stage_1" / "curate" / "pairs.jsonl")
    with safe_open(run / "stage_1" / "curate" / rows[0]["latents"], "pt") as f:  # the trainer runs no text encoder
        assert f.get_slice("prompt_embeds").get_shape() == [32, 32] and f.get_slice("winner").get_shape() == [16, 3, 4, 4]
    trained = json.loads((run / "stage_1" / "train" / "student" / "student.json").read_text())
    assert trained["weights"] == "transformer" and trained["removed_blocks"] == pruned["removed_blocks"]
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert [m["label"] for m in report["models"]] == ["teacher (M0)", "stage_1/prune", "stage_1/train"]
    assert report["models"][1]["unet_parameters"] < report["models"][0]["unet_parameters"]
    assert "params | Transformer params |" in (run / "eval" / "eval.md").read_text()

    # The export: a WanPipeline folder plain diffusers loads, generating what vip's student does.
    args = export.parse_args(["--config", config])
    family = stage.backend_of(args)
    student = models.load_model(family, args, student=str(run / "stage_1" / "train" / "student"))
    call = dict(prompt=["a red ball bounces", "a cat walks"], negative_prompt=[args.negative_prompt] * 2,
                num_frames=args.num_frames, height=args.height, width=args.width, guidance_scale=args.guidance_scale,
                num_inference_steps=args.num_inference_steps, max_sequence_length=args.max_sequence_length, seeds=[0, 1])
    theirs = plain_diffusers(run / "export", dict(call), tmp_path)
    ours = family.generate(family.load_pipeline(args, student), call["prompt"], call["seeds"], args, return_latents=True)[1]
    assert theirs["pipeline"] == "WanPipeline" and torch.allclose(theirs["latents"], ours, atol=1e-5)
    exported = WanTransformer3DModel.from_pretrained(run / "export" / "transformer")
    shape = dict(num_frames=args.num_frames, height=args.height, width=args.width)
    full_flops = models.count_flops(family, family.load_denoiser(args), **shape)
    removed = pruned["removed_blocks"]
    if backend == "wan":  # the kept blocks, renumbered: the student's size and speed
        kept = [i for i in range(6) if f"blocks.{i}" not in removed]
        names = {k if not k.startswith("blocks.") else
                 f"blocks.{kept.index(int(k.split('.')[1]))}." + k.split(".", 2)[2] for k in student.state_dict()}
        assert set(theirs["keys"]) == names and theirs["params"] == models.count_parameters(student)
        assert models.count_flops(family, exported, **shape) == models.count_flops(family, student, **shape) < full_flops
    else:  # every sub-layer, the removed one's weights zero: the student's function at the full cost
        zero = {k for k in theirs["keys"] if k.startswith(removed[0] + ".")}
        assert set(theirs["keys"]) == set(student.state_dict()) | zero and zero
        assert all(not exported.state_dict()[k].any() for k in zero)
        assert models.count_flops(family, exported, **shape) == full_flops
    assert json.loads((run / "export" / "transformer" / "config.json").read_text())["num_layers"] == (
        5 if backend == "wan" else 6)


def test_stochastic_sampling_draws_each_clips_noise_from_its_own_seed(tiny_wan):
    """model.scheduler + stochastic_sampling: every Euler step re-noises the predicted clip with noise
    from the clip's own generator, after its initial noise, so a clip does not depend on the clips
    beside it; checked against the rule written out over the transformer."""
    for bad, words in (({"scheduler": "Turbo"}, "model.scheduler"), ({"stochastic_sampling": True}, "model.scheduler"),
                       ({"scheduler": "UniPCMultistepScheduler", "stochastic_sampling": True}, "no stochastic sampling")):
        with pytest.raises(common.ConfigError, match=words):
            wan.required_models(argparse.Namespace(**{**vars(tiny_wan), **bad}))
    args = argparse.Namespace(**{**vars(tiny_wan), "scheduler": "FlowMatchEulerDiscreteScheduler",
                                 "stochastic_sampling": True, "flow_shift": 2.0, "num_inference_steps": 4})
    transformer = wan.load_denoiser(args).eval()
    pipe = wan.load_pipeline(args, transformer)
    assert pipe.scheduler.config.stochastic_sampling and pipe.scheduler.config.shift == 2.0
    prompts = ["a red car drives along a coastal road", "a cat!"]
    _, both = wan.generate(pipe, prompts, [3, 4], args, return_latents=True)
    _, alone = wan.generate(pipe, prompts[1:], [4], args, return_latents=True)
    _, other = wan.generate(pipe, prompts[1:], [5], args, return_latents=True)
    assert torch.allclose(both[1:], alone, atol=1e-5) and not torch.allclose(alone, other, atol=1e-2)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 3, 4, 4, generator=generator)  # the pipeline's own initial draw
    text = wan.encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts[1:] + [""], "cpu")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            cond, uncond = wan.predict(transformer, x.repeat(2, 1, 1, 1, 1), t.expand(2), text).chunk(2)
            x0 = x - sigmas[i] * (uncond + args.guidance_scale * (cond - uncond))
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(x.shape, generator=generator)
    assert torch.allclose(alone, x, atol=1e-4)
