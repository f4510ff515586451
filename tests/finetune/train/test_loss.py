"""The denoising objective against hand-written references from the scheduler's alphas_cumprod."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import ConfigError
from finetune.train.loss import (
    debiased_weights,
    diffusion_loss,
    make_noise_scheduler,
    min_snr_weights,
    noisy_latents,
    resolve_prediction_type,
    sample_noise,
    sample_timesteps,
    timestep_range,
    snr,
    training_target,
)
from finetune.models.configs import sdxl_scheduler_config


@pytest.fixture(scope="module")
def scheduler():
    return make_noise_scheduler(sdxl_scheduler_config(), zero_terminal_snr=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_alphas_cumprod(config: dict) -> torch.Tensor:
    """SDXL's scaled_linear betas, written out independently of diffusers."""
    n = config["num_train_timesteps"]
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def test_scheduler_uses_the_models_betas(scheduler):
    config = sdxl_scheduler_config()
    assert config["beta_schedule"] == "scaled_linear"
    expected = reference_alphas_cumprod(config)
    assert torch.allclose(scheduler.alphas_cumprod.double(), expected, rtol=1e-4)
    assert scheduler.alphas_cumprod[-1] > 1e-3  # SDXL's schedule never reaches pure noise


def test_zero_terminal_snr_reaches_pure_noise():
    scheduler = make_noise_scheduler(sdxl_scheduler_config(), zero_terminal_snr=True)
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert snr(scheduler, torch.tensor([999])).item() == pytest.approx(0.0, abs=1e-6)
    # The first step stays (almost) unchanged: the rescale keeps sqrt(ᾱ_0).
    plain = make_noise_scheduler(sdxl_scheduler_config(), zero_terminal_snr=False)
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), abs=1e-6)


def test_scheduler_config_private_keys_are_ignored():
    config = {**sdxl_scheduler_config(), "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0"}
    scheduler = make_noise_scheduler(config)
    assert scheduler.config.num_train_timesteps == 1000


@pytest.mark.parametrize("value", ["epsilon", "v_prediction"])
def test_prediction_type_auto_reads_the_scheduler(value):
    scheduler = make_noise_scheduler({**sdxl_scheduler_config(), "prediction_type": value})
    assert resolve_prediction_type("auto", scheduler) == value
    other = "epsilon" if value == "v_prediction" else "v_prediction"
    assert resolve_prediction_type(other, scheduler) == other  # an explicit value wins


def test_unsupported_prediction_type_is_a_config_error():
    scheduler = make_noise_scheduler({**sdxl_scheduler_config(), "prediction_type": "sample"})
    with pytest.raises(ConfigError, match=r"loss\.prediction_type.*'sample'.*epsilon"):
        resolve_prediction_type("auto", scheduler)


def test_noise_is_standard_normal_and_reproducible():
    latents = torch.zeros(4, 4, 32, 32, dtype=torch.float16)
    noise = sample_noise(latents, gen(3))
    assert noise.shape == latents.shape and noise.dtype == torch.float16
    assert noise.float().mean().item() == pytest.approx(0.0, abs=0.03)
    assert noise.float().std().item() == pytest.approx(1.0, abs=0.03)
    assert torch.equal(noise, sample_noise(latents, gen(3)))
    assert not torch.equal(noise, sample_noise(latents, gen(4)))


def test_noise_offset_shifts_each_channels_mean():
    latents = torch.zeros(8, 4, 32, 32)
    plain = sample_noise(latents, gen(0))
    offset = sample_noise(latents, gen(0), noise_offset=0.5)
    plain_means = plain.mean(dim=(2, 3))  # (B, C)
    assert plain_means.abs().max() < 0.15  # 1024 samples per channel: means near 0
    # Same generator: the per-pixel noise is the same draw, so the difference is a per-channel constant.
    shift = offset - plain
    assert shift.std(dim=(2, 3)).max() < 1e-6
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.5, rel=0.4)  # 0.5·N(0, 1) over 32 channels
    assert offset.std(dim=(2, 3)).mean().item() == pytest.approx(1.0, abs=0.05)


def test_random_offset_strength_scales_each_samples_offset_within_the_bound():
    latents = torch.zeros(256, 4, 8, 8)
    plain = sample_noise(latents, gen(0))
    fixed = sample_noise(latents, gen(0), noise_offset=0.5) - plain  # 0.5·N(0, 1) per (sample, channel)
    scaled = sample_noise(latents, gen(0), noise_offset=0.5, random_strength=True) - plain
    ratio = (scaled[:, :, 0, 0] / fixed[:, :, 0, 0])  # the same offset draw, times one strength per sample
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)  # one strength for all channels
    assert 0 <= ratio.min() and ratio.max() < 1 and ratio[:, 0].std() > 0.2  # uniform in [0, 1), not fixed


def test_timesteps_are_uniform_integers_in_range():
    t = sample_timesteps(20000, 1000, gen(0), torch.device("cpu"))
    assert t.dtype == torch.long and t.shape == (20000,)
    assert t.min() >= 0 and t.max() <= 999
    assert t.float().mean().item() == pytest.approx(499.5, abs=10)
    assert torch.bincount(t // 100, minlength=10).min() > 1800  # every tenth of the range is drawn
    assert torch.equal(t[:5], sample_timesteps(20000, 1000, gen(0), "cpu")[:5])


def test_a_timestep_range_narrows_the_draw_and_keeps_the_default_stream():
    assert timestep_range(1000) == (0, 1000)
    low, high = timestep_range(1000, 200, 800)
    t = sample_timesteps(20000, high, gen(0), "cpu", low)
    assert t.min() == 200 and t.max() == 799  # [min, max): both ends drawn, max excluded
    # The default range draws exactly what the plain call draws: old runs resume unchanged.
    assert torch.equal(sample_timesteps(64, 1000, gen(0), "cpu", 0), sample_timesteps(64, 1000, gen(0), "cpu"))


@pytest.mark.parametrize("low, high, key", [(0, 1001, "loss.max_timestep = 1001"), (1000, None, "loss.min_timestep = 1000")])
def test_a_timestep_range_outside_the_schedule_names_the_key(low, high, key):
    with pytest.raises(ConfigError, match=key):
        timestep_range(1000, low, high)


def test_noisy_latents_follow_the_formula(scheduler):
    g = gen(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    n = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ab = reference_alphas_cumprod(sdxl_scheduler_config())[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * x.double() + (1 - ab).sqrt() * n.double()
    assert torch.allclose(noisy_latents(scheduler, x, n, t).double(), expected, atol=1e-4)


def test_input_perturbation_changes_the_input_but_not_the_target(scheduler):
    g = gen(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    n = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 800])
    n_before = n.clone()
    plain = noisy_latents(scheduler, x, n, t)
    perturbed = noisy_latents(scheduler, x, n, t, input_perturbation=0.1, generator=gen(5))
    assert torch.equal(n, n_before)  # the caller's noise (the target) is untouched
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    extra = (perturbed - plain) / (1 - ab).sqrt()  # the added noise, recovered: 0.1·N(0,1)
    assert extra.std().item() == pytest.approx(0.1, rel=0.2)
    assert torch.equal(training_target(scheduler, x, n, t, "epsilon"), n)
    assert torch.equal(perturbed, noisy_latents(scheduler, x, n, t, input_perturbation=0.1, generator=gen(5)))


def test_targets(scheduler):
    g = gen(3)
    x = torch.randn(3, 4, 8, 8, generator=g)
    n = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 400, 990])
    ab = reference_alphas_cumprod(sdxl_scheduler_config())[t].view(-1, 1, 1, 1)
    v = ab.sqrt() * n.double() - (1 - ab).sqrt() * x.double()
    assert torch.allclose(training_target(scheduler, x, n, t, "v_prediction").double(), v, atol=1e-4)
    assert training_target(scheduler, x, n, t, "epsilon") is n
    with pytest.raises(ConfigError):
        training_target(scheduler, x, n, t, "sample")


def test_snr_matches_alphas_cumprod(scheduler):
    t = torch.tensor([0, 250, 999])
    ab = reference_alphas_cumprod(sdxl_scheduler_config())[t]
    value = snr(scheduler, t)
    assert value.dtype == torch.float32
    assert torch.allclose(value.double(), ab / (1 - ab), rtol=1e-3)
    assert value[0] > value[1] > value[2]  # signal fades with t


def test_min_snr_weights_at_small_and_large_t(scheduler):
    gamma = 5.0
    t = torch.tensor([0, 999])
    value = snr(scheduler, t)
    assert value[0] > gamma > value[1]
    eps = min_snr_weights(scheduler, t, gamma, "epsilon")
    assert eps[0].item() == pytest.approx(gamma / value[0].item(), rel=1e-5)  # easy steps down-weighted
    assert eps[1].item() == pytest.approx(1.0)  # noisy steps keep full weight
    v = min_snr_weights(scheduler, t, gamma, "v_prediction")
    assert v[0].item() == pytest.approx(gamma / (value[0].item() + 1), rel=1e-5)
    assert v[1].item() == pytest.approx(value[1].item() / (value[1].item() + 1), rel=1e-5)
    assert (v <= eps).all()


def test_min_snr_weights_are_finite_with_zero_terminal_snr():
    scheduler = make_noise_scheduler(sdxl_scheduler_config(), zero_terminal_snr=True)
    t = torch.tensor([0, 999])
    eps = min_snr_weights(scheduler, t, 5.0, "epsilon")
    v = min_snr_weights(scheduler, t, 5.0, "v_prediction")
    assert torch.isfinite(eps).all() and torch.isfinite(v).all()
    assert eps[1].item() == pytest.approx(1.0)  # the limit of min(snr, γ)/snr as snr → 0
    assert v[1].item() == pytest.approx(0.0, abs=1e-6)


def test_debiased_weights_are_one_over_root_snr_for_either_target(scheduler):
    t = torch.tensor([0, 250, 500, 999])
    value = snr(scheduler, t).double()
    eps = debiased_weights(scheduler, t, "epsilon").double()
    torch.testing.assert_close(eps, value.rsqrt(), rtol=1e-5, atol=0)
    assert eps[0] < 0.05 and eps[-1] > 10  # easy (low-noise) steps count far less
    # v error = eps error · (SNR + 1)/SNR: the v weight makes both objectives weigh each step alike.
    v = debiased_weights(scheduler, t, "v_prediction").double()
    torch.testing.assert_close(v * (value + 1) / value, eps, rtol=1e-5, atol=0)


def test_debiased_weights_are_finite_with_zero_terminal_snr():
    scheduler = make_noise_scheduler(sdxl_scheduler_config(), zero_terminal_snr=True)
    t = torch.tensor([0, 999])
    for prediction_type in ("epsilon", "v_prediction"):
        assert torch.isfinite(debiased_weights(scheduler, t, prediction_type)).all()


def test_l2_loss_is_the_mean_square():
    g = gen(4)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert diffusion_loss(pred, target).item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)


def test_loss_is_computed_in_fp32():
    pred = torch.full((1, 4, 8, 8), 1.0, dtype=torch.bfloat16)
    target = pred + 2.0**-6  # representable in bf16, but its square underflows bf16's precision near 1
    loss = diffusion_loss(pred, target.to(torch.bfloat16))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.0**-12, rel=1e-3)


def test_huber_is_quadratic_near_zero_and_linear_far_away():
    c = 0.1
    target = torch.zeros(1, 1, 1, 1)
    small = torch.full((1, 1, 1, 1), 1e-3)
    assert diffusion_loss(small, target, loss_type="huber", huber_c=c).item() == pytest.approx(1e-6, rel=1e-3)
    big = torch.full((1, 1, 1, 1), 100.0)
    huber = diffusion_loss(big, target, loss_type="huber", huber_c=c).item()
    assert huber == pytest.approx(2 * c * 100.0, rel=1e-2)  # 2c·|r|, far below l2's 10⁴
    bigger = diffusion_loss(big * 2, target, loss_type="huber", huber_c=c).item()
    assert bigger / huber == pytest.approx(2.0, rel=1e-2)  # linear growth
    r = torch.tensor([0.3]).view(1, 1, 1, 1)
    exact = 2 * c * ((0.3**2 + c**2) ** 0.5 - c)
    assert diffusion_loss(r, target, loss_type="huber", huber_c=c).item() == pytest.approx(exact, rel=1e-6)


def test_smooth_l1_is_quadratic_below_beta_and_linear_above():
    target = torch.zeros(1, 1, 1, 1)
    loss = lambda r: diffusion_loss(torch.full((1, 1, 1, 1), r), target, loss_type="smooth_l1", huber_c=0.1).item()
    assert loss(0.05) == pytest.approx(0.5 * 0.05**2 / 0.1, rel=1e-5)
    assert loss(3.0) == pytest.approx(3.0 - 0.05, rel=1e-5)


def test_unknown_loss_type_is_a_config_error():
    with pytest.raises(ConfigError, match="loss.type"):
        diffusion_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), loss_type="l3")


def test_mask_zeroes_the_loss_outside_it():
    pred = torch.zeros(2, 4, 8, 8)
    target = torch.zeros(2, 4, 8, 8)
    target[:, :, :, 4:] = 10.0  # large errors only on the right half
    target[:, :, :, :4] = 1.0  # error 1 on the left half
    mask = torch.zeros(2, 1, 64, 64)  # pixel-size mask: resized to the 8x8 latents
    mask[:, :, :, :32] = 1.0  # keep the left half
    assert diffusion_loss(pred, target, mask=mask).item() == pytest.approx(1.0)  # mean over the mask's area
    assert diffusion_loss(pred, target).item() == pytest.approx(50.5)


def test_soft_mask_weights_elements_and_empty_mask_gives_zero():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([1.0, 3.0, 0.0, 0.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    mask = torch.tensor([[1.0, 0.5], [0.0, 0.0]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    mask[1] = 0  # the second sample has nothing to learn
    per_first = (1 * 1 + 9 * 0.5) / 1.5
    assert diffusion_loss(pred, target, mask=mask).item() == pytest.approx(per_first / 2)


def test_weights_scale_each_sample():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])  # per-sample l2: 1 and 4
    assert diffusion_loss(pred, target).item() == pytest.approx(2.5)
    assert diffusion_loss(pred, target, weights=torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert diffusion_loss(pred, target, weights=torch.tensor([2.0, 0.5])).item() == pytest.approx((2 + 2) / 2)


def test_shape_mismatches_are_refused():
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(torch.zeros(2, 4, 8, 8), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="weights"):
        diffusion_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), weights=torch.ones(3))


def test_loss_has_gradients_for_pred():
    pred = torch.zeros(1, 4, 4, 4, requires_grad=True)
    diffusion_loss(pred, torch.ones(1, 4, 4, 4), loss_type="huber").backward()
    assert pred.grad is not None and (pred.grad < 0).all()


def test_pyramid_noise_follows_kohya_and_draws_only_from_the_generator():
    import random

    from finetune.train.loss import pyramid_noise

    latents = torch.zeros(2, 4, 16, 24)
    noise = sample_noise(latents, gen(7), multires_iterations=3, multires_discount=0.3)
    # By hand, with the same draws in the same order: base noise, then per level r in [2, 4) and its noise.
    g = gen(7)
    base = torch.randn(2, 4, 16, 24, generator=g)
    expected = base.clone()
    for i in range(3):
        r = float(torch.rand((), generator=g)) * 2 + 2
        hn, wn = max(1, int(16 / r**i)), max(1, int(24 / r**i))
        up = torch.nn.Upsample(size=(16, 24), mode="bilinear")  # kohya's module, default align_corners
        expected += up(torch.randn(2, 4, hn, wn, generator=g)) * 0.3**i
        if hn == 1 or wn == 1:
            break
    torch.testing.assert_close(noise, expected / expected.std(), atol=1e-6, rtol=0)
    assert float(noise.std()) == pytest.approx(1.0, abs=1e-5)
    state = random.getstate()
    assert torch.equal(noise, sample_noise(latents, gen(7), multires_iterations=3, multires_discount=0.3))
    assert random.getstate() == state  # kohya's global `random` is left alone: resume stays exact
    # Many levels on a small latent stop at the first 1-pixel level instead of failing.
    assert pyramid_noise(torch.randn(1, 4, 8, 8), gen(1), 20, 0.3).shape == (1, 4, 8, 8)
