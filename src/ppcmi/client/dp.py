"""Patient-level DP-SGD for a hospital's federated rounds (hospital side): ``mapping.dp`` with ``mapping.scope = "federated"``.

In the federated core only the core's update leaves a hospital, so differential privacy can be had where the data is:
each hospital trains its rounds with DP-SGD and its updates (and the global cores that average them) are then
differentially private with respect to its own patients, whatever the coordinator or the other hospitals do with them.

The unit of privacy is one **patient** (``data.group_regex`` / ``data.group_csv``; a case is its own patient where no
grouping is set), not one row: a hospital knows which of its rows (slices, and ``autoencoder.send_copies`` augmented
copies of each) belong to whom. Every step Poisson-samples patients with rate ``q = mapping.dp_patients / P`` (at most
1; ``P`` its patients), computes each sampled patient's gradient as the mean over *all* its rows (augmentation
multiplicity, De et al. 2022: the copies are averaged before clipping, so they cost no privacy), clips that gradient
to ``mapping.dp_clip`` in L2 norm over every trained tensor, sums, adds Gaussian noise of standard deviation
``sigma x dp_clip`` and divides by the expected number of patients ``q P``; Adam then steps on that noisy mean (post-
processing). An epoch is ``round(1 / q)`` steps, so on average every row is seen once an epoch, as without DP.

Opacus computes per-*sample* gradients and clips them one row at a time; user-level clipping needs each patient's
gradient over its rows, which one backward pass of its own rows gives, so the aggregation above is written here and
Opacus's RDP accountant does the accounting: epsilon after ``k`` steps is that of the subsampled Gaussian mechanism
``(sigma, q)`` composed ``k`` times, at ``delta = 1 / P``. A round starts where the last left off, so the steps of all
rounds compose (adaptive composition: the global cores a hospital receives are post-processing of its own earlier
releases and of other hospitals' data). ``mapping.dp_epsilon`` sets ``sigma`` for the whole budget (rounds x local
epochs) before the first round; else ``mapping.dp_noise`` is ``sigma``. Opacus's own per-row hooks (``GradSampleModule``
over a batch of patients' rows) were measured against this loop on PSFHS-sized latents with one torch thread: 1.5x
faster per row on a 2-core Intel Xeon, 1.1-1.2x slower on a 2-core AMD EPYC, so the loop stays.

What the guarantee covers, and what not: every tensor a hospital sends is a function of its DP-trained parameters and
of data-independent settings. The network normalises with GroupNorm (``mapping.norm = "group"``, required with DP):
per row, so a patient's gradient depends on no one else's rows (BatchNorm would mix them, and cannot normalise a
patient with a single row whose deepest maps are 1 x 1, as a first run on PSFHS found). Fixed frames from the
hospital's rows (``mapping.adapter_init = "pca"``) are refused with DP (a data-dependent preprocessing outside the
accounting). The noise comes from torch's seeded generator, fine for measuring, not a cryptographically secure source
for a release (PRIVACY.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, PpcmiError

ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class PatientDP:
    """The DP-SGD mechanism of one hospital for a whole federated run (fixed before its first round)."""

    noise_multiplier: float   # sigma: the noise's standard deviation over the clipping bound
    max_grad_norm: float      # the bound every patient's gradient is clipped to (L2 over every trained tensor)
    sample_rate: float        # q: each patient's chance to be in a step
    steps_per_epoch: int      # round(1 / q)
    n_patients: int           # P
    delta: float              # 1 / P

    def epsilon(self, steps: int) -> float:
        """Epsilon at ``delta`` after ``steps`` steps (Opacus's RDP accountant); 0 before the first."""
        if steps <= 0:
            return 0.0
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = [(self.noise_multiplier, self.sample_rate, int(steps))]
        return float(acc.get_epsilon(self.delta))

    def report(self, steps: int) -> dict:
        return {**asdict(self), "steps": int(steps), "epsilon": self.epsilon(steps), "accountant": ACCOUNTANT,
                "unit": "one patient (all its rows, augmented copies included)"}


def plan_dp(cfg, n_patients: int, total_epochs: int) -> PatientDP:
    """The mechanism for ``n_patients`` patients and a budget of ``total_epochs`` epochs over all rounds (``cfg``: the
    :class:`~ppcmi.config.MappingTrainConfig`)."""
    if n_patients < 1:
        raise PpcmiError("mapping.dp: this hospital has no patients to train on")
    q = min(1.0, cfg.dp_patients / n_patients)
    steps = max(1, int(round(1.0 / q)))
    delta = 1.0 / n_patients
    if cfg.dp_epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            sigma = float(get_noise_multiplier(target_epsilon=cfg.dp_epsilon, target_delta=delta, sample_rate=q,
                                               steps=steps * total_epochs, accountant=ACCOUNTANT))
        except ValueError as e:
            raise ConfigError(f"mapping.dp_epsilon: {cfg.dp_epsilon:g} cannot be reached with {n_patients} patients over "
                              f"{steps * total_epochs} steps ({e})") from None
    else:
        sigma = float(cfg.dp_noise)
    return PatientDP(sigma, float(cfg.dp_clip), q, steps, n_patients, delta)


def patients_of_rows(groups: Sequence[str], n_rows: int, setting: str = "mapping.dp") -> tuple[torch.Tensor, list[str]]:
    """The patient index of each training row and the patients' names. ``groups`` is the patient of each prepared plane
    (``arrays["groups"]``); row ``r`` of the training pairs comes from plane ``r mod len(groups)``
    (:func:`ppcmi.client.site.training_inputs`: the planes, then blocks of their augmented copies)."""
    n = len(groups)
    if n == 0 or n_rows % n:
        raise PpcmiError(f"{setting}: {n_rows} training rows are not whole copies of {n} planes")
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    plane = torch.tensor([index[g] for g in groups], dtype=torch.long)
    return plane.repeat(n_rows // n), names


def _chunks(idx: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """A patient's rows in nearly equal chunks of at most ``batch_size``."""
    return list(torch.tensor_split(idx, max(1, math.ceil(len(idx) / batch_size))))


def noisy_gradient(net: nn.Module, loss_fn: Callable, rows: Sequence[torch.Tensor], groups: Sequence[torch.Tensor],
                   chosen: Sequence[int], dp: PatientDP, gen: torch.Generator, *, batch_size: int) -> tuple[list[torch.Tensor], float]:
    """One step's privatised gradient for the trained tensors of ``net`` (in ``net.parameters()`` order): the sum over the
    ``chosen`` patients of each one's mean gradient over its rows (``groups[i]``: its row indices) clipped to
    ``dp.max_grad_norm``, plus Gaussian noise of standard deviation ``sigma x clip`` drawn from ``gen``, over the expected
    number of patients ``q P``. Also returns the sum of the chosen patients' (clean) losses, for monitoring only."""
    dev = next(net.parameters()).device
    params = [p for p in net.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    loss_sum = 0.0
    for i in chosen:
        for p in params:
            p.grad = None
        n = len(groups[i])
        for c in _chunks(groups[i], batch_size):
            loss = loss_fn(net, [t[c].to(dev) for t in rows]) * (len(c) / n)
            if not torch.isfinite(loss):
                raise PpcmiError(f"mapping.dp: loss became {loss.item()}")
            loss.backward()
            loss_sum += float(loss.detach())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        scale = min(1.0, dp.max_grad_norm / (norm + 1e-12))
        for t, g in zip(total, grads):
            t.add_(g, alpha=scale)
    expected = dp.sample_rate * dp.n_patients
    with torch.no_grad():
        for t, p in zip(total, params):
            t.add_(torch.randn(p.shape, generator=gen).to(p.device) * (dp.noise_multiplier * dp.max_grad_norm))
            t.div_(expected)
    return total, loss_sum


def fit_patients(net: nn.Module, loss_fn: Callable, rows: Sequence[torch.Tensor], patient: torch.Tensor, dp: PatientDP, *,
                 epochs: int, lr: float, seed: int, batch_size: int) -> list[float]:
    """``epochs`` epochs of patient-level DP-SGD (see the module docstring) on ``rows`` (``[hospital index, img...,
    msk...]``, as :func:`ppcmi.models.mapping_loss` takes them), ``patient`` the patient index of each row; every
    trained tensor of ``net`` is updated by Adam at ``lr`` with :func:`noisy_gradient`. Returns each epoch's mean
    training loss over the sampled patients (clean losses: a monitoring number that stays at the hospital). Seeded by
    ``seed``: sampling, dropout and noise. ``rows`` and ``patient`` on the CPU; each step's rows go where ``net`` is."""
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [torch.nonzero(patient == i).flatten() for i in range(dp.n_patients)]
    if any(len(g) == 0 for g in groups):
        raise PpcmiError("mapping.dp: a patient without rows")
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # dropout
        net.train()
        for _ in range(epochs):
            tot, count = 0.0, 0
            for _ in range(dp.steps_per_epoch):
                chosen = torch.nonzero(torch.rand(dp.n_patients, generator=gen) < dp.sample_rate).flatten().tolist()
                grads, loss_sum = noisy_gradient(net, loss_fn, rows, groups, chosen, dp, gen, batch_size=batch_size)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                tot, count = tot + loss_sum, count + len(chosen)
            losses.append(tot / max(count, 1))
    net.eval()
    return losses


__all__ = ["PatientDP", "plan_dp", "patients_of_rows", "noisy_gradient", "fit_patients"]
