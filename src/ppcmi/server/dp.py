"""DP-SGD training of the mapping network (coordinator side; Opacus): a defence against membership inference.

Per-sample gradients need every layer to see every sample of the batch on its own, so this path
routes hospitals through their adapters with one-hot masks (every adapter sees the whole batch;
rows of other hospitals contribute exactly zero) instead of the index-based routing of
:func:`ppcmi.models.mixed_forward`, and it needs GroupNorm (``mapping.norm = "group"``).

Batches are Poisson-sampled (Opacus' DPDataLoader) and the privacy loss is tracked with the RDP
accountant; epsilon is reported at delta = 1/N, N the number of training rows. The unit of
privacy is one row: a patient who contributes many slices, or several augmented copies of a slice,
is protected only by group privacy, which is much weaker. The server cannot know which rows share a
patient; ``ppcmi audit``, which reads the hospitals' case lists, reports the rows per patient.
Training runs a fixed number of epochs and keeps the final weights: validation losses are logged
for monitoring but never select a model, so they do not leak into the released weights.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import nn

from ..device import Device, resolve_device
from ..errors import ConfigError, PpcmiError
from ..models import mixed_forward
from ..training import FitConfig, FitResult

log = logging.getLogger(__name__)


class RoutedMapping(nn.Module):
    """``forward(onehot, *zt_img)`` -> tuple of keyed mask latents, one per scale, for a batch mixing hospitals.

    ``onehot`` is (B, n_clients) float; every adapter runs on the whole batch and its output is
    multiplied by that hospital's column, so per-sample gradients are well defined.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def _route(self, adapters: nn.ModuleDict, scale: str, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        out = None
        for c, name in enumerate(self.net.clients):
            y = onehot[:, c, None, None, None] * adapters[name][scale](x)
            out = y if out is None else out + y
        return out

    def forward(self, onehot: torch.Tensor, *zt_img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for s, x in zip(self.net.scales, zt_img):
            h = self.net.cores[s](self._route(self.net.in_adapters, s, self._route(self.net.in_frames, s, x, onehot), onehot))
            outs.append(self._route(self.net.out_frames, s, self._route(self.net.out_adapters, s, h, onehot), onehot))
        return tuple(outs)


def fit_dp(net: nn.Module, train: list[torch.Tensor], val: list[torch.Tensor] | None, scales: list[str], cfg, fc: FitConfig,
           *, progress: bool = True, device: Device = None) -> tuple[FitResult, dict]:
    """Train ``net`` (a :class:`~ppcmi.models.MappingNet` with GroupNorm) with DP-SGD.

    ``train``/``val``: [client_index, img_<scale>..., msk_<scale>...] tensors as built by
    :func:`ppcmi.server.mapping.pool_batches`. ``cfg``: the :class:`~ppcmi.config.MappingTrainConfig`
    (``dp_noise``, ``dp_clip``, ``dp_epsilon``). Returns the fit history and the privacy report.
    ``device``: where it trains (None is the CPU), in float32 (per-sample clipping and noise are not mixed-precision
    safe); the Poisson sampling and the noise come from the seeded generator of that device.
    """
    try:
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator
    except ImportError:  # pragma: no cover - the audit extra is installed by the Makefile
        raise PpcmiError("mapping.dp: needs the 'audit' extra (opacus); run make install") from None
    errs = ModuleValidator.validate(net, strict=False)
    if errs:
        raise ConfigError(f"mapping.dp: the network has layers DP-SGD cannot train ({str(errs[0])[:160]}); set mapping.norm = \"group\"")
    for m in net.modules():  # Opacus' backward hooks forbid in-place activations on hooked outputs; same maths
        if isinstance(m, (nn.LeakyReLU, nn.ReLU)):
            m.inplace = False
    dev = resolve_device(device)
    net.to(dev)
    k = len(scales)
    n = int(train[0].shape[0])
    delta = 1.0 / n
    onehot = nn.functional.one_hot(train[0], len(net.clients)).float()
    ds = torch.utils.data.TensorDataset(onehot, *train[1:])
    res = FitResult()
    t0 = time.perf_counter()
    with torch.random.fork_rng(), warnings.catch_warnings():
        # Opacus warns that secure_mode (a cryptographically secure noise RNG) is off: the noise comes from torch's
        # seeded PRNG, fine for measuring the defence, not for a production release (see PRIVACY.md)
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        torch.manual_seed(fc.seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=fc.batch_size, shuffle=True, pin_memory=dev.type == "cuda")
        model = RoutedMapping(net)
        opt = torch.optim.Adam(model.parameters(), lr=fc.lr)
        engine = PrivacyEngine(accountant="rdp")
        common = dict(module=model, optimizer=opt, data_loader=loader, max_grad_norm=cfg.dp_clip, poisson_sampling=True)
        if cfg.dp_epsilon is not None:
            model, opt, loader = engine.make_private_with_epsilon(target_epsilon=cfg.dp_epsilon, target_delta=delta,
                                                                   epochs=fc.epochs, **common)
        else:
            model, opt, loader = engine.make_private(noise_multiplier=cfg.dp_noise, **common)
        sigma = float(opt.noise_multiplier)
        from tqdm.auto import tqdm

        for epoch in tqdm(range(1, fc.epochs + 1), desc="server mapping (DP-SGD)", disable=not progress, leave=False):
            for g in opt.param_groups:
                g["lr"] = fc.lr_at(epoch)
            model.train()
            tot, count = 0.0, 0
            for batch in loader:
                batch = [b.to(dev, non_blocking=True) for b in batch]
                if batch[0].shape[0] == 0:  # Poisson sampling can draw an empty batch (probability ~ e^(-batch_size))
                    continue
                pred = model(batch[0], *batch[1:1 + k])
                loss = sum(nn.functional.mse_loss(p, t) for p, t in zip(pred, batch[1 + k:]))
                if not torch.isfinite(loss):
                    raise PpcmiError(f"mapping.dp: loss became {loss.item()} at epoch {epoch}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * batch[0].shape[0]
                count += batch[0].shape[0]
            train_loss = tot / max(count, 1)
            val_loss = _val_loss(net, val, scales, fc.batch_size, dev) if val is not None and len(val[0]) else train_loss
            res.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                                "epsilon": float(engine.get_epsilon(delta))})
            log.info("DP-SGD epoch %d/%d: train %.4f, val %.4f, epsilon %.3g (%.0f s)", epoch, fc.epochs, train_loss, val_loss,
                     res.history[-1]["epsilon"], time.perf_counter() - t0)
    res.best_epoch = fc.epochs
    res.best_val = res.history[-1]["val_loss"]
    res.seconds = time.perf_counter() - t0
    net.eval()
    eps = float(engine.get_epsilon(delta))
    report = {"epsilon": eps, "delta": delta, "n_rows": n, "noise_multiplier": sigma, "max_grad_norm": cfg.dp_clip,
              "sample_rate": fc.batch_size / n, "epochs": fc.epochs, "accountant": "rdp", "unit": "one training row",
              "model_selection": "none (final weights; validation loss logged only)"}
    log.info("DP-SGD: epsilon %.3g at delta %.3g (noise %.3g, clip %.3g)", eps, delta, sigma, cfg.dp_clip)
    return res, report


@torch.no_grad()
def _val_loss(net: nn.Module, val: list[torch.Tensor], scales: list[str], batch_size: int, dev: torch.device) -> float:
    net.eval()
    k = len(scales)
    tot = 0.0
    n = int(val[0].shape[0])
    for s in range(0, n, batch_size):
        b = [t[s:s + batch_size].to(dev) for t in val]
        pred = mixed_forward(net, dict(zip(scales, b[1:1 + k])), b[0])
        tot += float(sum(nn.functional.mse_loss(pred[sc], t) for sc, t in zip(scales, b[1 + k:]))) * len(b[0])
    return tot / max(n, 1)


__all__ = ["RoutedMapping", "fit_dp"]
