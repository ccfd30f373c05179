"""Throughput of rectflow's MM-DiT against diffusers' SD3Transformer2DModel with identical weights.

One process, the two models timed in alternating rounds (so machine load hits both alike): a training step
(forward + backward + AdamW) and a sampling step (forward, no grad), in fp32 and in bf16 autocast. Prints img/s of
both, their ratio, and rectflow's achieved GFLOP/s (FLOPs counted analytically) against a matmul peak measured in the
same run.

    python benchmarks/train_step.py                 # CPU: d=2 at 16x16 and 32x32 latents, d=8 at 32x32
    python benchmarks/train_step.py --quick         # one small config, few rounds (a smoke run)
    python benchmarks/train_step.py --gpu           # CUDA: d=24 at 32x32 latents in bf16, with MFU
    python benchmarks/train_step.py --compile       # adds torch.compile(rectflow) rows
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rectflow.checkpoints import diffusers_config, to_diffusers_state_dict  # noqa: E402
from rectflow.models import MMDiT  # noqa: E402
from rectflow.models.flops import forward_flops  # noqa: E402

CONTEXT_LEN, CONTEXT_DIM, POOLED_DIM, CHANNELS = 32, 384, 384, 16  # MiniLM-sized text conditioning, SD3 latents


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, clock, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype` (the reference for utilisation)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t0 = clock()
        a @ b
        sync(device)
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best / 1e9


def build_pair(depth: int, latent: int, device: torch.device):
    """A rectflow MM-DiT with random (non-zero) weights and a diffusers SD3Transformer2DModel holding the same."""
    from diffusers import SD3Transformer2DModel

    model = MMDiT.from_depth(depth, in_channels=CHANNELS, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM,
                             input_size=latent, pos_embed_max_size=latent // 2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():  # re-randomise the zero-initialised gates so every path does real work
            std = param[0].numel() ** -0.5 if param.ndim > 1 else 0.02
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    dcfg = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
    ref = SD3Transformer2DModel(**dcfg)
    ref.load_state_dict(to_diffusers_state_dict(model.state_dict()))
    return model.to(device), ref.to(device)


def make_runner(model, kind: str, batch: int, latent: int, device: torch.device, autocast: bool):
    """Closures (train_step, sample_step) for one model on fixed random inputs."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CHANNELS, latent, latent, generator=gen).to(device)
    t = torch.rand(batch, generator=gen).to(device)
    ctx = torch.randn(batch, CONTEXT_LEN, CONTEXT_DIM, generator=gen).to(device)
    y = torch.randn(batch, POOLED_DIM, generator=gen).to(device)
    target = torch.randn(x.shape, generator=gen).to(device)
    if kind == "diffusers":
        forward = lambda: model(x, ctx, y, t * 1000, return_dict=False)[0]  # noqa: E731  diffusers takes t * 1000
    else:
        forward = lambda: model(x, t, ctx, y)  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused: 4x faster than foreach on CPU

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.mse_loss(forward().float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample_step():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            forward()

    return train_step, sample_step


def time_alternating(fns: dict, batch: int, rounds: int, steps: int, device: torch.device, clock) -> dict:
    """Best img/s per name over `rounds` rounds, each timing every fn for `steps` steps, in alternating order."""
    for fn in fns.values():  # warm-up (allocator, autocast caches, compilation)
        fn()
    rates = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            sync(device)
            t0 = clock()
            for _ in range(steps):
                fns[name]()
            sync(device)
            rates[name].append(batch * steps / (clock() - t0))
    return {name: max(v) for name, v in rates.items()}


def parity(model, ref, latent: int, device: torch.device) -> float:
    """Max |rectflow - diffusers| relative to the output's std, fp32 (a check that the timed models agree)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, CHANNELS, latent, latent, generator=gen).to(device)
    t = torch.rand(2, generator=gen).to(device)
    ctx = torch.randn(2, CONTEXT_LEN, CONTEXT_DIM, generator=gen).to(device)
    y = torch.randn(2, POOLED_DIM, generator=gen).to(device)
    with torch.no_grad():
        a = model(x, t, ctx, y)
        b = ref(x, ctx, y, t * 1000, return_dict=False)[0]
    return ((a - b).abs().max() / b.std()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d=2 at 16x16 only, 3 rounds")
    parser.add_argument("--gpu", action="store_true", help="CUDA run: d=24 at 32x32 latents, bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(rectflow model)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per measurement")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall clock: on a machine shared with other jobs "
                             "and with --threads 1 this measures the work, not the waiting")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA")
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.cpu_time and args.gpu:
        parser.error("--cpu-time is for CPU runs")
    clock = time.process_time if args.cpu_time else time.perf_counter
    # (depth, latent side, batch, steps per round)
    if args.gpu:
        configs, precisions, rounds = [(24, 32, 32, 5)], ["bf16"], args.rounds or 5
    elif args.quick:
        configs, precisions, rounds = [(2, 16, 16, 2)], ["fp32", "bf16"], args.rounds or 3
    else:
        configs = [(2, 16, 32, 2), (2, 32, 16, 2), (8, 32, 4, 1)]
        precisions, rounds = ["fp32", "bf16"], args.rounds or 5
    if args.precision != "both" and not args.gpu:
        precisions = [args.precision]

    n_peak = 8192 if args.gpu else 2048
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak(dtypes[p], device, n_peak, clock) for p in precisions}
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"clock {'process CPU time' if args.cpu_time else 'wall'}, best of {rounds} alternating rounds; "
          f"matmul peak ({n_peak}^3): " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()))
    print("| model | latent | batch | precision | step | rectflow img/s | diffusers img/s | ratio | "
          "rectflow GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for depth, latent, batch, steps in configs:
        for p in precisions:  # the best peak seen so far: load on a shared machine varies
            peaks[p] = max(peaks[p], matmul_peak(dtypes[p], device, n_peak, clock))
        model, ref = build_pair(depth, latent, device)
        err = parity(model, ref, latent, device)
        flops = forward_flops(model.config, latent, latent, CONTEXT_LEN)
        compiled = torch.compile(model) if args.compile else None
        for prec in precisions:
            autocast = prec == "bf16"
            rf_train, rf_sample = make_runner(model, "rectflow", batch, latent, device, autocast)
            df_train, df_sample = make_runner(ref, "diffusers", batch, latent, device, autocast)
            runs = {"train": {"rectflow": rf_train, "diffusers": df_train},
                    "sample": {"rectflow": rf_sample, "diffusers": df_sample}}
            if compiled is not None:
                c_train, c_sample = make_runner(compiled, "rectflow", batch, latent, device, autocast)
                runs["train"]["compiled"], runs["sample"]["compiled"] = c_train, c_sample
            for step, fns in runs.items():
                rate = time_alternating(fns, batch, rounds, steps, device, clock)
                work = flops * (3 if step == "train" else 1)
                for name in [n for n in fns if n != "diffusers"]:
                    gflops = rate[name] * work / 1e9
                    label = f"d={depth}" + (" (compiled)" if name == "compiled" else "")
                    print(f"| {label} | {latent}x{latent} | {batch} | {prec} | {step} | {rate[name]:.1f} | "
                          f"{rate['diffusers']:.1f} | {rate[name] / rate['diffusers']:.2f} | {gflops:.0f} | "
                          f"{100 * gflops / peaks[prec]:.0f}% |", flush=True)
        print(f"# d={depth} {latent}x{latent}: {flops / 1e9:.2f} GFLOP per image forward; "
              f"fp32 output parity max|diff|/std = {err:.1e}", flush=True)
    print("# matmul peak used (best seen): " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
