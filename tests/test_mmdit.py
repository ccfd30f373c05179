"""MM-DiT (PAPER 4): parity with diffusers' SD3Transformer2DModel, structure, positions, checkpointing, precision."""
import json

import pytest
import torch
import torch.nn.functional as F

from rectflow.checkpoints import diffusers_config, to_diffusers_state_dict
from rectflow.models import MMDiT
from rectflow.models import mmdit as mmdit_module
from rectflow.models.layers import sincos_2d

TINY = dict(hidden_size=64, num_heads=2, patch_size=2, in_channels=4, context_dim=32, pooled_dim=24, input_size=16,
            pos_embed_max_size=12)
CONFIGS = {
    "sd3": dict(depth=2, qk_norm=None),
    "sd35m": dict(depth=3, qk_norm="rms", dual_attention_layers=(0, 1)),
    "ln": dict(depth=2, qk_norm="ln", dual_attention_layers=(1,)),
}
SHAPES = [(16, 16), (12, 20), (24, 8)]  # latent H x W: square and non-square (tokens up to 12 = table side)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, including the zero-initialised gates and final layer, so that parity can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            offset = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * std + offset)
    return model


def inputs(h, w, batch=2, channels=4, seed=1):
    """Random (x, t, context, y) for the tiny configs."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, h, w, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, 7, 32, generator=gen), torch.randn(batch, 24, generator=gen))


def tiny(name: str, **kw) -> MMDiT:
    """A random tiny model of one of CONFIGS."""
    cfg = {**TINY, **CONFIGS[name], **kw}
    return randomize(MMDiT(**cfg))


def diffusers_twin(model: MMDiT):
    """diffusers' SD3Transformer2DModel holding the same weights (strict load through the diffusers layout)."""
    diffusers = pytest.importorskip("diffusers")  # only the parity tests need it
    cfg = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
    ref = diffusers.SD3Transformer2DModel(**cfg)
    ref.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True)
    return ref.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_sd3_transformer(name):
    model = tiny(name)
    ref = diffusers_twin(model)
    for h, w in SHAPES:
        x, t, ctx, y = inputs(h, w)
        with torch.no_grad():
            ours = model(x, t, ctx, y)
            theirs = ref(x, ctx, y, t * 1000, return_dict=False)[0]  # diffusers takes t * 1000 directly
        assert ours.shape == (2, 4, h, w)
        err = (ours - theirs).abs().max().item()
        assert err <= 1e-5 * theirs.std().item(), (name, h, w, err)


def test_parity_detects_a_wrong_weight():
    # the parity test is sharp: one perturbed gate entry is visible
    model = tiny("sd3")
    ref = diffusers_twin(model)
    with torch.no_grad():
        model.joint_blocks[0].x_block.adaLN_modulation[1].bias[2 * 64] += 1e-2
    x, t, ctx, y = inputs(16, 16)
    with torch.no_grad():
        err = (model(x, t, ctx, y) - ref(x, ctx, y, t * 1000, return_dict=False)[0]).abs().max()
    assert err > 1e-4


def test_released_key_layout():
    model = MMDiT(**{**TINY, "depth": 2, "qk_norm": "rms", "dual_attention_layers": (0,)})
    keys = set(model.state_dict())
    for key in ["pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                "y_embedder.mlp.0.weight", "y_embedder.mlp.2.weight", "context_embedder.weight",
                "joint_blocks.0.x_block.adaLN_modulation.1.weight", "joint_blocks.0.x_block.attn.qkv.weight",
                "joint_blocks.0.x_block.attn.proj.weight", "joint_blocks.0.x_block.attn.ln_q.weight",
                "joint_blocks.0.x_block.attn.ln_k.weight", "joint_blocks.0.x_block.mlp.fc1.weight",
                "joint_blocks.0.x_block.mlp.fc2.weight", "joint_blocks.0.x_block.attn2.qkv.weight",
                "joint_blocks.0.x_block.attn2.proj.weight", "joint_blocks.0.context_block.mlp.fc2.bias",
                "joint_blocks.1.context_block.attn.qkv.weight", "final_layer.adaLN_modulation.1.weight",
                "final_layer.linear.weight"]:
        assert key in keys, key
    # the last context block is pre-only: no projection, no MLP, adaLN gives shift and scale only
    assert not any(k.startswith(("joint_blocks.1.context_block.attn.proj", "joint_blocks.1.context_block.mlp"))
                   for k in keys)
    sd = model.state_dict()
    assert sd["joint_blocks.1.context_block.adaLN_modulation.1.weight"].shape == (2 * 64, 64)
    assert sd["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (9 * 64, 64)  # MMDiT-X
    assert sd["joint_blocks.1.x_block.adaLN_modulation.1.weight"].shape == (6 * 64, 64)
    assert "joint_blocks.1.x_block.attn2.qkv.weight" not in keys
    assert sd["pos_embed"].shape == (1, 12 * 12, 64)


def test_from_depth_sizes_and_config_round_trip():
    model = MMDiT.from_depth(2, in_channels=4, context_dim=32, pooled_dim=24, input_size=8)
    assert model.config["hidden_size"] == 128 and model.config["num_heads"] == 2
    assert model.joint_blocks[0].x_block.attn.head_dim == 64
    wide = MMDiT.from_depth(2, hidden_size=96, num_heads=3, in_channels=4, context_dim=32, pooled_dim=24, input_size=8)
    assert wide.joint_blocks[0].x_block.attn.head_dim == 32
    cfg = json.loads(json.dumps(model.config))
    again = MMDiT.from_config(cfg)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown MMDiT config keys.*'depthh'"):
        MMDiT.from_config({**cfg, "depthh": 3})
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MMDiT.from_depth(2, num_heads=3, input_size=8)
    with pytest.raises(ValueError, match=r"dual_attention_layers \[5\]"):
        MMDiT.from_depth(2, dual_attention_layers=(5,), input_size=8)


def test_fresh_model_is_dit_zero_initialised():
    model = MMDiT(**{**TINY, "depth": 2, "qk_norm": "rms"})
    for block in model.joint_blocks:
        for stream in (block.context_block, block.x_block):
            assert not stream.adaLN_modulation[1].weight.any() and not stream.adaLN_modulation[1].bias.any()
    assert model.x_embedder.proj.weight.std() > 0 and model.joint_blocks[0].x_block.attn.qkv.weight.std() > 0
    x, t, ctx, y = inputs(16, 16)
    assert torch.equal(model(x, t, ctx, y), torch.zeros(2, 4, 16, 16))


def test_output_depends_on_every_input():
    model = tiny("sd35m")
    x, t, ctx, y = inputs(12, 20)
    with torch.no_grad():
        base = model(x, t, ctx, y)
        for changed in [(x + 0.1, t, ctx, y), (x, t * 0.5, ctx, y), (x, t, ctx + 0.1, y), (x, t, ctx, y + 0.1)]:
            assert not torch.allclose(model(*changed), base)
    assert model(x, t[0], ctx, y).shape == base.shape  # a scalar t is broadcast


def test_gradient_checkpointing_gives_identical_gradients():
    model = tiny("sd35m")
    x, t, ctx, y = inputs(12, 20)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        F.mse_loss(model(x, t, ctx, y), torch.zeros_like(x)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7, msg=name)


def test_non_square_inputs_and_table_limits():
    model = tiny("sd3")
    x, t, ctx, y = inputs(8, 24)
    assert model(x, t, ctx, y).shape == (2, 4, 8, 24)
    # centre crop of the 12 x 12 table: a 4 x 12 token grid is rows 4..7, all columns
    table = model.pos_embed.view(12, 12, -1)
    assert torch.equal(model.position_embedding(4, 12)[0], table[4:8].reshape(48, -1))
    with pytest.raises(ValueError, match=r"13 x 4 token grid exceeds the position table's 12 x 12"):
        model(*inputs(26, 8))
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(*inputs(15, 16))


def test_position_grid_is_extended_and_interpolated():
    # PAPER 4: pretrain at base side s0, train at s = 2 s0: positions (p - (h - s) / 2) * s0 / s
    cfg = {**TINY, "depth": 1, "pos_embed_max_size": None}
    base = MMDiT(**{**cfg, "input_size": 16})  # reference grid 8 x 8 tokens, positions 0..7
    fine = MMDiT(**{**cfg, "input_size": 32, "pos_embed_base_size": 16})  # 16 x 16 tokens on the same span
    e_base = base.position_embedding(8, 8)[0].view(8, 8, -1)
    e_fine = fine.position_embedding(16, 16)[0].view(16, 16, -1)
    torch.testing.assert_close(e_fine[::2, ::2], e_base)  # interpolated: every other token hits a base position
    # extended: a wider bucket keeps the reference positions in its middle and adds positions outside them
    wide = fine.position_embedding(8, 32)[0].view(8, 32, -1)
    torch.testing.assert_close(wide[:, 8:24], e_fine[4:12])
    pos_x = (torch.arange(32) - (32 - 16) / 2) * 0.5
    pos_y = (torch.arange(8) - (8 - 16) / 2) * 0.5
    torch.testing.assert_close(wide.reshape(256, -1), sincos_2d(pos_y, pos_x, 64).float())
    assert fine(*inputs(16, 64)).shape == (2, 4, 16, 64)  # any size: no table limit


def test_sincos_channel_order_matches_the_reference_tables():
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = sincos_2d(torch.arange(6.0), torch.arange(6.0), 32).float()
    theirs = get_2d_sincos_pos_embed(32, 6, base_size=6, interpolation_scale=1.0, output_type="pt").float()
    torch.testing.assert_close(ours, theirs)


def test_table_model_matches_on_the_fly_grid_and_can_be_regridded():
    common = {**TINY, "depth": 1, "input_size": 16}
    table = MMDiT(**{**common, "pos_embed_max_size": 12})
    free = MMDiT(**{**common, "pos_embed_max_size": None})
    for h, w in [(8, 8), (4, 12), (10, 6)]:  # even margins: the crop is exactly the computed grid
        torch.testing.assert_close(table.position_embedding(h, w), free.position_embedding(h, w))
    before = table.position_embedding(8, 8).clone()
    table.set_position_grid(32, pos_embed_base_size=16)
    assert table.config["input_size"] == 32 and table.config["pos_embed_base_size"] == 16
    regridded = MMDiT(**{**common, "input_size": 32, "pos_embed_base_size": 16, "pos_embed_max_size": 12})
    assert not torch.allclose(table.position_embedding(8, 8), before)
    torch.testing.assert_close(table.position_embedding(8, 8), regridded.position_embedding(8, 8))


def test_bf16_autocast_tracks_fp32():
    model = tiny("sd35m")
    x, t, ctx, y = inputs(12, 20)
    with torch.no_grad():
        full = model(x, t, ctx, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, ctx, y)
        pure = tiny("sd35m").to(torch.bfloat16)(x, t, ctx, y)  # bf16 weights, fp32 inputs
    for out in (low, pure):
        assert out.dtype == torch.bfloat16
        assert ((out.float() - full).pow(2).mean().sqrt() / full.std()).item() < 0.03


def test_cpu_bf16_matmul_attention_matches_sdpa(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 40, 3, 16, generator=gen) * 1.5 for _ in range(3))
    exact = mmdit_module.attention(q.double(), k.double(), v.double()).float()  # SDPA in float64
    fast = mmdit_module.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # two bf16 matmuls
    monkeypatch.setattr(mmdit_module, "MATMUL_ATTENTION_MAX", 0)
    flash = mmdit_module.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # SDPA
    assert fast.shape == flash.shape == (2, 40, 48)
    scale = exact.std()
    assert (fast.float() - exact).abs().max() < 0.05 * scale
    assert (fast.float() - exact).pow(2).mean().sqrt() < 0.015 * scale
    assert (flash.float() - exact).pow(2).mean().sqrt() < 0.015 * scale


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_identical_gradients(every):
    def grads(checkpointing):
        model = tiny("sd35m")
        model.gradient_checkpointing = checkpointing
        x, t, ctx, y = inputs(16, 16)
        model(x, t, ctx, y).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    plain, checkpointed = grads(0), grads(every)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kw", [dict(depth=2), dict(depth=3, dual_attention_layers=(0, 1), qk_norm="rms")])
def test_forward_flops_match_torch_s_flop_counter(kw):
    """The analytic FLOPs behind MFU (rectflow.models.flops) equal torch's count of a forward pass (bf16 on the CPU,
    whose attention runs as matmuls the counter sees), for SD3- and SD3.5-shaped blocks."""
    from torch.utils.flop_counter import FlopCounterMode

    from rectflow.models.flops import forward_flops
    kw = dict(kw)
    model = MMDiT.from_depth(kw.pop("depth"), in_channels=16, context_dim=96, pooled_dim=64, input_size=16,
                             **kw).bfloat16()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 16, 16, 16, generator=g), torch.rand(1, generator=g),
              torch.randn(1, 12, 96, generator=g), torch.randn(1, 64, generator=g)]
    with FlopCounterMode(display=False) as counter:
        model(*[x.bfloat16() for x in inputs])
    assert counter.get_total_flops() == forward_flops(model.config, 16, 16, 12)
