"""LoRA (rectflow.lora): peft layers on MM-DiT, the four file layouts and their exact round trips, diffusers loading
our files, merging, and the errors of files that do not fit."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from rectflow import lora as L
from rectflow.checkpoints import load_model, save_model
from rectflow.cli import main
from test_mmdit import diffusers_twin, inputs, tiny

pytest.importorskip("peft")


def lora_model(name="sd35m", rank=4, alpha=8.0, targets="all-linear", seed=5, **kw):
    """(base, model with a random LoRA attached) for a tiny config of test_mmdit."""
    base = tiny(name)
    model = copy.deepcopy(base)
    L.attach(model, rank, alpha, targets, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return base, model


def forward(model, h=16, w=16):
    x, t, ctx, y = inputs(h, w)
    with torch.no_grad():
        return model(x, t, ctx, y)


def same(a: dict, b: dict) -> bool:
    """Two LoRAs hold bit-identical tensors and alphas."""
    return set(a) == set(b) and all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up)
                                    and a[k].alpha == b[k].alpha for k in a)


def test_attach_selects_presets_and_blocks_and_freezes_the_rest():
    model = tiny("sd35m")
    assert L.select_modules(model, "attn") == [
        f"joint_blocks.{i}.{s}.{m}" for i in range(3) for s, ms in
        (("context_block", ["attn.qkv", "attn.proj"]), ("x_block", ["attn.qkv", "attn.proj"] +
                                                        (["attn2.qkv", "attn2.proj"] if i < 2 else [])))
        for m in ms if not (i == 2 and s == "context_block" and m == "attn.proj")]
    assert all(".mlp." in n or ".attn" in n for n in L.select_modules(model, "attn-mlp"))
    assert {n.split(".")[1] for n in L.select_modules(model, "attn", "0,2")} == {"0", "2"}
    assert "final_layer.linear" in L.select_modules(model, "all-linear")
    assert L.parse_blocks("0-2, 5") == {0, 1, 2, 5}
    with pytest.raises(ValueError, match="selects no linear layer"):
        L.select_modules(model, r"nothing\.here")
    with pytest.raises(ValueError, match="has blocks 0-2"):
        L.select_modules(model, "attn", "1-7")
    with pytest.raises(ValueError, match="not a block index"):
        L.parse_blocks("one")
    names = L.attach(model, 2, None, "attn", "1")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable) and len(trainable) == 2 * len(names)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)


@pytest.mark.parametrize("name", ["sd3", "sd35m"])
def test_attached_lora_equals_its_merge(name):
    base, model = lora_model(name)
    lora = L.adapters(model)
    merged = copy.deepcopy(base)
    L.merge(merged, lora)
    out, ref = forward(model), forward(merged)
    assert (out - forward(base)).abs().max() > 0.1  # the LoRA matters
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    # a pre-only context block's LoRA acts through the key/value rows of its fused projection
    last = model.joint_blocks[-1].context_block.attn
    assert type(last.qkv) is not torch.nn.Linear and last.pre_only


@pytest.mark.parametrize("name", ["sd3", "sd35m"])
def test_diffusers_loads_our_diffusers_file_and_matches(name, tmp_path):
    base, model = lora_model(name, rank=4, alpha=8.0)  # alpha != rank: the scale must come from the header
    L.write_lora(L.adapters(model), tmp_path / "lora.safetensors", "diffusers")
    ref = diffusers_twin(base)
    ref.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix="transformer", use_safetensors=True)
    x, t, ctx, y = inputs(16, 16)
    with torch.no_grad():
        theirs = ref(x, ctx, y, t * 1000, return_dict=False)[0]
    ours = forward(model)
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max().item())
    keys = load_file(str(tmp_path / "lora.safetensors"))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert torch.equal(keys["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                       keys["transformer.transformer_blocks.0.attn.to_v.lora_A.weight"])  # one shared A


@pytest.mark.parametrize("fmt", L.FORMATS)
def test_every_format_round_trips_exactly(fmt, tmp_path):
    _, model = lora_model("sd35m", alpha=3.0)
    lora = L.adapters(model)
    L.write_lora(lora, tmp_path / "x.safetensors", fmt)
    back, detected = L.read_lora(tmp_path / "x.safetensors")
    assert detected == fmt and same(back, lora)


def test_diffusers_kohya_diffusers_with_separate_qkv_adapters_is_exact(tmp_path):
    # another tool's diffusers LoRA: q, k, v with their own A -> block-diagonal fused qkv -> the same three back
    _, model = lora_model("sd3", rank=3, alpha=6.0, targets="attn")
    split = L.to_diffusers(L.adapters(model))
    gen = torch.Generator().manual_seed(1)
    split = {m: L.Adapter(torch.randn(a.down.shape, generator=gen), a.up, a.alpha) for m, a in split.items()}
    tensors = {}
    for m, a in split.items():
        tensors[f"transformer.{m}.lora_A.weight"], tensors[f"transformer.{m}.lora_B.weight"] = a.down, a.up
    save_file(tensors, str(tmp_path / "theirs.safetensors"),
              metadata={L.DIFFUSERS_METADATA: '{"transformer.lora_alpha": 6.0, "transformer.r": 3}'})
    assert main(["convert-lora", str(tmp_path / "theirs.safetensors"), str(tmp_path / "k.safetensors"),
                 "--to", "kohya"]) == 0
    kohya = load_file(str(tmp_path / "k.safetensors"))
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert kohya[f"{qkv}.lora_down.weight"].shape == (9, 64) and kohya[f"{qkv}.alpha"].item() == 18.0
    assert main(["convert-lora", str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors"),
                 "--to", "diffusers"]) == 0
    back = load_file(str(tmp_path / "d.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    # the fused form is the same weight update
    fused, _ = L.read_lora(tmp_path / "k.safetensors")
    for stream, names in (("x_block", ("to_q", "to_k", "to_v")), ("context_block",
                                                                  ("add_q_proj", "add_k_proj", "add_v_proj"))):
        want = torch.cat([split[f"transformer_blocks.0.attn.{n}"].delta() for n in names])
        torch.testing.assert_close(fused[f"joint_blocks.0.{stream}.attn.qkv"].delta(), want)


def test_adaln_halves_follow_the_diffusers_order():
    _, model = lora_model("sd3", targets=r"final_layer\.adaLN_modulation\.1|joint_blocks\.1\.context_block\..*")
    lora = L.adapters(model)
    d = L.to_diffusers(lora)
    a, b = lora["final_layer.adaLN_modulation.1"].up.chunk(2)
    assert torch.equal(d["norm_out.linear"].up, torch.cat([b, a]))  # (shift, scale) -> (scale, shift)
    a, b = lora["joint_blocks.1.context_block.adaLN_modulation.1"].up.chunk(2)  # pre-only: 2 outputs
    assert torch.equal(d["transformer_blocks.1.norm1_context.linear"].up, torch.cat([b, a]))
    assert same(L.from_diffusers(d), lora)


def test_merge_lora_into_full_weights_equals_base_plus_lora(tmp_path):
    base, model = lora_model("sd35m")
    save_model(base, tmp_path / "base.safetensors")
    L.write_lora(L.adapters(model), tmp_path / "l.safetensors", "kohya")
    assert main(["convert", str(tmp_path / "base.safetensors"), str(tmp_path / "merged.safetensors"),
                 "--merge-lora", f"{tmp_path / 'l.safetensors'}:0.5"]) == 0
    merged = load_model(tmp_path / "merged.safetensors").eval()
    half = copy.deepcopy(base)
    for name, a in L.adapters(model).items():
        w = dict(half.named_modules())[name].weight
        with torch.no_grad():
            w += 0.5 * (a.alpha / a.rank) * a.up @ a.down
    sd, want = merged.state_dict(), half.state_dict()
    assert all(torch.allclose(sd[k], want[k], atol=1e-6) for k in want)
    assert not torch.equal(sd["joint_blocks.0.x_block.attn.qkv.weight"], base.state_dict()[
        "joint_blocks.0.x_block.attn.qkv.weight"])


def test_spec_parsing_and_other_tools_key_variants(tmp_path):
    assert L.parse_spec("a.safetensors:0.7") == ("a.safetensors", 0.7)
    assert L.parse_spec("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    _, model = lora_model("sd3", targets="attn")
    lora = L.adapters(model)
    d = L.to_diffusers(lora)
    for prefix in ("base_model.model.", ""):  # PEFT's own save, and diffusers without the transformer. prefix
        tensors = {f"{prefix}{m}.lora_{x}.weight": t for m, a in d.items() for x, t in (("A", a.down), ("B", a.up))}
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "p.safetensors"))
        back, fmt = L.read_lora(tmp_path / "p.safetensors")
        assert fmt == "diffusers" and all(torch.equal(back[k].up, lora[k].up) for k in lora)
    # OneTrainer: diffusers names flattened with underscores
    tensors = {f"lora_transformer_{m.replace('.', '_')}.lora_{x}.weight": t.clone()
               for m, a in d.items() for x, t in (("down", a.down), ("up", a.up))}
    save_file(tensors, str(tmp_path / "o.safetensors"))
    back, fmt = L.read_lora(tmp_path / "o.safetensors")
    assert fmt == "diffusers" and all(torch.equal(back[k].down, lora[k].down) for k in lora)


def test_bad_lora_files_are_named_errors(tmp_path):
    _, model = lora_model("sd3", targets="attn")
    L.write_lora(L.adapters(model), tmp_path / "ok.safetensors", "kohya")
    other = tiny("sd3", hidden_size=32)
    with pytest.raises(ValueError, match=r"does not fit this model: joint_blocks\.0\.context_block\.attn\.proj: "
                                         r"LoRA is 64 x 64, the layer \(32, 32\)"):
        L.apply_loras(other, [str(tmp_path / "ok.safetensors")])
    t = load_file(str(tmp_path / "ok.safetensors"))
    del t["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"]
    save_file(t, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="lora_unet_joint_blocks_0_x_block_attn_qkv: its lora_up.weight is missing"):
        L.read_lora(tmp_path / "cut.safetensors")
    save_file({"model.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no known LoRA layout"):
        L.read_lora(tmp_path / "model.safetensors")
    (tmp_path / "lora.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="never pickles"):
        L.read_lora(tmp_path / "lora.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        L.read_lora(tmp_path / "absent.safetensors")
    t = load_file(str(tmp_path / "ok.safetensors"))
    t["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 4)
    save_file(t, str(tmp_path / "te.safetensors"))
    with pytest.warns(UserWarning, match="skipping 1 text-encoder"):
        assert L.read_lora(tmp_path / "te.safetensors")[1] == "kohya"
