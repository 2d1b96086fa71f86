"""ReDPO loss against hand-computed values. Run: python -m pytest -q tests/test_loss.py"""
import math

import pytest
import torch

from common import redpo_loss


def pair():
    # One pair, two elements each, target zero:
    # model mse w = (1+1)/2 = 1, l = (4+0)/2 = 2; ref mse w = (0+4)/2 = 2, l = (1+1)/2 = 1
    model = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    ref = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    return model, ref, torch.zeros(2, 2)


def test_hand_computed_values():
    model, ref, target = pair()
    loss, m = redpo_loss(model, ref, target, beta=0.5, w_sft=0.5)
    # logits = -0.5 * ((1 - 2) - (2 - 1)) = 1; sft = ((1-0)^2 + (1-2)^2) / 2 = 1
    dpo = math.log1p(math.exp(-1.0))
    assert m["dpo_loss"] == pytest.approx(dpo, abs=1e-6)
    assert m["sft_loss"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(dpo + 0.5, abs=1e-6)
    assert m["loss"] == pytest.approx(dpo + 0.5, abs=1e-6)
    assert m["rewards/accuracies"] == 1.0
    assert (m["rewards/chosen"], m["rewards/rejected"]) == (pytest.approx(0.5), pytest.approx(-0.5))
    assert m["rewards/margins"] == pytest.approx(1.0)  # beta * 2.0
    assert (m["mse/model_winner"], m["mse/model_loser"], m["mse/ref_winner"], m["mse/ref_loser"]) == (1.0, 2.0, 2.0, 1.0)
    assert all(isinstance(v, float) for v in m.values())


def test_loss_types_select_terms():
    model, ref, target = pair()
    dpo, _ = redpo_loss(model, ref, target, beta=0.5, w_sft=3.0, loss_type="dpo")
    sft, _ = redpo_loss(model, ref, target, beta=0.5, w_sft=3.0, loss_type="sft")
    redpo, _ = redpo_loss(model, ref, target, beta=0.5, w_sft=3.0)
    assert dpo.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert sft.item() == pytest.approx(1.0)
    assert redpo.item() == pytest.approx(dpo.item() + 3.0 * sft.item(), abs=1e-6)


def test_mse_averages_every_non_batch_dim_of_video_latents():
    # (2B, C, F, H, W) with all the error in one width column: a mean over dims [1, 2, 3] only
    # (VideoDPO's bug) would give one value per width column instead of one per sample.
    target = torch.zeros(4, 2, 3, 2, 5)
    model = target.clone()
    model[0, ..., 0] = 2.0  # winner 0: 12 of 60 elements at error 4 -> mse 0.8
    model[2, ..., 4] = 1.0  # loser 0: 12 of 60 elements at error 1 -> mse 0.2
    _, m = redpo_loss(model, target.clone(), target, beta=1.0, w_sft=0.0)
    assert m["mse/model_winner"] == pytest.approx(0.4)  # (0.8 + 0) / 2 winners
    assert m["mse/model_loser"] == pytest.approx(0.1)
    # pair 0: logits = -(0.8 - 0.2) < 0; pair 1: logits = 0 -> not > 0
    assert m["rewards/accuracies"] == 0.0
    assert m["rewards/margins"] == pytest.approx(-0.3)


def test_gradient_reaches_student_only():
    torch.manual_seed(0)
    model = torch.randn(4, 3, 2, 4, 4, requires_grad=True)
    ref = torch.randn(4, 3, 2, 4, 4, requires_grad=True)
    target = torch.randn(4, 3, 2, 4, 4)
    loss, _ = redpo_loss(model, ref, target, beta=10.0, w_sft=1.0)
    loss.backward()
    assert ref.grad is None
    assert model.grad is not None and model.grad[:2].abs().sum() > 0 and model.grad[2:].abs().sum() > 0

    model.grad = None
    loss, _ = redpo_loss(model, ref, target, beta=10.0, w_sft=1.0, loss_type="sft")
    loss.backward()
    assert model.grad[2:].abs().sum() == 0  # SFT pulls winners only
    # d/dx mean((x - r)^2) = 2 (x - r) / n per sample, averaged over the 2 winners
    n = model[0].numel()
    assert torch.allclose(model.grad[:2], (2 * (model - ref) / n / 2)[:2].detach(), atol=1e-7)


def test_low_precision_inputs_are_computed_in_float32():
    torch.manual_seed(0)
    model, ref, target = (torch.randn(2, 4, 2, 8, 8) for _ in range(3))
    loss32, m32 = redpo_loss(model.bfloat16().float(), ref.bfloat16().float(), target.bfloat16().float(),
                             beta=2500.0, w_sft=1.0)
    loss16, m16 = redpo_loss(model.bfloat16(), ref.bfloat16(), target.bfloat16(), beta=2500.0, w_sft=1.0)
    assert loss16.dtype == torch.float32
    assert loss16.item() == loss32.item() and m16 == m32
    # large beta on fp16 inputs: logits far outside fp16's range stay finite in float32
    big = torch.zeros(2, 4, 2, 8, 8, dtype=torch.float16)
    big[1] = 8.0
    loss, _ = redpo_loss(big, torch.zeros_like(big), torch.zeros_like(big), beta=5000.0, w_sft=1.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_bad_arguments_raise():
    model, ref, target = pair()
    with pytest.raises(ValueError, match="redpo, dpo, sft"):
        redpo_loss(model, ref, target, beta=1.0, w_sft=1.0, loss_type="ipo")
    with pytest.raises(ValueError, match="B winners then B losers"):
        redpo_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), beta=1.0, w_sft=1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        redpo_loss(model, ref[:, :1], target, beta=1.0, w_sft=1.0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_diffusion_target_follows_prediction_type(kind):
    from diffusers import DDPMScheduler

    from common import diffusion_target

    scheduler = DDPMScheduler(prediction_type=kind)
    latents, noise, t = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2), torch.tensor([10, 900])
    target = diffusion_target(scheduler, latents, noise, t)
    a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1, 1)
    expected = {"epsilon": noise, "v_prediction": a * noise - s * latents, "sample": latents}[kind]
    assert torch.allclose(target, expected, atol=1e-6)
    noisy = scheduler.add_noise(latents, noise, t)  # each target recovers the clean latents
    clean = {"epsilon": (noisy - s * target) / a, "v_prediction": a * noisy - s * target, "sample": target}[kind]
    assert torch.allclose(clean, latents, atol=1e-4)
