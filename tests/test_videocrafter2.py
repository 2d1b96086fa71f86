"""VideoCrafter2: the official checkpoint's every key and shape against our modules, the full
size, conversion of a tiny checkpoint in the official layout, the schedule and the sampler.
Run: python -m pytest -q tests/test_videocrafter2.py"""
import json
import os

import pytest
import torch

import common
import models
import stage
from backends import animatediff
from backends import videocrafter2 as vc2
from conftest import ROOT

# Every key and shape of the official model.ckpt's state dict, made from the public architecture without weights.
KEYS = ROOT / "tests" / "fixtures" / "vc2_model_ckpt_keys.json"
TINY = (vc2.TINY_UNET_CONFIG, vc2.TINY_VAE_CONFIG, vc2.TINY_TEXT_CONFIG)


@pytest.fixture(scope="module")
def official():
    return json.loads(KEYS.read_text())


def test_every_official_key_maps_to_one_of_ours_with_its_shape(official):
    nets = vc2.build_models(device="meta")
    state = {k: torch.empty(v, device="meta") for k, v in official["keys"].items()}
    converted = vc2.convert_state_dict(state, *nets)  # raises on any missing, unexpected or misshapen key
    for model, ours in zip(nets, converted):
        assert set(ours) == set(model.state_dict())  # none of ours left over
    unet_keys = {k for k in state if k.startswith(vc2.UNET_PREFIX)}
    assert len(unet_keys) == 1484 and len(converted[0]) == 1484
    # The only official tensors not loaded: the schedule (recomputed, checked below) and the text
    # tower's unused tail (its 24th block, projection and temperature).
    mapped = {vc2.UNET_PREFIX + v for v in vc2.unet_key_map(nets[0]).values()}
    mapped |= {vc2.VAE_PREFIX + v for v in vc2.vae_key_map(nets[1]).values()}
    mapped |= {vc2.TEXT_PREFIX + (v if isinstance(v, str) else v[0]) for v in vc2.text_key_map(nets[2]).values()}
    left = set(state) - mapped
    assert {k for k in left if not k.startswith(vc2.TEXT_PREFIX)} == set(vc2.SCHEDULE_BUFFERS)
    text_left = sorted(k[len(vc2.TEXT_PREFIX):] for k in left if k.startswith(vc2.TEXT_PREFIX))
    assert text_left[:2] == ["logit_scale", "text_projection"] and len(text_left) == 14
    assert all(k.startswith("transformer.resblocks.23.") for k in text_left[2:])
    with pytest.raises(common.ConfigError, match="unexpected tensors, e.g. model.diffusion_model.extra"):
        vc2.convert_state_dict({**state, "model.diffusion_model.extra": torch.empty(1)}, *nets)
    with pytest.raises(common.ConfigError, match="has shape"):
        vc2.convert_state_dict({**state, "model.diffusion_model.out.2.bias": torch.empty(5)}, *nets)


def test_full_unet_has_vc2s_1413_28m_parameters(official):
    unet, vae, text = vc2.build_models(device="meta")
    assert models.count_parameters(unet) == official["total_params"]["model.diffusion_model"] == 1_413_284_420
    assert models.count_parameters(vae) == official["total_params"]["first_stage_model"]
    fps = models.count_parameters(unet.fps_embedding)
    assert fps == 2_050_560


def test_schedule_matches_the_official_buffers(official):
    buffers = official["buffers"]
    scheduler = vc2.scheduler_of()
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(buffers["alphas_cumprod"]["last"], rel=1e-5)
    assert scheduler.betas[0].item() == pytest.approx(buffers["betas"]["first"], rel=1e-6)
    scale = vc2.latent_scale(torch.arange(1000))
    assert scale[0] == buffers["scale_arr"]["first"] == 1.0
    assert scale[399].item() == pytest.approx(buffers["scale_arr"]["index_399"]) and scale[398] > 0.7
    assert scale[999].item() == pytest.approx(buffers["scale_arr"]["last"])
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == 981 and scheduler.timesteps[-1] == 1


def test_ddim_step_without_latent_scale_is_diffusers_ddim():
    scheduler = vc2.scheduler_of()
    scheduler.set_timesteps(10)
    x, eps = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    abar = scheduler.alphas_cumprod
    for i, t in enumerate(scheduler.timesteps.tolist()):
        prev = scheduler.timesteps[i + 1].item() if i + 1 < 10 else 0
        ours = vc2.ddim_step(x, eps, float(abar[t]), float(abar[prev]), 1.0, 1.0)
        theirs = scheduler.step(eps, t, x, eta=0.0).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5)
    # With the scale, the clean latent the step aims at is divided by scale(t) and re-scaled by scale(prev).
    t, prev = 301, 201  # below mid_step, where scale(t) != scale(prev)
    scaled = vc2.ddim_step(x, eps, float(abar[t]), float(abar[prev]), float(vc2.latent_scale(t)), float(vc2.latent_scale(prev)))
    plain = vc2.ddim_step(x, eps, float(abar[t]), float(abar[prev]), 1.0, 1.0)
    assert not torch.allclose(scaled, plain)


def test_add_noise_scales_the_clean_latent():
    scheduler = vc2.scheduler_of()
    x0, noise = torch.randn(2, 4, 3, 4, 4), torch.zeros(2, 4, 3, 4, 4)
    t = torch.tensor([0, 700])
    xt = vc2.add_noise(scheduler, x0, noise, t)
    abar = scheduler.alphas_cumprod[t]
    assert torch.allclose(xt[0], abar[0].sqrt() * x0[0])
    assert torch.allclose(xt[1], abar[1].sqrt() * 0.7 * x0[1], atol=1e-6)


def test_fps_conditions_the_unet():
    torch.manual_seed(0)
    unet = vc2.VideoCrafter2UNet(**vc2.TINY_UNET_CONFIG).eval()
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        a, b = unet(x, 10, text, fps=8).sample, unet(x, 10, text, fps=28).sample
        assert not torch.allclose(a, b)
        assert not unet.time_embedding._forward_hooks  # the fps hook lives for one call
        torch.nn.init.zeros_(unet.fps_embedding.linear_2.weight), torch.nn.init.zeros_(unet.fps_embedding.linear_2.bias)
        assert torch.allclose(unet(x, 10, text, fps=8).sample, unet(x, 10, text, fps=28).sample)


def tiny_checkpoint(path, seed=0):
    torch.manual_seed(seed)
    nets = vc2.build_models(*TINY)
    for model in nets:  # random, not init-time zeros, so a misplaced tensor shows
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    state = vc2.official_state_dict(*nets)
    state.update({k: torch.zeros(1400 if k == "scale_arr" else 1000) for k in vc2.SCHEDULE_BUFFERS})
    torch.save({"state_dict": state, "epoch": 3}, path)
    return nets


def test_tiny_official_checkpoint_converts_caches_and_generates(tmp_path):
    nets = tiny_checkpoint(tmp_path / "model.ckpt")
    out = vc2.convert(str(tmp_path / "model.ckpt"), str(tmp_path / "vc2"), animatediff.tiny_clip_tokenizer(), configs=TINY)
    unet = vc2.VideoCrafter2UNet.from_pretrained(os.path.join(out, "unet")).eval()
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel

    vae = AutoencoderKL.from_pretrained(os.path.join(out, "vae"))
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"))
    for ours, original in zip((unet, vae, text_encoder), nets):
        theirs = original.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    tokenizer = vc2.bpe_tokenizer(AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer")))
    seen = []
    vc2.encode_prompts(lambda ids: (seen.append(ids), text_encoder(ids))[1], tokenizer, ["a cat!"], "cpu")
    ids = tokenizer("a cat!").input_ids
    assert seen[0].shape == (1, 77) and (seen[0][0, len(ids):] == 0).all()  # padded with token 0, as OpenCLIP pads
    assert seen[0][0, :len(ids)].tolist() == ids and 0 not in ids  # the "!" a word of its own, not the pad
    stamp = os.path.getmtime(os.path.join(out, "videocrafter2.json"))
    vc2.convert(str(tmp_path / "model.ckpt"), str(tmp_path / "vc2"), animatediff.tiny_clip_tokenizer(), configs=TINY)
    assert os.path.getmtime(os.path.join(out, "videocrafter2.json")) == stamp  # cached: converted once

    text = vc2.encode_prompts(text_encoder, tokenizer, ["a cat runs"], "cpu")
    uncond = vc2.encode_prompts(text_encoder, tokenizer, [""], "cpu")
    scheduler = vc2.scheduler_of()
    g = torch.Generator().manual_seed(0)
    latents = vc2.sample(unet, scheduler, text, uncond, torch.randn(1, 4, 4, 8, 8, generator=g), fps=16,
                         num_inference_steps=3, guidance_scale=12.0, generator=g)
    frames = vae.decode(latents[0].permute(1, 0, 2, 3) / vae.config.scaling_factor).sample
    assert frames.shape == (4, 3, 16, 16) and torch.isfinite(frames).all()


class Trainer:  # any class outside torch's allow-list: unpickling it could run code
    pass


def test_a_checkpoint_with_pickled_objects_is_refused_not_run(tmp_path):
    torch.save({"state_dict": {}, "trainer": Trainer()}, tmp_path / "model.ckpt")
    with pytest.raises(common.ConfigError, match="weights_only=True"):
        vc2.load_official(str(tmp_path / "model.ckpt"))
    torch.save({"weights": {}}, tmp_path / "other.ckpt")
    with pytest.raises(common.ConfigError, match="expected a dict with 'state_dict'"):
        vc2.load_official(str(tmp_path / "other.ckpt"))


def test_vip_loop_runs_one_stage_on_a_tiny_vc2(tmp_path, tiny_reward):
    from conftest import loop_config, run_script
    from safetensors.torch import load_file

    # diffusers' UNet3D has no gradient checkpointing of its own: ours covers it
    config = loop_config("tiny_videocrafter2", tmp_path / "vc2.yaml", fast_except=("build_tiny",),
                         model={"pretrained_model_name_or_path": str(tmp_path / "models" / "vc2"),
                                "height": 32, "width": 32},
                         reward={"reward_model": tiny_reward}, train={"gradient_checkpointing": True})
    run = tmp_path / "run"
    run_script("bash", "vip_loop.sh", "tiny_videocrafter2", "1", env={"CONFIG": config, "RUN_DIR": str(run)},
               timeout=900)

    assert (tmp_path / "models" / "vc2.ckpt").exists()  # the tiny model went through the official layout
    assert json.loads((tmp_path / "models" / "vc2" / "videocrafter2.json").read_text())["unet_parameters"] > 0
    pruned = json.loads((run / "stage_1" / "prune" / "student" / "student.json").read_text())
    assert pruned["backend"] == "videocrafter2" and len(pruned["removed_blocks"]) == 1
    unet = vc2.VideoCrafter2UNet(**vc2.TINY_UNET_CONFIG)
    assert pruned["removed_blocks"][0] in vc2.prunable_blocks(unet)
    trained = json.loads((run / "stage_1" / "train" / "student" / "student.json").read_text())
    assert trained["weights"] == "unet" and trained["removed_blocks"] == pruned["removed_blocks"]
    weights = load_file(run / "stage_1" / "train" / "student" / "student.safetensors")
    teacher = vc2.VideoCrafter2UNet.from_pretrained(tmp_path / "models" / "vc2" / "unet").state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in weights.items())  # ReDPO moved the student
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert [m["label"] for m in report["models"]] == ["teacher (M0)", "stage_1/prune", "stage_1/train"]
    assert report["models"][1]["unet_parameters"] < report["models"][0]["unet_parameters"]

    # The export: VC2's own model.ckpt, read through the official key names, is the student's function.
    state = vc2.load_official(run / "export" / "model.ckpt")
    nets = vc2.build_models(*TINY)
    assert set(state) == set(vc2.official_state_dict(*nets)) | set(vc2.SCHEDULE_BUFFERS)  # both ways
    unet = vc2.VideoCrafter2UNet(**vc2.TINY_UNET_CONFIG)
    unet.load_state_dict(vc2.convert_state_dict(state, unet, *nets[1:])[0])
    args = stage.parse_config(["--config", config], "", {"model": stage.MODEL_OPTIONS})
    student = models.load_model(vc2, args, student=str(run / "stage_1" / "train" / "student"))
    x, text = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.allclose(unet.eval()(x, 500, text).sample, student.eval()(x, 500, text).sample, atol=1e-6)
    assert all(not v.any() for k, v in unet.state_dict().items() if k.startswith(pruned["removed_blocks"][0] + "."))


def test_every_kind_of_block_is_removable_and_removal_saves_parameters_and_flops():
    torch.manual_seed(0)
    unet = vc2.VideoCrafter2UNet(**vc2.TINY_UNET_CONFIG).eval()
    blocks = models.list_blocks(vc2, unet)
    kinds = {b["name"].split(".")[-2] if "." in b["name"] else b["name"] for b in blocks}
    assert kinds == {"transformer_in", "resnets", "temp_convs", "attentions", "temp_attentions"}
    chosen = ["transformer_in"] + [next(b["name"] for b in blocks if f".{k}." in b["name"])
                                   for k in ("resnets", "temp_convs", "attentions", "temp_attentions")]
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 32)
    flops, params = models.count_flops(vc2, unet, 3, 64, 64), models.count_parameters(unet)
    with torch.no_grad():
        full = unet(x, 10, text).sample
        with models.blocks_removed(vc2, unet, chosen):
            pruned = unet(x, 10, text).sample
            assert models.removed_blocks(vc2, unet) == chosen
            assert models.count_flops(vc2, unet, 3, 64, 64) < flops
            saved = params - models.count_parameters(unet)
            assert saved == sum(b["params"] for b in blocks if b["name"] in chosen)
        assert torch.equal(unet(x, 10, text).sample, full)  # put back as it was
    assert pruned.shape == full.shape and not torch.allclose(pruned, full)
