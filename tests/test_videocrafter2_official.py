"""VideoCrafter2 against numbers recorded from the official code (AILab-CVC/VideoCrafter at 11bcd76,
unmodified): a tiny official-layout LatentDiffusion (widths shrunk, group norm 32 as the official
code hard-codes, every weight random and float16-exact), its state dict, and what its UNet, DDIM
sampler, text embedder, tokenizer and VAE produced (tests/fixtures/vc2_official*.json|safetensors;
how they were made: the JSON's "how"). Our models take the official state dict through
convert_state_dict and must give the same numbers. Run: python -m pytest -q tests/test_videocrafter2_official.py"""
import gzip
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from backends import videocrafter2 as vc2
from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"
OFFICIAL = json.loads((FIXTURES / "vc2_official.json").read_text())
REF = load_file(FIXTURES / "vc2_official_reference.safetensors")


def configs():
    """Our three configs for the official sizes of the fixture."""
    u, d, t = OFFICIAL["unet_config"]["params"], OFFICIAL["ddconfig"], OFFICIAL["open_clip_text_config"]
    attention = [2 ** i in u["attention_resolutions"] for i in range(len(u["channel_mult"]))]
    unet = dict(block_out_channels=tuple(u["model_channels"] * m for m in u["channel_mult"]),
                layers_per_block=u["num_res_blocks"], norm_num_groups=32, cross_attention_dim=u["context_dim"],
                attention_head_dim=u["num_head_channels"],
                down_block_types=tuple("CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attention),
                up_block_types=tuple("CrossAttnUpBlock3D" if a else "UpBlock3D" for a in attention[::-1]))
    vae = dict(vc2.VAE_CONFIG, block_out_channels=tuple(d["ch"] * m for m in d["ch_mult"]),
               down_block_types=("DownEncoderBlock2D",) * len(d["ch_mult"]),
               up_block_types=("UpDecoderBlock2D",) * len(d["ch_mult"]), layers_per_block=d["num_res_blocks"],
               norm_num_groups=32, sample_size=d["resolution"], latent_channels=d["z_channels"])
    text = dict(vc2.TEXT_CONFIG, hidden_size=t["width"], intermediate_size=4 * t["width"],
                num_hidden_layers=t["layers"] - 1, num_attention_heads=t["heads"], projection_dim=t["width"])
    return unet, vae, text


@pytest.fixture(scope="module")
def models():
    """Our UNet, VAE and text encoder holding the official tiny model's weights."""
    nets = vc2.build_models(*configs())
    state = load_file(FIXTURES / "vc2_official_tiny.safetensors")
    for model, weights in zip(nets, vc2.convert_state_dict(state, *nets)):
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
        assert not unexpected and not [k for k in missing if "position_ids" not in k]
    return [m.eval() for m in nets]


def relative(ours, official):
    return ((ours - official).abs().max() / official.abs().max()).item()


def clip_tokenizer():
    """CLIP's BPE (OpenCLIP's SimpleTokenizer vocabulary: bpe_simple_vocab_16e6.txt.gz, the laion
    ViT-H/14 repository's too) as a transformers CLIPTokenizer, offline: the 256 byte symbols in
    CLIP's order, each with the end-of-word mark, the 48,894 merges, the two special tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols = [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]
    lines = gzip.open(FIXTURES / "clip_bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


@pytest.mark.parametrize("case", range(3))
def test_the_unet_gives_the_official_outputs(models, case):
    """Three shapes; fps as an int, one per video, and left out (the official UNet's own default is 16, ours 28,
    the official inference script's: passed explicitly here)."""
    unet = models[0]
    fps = REF[f"unet{case}_fps"].long()
    fps = int(fps[0]) if OFFICIAL["unet_cases"][case]["fps_kind"] == "python int" else fps
    with torch.no_grad():
        out = unet(REF[f"unet{case}_x"], REF[f"unet{case}_t"].long(), REF[f"unet{case}_context"], fps=fps).sample
    assert relative(out, REF[f"unet{case}_out"]) < 1e-4


def test_the_vae_decodes_as_the_official_one(models):
    vae, z = models[1], REF["vae_z"]
    frames = z.permute(0, 2, 1, 3, 4).flatten(0, 1) / OFFICIAL["vae"]["scale_factor"]
    with torch.no_grad():
        video = vae.decode(frames).sample.reshape(1, 2, 3, 16, 16).permute(0, 2, 1, 3, 4)
    assert relative(video, REF["vae_decoded"]) < 1e-4


def test_prompts_are_tokenized_and_encoded_as_openclip_does(models):
    """Punctuation ("!" is token 0, OpenCLIP's pad, and must stay a word), HTML entities (OpenCLIP
    unescapes them), accents, emoji and runs of spaces: the same 77 ids as open_clip.tokenize, and
    the embedder's output."""
    tokenizer, prompts = clip_tokenizer(), OFFICIAL["text"]["prompts"]
    tokens = REF["text_tokens"].long()
    seen, text_encoder = [], models[2]
    recording = lambda ids: (seen.append(ids), text_encoder(ids))[1]  # noqa: E731 (what the encoder is handed)
    with torch.no_grad():
        embedded = vc2.encode_prompts(recording, tokenizer, prompts, "cpu")
    assert torch.equal(seen[0], tokens), [p for p, a, b in zip(prompts, seen[0], tokens) if not torch.equal(a, b)]
    assert relative(embedded, REF["text_emb"]) < 1e-5


def test_a_saved_tokenizer_whose_pad_is_token_0_keeps_its_exclamation_marks(tmp_path):
    """A conversion used to save the tokenizer with "!" (token 0) as its pad token; reloaded, every
    "!" then became that special token before BPE. The backend rebuilds it from the vocabulary."""
    from transformers import AutoTokenizer

    saved = clip_tokenizer()
    saved.pad_token = saved.convert_ids_to_tokens(0)
    saved.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("wow!! a cat!").input_ids[1:-1] != clip_tokenizer()("wow!! a cat!").input_ids[1:-1]  # the fault
    assert vc2.bpe_tokenizer(reloaded)("wow!! a cat!").input_ids == clip_tokenizer()("wow!! a cat!").input_ids
    assert vc2.clean("rock &amp; roll &lt;3") == "rock & roll <3" and vc2.clean(" a  b\n c ") == "a b c"


def test_ddim_timesteps_are_the_official_ones_for_every_step_count():
    for steps, run in OFFICIAL["ddim"].items():
        s = int(steps)
        if "timesteps" in run:
            assert vc2.ddim_timesteps(s) == run["timesteps"], s
        elif 0 < s <= 1000:  # the official schedule ends at t = 1000, past alphas_cumprod: ours leaves that step out
            official = run["timesteps_before_error"]
            assert run["error"].startswith("IndexError") and official[-1] == 1000, s
            assert vc2.ddim_timesteps(s) == official[:-1], s
    assert len(vc2.ddim_timesteps(30)) == 31 and vc2.ddim_timesteps(30)[-1] == 991  # not 958, nor 30 steps


@pytest.mark.parametrize("steps", [50, 30, 10])
def test_sampling_ends_at_the_official_latents(models, steps):
    unet = models[0]
    latents = vc2.sample(unet, vc2.scheduler_of(), REF["e2e_text_emb"], REF["e2e_uncond_emb"], REF["e2e_x_T"],
                         fps=OFFICIAL["e2e"]["fps"], num_inference_steps=steps, guidance_scale=OFFICIAL["e2e"]["cfg_scale"],
                         eta=0.0)
    assert relative(latents, REF[f"e2e_S{steps}_eta0_latents"]) < 1e-4


def test_sampling_with_eta_1_ends_at_the_official_latents_given_its_noise(models, monkeypatch):
    """eta 1 draws noise each step: the official draws, fed to our sampler (one video at a time, as it draws them)."""
    draws = [REF[f"e2e_S10_eta1_noise{i:02d}"][b:b + 1] for i in range(10) for b in range(2)]
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.pop(0))
    latents = vc2.sample(models[0], vc2.scheduler_of(), REF["e2e_text_emb"], REF["e2e_uncond_emb"], REF["e2e_x_T"],
                         fps=28, num_inference_steps=10, guidance_scale=12.0, eta=1.0, generator=[None, None])
    assert not draws and relative(latents, REF["e2e_S10_eta1_latents"]) < 1e-4
