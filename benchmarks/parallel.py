"""Data-parallel training of an SD3-medium-shaped MM-DiT (random weights) under DDP and FSDP2, side by side in one
command: per-rank memory, images/s and (on a GPU) MFU, with rectflow's own wrapping (rectflow.training.parallel:
fully_shard per block, then the root; bf16 MixedPrecisionPolicy under bf16).

Each configuration runs in fresh processes (spawned, one per rank, one thread each on the CPU; gloo on the CPU, nccl
on GPUs). A step: per-rank batch of latents, 333 text tokens 4096 wide and a pooled vector, bf16 autocast, MSE loss,
backward, AdamW (float32 weights and state). Memory per rank: the peak RSS over the timed steps on the CPU (VmHWM,
reset after the model is built and wrapped, so the full model each rank builds before sharding does not count;
the state it keeps does), torch.cuda.max_memory_allocated on a GPU; plus the bytes of parameters, gradients and
AdamW state the rank holds. MFU: model FLOPs (3 x rectflow.models.flops.forward_flops) per second over the device's
bf16 peak.

    python benchmarks/parallel.py                        # CPU: 2 processes, SD3-medium width at depth 4, 256 px
    python benchmarks/parallel.py --depth 8 --steps 3
    python benchmarks/parallel.py --gpu                  # every GPU: depth 24, 256 and 1024 px, ddp/fsdp x compile
    python benchmarks/parallel.py --quick                # tiny shapes, a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.finetune import CONTEXT_TOKENS, SHAPES, reset_peak, rss  # noqa: E402
from rectflow.models import MMDiT  # noqa: E402
from rectflow.models.flops import forward_flops, peak_flops  # noqa: E402
from rectflow.training.parallel import shard  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _held_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds (its shards under FSDP)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    total = 0
    for p in model.parameters():
        total += local(p).numel() * local(p).element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * local(p.grad).element_size()
    for state in opt.state.values():
        total += sum(local(v).numel() * local(v).element_size() for v in state.values() if torch.is_tensor(v))
    return total


def _rank(rank: int, world: int, port: int, job: dict, out: str) -> None:
    """One rank: build, wrap, warm up, time job['steps'] steps; rank 0 writes the result JSON."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    gpu = job["gpu"]
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if gpu else "gloo")
    cfg, latent, batch = job["shape"], job["latent"], job["batch"]
    torch.manual_seed(0)
    model = MMDiT(**{**cfg, "input_size": latent}).to(device)
    if job["mode"] == "fsdp":
        shard(model, mixed_precision=True)
        net = model
    else:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if gpu else None,
                                                        find_unused_parameters=True)
    if job["compile"]:
        for block in model.joint_blocks:
            block.compile()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, cfg["in_channels"], latent, latent, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    ctx = torch.randn(batch, CONTEXT_TOKENS, cfg["context_dim"], generator=g).to(device)
    y = torch.randn(batch, cfg["pooled_dim"], generator=g).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(net(x, t, ctx, y).float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients allocated: what a step holds

    def sync():
        if gpu:
            torch.cuda.synchronize()
        dist.barrier()

    step()  # warm-up (and compile)
    sync()
    reset_peak(gpu)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(job["steps"]):
        step()
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() if gpu else rss()
    held = _held_bytes(model, opt)
    results = [None] * world
    dist.all_gather_object(results, {"peak": peak, "held": held, "cpu": cpu})
    if rank == 0:
        per_step = wall / job["steps"] if gpu else max(r["cpu"] for r in results) / job["steps"]
        images = batch * world / per_step
        flops = 3 * forward_flops(model.config, latent, latent, CONTEXT_TOKENS) * images
        peak_device = peak_flops(device)
        Path(out).write_text(json.dumps({
            **{k: job[k] for k in ("mode", "compile", "latent", "batch")}, "world": world,
            "params": job["params"], "peak_gib": max(r["peak"] for r in results) / 2**30,
            "held_gib": max(r["held"] for r in results) / 2**30, "img_s": images,
            "mfu": flops / (peak_device * world) if peak_device else None}))
    dist.barrier()
    dist.destroy_process_group()


def run_job(job: dict, world: int, out: Path) -> dict:
    mp.start_processes(_rank, args=(world, _free_port(), job, str(out)), nprocs=world, start_method="spawn")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="every CUDA device, depth 24, 256 and 1024 px")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    ap.add_argument("--nproc", type=int, default=None, help="processes (default: 2 on the CPU, every GPU)")
    ap.add_argument("--depth", type=int, default=None, help="blocks (default: 4 on the CPU, 24 on GPUs)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=None, help="pixels (latent = px / 8)")
    ap.add_argument("--batch", type=int, default=None, help="images per rank per step (default 1 CPU, 8 GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default 2 CPU, 10 GPU)")
    ap.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks (default on GPUs)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/parallel.json"))
    args = ap.parse_args()
    gpu = args.gpu
    shape = dict(SHAPES["tiny" if args.quick else "sd3-medium"])
    shape["depth"] = args.depth or (shape["depth"] if args.quick else 24 if gpu else 4)
    world = args.nproc or (torch.cuda.device_count() if gpu else 2)
    resolutions = args.resolutions or ([256, 1024] if gpu else [256])
    batch = args.batch or (8 if gpu else 1)
    steps = args.steps or (10 if gpu else 2)
    compiles = [False, True] if (args.compile or gpu) else [False]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if gpu else f"CPU, {world} processes x 1 thread"
    with torch.device("meta"):
        params = sum(p.numel() for p in MMDiT(**shape).parameters())
    print(f"# {device}; MM-DiT width {shape['hidden_size']}, depth {shape['depth']} ({params / 1e6:.0f}M "
          f"parameters), batch {batch}/rank")
    print("| mode | compile | px | peak GiB/rank | held GiB/rank | img/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for px in resolutions:
        for compiled in compiles:
            for mode in args.modes:
                job = {"mode": mode, "compile": compiled, "latent": px // 8, "batch": batch, "steps": steps,
                       "gpu": gpu, "shape": shape, "params": params}
                r = run_job(job, world, args.out.with_suffix(".part.json"))
                rows.append({**r, "px": px, "device": device})
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
                print(f"| {mode} | {'on' if compiled else 'off'} | {px} | {r['peak_gib']:.2f} | {r['held_gib']:.2f} "
                      f"| {r['img_s']:.3g} | {mfu} |", flush=True)
    by = {(r["mode"], r["compile"], r["px"]): r for r in rows}
    for (mode, compiled, px), r in by.items():
        if mode == "fsdp" and ("ddp", compiled, px) in by:
            d = by[("ddp", compiled, px)]
            print(f"# {px} px, compile {'on' if compiled else 'off'}: FSDP/DDP peak memory per rank "
                  f"{r['peak_gib'] / d['peak_gib']:.2f}x, held state {r['held_gib'] / d['held_gib']:.2f}x, "
                  f"throughput {r['img_s'] / d['img_s']:.2f}x")
    args.out.with_suffix(".part.json").unlink(missing_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
