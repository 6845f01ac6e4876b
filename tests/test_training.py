import json
import os

import numpy as np
import pytest
import torch

from ppcmi.config import MappingTrainConfig
from ppcmi.errors import CheckpointError
from ppcmi.klt import KeyedLatentTransform
from ppcmi.protocol import LatentBatch
from ppcmi.latent import principal_frame
from ppcmi.server.mapping import MappingServer, refit_adapters, train_mapping
from ppcmi.training import FitConfig, fit, seeded_init
from safetensors.torch import load_file

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


class _Killed(BaseException):
    """A kill of the training process (not an Exception, so no ``except Exception`` in the code swallows it)."""


class _KillSwitch:
    """Counts the file-system steps that change a checkpoint folder (``os.replace``: an atomic write lands;
    ``os.unlink``: a file goes) and kills the process just before the ``at``-th. After the kill every
    further step fails too, as nothing runs after a SIGKILL (temporaries stay behind)."""

    def __init__(self, monkeypatch, at=None):
        self.at, self.calls, self.dead = at, 0, False
        self._replace, self._unlink = os.replace, os.unlink
        monkeypatch.setattr(os, "replace", self._wrap(self._replace))
        monkeypatch.setattr(os, "unlink", self._wrap(self._unlink))

    def _wrap(self, real):
        def step(*args, **kwargs):
            if self.dead:
                raise _Killed
            self.calls += 1
            if self.calls == self.at:
                self.dead = True
                raise _Killed
            return real(*args, **kwargs)
        return step

    def disarm(self):
        self.at, self.dead = None, False


def _outcome(work, model, res):
    """Everything an interrupted run must reproduce: final (best) weights, the last epoch's model and
    optimiser tensors, the best checkpoint, the history and counters (not the wall-clock seconds)."""
    st = json.loads((work / "state.json").read_text())
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "last": load_file(str(work / st["files"]["last"]["name"])),
            "best": load_file(str(work / st["files"]["best"]["name"])),
            "history": res.history, "best_epoch": res.best_epoch, "best_val": res.best_val,
            "state": {k: v for k, v in st.items() if k != "seconds"},
            "folder": sorted(p.name for p in work.iterdir())}


def _assert_same(a, b):
    for k in ("model", "last", "best"):
        assert a[k].keys() == b[k].keys(), k
        for name in a[k]:
            assert torch.equal(a[k][name], b[k][name]), f"{k}: {name}"
    assert any(n.startswith("optim.") for n in a["last"])  # the optimiser state is compared too
    for k in ("history", "best_epoch", "best_val", "state", "folder"):
        assert a[k] == b[k], k


@pytest.mark.parametrize("lr, seed", [(0.1, 0), (0.3, 1)], ids=["best-improves-each-epoch", "best-stays-at-epoch-1"])
def test_kill_at_every_checkpoint_step_then_resume_is_bit_identical(tmp_path, monkeypatch, lr, seed):
    x, y = _regression_data()
    data = ([x[:24], y[:24]], [x[24:], y[24:]])
    cfg = FitConfig(epochs=3, batch_size=8, lr=lr, patience=100, seed=seed)
    ref = seeded_init(_net, 0)
    r_ref = fit(ref, _mse, *data, cfg, tmp_path / "ref", progress=False)
    want = _outcome(tmp_path / "ref", ref, r_ref)
    assert want["folder"] == sorted(["state.json", "last-3.safetensors", f"best-{r_ref.best_epoch}.safetensors"])

    epochs_seen = []
    count = _KillSwitch(monkeypatch)  # count the steps of an uninterrupted run, per epoch
    fit(seeded_init(_net, 0), _mse, *data, cfg, tmp_path / "count", progress=False,
        on_epoch=lambda e, rec: epochs_seen.append((e, count.calls)))
    steps = count.calls
    per_epoch = [b - a for (_, a), (_, b) in zip([(0, 0)] + epochs_seen, epochs_seen)]
    assert per_epoch[1] >= 3 and steps == sum(per_epoch)  # epoch 2: last, (best,) state.json, removals

    for at in range(1, steps + 1):  # every step of every epoch, epoch 2's included
        work = tmp_path / f"kill{at}"
        switch = _KillSwitch(monkeypatch, at)
        with pytest.raises(_Killed):
            fit(seeded_init(_net, 0), _mse, *data, cfg, work, progress=False)
        switch.disarm()
        if (work / "state.json").exists():  # the old or the new epoch, complete
            st = json.loads((work / "state.json").read_text())
            killed_in = next(e for e, c in epochs_seen if c >= at)
            assert st["epoch"] in (killed_in - 1, killed_in), at
        resuming = (work / "state.json").exists()  # as the callers decide it
        assert resuming or at <= per_epoch[0], at  # only a kill in epoch 1 leaves nothing to resume
        m = seeded_init(_net, 99 if resuming else 0)  # resuming: other weights until the checkpoint is loaded
        r = fit(m, _mse, *data, cfg, work, progress=False, resume=resuming)
        _assert_same(_outcome(work, m, r), want)


def _two_epochs(tmp_path):
    x, y = _regression_data()
    data = ([x[:24], y[:24]], [x[24:], y[24:]])
    cfg = FitConfig(epochs=4, batch_size=8, lr=1e-2, patience=100, seed=0)

    def stop(epoch, rec):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(seeded_init(_net, 0), _mse, *data, cfg, tmp_path, progress=False, on_epoch=stop)
    return lambda: fit(seeded_init(_net, 0), _mse, *data, cfg, tmp_path, progress=False, resume=True)


def _one_line_error(resume, match):
    with pytest.raises(CheckpointError, match=match) as e:
        resume()
    assert "\n" not in str(e.value)
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)  # no chained traceback
    return str(e.value)


def test_truncated_state_json_is_a_checkpoint_error_naming_it(tmp_path):
    resume = _two_epochs(tmp_path)
    p = tmp_path / "state.json"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    _one_line_error(resume, r"state\.json: truncated or unreadable training state")


@pytest.mark.parametrize("role", ["last", "best"])
def test_truncated_weights_file_is_a_checkpoint_error_naming_it(tmp_path, role):
    resume = _two_epochs(tmp_path)
    p = tmp_path / f"{role}-2.safetensors"
    p.write_bytes(p.read_bytes()[:-7])
    _one_line_error(resume, rf"{role}-2\.safetensors: truncated or altered checkpoint")


def test_missing_or_inconsistent_checkpoint_is_a_checkpoint_error(tmp_path):
    resume = _two_epochs(tmp_path)
    (tmp_path / "last-2.safetensors").unlink()
    _one_line_error(resume, r"last-2\.safetensors: checkpoint not found \(named by state\.json\)")
    st = json.loads((tmp_path / "state.json").read_text())
    for bad, match in (({**st, "epoch": 3}, "history does not list epochs 1..3"),
                       ({**st, "files": {**st["files"], "last": {"name": "../x.safetensors", "sha256": "0"}}}, "files.last is"),
                       ({**st, "format": 9}, "format 9"), ([1, 2], "not a JSON object")):
        (tmp_path / "state.json").write_text(json.dumps(bad))
        _one_line_error(resume, r"state\.json: inconsistent training state \(" + match)


def test_resume_from_the_old_two_file_format(tmp_path):
    """A folder written before per-epoch commits (last.safetensors, best.safetensors, state.json without
    file names) still resumes, and ends in the new format, equal to an uninterrupted run."""
    x, y = _regression_data()
    data = ([x[:24], y[:24]], [x[24:], y[24:]])
    cfg = FitConfig(epochs=3, batch_size=8, lr=0.3, patience=100, seed=1)
    ref = seeded_init(_net, 0)
    want = _outcome(tmp_path / "ref", ref, fit(ref, _mse, *data, cfg, tmp_path / "ref", progress=False))

    def stop(epoch, rec):
        if epoch == 2:
            raise KeyboardInterrupt

    work = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        fit(seeded_init(_net, 0), _mse, *data, cfg, work, progress=False, on_epoch=stop)
    st = json.loads((work / "state.json").read_text())
    (work / st["files"]["last"]["name"]).rename(work / "last.safetensors")
    (work / st["files"]["best"]["name"]).rename(work / "best.safetensors")
    (work / "state.json").write_text(json.dumps({k: v for k, v in st.items() if k not in ("format", "files")}))
    m = seeded_init(_net, 99)
    _assert_same(_outcome(work, m, fit(m, _mse, *data, cfg, work, progress=False, resume=True)), want)


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


@pytest.mark.slow
def test_adapters_make_keyed_training_match_plain(tmp_path):
    """DESIGN.md §3.1: an orthogonal map plus bias is what a 1x1 adapter absorbs, so training on keyed
    latents reaches the loss of training on plain latents (MSE is invariant under the keyed map)."""
    ch = {"s3": 8, "s4": 16, "b": 32}
    keys = [bytes([i] * 32) for i in (1, 2)]
    data = [_latent_pairs(10 + i) for i in range(2)]
    cfg = MappingTrainConfig(**TINY, epochs=20, patience=20, batch_size=24, lr=3e-3, val_frac=0.25, adapter_init="identity")
    plain = [_batch(f"h{i}", *data[i]) for i in range(2)]
    keyed = [_batch(f"h{i}", *data[i], KeyedLatentTransform(keys[i], ch)) for i in range(2)]
    _, rp = train_mapping(plain, cfg, tmp_path / "plain", progress=False)
    _, rk = train_mapping(keyed, cfg, tmp_path / "keyed", progress=False)
    first = rk.history[0]["val_loss"]
    assert rk.best_val < 0.2 * first  # it learned
    assert rk.best_val == pytest.approx(rp.best_val, rel=0.35, abs=0.01)


def test_canonical_frame_coordinates_do_not_depend_on_the_key():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(40, 8, 4, 4, generator=g) ** 3  # skewed, so every axis's sign is defined
    zt = KeyedLatentTransform(bytes([7] * 32), {"s3": 8}).forward({"s3": z}, "image")["s3"]
    (u, mu), (ut, mut) = principal_frame(z.numpy()), principal_frame(zt.numpy())
    coords = lambda a, u, mu: np.einsum("cd,nchw->ndhw", u, a.numpy().astype(np.float64) - mu[None, :, None, None])  # noqa: E731
    np.testing.assert_allclose(coords(zt, ut, mut), coords(z, u, mu), atol=1e-4)
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-10)


def _full_rank_pairs(seed, n=48):
    """Like _latent_pairs, but no mask-latent direction is constant (a ReLU leaves some at zero, where a
    principal axis, and with it the decoded output, is arbitrary)."""
    img, msk = _latent_pairs(seed, n)
    return img, {s: torch.nn.functional.softplus(v) + 0.1 * img[s][:, : v.shape[1]] ** 2 for s, v in msk.items()}


def _decoded(model_dir, batch, klt):
    """The mapped mask latents of ``batch``'s image latents, back in plain coordinates."""
    q = LatentBatch("query", batch.client, {k: v for k, v in batch.arrays.items() if k.startswith("zt_img_")})
    out = MappingServer(model_dir).handle(q).latents("zt_msk_")
    out = {s: torch.from_numpy(np.asarray(v)) for s, v in out.items()}
    return {s: v.numpy() for s, v in (klt.inverse(out, "mask") if klt is not None else out).items()}


@pytest.mark.slow
def test_pca_adapters_make_training_independent_of_the_keys(tmp_path):
    """With mapping.adapter_init = "pca" the core sees key-independent coordinates: training on two hospitals'
    pairs under any keys (or none) follows the same losses and gives the same decoded predictions."""
    ch = {"s3": 8, "s4": 16, "b": 32}
    data = [_full_rank_pairs(20 + i) for i in range(2)]
    cfg = MappingTrainConfig(**TINY, epochs=3, patience=3, batch_size=16, lr=1e-3, val_frac=0.25, adapter_init="pca")
    runs = {}
    for name, keys in (("plain", None), ("a", (1, 2)), ("b", (3, 4))):
        klts = [None, None] if keys is None else [KeyedLatentTransform(bytes([k] * 32), ch) for k in keys]
        batches = [_batch(f"h{i}", *data[i], klts[i]) for i in range(2)]
        # resume=True into a fresh folder, as `ppcmi simulate` and `ppcmi bench` call it, must set the frames too
        model, r = train_mapping(batches, cfg, tmp_path / name, resume=name == "b", progress=False)
        assert not torch.allclose(model.in_frames["h0"]["b"].weight, torch.eye(32))
        runs[name] = (r, _decoded(tmp_path / name, batches[0], klts[0]))
    # equal up to float32 rounding of the keyed latents (1e-6), which three epochs amplify to < 1 %
    for name in ("a", "b"):
        for h0, h1 in zip(runs["plain"][0].history, runs[name][0].history):
            assert h1["train_loss"] == pytest.approx(h0["train_loss"], rel=1e-2)
            assert h1["val_loss"] == pytest.approx(h0["val_loss"], rel=1e-2)
        for s in ch:
            np.testing.assert_allclose(runs[name][1][s], runs["plain"][1][s], atol=2e-2)


def test_key_rotation_with_pca_adapters_keeps_the_predictions(tmp_path):
    """After a key rotation the re-fitted adapters start at the new key's canonical frames, so the frozen core
    serves the new key as it served the old one (no old-to-new relation is needed)."""
    ch = {"s3": 8, "s4": 16, "b": 32}
    img, msk = _full_rank_pairs(30)
    old, new = KeyedLatentTransform(bytes([5] * 32), ch), KeyedLatentTransform(bytes([6] * 32), ch)
    cfg = MappingTrainConfig(**TINY, epochs=3, patience=3, batch_size=16, val_frac=0.25, adapter_init="pca")
    train_mapping([_batch("h0", img, msk, old)], cfg, tmp_path / "m", progress=False)
    before = _decoded(tmp_path / "m", _batch("h0", img, msk, old), old)
    refit = MappingTrainConfig(**{**cfg.__dict__, "epochs": 1, "patience": 1, "lr": 1e-12})  # the start, not the training
    refit_adapters(tmp_path / "m", _batch("h0", img, msk, new), refit, tmp_path / "m2", progress=False)
    after = _decoded(tmp_path / "m2", _batch("h0", img, msk, new), new)
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["refits"][0]["init"].startswith("canonical frames")
    for s in ch:
        np.testing.assert_allclose(after[s], before[s], atol=1e-3)


@pytest.mark.slow
def test_mapping_overfits_a_tiny_batch(tmp_path):
    img, msk = _latent_pairs(0, n=8)
    cfg = MappingTrainConfig(**TINY, epochs=40, patience=40, batch_size=8, lr=5e-3, val_frac=0.0)
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


def test_mask_loss_by_hand_and_a_dropped_small_class_costs_a_share_of_the_dice():
    from ppcmi.training import autoencoder_loss, bce_dice_loss, mask_loss

    t = torch.zeros(2, 2, 10, 10)
    t[:, 0] = 1.0
    t[0, 0, 2, 3], t[0, 1, 2, 3] = 0.0, 1.0  # one class-1 pixel in 200: 0.5 % of the pixels
    # uniform logits: cross-entropy log 2; per class Dice (2 * sum(t) / 2 + 1) / (200 / 2 + sum(t) + 1)
    uniform = mask_loss(torch.zeros(2, 2, 10, 10), t)
    d0, d1 = (199 + 1) / (100 + 199 + 1), (1 + 1) / (100 + 1 + 1)
    assert float(uniform) == pytest.approx(0.5 * np.log(2) + 0.5 * (1 - (d0 + d1) / 2), rel=1e-6)
    # near-certain logits of the right class: almost no loss
    assert float(mask_loss(40.0 * (2 * t - 1), t)) < 1e-6
    # predicting background everywhere drops the small class: the per-class Dice charges about half its weight,
    # where the published joint Dice (one over every channel) hardly notices
    bg_only = torch.zeros_like(t)
    bg_only[:, 0] = 1.0
    dropped = mask_loss(40.0 * (2 * bg_only - 1), t)
    joint = float(bce_dice_loss(bg_only.clamp(1e-6, 1 - 1e-6), t))
    assert float(dropped) > 0.5 * 0.5 * (1 - 1 / 2) and float(dropped) > 5 * joint
    # the autoencoder losses by kind
    with pytest.raises(Exception, match="kind must be 'image' or 'mask'"):
        autoencoder_loss("label")


def test_mask_noise_perturbs_each_latent_channel_by_its_spread_in_training_only():
    from ppcmi.models import AEConfig, Autoencoder
    from ppcmi.training import autoencoder_loss, mask_loss, noisy_latents

    g = torch.Generator().manual_seed(1)
    z = {"s3": torch.randn(4, 3, 5, 5, generator=g) * torch.tensor([0.1, 1.0, 10.0])[None, :, None, None]}
    torch.manual_seed(7)
    got = noisy_latents(z, 0.5)["s3"]
    torch.manual_seed(7)
    eps = torch.randn(4, 3, 5, 5)
    sd = z["s3"].std(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(got, z["s3"] + 0.5 * sd * eps)
    rel = ((got - z["s3"]) / sd).std(dim=(0, 2, 3))  # each channel's noise in units of its own spread
    assert torch.allclose(rel, torch.full((3,), 0.5), atol=0.12)
    assert torch.equal(noisy_latents(z, 0.0)["s3"], z["s3"])
    model = seeded_init(lambda: Autoencoder(AEConfig(in_channels=2, width=0.25)), 0)
    y = torch.nn.functional.one_hot(torch.randint(0, 2, (2, 32, 32), generator=g), 2).permute(0, 3, 1, 2).float()
    clean, noisy = autoencoder_loss("mask"), autoencoder_loss("mask", noise=1.0)
    model.eval()  # validation decodes the latents as they are
    with torch.no_grad():
        assert float(noisy(model, [y])) == float(clean(model, [y])) == pytest.approx(
            float(mask_loss(model.decode_logits(model.encode(y)), y)))
    model.train()
    with torch.no_grad():
        torch.manual_seed(3)
        a = float(noisy(model, [y]))
        torch.manual_seed(3)
        assert float(noisy(model, [y])) == a != float(clean(model, [y]))  # seeded by the caller's generator, and perturbed
    with pytest.raises(Exception, match="latent noise is for the mask autoencoder only"):
        autoencoder_loss("image", noise=0.5)


def test_recalibrate_batchnorm_is_the_cumulative_average_of_the_batches_statistics_in_evaluation_mode():
    from ppcmi.training import recalibrate_batchnorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g) * 2 + 1
    lin = torch.nn.Linear(3, 4)
    torch.nn.init.normal_(lin.weight, generator=g)
    model = torch.nn.Sequential(lin, torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(4))
    model[2].running_mean.fill_(7.0)  # an average that describes nobody's data
    seen = []

    def loss_fn(m, batch):
        seen.append(m[1].training)
        return m(batch[0]).sum()

    assert recalibrate_batchnorm(model, loss_fn, [x], batch_size=4) == 1
    with torch.no_grad():
        h = lin(x).double().numpy()  # dropout off: evaluation-time activations
    batches = [h[i:i + 4] for i in range(0, 12, 4)]  # in order, 3 batches of 4
    want_mean = np.mean([b.mean(0) for b in batches], 0)
    want_var = np.mean([b.var(0, ddof=1) for b in batches], 0)  # BatchNorm's running variance is unbiased
    np.testing.assert_allclose(model[2].running_mean.numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model[2].running_var.numpy(), want_var, rtol=1e-5, atol=1e-6)
    assert seen == [False] * 3 and not model.training and model[2].momentum == 0.1  # dropout stayed off; settings restored
