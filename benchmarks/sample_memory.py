"""Peak memory of `rectflow sample` on a full-size SD3.5-medium-shaped pipeline (random weights: the MM-DiT, CLIP-L,
CLIP-G, T5-XXL and the VAE at their released sizes), with and without the memory options.

    python benchmarks/sample_memory.py                 # writes the pipeline once (~16 GB in bf16), then measures
    python benchmarks/sample_memory.py --tiny          # a small pipeline (a smoke run)

Each configuration runs `rectflow sample` (one prompt, 512 px, 2 Euler steps, CFG 4, --preset none) in a fresh
process and reports its peak resident memory (VmHWM) and wall time. Configurations: bf16 weights with the text
encoders freed once the prompt is encoded (the default), the same keeping them (--keep-text-encoders), bf16 without
T5 (--no-t5), and float32 (which needs ~32 GB and is skipped below that much free memory).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = "a an the photo of red green blue fox cat dog in on snow".split()
FULL = {
    "mmdit": dict(depth=24, hidden_size=1536, num_heads=24, patch_size=2, in_channels=16, context_dim=4096,
                  pooled_dim=2048, input_size=128, qk_norm="rms", dual_attention_layers=tuple(range(13)),
                  pos_embed_max_size=384),
    "clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu"),
    "clip_g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu"),
    "t5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
}
TINY = {
    "mmdit": dict(depth=2, hidden_size=64, num_heads=1, patch_size=2, in_channels=16, context_dim=96, pooled_dim=64,
                  input_size=32, qk_norm="rms", dual_attention_layers=(0,), pos_embed_max_size=48),
    "clip_l": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=24,
                   hidden_act="quick_gelu"),
    "clip_g": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, projection_dim=40,
                   hidden_act="gelu"),
    "t5": dict(d_model=96, d_kv=16, d_ff=64, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu"),
    "vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
}
SUBFOLDERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
              "t5": ("text_encoder_3", "tokenizer_3")}


def tokenizer(pad: str, bos: str | None):
    """A word-level tokenizer built locally (the benchmark measures memory, not language)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<s>", "</s>", "<pad>", "!", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[
        (t, vocab[t]) for t in (bos, "</s>") if t])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", pad_token=pad,
                                   unk_token="<unk>", model_max_length=77)


@torch.no_grad()
def randomise(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def materialise(cls, config, dtype):
    """A model built on the meta device and materialised once in dtype with random values."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype).to_empty(device="cpu")
    randomise(model)
    return model


def write_pipeline(root: Path, sizes: dict) -> None:
    """The random pipeline folder (bf16): transformer single file, three text encoders with tokenizers, VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from rectflow.checkpoints import save_released
    from rectflow.models import MMDiT
    root.mkdir(parents=True, exist_ok=True)
    for name, (model_dir, tok_dir) in SUBFOLDERS.items():
        if name == "t5":
            config = T5Config(vocab_size=32128, pad_token_id=2, eos_token_id=1, decoder_start_token_id=2, **sizes[name])
            model = materialise(T5EncoderModel, config, torch.bfloat16)
            tok = tokenizer("<pad>", None)
        else:
            config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                    pad_token_id=2, **sizes[name])
            model = materialise(CLIPTextModelWithProjection, config, torch.bfloat16)
            tok = tokenizer("</s>" if name == "clip_l" else "!", "<s>")
        model.save_pretrained(root / model_dir)
        tok.save_pretrained(root / tok_dir)
        del model
    vae_cfg = sizes["vae"]
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False, **vae_cfg)
    randomise(vae)
    vae.to(torch.bfloat16).save_pretrained(root / "vae")
    with torch.device("meta"):
        mmdit = MMDiT(**sizes["mmdit"])
    mmdit = mmdit.to(torch.bfloat16).to_empty(device="cpu")
    randomise(mmdit)
    save_released(mmdit, root / "transformer.safetensors", prefix=True)


def measure(root: Path, options: list[str], resolution: int, threads: int) -> dict:
    """Peak RSS and wall time of one `rectflow sample` run in a fresh process."""
    code = ("import sys; from rectflow.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('RESULT', rc, int(hwm) * 1024)")
    args = ["sample", "--checkpoint", str(root / "transformer.safetensors"), "--text-encoder", f"sd3:{root}",
            "--autoencoder", f"sd3-vae:{root}", "--resolution", str(resolution), "--steps", "2", "--preset", "none",
            "--prompt", "a photo of a red fox in the snow", "--out", str(root / "out" / "grid.png"), *options]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.perf_counter() - t0
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        return {"options": options, "error": (out.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]}
    _, rc, peak = line.split()
    return {"options": options, "rc": int(rc), "peak_bytes": int(peak), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/rectflow-bench/sd35m-pipeline", help="where the random pipeline lives")
    ap.add_argument("--tiny", action="store_true", help="a small pipeline instead of the full-size one")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    root = Path(args.root + ("-tiny" if args.tiny else ""))
    if not (root / "transformer.safetensors").is_file():
        print(f"... writing the random pipeline to {root}", file=sys.stderr, flush=True)
        write_pipeline(root, TINY if args.tiny else FULL)
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    configs = [["--dtype", "bf16"], ["--dtype", "bf16", "--keep-text-encoders"], ["--dtype", "bf16", "--no-t5"]]
    if args.tiny or free > 34 * 2 ** 30:
        configs.append(["--dtype", "fp32"])
    rows = []
    for options in configs:
        print(f"... rectflow sample {' '.join(options)}", file=sys.stderr, flush=True)
        rows.append(measure(root, options, args.resolution, args.threads))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
    print(f"SD3.5-medium-shaped pipeline ({size / 2**30:.1f} GiB of bf16 weights on disk), {args.resolution} px, "
          f"2 steps:\n\n| options | peak RSS GiB | wall s |\n|---|---|---|")
    for r in rows:
        cells = f"{r['peak_bytes'] / 2**30:.2f} | {r['seconds']:.0f}" if "peak_bytes" in r else f"{r['error'][:60]} | -"
        print(f"| `{' '.join(r['options'])}` | {cells} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
