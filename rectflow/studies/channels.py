"""The autoencoder-channels study (docs/paper.md §4): latent spaces of 4, 8 and 16 channels.

A SmallAE (rectflow.autoencoder) with each channel count is trained on the study's data (train_small_ae, same
steps, factor and seed); its reconstructions of the evaluation images are scored by PSNR, SSIM
(rectflow.studies.reconstruction) and reconstruction FID. Then the same MM-DiT recipe trains in each latent space
and its samples are scored. The paper (f = 8): 4 / 8 / 16 channels give PSNR 25.12 / 26.40 / 28.62 and
reconstruction FID 2.41 / 1.56 / 1.06; more channels make the flow model's task harder, which pays off with size.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from rectflow.autoencoder import SmallAE, train_small_ae
from rectflow.data import get_dataset
from rectflow.evaluate.protocol import Setting, metric_value
from rectflow.files import atomic_path
from rectflow.studies.common import (
    Run,
    StudyOptions,
    figure,
    fmt,
    folder_name,
    parameter_count,
    read_json,
    samples_section,
    scaled,
    study_config,
    table,
    train_spec,
    trained,
)
from rectflow.studies.evaluation import evaluation, final_loss
from rectflow.studies.reconstruction import psnr, ssim

TITLE = "Autoencoder latent channels (paper §4) at small scale"
CHANNELS = (4, 8, 16)
FACTOR = 4           # spatial downsampling of the small autoencoders (32 px -> 8 x 8 latents)
AE_STEPS = 1500      # autoencoder training steps at budget 1
AE_BATCH = 32
AE_WIDTH = 32        # base width of the small autoencoders (64 costs 3.5x the time)
STEPS = 1500         # flow-model training steps at budget 1
PATCH = 1            # 8 x 8 latents in 1 x 1 patches: 64 tokens, as the pixel-space studies' 32 px in 4 x 4
SETTINGS = [Setting("ema", 25, 5.0)]
PAPER = {4: (25.12, 2.41), 8: (26.40, 1.56), 16: (28.62, 1.06)}  # channels -> (PSNR, reconstruction FID)


def ae_path(opts: StudyOptions, channels: int) -> Path:
    """Where the autoencoder with `channels` latent channels is written."""
    return opts.study_dir / folder_name(f"ae-{channels}") / "autoencoder.safetensors"


def flow_config(opts: StudyOptions, channels: int):
    """The MM-DiT recipe in the latent space of the `channels` autoencoder."""
    return study_config(opts, STEPS, recipe={"patch_size": PATCH},
                        autoencoder=f"small:{ae_path(opts, channels)}")


def runs(opts: StudyOptions) -> list[Run]:
    """An autoencoder run per channel count, then a flow run in each latent space (which needs its autoencoder)."""
    cfg = flow_config(opts, CHANNELS[0])
    ae = {"factor": FACTOR, "width": AE_WIDTH, "steps": scaled(AE_STEPS, opts.budget), "batch": AE_BATCH,
          "data": cfg.data, "data_options": cfg.data_options, "resolution": cfg.resolution, "seed": opts.seed,
          "eval": opts.eval_spec()}
    out = [Run(f"ae-{c}", {"channels": c, **ae}) for c in CHANNELS]
    out += [Run(f"flow-{c}", {"channels": c, "train": train_spec(flow_config(opts, c)), "eval": opts.eval_spec(),
                              "settings": [s.key for s in SETTINGS]}, needs=(f"ae-{c}",)) for c in CHANNELS]
    return out


def execute(run: Run, run_dir: Path, opts: StudyOptions) -> dict:
    """Train and score an autoencoder, or a flow model in its latent space."""
    return (_autoencoder if run.name.startswith("ae-") else _flow)(run, run_dir, opts)


def _autoencoder(run: Run, run_dir: Path, opts: StudyOptions) -> dict:
    """Train a SmallAE (from scratch: minutes, no checkpoints) and score its reconstructions of the FID reference
    images (the first validation images): PSNR, SSIM and reconstruction FID."""
    spec, path, device = run.spec, ae_path(opts, run.spec["channels"]), opts.torch_device()
    train_seconds = None
    if not path.is_file():
        t0 = time.perf_counter()
        data = get_dataset(spec["data"], spec["resolution"], split="train", seed=opts.seed, **spec["data_options"])
        model = train_small_ae(data, channels=spec["channels"], factor=spec["factor"], steps=spec["steps"],
                               batch=spec["batch"], width=spec["width"], seed=opts.seed, device=device)
        with atomic_path(path) as tmp:
            model.save(tmp)
        train_seconds = time.perf_counter() - t0
    model = SmallAE.from_file(path).to(device).eval()
    val = get_dataset(spec["data"], spec["resolution"], split="val", seed=0, **spec["data_options"])
    images = torch.stack([val[i]["image"] for i in range(min(len(val), opts.n_reference))])
    with torch.no_grad():
        recon = torch.cat([model.decode(model.encode(images[i:i + 64].to(device))).float().cpu()
                           for i in range(0, len(images), 64)]).clamp(-1, 1)
    ev = evaluation(opts, flow_config(opts, spec["channels"]))
    return {"channels": spec["channels"], "psnr": float(psnr(recon, images).mean()),
            "ssim": float(ssim(recon, images).mean()), "rfid": ev.fid(recon), "params": parameter_count(model),
            "train_seconds": train_seconds, "n": len(images)}


def _flow(run: Run, run_dir: Path, opts: StudyOptions) -> dict:
    """Train the MM-DiT in one latent space and score its samples."""
    cfg = flow_config(opts, run.spec["channels"])
    trainer = trained(run_dir, cfg)
    scores = evaluation(opts, cfg).evaluate(trainer, run_dir, SETTINGS)
    return {"channels": run.spec["channels"], "scores": scores, "params": parameter_count(trainer.model),
            "final_loss": final_loss(run_dir),
            "train_seconds": (read_json(run_dir / "train_time.json") or {}).get("seconds")}


def report(results: dict, opts: StudyOptions, fig_dir: Path) -> str:
    """Reconstruction and generation quality per channel count, beside the paper's."""
    s = SETTINGS[0].key
    rows = []
    for c in CHANNELS:
        ae, flow = results.get(f"ae-{c}", {}), results.get(f"flow-{c}", {})
        sc = flow.get("scores", {}).get(s, {})
        rows.append([c, fmt(ae.get("psnr"), 2), fmt(ae.get("ssim"), 3), fmt(ae.get("rfid"), 2),
                     fmt(PAPER[c][0], 2), fmt(PAPER[c][1], 2), fmt(flow.get("final_loss"), 4),
                     fmt(sc.get("clip_score"), 2), fmt(sc.get("fid"), 2), fmt(metric_value(sc, "geneval"), 3)])
    _plot(results, fig_dir / "channels.png")
    any_ae = next((r for n, r in results.items() if n.startswith("ae-")), {})
    return "\n".join([
        "## Results", "",
        f"SmallAE, factor {FACTOR}, width {AE_WIDTH}, {any_ae.get('n', '?')} evaluation images; reconstruction FID "
        f"uses the study's image encoder (`{opts.encoder}`), the paper's uses its own. Generation: the same MM-DiT "
        f"recipe on each latent space ({PATCH} x {PATCH} patches), {SETTINGS[0].steps} Euler steps, CFG "
        f"{SETTINGS[0].cfg:g}, EMA.",
        "",
        table(["channels", "PSNR", "SSIM", "rec. FID", "paper PSNR", "paper rec. FID", "flow train loss",
               "CLIP score", "FID", "GenEval overall"], rows), "",
        "The training losses of different latent spaces are not comparable (different targets); the sample scores "
        "are.", "", f"![reconstruction and generation by channels]({fig_dir.name}/channels.png)", "",
        samples_section(opts, {f"{c} channels": (f"flow-{c}", s) for c in CHANNELS}, fig_dir,
                        f"Samples ({SETTINGS[0].steps} Euler steps, CFG {SETTINGS[0].cfg:g}, EMA weights)")])


def _plot(results: dict, path: Path) -> None:
    """PSNR and generation CLIP score against the channel count."""
    s = SETTINGS[0].key
    cs = [c for c in CHANNELS if f"ae-{c}" in results]
    gs = [c for c in CHANNELS if f"flow-{c}" in results]

    def draw(ax):
        ax.plot(cs, [results[f"ae-{c}"]["psnr"] for c in cs], marker="o", label="PSNR (ours)")
        ax.plot(list(CHANNELS), [PAPER[c][0] for c in CHANNELS], marker="s", ls="--", label="PSNR (paper, f = 8)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CHANNELS), [str(c) for c in CHANNELS])
        ax.set_xlabel("latent channels")
        ax.set_ylabel("PSNR (dB)")
        if gs:
            twin = ax.twinx()
            twin.plot(gs, [results[f"flow-{c}"]["scores"][s]["clip_score"] for c in gs], marker="^", color="C2",
                      label="CLIP score of samples")
            twin.set_ylabel("CLIP score of samples")
            twin.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
    figure(path, draw)
