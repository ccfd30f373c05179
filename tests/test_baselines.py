"""The architecture study's baselines: interface, init, conditioning paths, parameter matching, learning."""
import pytest
import torch

from rectflow.flow import Formulation
from rectflow.models.baselines import (
    ARCHITECTURES,
    MMDiT3,
    UViT,
    count_parameters,
    from_config,
    matched,
)
from rectflow.models.mmdit import MMDiT

IO = dict(patch_size=2, in_channels=3, context_dim=24, pooled_dim=16, input_size=8)
BASELINES = ["dit", "crossdit", "uvit", "mmdit3"]


def tiny(arch, depth=2, hidden=32, heads=2, **kw):
    """A tiny model of `arch` built through from_config."""
    return from_config({"arch": arch, "depth": depth, "hidden_size": hidden, "num_heads": heads, **IO, **kw})


def inputs(b=2, n_ctx=6, seed=0):
    """Random (x, t, context, y) for the IO settings."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 8, 8, generator=g), torch.rand(b, generator=g),
            torch.randn(b, n_ctx, 24, generator=g), torch.randn(b, 16, generator=g))


def randomise(model, seed=0):
    """Non-zero weights everywhere, so every path (gates, final layer) carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("arch", BASELINES)
def test_shape_and_zero_init(arch):
    model = tiny(arch)
    out = model(*inputs())
    assert out.shape == (2, 3, 8, 8)
    assert torch.count_nonzero(out) == 0  # zero final layer: the untrained model predicts 0


@pytest.mark.parametrize("arch", BASELINES)
def test_config_round_trip(arch):
    model = randomise(tiny(arch, qk_norm="rms"))
    assert model.config["arch"] == arch
    twin = from_config(model.config)
    twin.load_state_dict(model.state_dict())
    args = inputs()
    assert torch.equal(model(*args), twin(*args))


@pytest.mark.parametrize("arch", BASELINES)
def test_text_and_time_reach_the_output(arch):
    model = randomise(tiny(arch))
    x, t, ctx, y = inputs()
    base = model(x, t, ctx, y)
    assert not torch.allclose(base, model(x, t, ctx + 1.0, y))
    assert not torch.allclose(base, model(x, t, ctx, y + 1.0))
    assert not torch.allclose(base, model(x, t.flip(0), ctx, y))


def test_mmdit3_uses_both_context_parts_with_separate_weights():
    model = randomise(MMDiT3(2, 32, 2, **IO))
    x, t, ctx, y = inputs(n_ctx=6)
    base = model(x, t, ctx, y)
    later = ctx.clone()
    later[:, 3:] += 1.0  # the second (T5-like) half only
    assert not torch.allclose(base, model(x, t, later, y))
    clip, t5 = model.joint_blocks[0].context_blocks
    assert clip.attn.qkv.weight.data_ptr() != t5.attn.qkv.weight.data_ptr()
    assert [p.shape[1] for p in model.split_context(ctx)] == [3, 3]
    assert [p.shape[1] for p in model.split_context(ctx[:, :5])] == [3, 2]  # odd: first part takes ceil(L/2)


def test_mmdit3_context_splits():
    model = MMDiT3(1, 32, 2, context_splits=[2, 4], **IO)
    parts = model.split_context(torch.randn(1, 6, 24))
    assert [p.shape[1] for p in parts] == [2, 4]
    with pytest.raises(ValueError, match="context_splits"):
        model(*inputs(n_ctx=7))
    with pytest.raises(ValueError, match="two token counts"):
        MMDiT3(1, 32, 2, context_splits=[6], **IO)


def test_mmdit3_last_text_blocks_are_pre_only():
    model = MMDiT3(3, 32, 2, **IO)
    assert all(b.pre_only for b in model.joint_blocks[-1].context_blocks)
    assert not any(b.pre_only for blk in model.joint_blocks[:-1] for b in blk.context_blocks)


@pytest.mark.parametrize("depth,skips", [(1, 0), (4, 2), (5, 2)])
def test_uvit_skips_pair_shallow_and_deep_blocks(depth, skips):
    model = UViT(depth, 32, 2, **IO)
    assert len(model.skips) == skips
    # every skip is used: a perturbed skip weight changes the output of a randomised model
    randomise(model)
    args = inputs()
    base = model(*args)
    for skip in model.skips:
        with torch.no_grad():
            skip.weight.add_(0.5)
        assert not torch.allclose(base, model(*args))


def test_unknown_config_keys_and_arch():
    with pytest.raises(ValueError, match="unknown DiT config keys"):
        from_config({"arch": "dit", "depth": 1, "hidden_size": 32, "num_heads": 2, "dual_attention_layers": []})
    with pytest.raises(ValueError, match="unknown architecture"):
        from_config({"arch": "unet", "depth": 1})
    assert isinstance(from_config(tiny("mmdit").config), MMDiT)  # no "arch": a plain MM-DiT


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_matched_parameter_counts(arch):
    target = MMDiT(depth=4, hidden_size=96, num_heads=3, qk_norm="rms", **IO)
    n = sum(p.numel() for p in target.parameters())
    cfg = matched(arch, target)
    model = from_config(cfg)
    got = sum(p.numel() for p in model.parameters())
    assert abs(got - n) / n <= 0.05
    assert got == count_parameters(cfg)
    assert cfg["num_heads"] == 3 and cfg["hidden_size"] % 12 == 0 and cfg["qk_norm"] == "rms"
    assert model(*inputs()).shape == (2, 3, 8, 8)


def test_matched_from_a_count_and_its_errors():
    cfg = matched("dit", 200_000, depth=3, num_heads=4, **IO)
    assert cfg["depth"] == 3 and abs(count_parameters(cfg) - 200_000) / 200_000 <= 0.05
    with pytest.raises(ValueError, match="no crossdit"):
        matched("crossdit", 200_000, depth=1, num_heads=64, tolerance=0.001, **IO)
    with pytest.raises(ValueError, match="reference depth"):
        matched("dit", 200_000, **IO)


@pytest.mark.parametrize("arch", BASELINES)
def test_gradient_checkpointing_matches(arch):
    model = randomise(tiny(arch))
    args = inputs()
    plain = model(*args).square().sum()
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    ck = model(*args).square().sum()
    ck.backward()
    assert torch.allclose(plain, ck)
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("arch", BASELINES)
def test_tiny_model_learns(arch):
    torch.manual_seed(0)
    model = tiny(arch, depth=2, hidden=32)
    f = Formulation.from_name("rf")
    x0, _, ctx, y = inputs(b=8, seed=1)
    g = torch.Generator().manual_seed(2)
    t, eps = torch.rand(8, generator=g), torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = f.training_loss(lambda z, tt: model(z, tt, ctx, y), x0, t=t, eps=eps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


@pytest.mark.parametrize("arch", BASELINES)
def test_matched_tiny_models_fall_back_to_the_mlp_width(arch):
    # one block of width 32 behind a 384-wide context: width steps of 4 move the count by ~12%, too coarse alone
    target = MMDiT(depth=1, hidden_size=32, num_heads=2, patch_size=4, in_channels=3, context_dim=384,
                   pooled_dim=384, input_size=16)
    n = sum(p.numel() for p in target.parameters())
    cfg = matched(arch, target)
    assert cfg["depth"] == 1 and abs(count_parameters(cfg) - n) / n <= 0.05
    model = from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        tiny("dit", hidden=32, heads=3)
    with pytest.raises(ValueError, match="input_size 8 is not divisible by patch_size 3"):
        from_config({"arch": "uvit", "depth": 1, "hidden_size": 32, "num_heads": 2, **{**IO, "patch_size": 3}})


def test_patch_layout_matches_mmdit():
    # the same final-layer weights give the same image: patch outputs are unpatchified in MM-DiT's order
    dit, mm = randomise(tiny("dit", depth=1)), tiny("mmdit", depth=1)
    out = torch.randn(2, 16, 2 * 2 * 3)
    assert torch.equal(dit.unpatchify(out, 4, 4), mm.unpatchify(out, 4, 4))


def test_mmdit_from_single_file_returns_an_mmdit_or_raises(tmp_path):
    """A rectflow file of a baseline loads through rectflow.checkpoints.load_model, and MMDiT.from_single_file
    refuses it instead of returning another class."""
    from rectflow.checkpoints import CheckpointError, load_model, save_model
    save_model(randomise(tiny("dit")), tmp_path / "dit.safetensors")
    assert type(load_model(tmp_path / "dit.safetensors")).__name__ == "DiT"
    with pytest.raises(CheckpointError, match="not an MM-DiT"):
        MMDiT.from_single_file(tmp_path / "dit.safetensors")
    mmdit = MMDiT.from_depth(2, patch_size=2, in_channels=4, context_dim=8, pooled_dim=8, input_size=8)
    save_model(mmdit, tmp_path / "mmdit.safetensors")
    loaded = MMDiT.from_single_file(tmp_path / "mmdit.safetensors")
    assert type(loaded) is MMDiT and loaded.config == mmdit.config
