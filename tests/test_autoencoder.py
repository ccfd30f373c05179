"""Autoencoders: identity, the SD3 VAE wrapper (vs a tiny diffusers AutoencoderKL), SmallAE training, latent files."""
import pytest
import torch

from rectflow.autoencoder import (SD3VAE, Identity, SmallAE, encode_dataset, load_autoencoder, load_latents,
                                  train_small_ae)
from rectflow.data import get_dataset


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads are 30x slower when the cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random 16-channel, factor-2 AutoencoderKL with the released SD3 scale/shift, saved in a pipeline layout."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=8,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    root = tmp_path_factory.mktemp("pipe")
    vae.save_pretrained(root / "vae")
    return vae, root


def test_sd3_vae_scale_shift_and_round_trip(tiny_vae):
    vae, root = tiny_vae
    ae = SD3VAE.from_folder(root)  # the pipeline folder: finds vae/
    assert (ae.channels, ae.factor, ae.scale, ae.shift) == (16, 2, 1.5305, 0.0609)
    assert ae.spec == f"sd3-vae:{(root / 'vae').resolve()}" and load_autoencoder(ae.spec).scale == 1.5305
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        mean = vae.encode(x).latent_dist.mean
        assert z.shape == (2, 16, 8, 8) and ae.latent_shape(16) == (16, 8, 8)
        torch.testing.assert_close(z, (mean - 0.0609) * 1.5305)
        torch.testing.assert_close(ae.decode(z), vae.decode(mean).sample, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="AutoencoderKL"):
        SD3VAE.from_folder(root / "missing")


def test_identity_and_specs():
    ae = load_autoencoder("identity")
    x = torch.randn(1, 3, 4, 4)
    assert isinstance(ae, Identity) and ae.encode(x) is x and ae.decode(x) is x and (ae.channels, ae.factor) == (3, 1)
    with pytest.raises(ValueError, match="not divisible"):
        SmallAE(4, 8, width=8).latent_shape(12)
    with pytest.raises(ValueError, match="unknown autoencoder spec"):
        load_autoencoder("vqgan:/x")


@pytest.mark.parametrize("channels,factor", [(4, 2), (8, 4), (16, 8)])
def test_small_ae_shapes(channels, factor):
    ae = SmallAE(channels, factor, width=8)
    x = torch.randn(2, 3, 32, 32)
    z = ae.encode(x)
    assert z.shape == (2, channels, 32 // factor, 32 // factor) and ae.decode(z).shape == x.shape


def test_small_ae_trains_normalises_and_saves(tmp_path):
    data = get_dataset("shapes", 16)
    losses = []
    ae = train_small_ae(data, channels=4, factor=2, steps=40, batch=8, lr=2e-3, width=16,
                        callback=lambda step, loss: losses.append(loss))
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    with torch.no_grad():
        z = ae.encode(torch.stack([data[10**6 + i]["image"] for i in range(64)]))
    assert abs(z.mean().item()) < 0.3 and 0.7 < z.std().item() < 1.4  # latent scale/shift fitted on data
    assert ae.scale.item() != 1.0
    path = tmp_path / "ae.safetensors"
    ae.save(path)
    back = load_autoencoder(f"small:{path}")
    x = data[3]["image"][None]
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), ae.encode(x))
        torch.testing.assert_close(back.decode(back.encode(x)), ae.decode(ae.encode(x)))
    assert back.config == {"channels": 4, "factor": 2, "width": 16}
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:10])
    with pytest.raises(Exception):
        SmallAE.from_file(tmp_path / "bad.safetensors")


def test_small_ae_loss_options_differ():
    data = get_dataset("shapes", 8)
    runs = {}
    for loss, kl in (("l1", 0.0), ("mse", 0.0), ("l1", 1.0)):
        out = []
        train_small_ae(data, channels=4, factor=2, steps=2, batch=2, width=8, loss=loss, kl_weight=kl,
                       callback=lambda s, v: out.append(v))
        runs[loss, kl] = out[0]
    assert len(set(runs.values())) == 3  # each option changes the objective
    with pytest.raises(ValueError, match="'l1' or 'mse'"):
        train_small_ae(data, steps=1, batch=1, width=8, loss="huber")


def test_encode_dataset_to_file(tmp_path):
    data = get_dataset("shapes", 8, split="val", val_size=10)
    ae = SmallAE(4, 2, width=8).eval()
    path = tmp_path / "lat.safetensors"
    out = encode_dataset(ae, data, path, batch=4)
    assert out["latents"].shape == (10, 4, 4, 4) and out["captions"][3] == data[3]["caption"]
    back = load_latents(path)
    torch.testing.assert_close(back["latents"], out["latents"])
    assert back["captions"] == out["captions"] and back["metas"][2] == data[2]["meta"]
    assert back["autoencoder"] == "small"
    with torch.no_grad():
        torch.testing.assert_close(out["latents"][7], ae.encode(data[7]["image"][None])[0])
    with pytest.raises(ValueError, match="pass n"):
        encode_dataset(Identity(), get_dataset("shapes", 8))
    assert encode_dataset(Identity(), get_dataset("shapes", 8), n=3)["latents"].shape == (3, 3, 8, 8)
