"""Validation loss: 8 fixed levels, fixed noise, identical digits on rerun, and the formula it claims."""
import pytest
import torch

from rectflow.evaluate.val_loss import T_LEVELS, noise_for, validation_loss
from rectflow.flow import Formulation
from rectflow.models.mmdit import MMDiT


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = MMDiT.from_depth(1, patch_size=2, in_channels=3, context_dim=8, pooled_dim=8, input_size=8,
                             hidden_size=32, num_heads=2).eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(10, 3, 8, 8, generator=g) * 2 - 1
    context, pooled = torch.randn(10, 4, 8, generator=g), torch.randn(10, 8, generator=g)
    return model, x0, context, pooled


def test_levels_are_the_documented_midpoints():
    assert T_LEVELS == (0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375)


def test_rerun_is_identical_and_independent_of_batching(setup):
    model, x0, context, pooled = setup
    f = Formulation.from_name("rf/lognorm(0.00, 1.00)")
    first = validation_loss(model, f, x0, context, pooled, seed=3, batch_size=4)
    again = validation_loss(model, f, x0, context, pooled, seed=3, batch_size=4)
    assert first == again  # every digit
    assert len(first["loss"]) == 8 and first["t"] == list(T_LEVELS) and first["n"] == 10
    assert first["mean"] == sum(first["loss"]) / 8
    other_batching = validation_loss(model, f, x0, context, pooled, seed=3, batch_size=7)
    assert other_batching["loss"] == pytest.approx(first["loss"], rel=1e-5)  # same noise per image
    other_seed = validation_loss(model, f, x0, context, pooled, seed=4, batch_size=4)
    assert other_seed["mean"] != first["mean"]


def test_level_value_is_the_rf_velocity_mse(setup):
    model, x0, context, pooled = setup
    f = Formulation.from_name("rf")
    result = validation_loss(model, f, x0, context, pooled, seed=0, levels=(0.25, 0.75), batch_size=16)
    eps = torch.stack([noise_for(0, i, (3, 8, 8)) for i in range(10)])
    for t, value in zip((0.25, 0.75), result["loss"]):
        z = (1 - t) * x0 + t * eps  # PAPER 1: rf, a = 1 - t, b = t; the network predicts eps - x0
        with torch.no_grad():
            v = model(z, torch.full((10,), t), context, pooled)
        assert value == pytest.approx(float((v - (eps - x0)).pow(2).mean()), rel=1e-5)


def test_noise_is_fixed_per_image():
    assert torch.equal(noise_for(0, 5, (2, 3)), noise_for(0, 5, (2, 3)))
    assert not torch.equal(noise_for(0, 5, (2, 3)), noise_for(0, 6, (2, 3)))
    assert not torch.equal(noise_for(0, 5, (2, 3)), noise_for(1, 5, (2, 3)))
