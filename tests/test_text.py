"""Text conditioning: MiniLM, the SD3 three-encoder assembly (vs diffusers), per-encoder dropout, caching."""
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config,
                          T5EncoderModel)

from rectflow.text import (DROP_P, SD3_DIMS, CachedTextEncoder, MiniLMEncoder, SD3TextEncoders, drop_parts,
                           load_text_encoder)

WORDS = "a an red green blue yellow circle circles square triangle and of to the left right above below two".split()
CAPTIONS = ["a red circle", "two blue circles to the left of a yellow square", "", "a zebra"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads are 30x slower when the cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tokenizer(pad: str, eos: str, bos: str | None) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer built locally (never from the hub)."""
    specials = ["<s>", "</s>", "<pad>", "!", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>", model_max_length=77)


def _clip(hidden: int, proj: int, seed: int) -> CLIPTextModelWithProjection:
    """A random 2-layer CLIP text model with a projection."""
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, projection_dim=proj, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return CLIPTextModelWithProjection(cfg).eval()


def _t5(d_model: int) -> T5EncoderModel:
    """A random 1-layer T5 encoder."""
    torch.manual_seed(3)
    cfg = T5Config(vocab_size=32, d_model=d_model, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                   pad_token_id=2, eos_token_id=1, decoder_start_token_id=2)
    return T5EncoderModel(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny CLIP-L (32 wide), CLIP-G (48 wide, '!' padding like bigG) and T5 (96 wide), saved as folders."""
    root = tmp_path_factory.mktemp("sd3")
    parts = {"clip_l": (_clip(32, 24, 1), _tokenizer("</s>", "</s>", "<s>")),
             "clip_g": (_clip(48, 40, 2), _tokenizer("!", "</s>", "<s>")),
             "t5": (_t5(96), _tokenizer("<pad>", "</s>", None))}
    dirs = {}
    for name, (model, tok) in parts.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return parts, dirs, root


def _reference(parts, captions):
    """An independent SD3 assembly (PAPER 4), written out step by step."""
    outs = {}
    for name in ("clip_l", "clip_g"):
        model, tok = parts[name]
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = model(ids, output_hidden_states=True)
        outs[name] = (out.hidden_states[-2], out.text_embeds)
    model, tok = parts["t5"]
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    t5 = model(ids).last_hidden_state
    clip = torch.cat([outs["clip_l"][0], outs["clip_g"][0]], -1)
    clip = torch.cat([clip, clip.new_zeros(*clip.shape[:2], t5.shape[-1] - clip.shape[-1])], -1)
    return torch.cat([clip, t5], 1), torch.cat([outs["clip_l"][1], outs["clip_g"][1]], -1)


def test_sd3_assembly_matches_reference_and_diffusers(tiny):
    parts, dirs, _ = tiny
    enc = SD3TextEncoders(**dirs)
    context, pooled = enc.encode(CAPTIONS)
    assert context.shape == (4, 154, 96) and pooled.shape == (4, 64)
    assert (enc.context_dim, enc.pooled_dim, enc.seq_len) == (96, 64, 154)
    assert enc.encoder_names == ("clip_l", "clip_g", "t5")
    with torch.no_grad():
        ref_context, ref_pooled = _reference(parts, CAPTIONS)
    torch.testing.assert_close(context, ref_context)
    torch.testing.assert_close(pooled, ref_pooled)
    assert context[:, :77, 80:].abs().max() == 0 and context[:, 77:].abs().min() < context[:, 77:].abs().max()
    assert not torch.equal(context[0], context[1])

    pytest.importorskip("diffusers")  # the rest compares with diffusers' own prompt encoding
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None,
                                    text_encoder=parts["clip_l"][0], tokenizer=parts["clip_l"][1],
                                    text_encoder_2=parts["clip_g"][0], tokenizer_2=parts["clip_g"][1],
                                    text_encoder_3=parts["t5"][0], tokenizer_3=parts["t5"][1])
    with torch.no_grad():
        d_context, _, d_pooled, _ = pipe.encode_prompt(CAPTIONS, CAPTIONS, CAPTIONS, device="cpu",
                                                       do_classifier_free_guidance=False, max_sequence_length=77)
    torch.testing.assert_close(context, d_context)
    torch.testing.assert_close(pooled, d_pooled)


def test_sd3_subsets_are_zeros_of_the_right_width(tiny):
    parts, dirs, _ = tiny
    full_context, full_pooled = SD3TextEncoders(**dirs).encode(CAPTIONS[:2])
    no_g = SD3TextEncoders(clip_l=dirs["clip_l"], t5=dirs["t5"], dims={"clip_g": (48, 40)})
    context, pooled = no_g.encode(CAPTIONS[:2])
    assert no_g.encoder_names == ("clip_l", "t5") and context.shape == full_context.shape
    assert context[:, :77, 32:80].abs().max() == 0 and pooled[:, 24:].abs().max() == 0
    torch.testing.assert_close(context[:, :77, :32], full_context[:, :77, :32])
    torch.testing.assert_close(context[:, 77:], full_context[:, 77:])
    torch.testing.assert_close(pooled[:, :24], full_pooled[:, :24])
    # widths of missing encoders default to the released SD3 ones
    only_l = SD3TextEncoders(clip_l=parts["clip_l"], t5_length=5)
    assert (only_l.context_dim, only_l.pooled_dim, only_l.seq_len) == (SD3_DIMS["t5"], 24 + 1280, 82)
    context, pooled = only_l.encode(["a red circle"])
    assert context.shape == (1, 82, 4096) and context[:, 77:].abs().max() == 0
    with pytest.raises(ValueError, match="unknown encoders"):
        SD3TextEncoders(dims={"clip_h": 3})


def test_pipeline_folder_and_specs(tiny):
    parts, dirs, root = tiny
    pipe = root / "pipeline"
    for name, (model_dir, tok_dir) in {"clip_l": ("text_encoder", "tokenizer"),
                                       "clip_g": ("text_encoder_2", "tokenizer_2")}.items():
        parts[name][0].save_pretrained(pipe / model_dir)
        parts[name][1].save_pretrained(pipe / tok_dir)
    from_pipe = load_text_encoder(f"sd3:{pipe}")
    by_keys = load_text_encoder(f"sd3:clip_l={dirs['clip_l']},clip_g={dirs['clip_g']}")
    assert from_pipe.encoder_names == ("clip_l", "clip_g") and from_pipe.identity != by_keys.identity
    a, b = from_pipe.encode(CAPTIONS), by_keys.encode(CAPTIONS)
    torch.testing.assert_close(a, b)
    assert load_text_encoder(f"sd3:t5={dirs['t5']},t5_length=9").seq_len == 86
    with pytest.raises(ValueError, match="unknown key 'clip_h'"):
        load_text_encoder("sd3:clip_h=/x")
    with pytest.raises(ValueError, match="unknown text encoder spec"):
        load_text_encoder("bert")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_encoder(f"sd3:clip_l={root / 'nowhere'}")


def test_drop_rate_and_independence():
    enc = SD3TextEncoders(dims={"clip_l": (4, 3), "clip_g": (6, 5), "t5": 12}, clip_length=3, t5_length=2)
    n = 20000
    context, pooled = torch.ones(n, enc.seq_len, enc.context_dim), torch.ones(n, enc.pooled_dim)
    c, p = enc.drop(context, pooled, generator=torch.Generator().manual_seed(0))
    dropped = {"clip_l": p[:, 0] == 0, "clip_g": p[:, 3] == 0, "t5": c[:, 3, 0] == 0}
    # each part is zeroed as a whole: its context slice and its pooled slice together
    assert torch.equal(c[:, :3, :4].sum((1, 2)) == 0, dropped["clip_l"])
    assert torch.equal(p[:, :3].sum(1) == 0, dropped["clip_l"])
    assert torch.equal(c[:, :3, 4:10].sum((1, 2)) == 0, dropped["clip_g"])
    assert torch.equal(p[:, 3:].sum(1) == 0, dropped["clip_g"])
    assert torch.equal(c[:, 3:].sum((1, 2)) == 0, dropped["t5"]) and (c[:, :3, 10:] == 1).all()
    tol = 4 * (DROP_P * (1 - DROP_P) / n) ** 0.5
    for d in dropped.values():
        assert abs(d.float().mean().item() - DROP_P) < tol
    for a, b in (("clip_l", "clip_g"), ("clip_l", "t5"), ("clip_g", "t5")):
        assert abs((dropped[a] & dropped[b]).float().mean().item() - DROP_P**2) < tol
    all3 = (dropped["clip_l"] & dropped["clip_g"] & dropped["t5"]).float().mean().item()
    assert abs(all3 - DROP_P**3) < tol  # ~10% fully unconditional (PAPER 4)
    assert (context == 1).all()  # inputs untouched
    again = enc.drop(context, pooled, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], c) and torch.equal(again[1], p)
    assert torch.equal(enc.drop(context, pooled, p=0.0)[0], context)
    assert enc.drop(context, pooled, p=1.0)[1].abs().max() == 0


def test_drop_single_encoder_parts():
    from rectflow.text import Part

    parts = {"only": Part(slice(None), slice(None), slice(None))}
    c, p = drop_parts(parts, torch.ones(1000, 2, 3), torch.ones(1000, 3), 0.3, torch.Generator().manual_seed(1))
    gone = p.sum(1) == 0
    assert torch.equal(gone, c.sum((1, 2)) == 0) and 0.25 < gone.float().mean() < 0.35


@pytest.fixture(scope="module")
def minilm():
    """The real MiniLM, 16 tokens."""
    return MiniLMEncoder(max_length=16)


def test_minilm_outputs(minilm):
    context, pooled = minilm.encode(["a red circle", "a crimson disc", "quarterly earnings fell sharply"])
    assert context.shape == (3, 16, 384) and pooled.shape == (3, 384) and context.dtype == torch.float32
    assert (minilm.context_dim, minilm.pooled_dim, minilm.seq_len, minilm.encoder_names) == (384, 384, 16, ("minilm",))
    n_tokens = len(minilm.tokenizer("a red circle").input_ids)  # [CLS] a red circle [SEP]
    assert n_tokens == 5 and context[0, n_tokens:].abs().max() == 0 and context[0, :n_tokens].abs().min() > 0
    torch.testing.assert_close(pooled[0], context[0, :n_tokens].mean(0))
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], 0) > cos(pooled[0], pooled[2], 0) + 0.2  # a real sentence model
    assert load_text_encoder("minilm").identity == MiniLMEncoder().identity != minilm.identity


def test_cache_memory_disk_and_eviction(minilm, tmp_path):
    cached = CachedTextEncoder(minilm, cache_dir=tmp_path)
    caps = ["a red circle", "two blue squares", "a red circle"]
    context, pooled = cached.encode(caps)
    ref_context, ref_pooled = minilm.encode(caps)
    torch.testing.assert_close(context, ref_context)
    torch.testing.assert_close(pooled, ref_pooled)
    assert cached.stats == {"memory": 0, "disk": 0, "encoded": 2} and len(list(tmp_path.glob("*.safetensors"))) == 2
    cached.encode(["two blue squares"])
    assert cached.stats["memory"] == 1
    fresh = CachedTextEncoder(minilm, cache_dir=tmp_path)
    torch.testing.assert_close(fresh.encode(caps)[0], ref_context)
    assert fresh.stats == {"memory": 0, "disk": 2, "encoded": 0}
    assert (fresh.context_dim, fresh.seq_len) == (384, 16)
    c, _ = fresh.drop(*fresh.encode(caps), p=1.0)
    assert c.abs().max() == 0
    one = 16 * 384 * 4 + 384 * 4  # bytes of one cached caption
    small = CachedTextEncoder(minilm, max_memory_bytes=2 * one)
    small.encode(["a", "b", "c"])
    assert list(small.memory) == [small.key("b"), small.key("c")] and small.memory_bytes == 2 * one
    small.encode(["a"])
    assert small.stats["encoded"] == 4
    other = CachedTextEncoder(MiniLMEncoder(max_length=8))
    assert other.key("a") != small.key("a")
