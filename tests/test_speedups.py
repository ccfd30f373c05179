"""The learning-speed options (docs/training.md "Learning speed"): contrastive flow matching, Muon, the power-function
EMA, token routing, register tokens and a shorter text length; each computes what it says and resumes exactly."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from rectflow.flow import Formulation
from rectflow.models import MMDiT
from rectflow.train import train
from rectflow.training.model import negative_indices, route_indices
from rectflow.training.optim import Optimizers, ema_decay_at, make_optimizer
from tests.test_train import losses, tiny


def test_contrastive_loss_by_hand():
    """loss_i - lambda ||v_i - (eps_j - x0_j)||^2 for the negative j of i (rf's velocity target); a sample that is
    its own negative keeps its plain loss."""
    f = Formulation.from_name("rf")
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(3, 2, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9])
    neg = torch.tensor([2, 2, 2])
    got = f.contrastive_loss(out, x0, eps, t, neg, 0.05)
    plain = (out - (eps - x0)).pow(2).flatten(1).mean(1)
    away = (out - (eps[neg] - x0[neg])).pow(2).flatten(1).mean(1)
    want = plain - 0.05 * away * torch.tensor([1.0, 1.0, 0.0])
    torch.testing.assert_close(got, want * f.loss_scale)
    assert negative_indices(["a", "a", "b"]).tolist() == [2, 2, 0]
    assert negative_indices(["a", "a"]).tolist() == [0, 1]


def test_power_ema_is_the_power_weighted_average():
    """EDM2's power-function EMA: after n updates the EMA is sum_k w_k theta_k with w_k ~ k^gamma."""
    gamma, n = 3.0, 50
    thetas = torch.randn(n, generator=torch.Generator().manual_seed(0))
    ema = torch.tensor(0.0)
    for k in range(n):
        ema = ema_decay_at(k, 0.999, True, gamma) * ema + (1 - ema_decay_at(k, 0.999, True, gamma)) * thetas[k]
    # the exact profile of the recursion: w_k = prod_{j>k} beta_j (1 - beta_k), ~ (k/n)^gamma for large k
    betas = torch.tensor([ema_decay_at(k, 0.999, True, gamma) for k in range(n)], dtype=torch.float64)
    w = torch.tensor([(1 - betas[k]) * betas[k + 1:].prod() for k in range(n)])
    torch.testing.assert_close(ema.double(), (w * thetas.double()).sum(), rtol=1e-5, atol=1e-6)
    assert ema_decay_at(0, 0.999, True, gamma) == 0.0  # the first update copies the weights
    ratio = w[n - 1] / w[n // 2 - 1]
    assert 0.8 * 2 ** gamma < ratio < 1.25 * 2 ** gamma


def test_muon_takes_the_block_matrices_and_resumes_exactly(tmp_path):
    model = MMDiT.from_depth(2, patch_size=4, in_channels=3, context_dim=384, pooled_dim=384, input_size=16)
    cfg = tiny(optimizer="muon")
    opt = make_optimizer(list(model.parameters()), cfg, model)
    assert isinstance(opt, Optimizers) and set(opt.optimizers) == {"muon", "adamw"}
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in muon]
    assert names and all(n.startswith("joint_blocks.") and n.endswith("weight") for n in names)
    assert "x_embedder.proj.weight" not in names and len(names) + len(opt.optimizers["adamw"].param_groups[0][
        "params"]) == len(list(model.parameters()))
    cfg = tiny(optimizer="muon", max_steps=6, checkpoint_every=3, warmup_steps=0, lr=1e-2, lr_schedule="constant")
    train(cfg, tmp_path / "ref")
    train(dataclasses.replace(cfg, max_steps=3), tmp_path / "cut")
    train(cfg, tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    train(dataclasses.replace(cfg, optimizer="adamw"), tmp_path / "adamw")
    assert losses(tmp_path / "adamw")[1:] != losses(tmp_path / "ref")[1:]
    sharded = dataclasses.replace(cfg, checkpoint_format="sharded")  # Muon's state through torch.distributed.checkpoint
    train(dataclasses.replace(sharded, max_steps=3), tmp_path / "dcp")
    train(sharded, tmp_path / "dcp", resume=True)
    assert losses(tmp_path / "dcp") == losses(tmp_path / "ref")


def _random_model(**kw) -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT.from_depth(4, patch_size=2, in_channels=3, context_dim=32, pooled_dim=16, input_size=8, **kw)
    with torch.no_grad():
        for p in model.parameters():  # non-zero gates, so every block acts
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_token_routing_passes_skipped_tokens_unchanged():
    """Keeping every token is the plain forward; keeping some changes the output, and the routed-out tokens'
    states enter the rejoining block exactly as they left the block before the routed ones."""
    model = _random_model().eval()
    g = torch.Generator().manual_seed(1)
    x, t, c, y = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g), \
        torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, generator=g)
    every = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(model(x, t, c, y, route=(1, 3, every)), model(x, t, c, y))
    keep = route_indices(16, 0.5, 2, torch.Generator().manual_seed(2))
    assert keep.shape == (2, 8) and (keep.diff(dim=1) > 0).all()
    seen = {}

    def record(name, output=False):
        def hook(module, args, out=None):
            seen[name] = (out if output else args)[1].clone()
        return hook
    model.joint_blocks[0].register_forward_hook(record("out0", output=True))
    model.joint_blocks[1].register_forward_pre_hook(record("in1"))
    model.joint_blocks[3].register_forward_pre_hook(record("in3"))
    routed = model(x, t, c, y, route=(1, 3, keep))
    assert not torch.allclose(routed, model(x, t, c, y, route=(1, 3, every)))
    model(x, t, c, y, route=(1, 3, keep))
    assert seen["in1"].shape[1] == 8 and seen["in3"].shape[1] == 16
    for b in range(2):
        dropped = sorted(set(range(16)) - set(keep[b].tolist()))
        torch.testing.assert_close(seen["in3"][b, dropped], seen["out0"][b, dropped])
        torch.testing.assert_close(seen["in1"][b], seen["out0"][b, keep[b]])


def test_routing_registers_and_short_text_train_and_resume(tmp_path):
    """Routing (half the tokens skip blocks 1-2), 4 register tokens, 16 text tokens and their learned positions in
    one run: resumed from its middle checkpoint it logs the uninterrupted losses; the registers and positions are
    saved with the model, which samples."""
    from rectflow.checkpoints import load_model
    from rectflow.cli import main
    cfg = tiny(depth=4, route_fraction=0.5, route_start=1, route_end=3, registers=4, text_positions=16, max_steps=6,
               checkpoint_every=3, warmup_steps=0, text_encoder="minilm:length=16", contrastive=0.05,
               ema_power=6.94, lr_schedule="constant")
    train(cfg, tmp_path / "ref")
    train(dataclasses.replace(cfg, max_steps=3), tmp_path / "cut")
    train(cfg, tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    from rectflow.runs import find_checkpoint
    model = load_model(find_checkpoint(tmp_path / "ref") / "ema.safetensors")
    assert model.config["registers"] == 4 and model.registers.shape == (1, 4, 64)
    assert model.config["text_positions"] == 16 and model.text_positions.abs().sum() > 0  # trained from zero
    assert main(["sample", "--run", str(tmp_path / "ref"), "--prompt", "a red circle", "--steps", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert main(["convert", str(tmp_path / "ref"), str(tmp_path / "d"), "--to", "diffusers"]) == 2
    with pytest.raises(ValueError, match="route_start"):
        train(dataclasses.replace(cfg, route_start=3, route_end=3), tmp_path / "bad")
    with pytest.raises(ValueError, match="'text_positions': 8, but the init model .* has 16"):
        train(tiny(init=str(tmp_path / "ref"), text_positions=8, max_steps=1), tmp_path / "ft")


def test_text_positions_make_the_joint_attention_see_word_order():
    """Without text positions the model is blind to the order of the text tokens (permuting them leaves the output
    unchanged); zero-initialised positions keep a model's output, trained ones make order count; too many tokens are
    refused by name, and the diffusers layout (which has no such weights) is refused."""
    from rectflow.checkpoints import CheckpointError, diffusers_config
    torch.manual_seed(0)
    plain = MMDiT(depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=4, context_dim=16, pooled_dim=8,
                  input_size=8)
    torch.manual_seed(0)
    ordered = MMDiT(depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=4, context_dim=16, pooled_dim=8,
                    input_size=8, text_positions=6)
    with torch.no_grad():  # the zero-initialised output layer would hide every difference
        for m in (plain, ordered):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ordered.load_state_dict({**plain.state_dict(), "text_positions": torch.zeros(1, 6, 32)})
    g = torch.Generator().manual_seed(1)
    x, c, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    t, perm = torch.tensor([0.3, 0.8]), torch.tensor([4, 2, 0, 1, 3])
    with torch.no_grad():
        base = plain(x, t, c, y)
        torch.testing.assert_close(plain(x, t, c[:, perm], y), base)
        torch.testing.assert_close(ordered(x, t, c, y), base)
        ordered.text_positions.normal_(generator=g)
        assert not torch.allclose(ordered(x, t, c[:, perm], y), ordered(x, t, c, y), atol=1e-4)
        with pytest.raises(ValueError, match="7 text tokens exceed the model's 6 learned text positions"):
            ordered(x, t, torch.randn(2, 7, 16), y)
    assert ordered.config["text_positions"] == 6 and "text_positions" not in plain.config
    with pytest.raises(CheckpointError, match="learned text positions"):
        diffusers_config(ordered.config)


def test_short_text_spec():
    from rectflow.text import load_text_encoder
    enc = load_text_encoder("minilm:length=16")
    context, _ = enc.encode(["a red circle to the left of a blue square"])
    assert enc.seq_len == 16 and context.shape == (1, 16, 384)
    with pytest.raises(ValueError, match="length must be"):
        load_text_encoder("minilm:length=1")


def test_x_prediction_is_rf_with_x0_as_output():
    """x/lognorm(m, s): the network predicts x0, trained with rf's velocity loss ||(x0_hat - x0) / t||^2 (t floored
    at X_T_MIN); its velocity and denoised values are rf's for the velocity that x0_hat implies."""
    from rectflow.flow import X_T_MIN
    f, rf = Formulation.from_name("x/lognorm(0, 1)"), Formulation.from_name("rf/lognorm(0.00, 1.00)")
    assert f.name == "x/lognorm(0.00, 1.00)" and Formulation.from_name("x").name == "x"
    g = torch.Generator().manual_seed(0)
    x0, eps, x_hat = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.01, 0.2, 0.5, 0.9])
    z = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * eps
    v_hat = (z - x_hat) / t.view(-1, 1, 1, 1)  # the velocity x_hat implies
    want = ((x_hat - x0) / t.clamp_min(X_T_MIN).view(-1, 1, 1, 1)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(f.loss(x_hat, x0, eps, t), want)
    torch.testing.assert_close(f.loss(x_hat, x0, eps, t)[1:], rf.loss(v_hat, x0, eps, t)[1:])  # t >= X_T_MIN
    torch.testing.assert_close(f.velocity(x_hat, z, t), v_hat, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(f.denoise(x_hat, z, t)[1], rf.denoise(v_hat, z, t)[1], rtol=1e-5, atol=1e-4)
    assert torch.equal(f.target(x0, eps, t), x0) and f.sample_t(3, torch.Generator().manual_seed(0)).shape == (3,)
    with pytest.raises(ValueError, match="x/lognorm"):
        Formulation.from_name("x/lognorm(0)")


def test_dispersive_loss_by_hand():
    """log mean_ij exp(-||h_i - h_j||^2 / d) over all pairs, diagonal included; spread-out batches score lower."""
    from rectflow.training.model import dispersive_loss
    h = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[0.0, 2.0]]])  # d = 2
    d2 = torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=torch.float)  # squared distances / 2
    want = torch.log(torch.exp(-d2).mean())
    torch.testing.assert_close(dispersive_loss(h), want)
    assert dispersive_loss(h * 3) < dispersive_loss(h) < 0 == dispersive_loss(torch.zeros(3, 2)).item()


def test_dispersive_and_x_prediction_train_and_resume(tmp_path):
    """A run with the dispersive loss on x-prediction logs the dispersive term, and resumed from its middle
    checkpoint it logs the uninterrupted losses; lambda shifts the gradients, not the logged flow loss at step 1."""
    import json
    cfg = tiny(max_steps=4, checkpoint_every=2, warmup_steps=0, dispersive=0.5, formulation="x/lognorm(0, 1)",
               lr_schedule="constant")
    train(cfg, tmp_path / "ref")
    train(dataclasses.replace(cfg, max_steps=2), tmp_path / "cut")
    train(cfg, tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    recs = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dispersive_loss"] < 0 for r in recs)
    train(dataclasses.replace(cfg, dispersive=0.0, max_steps=2), tmp_path / "plain")
    plain = losses(tmp_path / "plain")
    assert plain[0] == losses(tmp_path / "ref")[0] and plain[1] != losses(tmp_path / "ref")[1]
    with pytest.raises(ValueError, match="'dispersive'"):
        train(dataclasses.replace(cfg, dispersive=-1.0), tmp_path / "bad")


def test_shipped_shapes_autoencoder_reads_back_exactly():
    """autoencoder 'shapes-ae': the shipped SmallAE's reconstructions of validation scenes are read back exactly by
    the shapes detector, and a run's config keeps the spec's name (not the install path)."""
    import sys
    from pathlib import Path
    from rectflow.autoencoder import load_autoencoder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from train_shapes_ae import check
    ae = load_autoencoder("shapes-ae")
    assert ae.spec == "shapes-ae" and (ae.channels, ae.factor) == (4, 4)
    exact, psnr = check(ae, n=40)
    assert exact == 1.0 and psnr > 35
    f8 = load_autoencoder("shapes-ae-f8")  # 4 x 4 x 16 latents: most scenes read back exactly
    assert f8.spec == "shapes-ae-f8" and (f8.channels, f8.factor) == (16, 8)
    assert f8.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 4, 4)
    exact, psnr = check(f8, n=40)
    assert exact >= 0.8 and psnr > 28


def _muon_runs(make, steps: int = 3, **kwargs) -> list[torch.Tensor]:
    """The matrices (two shapes, wide and tall, repeated) after `steps` updates of an optimizer `make` builds."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((16, 48), (48, 16)) * 3]
    opt = make(weights, lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **kwargs)
    for _ in range(steps):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=g)
        opt.step()
    return [w.detach() for w in weights]


def test_endless_data_are_encoded_under_the_runs_bf16_autocast(tmp_path, monkeypatch):
    """Shapes scenes (endless: encoded every step) go through the autoencoder in bf16 when the run trains in bf16:
    the same latents up to bf16 rounding; an fp32 run encodes in fp32."""
    from rectflow.training import Trainer
    monkeypatch.setenv("RECTFLOW_CPU_BF16", "1")
    cfg = tiny(autoencoder="shapes-ae-f8", resolution=32, patch_size=1, bf16=True)
    bf16 = Trainer(cfg, tmp_path / "bf16")
    fp32 = Trainer(dataclasses.replace(cfg, bf16=False), tmp_path / "fp32")
    assert bf16.batches.cache is None and (bf16.batches.bf16, fp32.batches.bf16) == (True, False)
    (zb, cap_b), (zf, cap_f) = bf16.batches.load([0, 1, 2]), fp32.batches.load([0, 1, 2])
    assert cap_b == cap_f and zb.dtype == zf.dtype == torch.float32 and zb.shape == (3, 16, 4, 4)
    assert not torch.equal(zb, zf)
    assert ((zb - zf).norm() / zf.norm()).item() < 0.02


def test_muon_orthogonalises_same_shape_matrices_together_as_torch_does_one_by_one():
    """rectflow.training.optim.Muon batches the Newton-Schulz iterations of same-shape matrices: bit-identical to
    torch.optim.Muon (bf16 iterations, Nesterov or not); its fp32 iterations (for CPUs that emulate bf16) give the
    same update up to bf16 rounding."""
    from rectflow.training.optim import Muon
    for nesterov in (True, False):
        ours, torchs = _muon_runs(Muon, nesterov=nesterov), _muon_runs(torch.optim.Muon, nesterov=nesterov)
        assert all(torch.equal(a, b) for a, b in zip(ours, torchs))
    fp32, torchs = _muon_runs(Muon, fp32_iterations=True), _muon_runs(torch.optim.Muon)
    assert not any(torch.equal(a, b) for a, b in zip(fp32, torchs))
    for a, b in zip(fp32, torchs):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    opt = Muon([torch.nn.Parameter(torch.zeros(4, 8))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 8)
    opt.step()
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}  # torch's state dict, so checkpoints carry over


def test_the_demo_recipe_is_the_naive_one_with_the_combined_options():
    """rectflow/recipes/demo.yaml = naive.yaml + the study's `combined` variant (so the study measures the demo's
    recipe against its baseline): latents of the shipped f4 AE, one token per latent pixel."""
    from rectflow.config import TrainConfig, recipe
    from rectflow.studies.speedups import RUN_LENGTH, VARIANTS, naive_recipe
    demo = {k: v for k, v in recipe("demo").items() if k not in RUN_LENGTH}
    assert demo == {**naive_recipe(), **VARIANTS["combined"]}
    cfg = TrainConfig.from_dict(recipe("demo"), source="demo").validate()
    assert (cfg.autoencoder, cfg.patch_size, cfg.optimizer) == ("shapes-ae", 1, "muon")
