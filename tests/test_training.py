import json

import numpy as np
import pytest
import torch

from ppcmi.config import MappingTrainConfig
from ppcmi.errors import CheckpointError
from ppcmi.klt import KeyedLatentTransform
from ppcmi.protocol import LatentBatch
from ppcmi.server.mapping import train_mapping
from ppcmi.training import FitConfig, fit, seeded_init

TINY = dict(widen=(16, 16, 32), mid=(32, 32), down=(16, 16, 16), dropout=0.0)


def _regression_data(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g) + 0.01 * torch.randn(n, 1, generator=g)
    return x, y


def _net():
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.1), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _mse(m, b):
    return torch.nn.functional.mse_loss(m(b[0]), b[1])


def test_resume_after_interrupt_equals_uninterrupted(tmp_path):
    x, y = _regression_data()
    cfg = FitConfig(epochs=6, batch_size=8, lr=1e-2, patience=100, seed=3)
    ref = seeded_init(_net, 0)
    r_ref = fit(ref, _mse, [x[:24], y[:24]], [x[24:], y[24:]], cfg, tmp_path / "a", progress=False)

    def boom(epoch, rec):
        if epoch == 3:
            raise KeyboardInterrupt

    m = seeded_init(_net, 0)
    with pytest.raises(KeyboardInterrupt):
        fit(m, _mse, [x[:24], y[:24]], [x[24:], y[24:]], cfg, tmp_path / "b", progress=False, on_epoch=boom)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["epoch"] == 3
    with pytest.raises(CheckpointError, match="--resume"):
        fit(seeded_init(_net, 0), _mse, [x[:24], y[:24]], [x[24:], y[24:]], cfg, tmp_path / "b", progress=False)
    m2 = seeded_init(_net, 99)  # fresh process: different weights until the checkpoint is loaded
    r = fit(m2, _mse, [x[:24], y[:24]], [x[24:], y[24:]], cfg, tmp_path / "b", progress=False, resume=True)
    assert [h["val_loss"] for h in r.history] == [h["val_loss"] for h in r_ref.history]
    for a, b in zip(ref.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_restores_best_weights(tmp_path):
    x, y = _regression_data()
    cfg = FitConfig(epochs=200, batch_size=8, lr=0.3, patience=3, seed=0)  # a large lr makes validation loss bounce
    m = seeded_init(_net, 0)
    r = fit(m, _mse, [x[:24], y[:24]], [x[24:], y[24:]], cfg, tmp_path, progress=False)
    assert r.stopped_early and len(r.history) < 200
    with torch.no_grad():
        val = _mse(m.eval(), [x[24:], y[24:]]).item()
    assert val == pytest.approx(min(h["val_loss"] for h in r.history), rel=1e-5)


def _latent_pairs(seed, n=48):
    """Image latents and mask latents that are a fixed non-linear function of them."""
    g = torch.Generator().manual_seed(seed)
    img = {"s3": torch.rand(n, 8, 8, 8, generator=g), "s4": torch.rand(n, 16, 4, 4, generator=g), "b": torch.rand(n, 32, 2, 2, generator=g)}
    w = {s: torch.randn(c, c, generator=g) / c ** 0.5 for s, c in (("s3", 8), ("s4", 16), ("b", 32))}
    msk = {s: torch.relu(torch.einsum("ij,bjhw->bihw", w[s], v)) for s, v in img.items()}
    return img, msk


def _batch(client, img, msk, klt=None):
    if klt is not None:
        img, msk = klt.forward(img, "image"), klt.forward(msk, "mask")
    arrays = {f"zt_img_{s}": v.numpy() for s, v in img.items()}
    arrays.update({f"zt_msk_{s}": v.numpy() for s, v in msk.items()})
    return LatentBatch("train", client, arrays)


def test_adapters_make_keyed_training_match_plain(tmp_path):
    """DESIGN.md §3.1: an orthogonal map plus bias is what a 1x1 adapter absorbs, so training on keyed
    latents reaches the loss of training on plain latents (MSE is invariant under the keyed map)."""
    ch = {"s3": 8, "s4": 16, "b": 32}
    keys = [bytes([i] * 32) for i in (1, 2)]
    data = [_latent_pairs(10 + i) for i in range(2)]
    cfg = MappingTrainConfig(**TINY, epochs=40, patience=40, batch_size=24, lr=3e-3, val_frac=0.25)
    plain = [_batch(f"h{i}", *data[i]) for i in range(2)]
    keyed = [_batch(f"h{i}", *data[i], KeyedLatentTransform(keys[i], ch)) for i in range(2)]
    _, rp = train_mapping(plain, cfg, tmp_path / "plain", progress=False)
    _, rk = train_mapping(keyed, cfg, tmp_path / "keyed", progress=False)
    first = rk.history[0]["val_loss"]
    assert rk.best_val < 0.2 * first  # it learned
    assert rk.best_val == pytest.approx(rp.best_val, rel=0.35, abs=0.01)


def test_mapping_overfits_a_tiny_batch(tmp_path):
    img, msk = _latent_pairs(0, n=8)
    cfg = MappingTrainConfig(**TINY, epochs=80, patience=80, batch_size=8, lr=5e-3, val_frac=0.0)
    _, r = train_mapping([_batch("h0", img, msk)], cfg, tmp_path, progress=False)
    assert r.history[-1]["train_loss"] < 0.05 * r.history[0]["train_loss"]


def test_mapping_refuses_to_overwrite(tmp_path):
    img, msk = _latent_pairs(0, n=8)
    cfg = MappingTrainConfig(**TINY, epochs=1, val_frac=0.0)
    train_mapping([_batch("h0", img, msk)], cfg, tmp_path, progress=False)
    before = (tmp_path / "mapping.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        train_mapping([_batch("h0", img, msk)], cfg, tmp_path, progress=False)
    assert (tmp_path / "mapping.safetensors").read_bytes() == before
