"""Checkpoints: released single files, rectflow files, the diffusers layout, errors, pickle refusal, the CLI."""
import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rectflow import checkpoints as ck
from rectflow.models import MMDiT

TINY = dict(hidden_size=64, num_heads=2, patch_size=2, in_channels=4, context_dim=32, pooled_dim=24, input_size=24,
            pos_embed_max_size=12)
SD3 = dict(depth=2, qk_norm=None)
SD35M = dict(depth=3, qk_norm="rms", dual_attention_layers=(0, 1))


@pytest.fixture
def diffusers():
    """diffusers, for the parity tests only: the rest of this file runs without it."""
    return pytest.importorskip("diffusers")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, including the zero-initialised gates and final layer, so that parity can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if ".ln_" in name else 0.0))
    return model


def tiny(**kw) -> MMDiT:
    return randomize(MMDiT(**{**TINY, **kw}))


def inputs(h, w, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, h, w, generator=gen), torch.rand(2, generator=gen),
            torch.randn(2, 7, 32, generator=gen), torch.randn(2, 24, generator=gen))


def assert_same_weights(a: MMDiT, b: MMDiT):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_parity(model: MMDiT, ref, shapes=((16, 16), (12, 20))):
    for h, w in shapes:
        x, t, ctx, y = inputs(h, w)
        with torch.no_grad():
            ours, theirs = model(x, t, ctx, y), ref(x, ctx, y, t * 1000, return_dict=False)[0]
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.std(), (h, w)


@pytest.mark.parametrize("cfg", [SD3, SD35M], ids=["sd3", "sd35m"])
def test_released_file_through_diffusers_own_converter(tmp_path, cfg, diffusers):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    model = tiny(**cfg)
    ck.save_released(model, tmp_path / "sd3.safetensors", prefix=True)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(load_file(tmp_path / "sd3.safetensors"))
    dcfg = {k: v for k, v in ck.diffusers_config(model.config).items() if not k.startswith("_")}
    ref = diffusers.SD3Transformer2DModel(**dcfg)
    ref.load_state_dict(converted, strict=True)
    assert_parity(model, ref.eval())


def test_diffusers_folder_both_ways(tmp_path, diffusers):
    model = tiny(**SD35M)
    ck.save_diffusers(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", ck.DIFFUSERS_WEIGHTS]
    ref = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert_parity(model, ref)
    back = ck.load_diffusers(tmp_path / "out")
    assert back.config == model.config
    assert_same_weights(model, back)


def test_folder_written_by_diffusers_loads(tmp_path, diffusers):
    # diffusers' own folder (no rectflow config inside): the config is read off its config.json and the weights
    ref = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=24,
        pos_embed_max_size=12, qk_norm="rms_norm", dual_attention_layers=(0,))
    randomize(ref, seed=5).eval()
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    model = ck.load_model(tmp_path / "pipe")  # a pipeline folder: its transformer/ subfolder is used
    assert model.config["qk_norm"] == "rms" and model.config["dual_attention_layers"] == [0]
    assert model.config["input_size"] == 16 and model.config["pos_embed_max_size"] == 12
    assert_parity(model, ref, shapes=((16, 16), (8, 24)))


def test_from_single_file_round_trips_with_and_without_prefix(tmp_path):
    model = tiny(**SD35M)
    for prefix in (True, False):
        path = tmp_path / f"m{prefix}.safetensors"
        ck.save_released(model, path, prefix=prefix)
        assert any(k.startswith("model.diffusion_model.") for k in load_file(path)) == prefix
        back = MMDiT.from_single_file(path)
        structural = {k: v for k, v in model.config.items() if k not in ("input_size", "pos_embed_base_size")}
        assert {k: back.config[k] for k in structural} == structural
        assert_same_weights(model, back)
        x, t, ctx, y = inputs(12, 20)
        with torch.no_grad():
            assert torch.equal(back(x, t, ctx, y), model(x, t, ctx, y))


def test_bundled_vae_and_text_encoders_are_ignored(tmp_path):
    model = tiny(**SD3)
    extra = {"first_stage_model.decoder.conv_in.weight": torch.zeros(3, 3),
             "text_encoders.clip_l.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77)}
    prefixed = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    save_file({**prefixed, **extra}, tmp_path / "all_in_one.safetensors")
    save_file({**model.state_dict(), **extra}, tmp_path / "bare.safetensors")
    for name in ("all_in_one", "bare"):
        assert_same_weights(model, MMDiT.from_single_file(tmp_path / f"{name}.safetensors"))


def test_config_inferred_from_keys_and_shapes(tmp_path):
    model = tiny(depth=3, qk_norm="ln", dual_attention_layers=(1,), hidden_size=96, num_heads=3, out_channels=8,
                 pos_embed_max_size=10)
    cfg = ck.infer_config(model.state_dict())
    assert cfg["depth"] == 3 and cfg["hidden_size"] == 96 and cfg["num_heads"] == 3  # heads from the QK-norm width
    assert cfg["qk_norm"] == "ln" and cfg["dual_attention_layers"] == [1] and cfg["pos_embed_max_size"] == 10
    assert (cfg["patch_size"], cfg["in_channels"], cfg["out_channels"]) == (2, 4, 8)
    assert (cfg["context_dim"], cfg["pooled_dim"], cfg["mlp_ratio"]) == (32, 24, 4.0)
    plain = ck.infer_config(tiny(depth=2, hidden_size=128, num_heads=2).state_dict())
    assert plain["num_heads"] == 2 and plain["qk_norm"] is None  # SD3 rule: head dim 64


def test_rectflow_file_keeps_the_config(tmp_path):
    model = tiny(depth=2, qk_norm="rms", pos_embed_max_size=None, input_size=32, pos_embed_base_size=16)
    ck.save_model(model, tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind
    back = ck.load_model(tmp_path / "m.safetensors")
    assert back.config == model.config and back.pos_embed is None
    assert_same_weights(model, back)
    x, t, ctx, y = inputs(12, 40)
    with torch.no_grad():
        assert torch.equal(back(x, t, ctx, y), model(x, t, ctx, y))
    back16 = ck.load_model(tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert back16.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.bfloat16


def test_on_the_fly_positions_through_diffusers(tmp_path, diffusers):
    model = tiny(depth=2, pos_embed_max_size=None)
    with pytest.raises(ck.CheckpointError, match="pass pos_embed_max_size"):
        ck.save_diffusers(model, tmp_path / "d")
    ck.save_diffusers(model, tmp_path / "d", pos_embed_max_size=16)
    ref = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "d").eval()
    assert_parity(model, ref, shapes=((24, 24), (16, 32)))  # even margins: the table crop is the computed grid
    back = ck.load_diffusers(tmp_path / "d")
    assert back.pos_embed is None and back.config == model.config


def test_write_is_atomic(tmp_path, monkeypatch):
    model = tiny(**SD3)
    ck.save_model(model, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ck.save_model(tiny(**SD35M), tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def _saved_with(tmp_path, edit) -> str:
    """A rectflow file of a tiny model whose state dict was changed by `edit`."""
    model = tiny(**SD3)
    sd = dict(model.state_dict())
    edit(sd)
    path = tmp_path / "edited.safetensors"
    save_file(sd, path, metadata={"format": ck.FORMAT_TAG, "config": json.dumps(model.config)})
    return path


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    def edit(sd):
        del sd["joint_blocks.0.x_block.mlp.fc1.bias"]
        sd["joint_blocks.0.x_block.extra.weight"] = torch.zeros(2)
        sd["context_embedder.weight"] = torch.zeros(64, 33)

    with pytest.raises(ck.CheckpointError) as err:
        MMDiT.from_single_file(_saved_with(tmp_path, edit))
    msg = str(err.value)
    assert "edited.safetensors" in msg
    assert "missing keys [1]: joint_blocks.0.x_block.mlp.fc1.bias" in msg
    assert "unexpected keys [1]: joint_blocks.0.x_block.extra.weight" in msg
    assert "mis-shaped keys [1]: context_embedder.weight (expected (64, 32), got (64, 33))" in msg


def test_released_file_without_required_keys_names_them(tmp_path):
    model = tiny(**SD3)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("x_embedder")}
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(ck.CheckpointError, match="'x_embedder.proj.weight' is missing"):
        MMDiT.from_single_file(tmp_path / "broken.safetensors")


def test_pickle_files_are_refused_unless_allowed(tmp_path):
    model = tiny(**SD3)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(ck.CheckpointError, match="pickle file.*allow_pickle=True"):
        MMDiT.from_single_file(path)
    assert_same_weights(model, MMDiT.from_single_file(path, allow_pickle=True))
    # weights_only=True: a pickle that would build arbitrary objects is rejected even when allowed
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        MMDiT.from_single_file(tmp_path / "evil.pt", allow_pickle=True)


def _cli(argv):
    parser = argparse.ArgumentParser()
    ck.add_arguments(parser)
    return ck.run(parser.parse_args(argv))


def test_convert_command(tmp_path, capsys):
    model = tiny(**SD35M)
    ck.save_released(model, tmp_path / "sd35.safetensors", prefix=True)
    assert _cli([str(tmp_path / "sd35.safetensors"), str(tmp_path / "diff")]) == 0
    assert _cli([str(tmp_path / "diff"), str(tmp_path / "rf.safetensors")]) == 0
    assert _cli([str(tmp_path / "rf.safetensors"), str(tmp_path / "back.safetensors"), "--to", "sd3", "--prefix",
                 "--dtype", "bf16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert_same_weights(model, ck.load_model(tmp_path / "rf.safetensors"))
    back = load_file(tmp_path / "back.safetensors")
    assert back["model.diffusion_model.final_layer.linear.weight"].dtype == torch.bfloat16
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert _cli([str(tmp_path / "m.pt"), str(tmp_path / "x.safetensors")]) == 2  # bad input: exit status 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert _cli([str(tmp_path / "m.pt"), str(tmp_path / "x.safetensors"), "--allow-pickle"]) == 0


@pytest.mark.parametrize("arch", ["mmdit3", "dit", "crossdit", "uvit"])
def test_baseline_files_load_by_their_arch(tmp_path, arch):
    from rectflow.models import baselines
    model = randomize(baselines.from_config({"arch": arch, "depth": 2, "hidden_size": 32, "num_heads": 2,
                                             "patch_size": 2, "in_channels": 4, "context_dim": 32, "pooled_dim": 24,
                                             "input_size": 8}))
    ck.save_model(model, tmp_path / "b.safetensors")
    back = ck.load_model(tmp_path / "b.safetensors")
    assert type(back) is type(model) and back.config == model.config
    assert_same_weights(model, back)
    x, t, ctx, y = inputs(8, 8)
    with torch.no_grad():
        assert torch.equal(back(x, t, ctx, y), model(x, t, ctx, y))


def test_baseline_errors_name_the_arch(tmp_path, capsys):
    from rectflow.models import baselines
    model = baselines.from_config({"arch": "dit", "depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2,
                                   "in_channels": 4, "context_dim": 32, "pooled_dim": 24, "input_size": 8})
    ck.save_model(model, tmp_path / "d.safetensors")
    assert _cli([str(tmp_path / "d.safetensors"), str(tmp_path / "diff")]) == 2
    assert "dit model" in capsys.readouterr().err and not (tmp_path / "diff").exists()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.0.mlp")}
    save_file(sd, tmp_path / "cut.safetensors", metadata={"format": ck.FORMAT_TAG, "config": json.dumps(model.config)})
    with pytest.raises(ck.CheckpointError, match="does not fit the dit model.*missing keys"):
        ck.load_model(tmp_path / "cut.safetensors")
    bad = {**model.config, "arch": "transformer9"}
    save_file(model.state_dict(), tmp_path / "bad.safetensors", metadata={"format": ck.FORMAT_TAG,
                                                                         "config": json.dumps(bad)})
    with pytest.raises(ck.CheckpointError, match="bad.safetensors.*'transformer9'"):
        ck.load_model(tmp_path / "bad.safetensors")
