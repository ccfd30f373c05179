"""Fine-tuning memory and speed of full-size SD3-medium- and SD3.5-medium-shaped models (random weights): rectflow's
MM-DiT with rectflow.lora against diffusers' SD3Transformer2DModel with peft, the same shapes, LoRA targets, gradient
checkpointing and bf16, measured side by side in one command; and the peak memory of loading a released-layout file.

Every measurement runs in a process of its own, one thread: peak memory is the child's peak RSS on the CPU (VmHWM,
reset once the model is built so that the random init's temporaries do not count;
torch.cuda.max_memory_allocated on a GPU) over the warm-up and the timed steps, the step time its process CPU time per
step (wall time on a GPU) after one warm-up step. A step: batch 1 of latents at the resolution, 333 text tokens (77 CLIP + 256 T5, 4096 wide) and a
pooled vector, forward under bf16 autocast, MSE loss, backward, AdamW over the trainable parameters. LoRA: frozen
base in bf16, adapters in float32 (rank 16, alpha 16) on the attention projections of both streams (and MMDiT-X's
second attention); full: float32 weights and AdamW state.

    python benchmarks/finetune.py                              # CPU: both shapes, LoRA r16 at 512 px
    python benchmarks/finetune.py --modes full --depth 6       # full fine-tuning needs ~16 bytes/parameter
    python benchmarks/finetune.py --load                       # also: load a 2.5B released-layout file
    python benchmarks/finetune.py --gpu --resolutions 512 1024 --modes lora full
    python benchmarks/finetune.py --quick                      # tiny shapes, a smoke run
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # the released models' transformer configs (rectflow.models.MMDiT arguments)
    "sd3-medium": dict(depth=24, hidden_size=1536, num_heads=24, patch_size=2, in_channels=16, context_dim=4096,
                       pooled_dim=2048, input_size=128, qk_norm=None, pos_embed_max_size=192),
    "sd3.5-medium": dict(depth=24, hidden_size=1536, num_heads=24, patch_size=2, in_channels=16, context_dim=4096,
                         pooled_dim=2048, input_size=128, qk_norm="rms", dual_attention_layers=tuple(range(13)),
                         pos_embed_max_size=384),
    "tiny": dict(depth=2, hidden_size=128, num_heads=2, patch_size=2, in_channels=16, context_dim=64, pooled_dim=32,
                 input_size=32, qk_norm="rms", dual_attention_layers=(0,), pos_embed_max_size=96),
}
CONTEXT_TOKENS = 333
RANK = 16
DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def rss(field: str = "VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident memory in bytes, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak(gpu: bool) -> None:
    """Start the peak-memory count afresh (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def shape_config(name: str, depth: int | None) -> dict:
    cfg = dict(SHAPES[name])
    if depth is not None:
        cfg["depth"] = depth
        cfg["dual_attention_layers"] = tuple(i for i in cfg.get("dual_attention_layers", ()) if i < depth)
    return cfg


@torch.no_grad()
def fill_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every floating tensor (the model was materialised uninitialised)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32) * 0.02)


def build(impl: str, cfg: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The model on the meta device, cast there (no memory), then materialised once in `dtype` on `device`."""
    with torch.device("meta"):
        if impl == "rectflow":
            from rectflow.models import MMDiT
            model = MMDiT(**cfg)
        else:
            from diffusers import SD3Transformer2DModel
            from rectflow.checkpoints import diffusers_config
            full = {**cfg, "out_channels": cfg["in_channels"], "mlp_ratio": 4.0,
                    "dual_attention_layers": list(cfg.get("dual_attention_layers", ())),
                    "pos_embed_base_size": cfg["input_size"]}
            model = SD3Transformer2DModel(**{k: v for k, v in diffusers_config(full).items()
                                             if not k.startswith("_")})
    model = model.to(dtype).to_empty(device=device)
    fill_(model)
    return model


def prepare(impl: str, model, mode: str) -> list[torch.nn.Parameter]:
    """Gradient checkpointing on; a LoRA attached (or every weight trainable); returns the trainable parameters."""
    if impl == "rectflow":
        model.gradient_checkpointing = True
        if mode == "lora":
            from rectflow.lora import attach
            attach(model, RANK, RANK, "attn")
    else:
        model.enable_gradient_checkpointing()
        if mode == "lora":
            from peft import LoraConfig
            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=DIFFUSERS_TARGETS))
            for name, p in model.named_parameters():  # as diffusers' training scripts cast them
                if "lora_" in name:
                    p.data = p.data.float()
    return [p for p in model.parameters() if p.requires_grad]


def inputs(cfg: dict, resolution: int, device: torch.device):
    side = resolution // 8  # SD3's VAE: 8x
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg["in_channels"], side, side, generator=gen, device=device)
    ctx = torch.randn(1, CONTEXT_TOKENS, cfg["context_dim"], generator=gen, device=device)
    pooled = torch.randn(1, cfg["pooled_dim"], generator=gen, device=device)
    return x, torch.rand(1, generator=gen, device=device), ctx, pooled, torch.randn_like(x)


def step(impl: str, model, opt, batch, device: torch.device) -> float:
    x, t, ctx, pooled, target = batch
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if impl == "rectflow":
            out = model(x, t, ctx, pooled)
        else:
            out = model(x, ctx, pooled, t * 1000, return_dict=False)[0]
    loss = F.mse_loss(out.float(), target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def worker(spec: dict) -> dict:
    """One measurement (runs in a child process)."""
    torch.set_num_threads(spec.get("threads", 1))
    device = torch.device(spec["device"])
    cfg = shape_config(spec["shape"], spec.get("depth"))
    dtype = torch.bfloat16 if spec["mode"] == "lora" else torch.float32
    model = build(spec["impl"], cfg, dtype, device)
    params = prepare(spec["impl"], model, spec["mode"])
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch = inputs(cfg, spec["resolution"], device)
    gpu = device.type == "cuda"
    reset_peak(gpu)  # the peak of training from here: the weights, activations and optimizer, not the random init
    clock = time.perf_counter if gpu else time.process_time
    step(spec["impl"], model, opt, batch, device)  # warm-up (allocates the optimizer state)
    if gpu:
        torch.cuda.synchronize()
    t0 = clock()
    for _ in range(spec["steps"]):
        step(spec["impl"], model, opt, batch, device)
    if gpu:
        torch.cuda.synchronize()
    seconds = (clock() - t0) / spec["steps"]
    peak = torch.cuda.max_memory_allocated() if gpu else rss()
    return {**spec, "sec_per_step": seconds, "peak_bytes": peak,
            "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params)}


def load_worker(spec: dict) -> dict:
    """Peak memory of MMDiT.from_single_file on a released-layout file, against the file's size."""
    from rectflow.models import MMDiT
    before = rss("VmRSS")
    t0 = time.perf_counter()
    model = MMDiT.from_single_file(spec["file"])
    with torch.no_grad():  # touch every weight: memory-mapped pages count once they are read
        checksum = sum(float(p.float().sum()) for p in model.parameters())
    seconds = time.perf_counter() - t0
    peak = rss()
    size = os.path.getsize(spec["file"])
    return {"file": spec["file"], "file_bytes": size, "peak_bytes": peak, "before_bytes": before,
            "ratio": (peak - before) / size, "seconds": seconds, "checksum": checksum,
            "params": sum(p.numel() for p in model.parameters())}


def write_released(path: Path, shape: str) -> None:
    """A random bf16 released-layout single file of `shape` (under model.diffusion_model., as released)."""
    from rectflow.checkpoints import save_released
    model = build("rectflow", shape_config(shape, None), torch.bfloat16, torch.device("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_released(model, path, prefix=True)


def run_child(spec: dict, kind: str = "step") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1))}
    out = subprocess.run([sys.executable, __file__, f"--{kind}-worker", json.dumps(spec)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        return {**spec, "error": (out.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f}"


def report(rows: list[dict], device: str, gpu: bool) -> str:
    lines = [f"Fine-tuning step, batch 1, gradient checkpointing, bf16 autocast ({device}; peak = "
             f"{'max allocated' if gpu else 'max RSS'}):", "",
             "| shape | depth | px | mode | impl | trainable | peak GiB | s/step | peak vs diffusers | "
             "time vs diffusers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r.get('depth') or 24} | {r['resolution']} | {r['mode']} | {r['impl']} "
                         f"| | | | {r['error'][:60]} | |")
            continue
        ref = next((q for q in rows if q["impl"] == "diffusers" and "error" not in q and
                    all(q[k] == r[k] for k in ("shape", "depth", "resolution", "mode"))), None)
        ratio = (f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x", f"{r['sec_per_step'] / ref['sec_per_step']:.2f}x") \
            if ref and r["impl"] == "rectflow" else ("", "")
        lines.append(f"| {r['shape']} | {r.get('depth') or SHAPES[r['shape']]['depth']} | {r['resolution']} | "
                     f"{r['mode']} | {r['impl']} | {r['trainable'] / 1e6:.1f}M of {r['params'] / 1e9:.2f}B | "
                     f"{gib(r['peak_bytes'])} | {r['sec_per_step']:.2f} | {ratio[0]} | {ratio[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-worker", help=argparse.SUPPRESS)
    ap.add_argument("--load-worker", help=argparse.SUPPRESS)
    ap.add_argument("--write-file", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", nargs="+", default=["sd3-medium", "sd3.5-medium"], choices=sorted(SHAPES))
    ap.add_argument("--modes", nargs="+", default=["lora"], choices=["lora", "full"])
    ap.add_argument("--resolutions", nargs="+", type=int, default=[512])
    ap.add_argument("--depth", type=int, default=None, help="fewer blocks than the released 24 (same widths)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    ap.add_argument("--impls", nargs="+", default=["rectflow", "diffusers"], choices=["rectflow", "diffusers"])
    ap.add_argument("--gpu", action="store_true", help="run on cuda:0")
    ap.add_argument("--load", action="store_true", help="also measure loading a released-layout sd3.5-medium file")
    ap.add_argument("--load-file", default="/tmp/rectflow-bench/sd3.5-medium.safetensors",
                    help="the file to load (written once with random weights if absent)")
    ap.add_argument("--quick", action="store_true", help="the tiny shape at 256 px, one step")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    if args.step_worker:
        print(json.dumps(worker(json.loads(args.step_worker))))
        return
    if args.load_worker:
        print(json.dumps(load_worker(json.loads(args.load_worker))))
        return
    if args.write_file:
        write_released(Path(args.write_file), "sd3.5-medium")
        return
    if args.quick:
        args.shapes, args.resolutions, args.steps = ["tiny"], [256], 1
    device = "cuda:0" if args.gpu else "cpu"
    rows = []
    for shape in args.shapes:
        for res in args.resolutions:
            for mode in args.modes:
                for impl in args.impls:
                    spec = {"impl": impl, "shape": shape, "depth": args.depth, "mode": mode, "resolution": res,
                            "steps": args.steps, "device": device}
                    print(f"... {impl} {shape} {mode} {res}px", file=sys.stderr, flush=True)
                    rows.append(run_child(spec))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(report(rows, torch.cuda.get_device_name(0) if args.gpu else "cpu, 1 thread", args.gpu))
    result = {"steps": rows}
    if args.load:
        path = Path(args.load_file)
        if not path.is_file():  # in a child: this process's memory stays small
            print(f"... writing {path}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--write-file", str(path)], check=True)
        load = run_child({"file": str(path)}, kind="load")
        result["load"] = load
        if "error" in load:
            print(f"\nloading {path}: {load['error']}")
        else:
            print(f"\nLoading {path.name} ({load['params'] / 1e9:.2f}B parameters, {gib(load['file_bytes'])} GiB): "
                  f"peak RSS {gib(load['peak_bytes'])} GiB, {gib(load['peak_bytes'] - load['before_bytes'])} GiB "
                  f"over the process before loading = {load['ratio']:.2f}x the file, {load['seconds']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
