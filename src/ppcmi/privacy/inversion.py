"""Inverting the federated core's round updates (attacker side, pure maths): "deep leakage from gradients" against
``mapping.scope = "federated"``.

A hospital's round (:func:`ppcmi.client.fedcore.local_round`) loads the global core into a one-client
:class:`~ppcmi.models.MappingNet`, trains it with Adam on stage 2's loss (:func:`ppcmi.models.mapping_loss`) and returns
the core (:func:`ppcmi.models.core_state`: weights and biases, and with ``mapping.federated_norm = "shared"`` also the
normalisation affines and running statistics; with "local", FedBN, those stay at the hospital). Everything
that shapes that update is public or crossed: the architecture and widths, the loss, the learning rate of the round,
the local epochs, the batch size, the hospital's row count and the global core it was sent. What is not public is
the rows themselves and the hospital's own adapters and frames.

What the attacker can model exactly, and in which coordinates. In round 1 the adapters start as the identity (every
hospital's do, whatever the seed) and, with ``mapping.adapter_init = "pca"``, the input frame takes the hospital's keyed
image latents ``zt`` to ``h = Uᵀ (zt - mu)`` and the output frame takes core outputs ``y`` back by ``U_m y + mu_m``, with
``U`` and ``U_m`` square orthogonal (:func:`ppcmi.latent.principal_frame`). Since an orthogonal map keeps the MSE,
``mse(U_m y + mu_m, zt_m) = mse(y, t)`` with ``t = U_mᵀ (zt_m - mu_m)``, and the adapters' parameters see the same
gradients in either parameterisation, the whole round (every step, Adam's state, the adapters' training) is exactly the
round of a network with identity frames fed ``h`` and ``t``. So :func:`simulate_update` works in these *canonical
coordinates* and reproduces the core the hospital returns to float tolerance; with ``adapter_init = "identity"`` the
canonical coordinates are the keyed latents themselves. Inverting therefore recovers at best the canonical coordinates
of the hospital's image and mask latents: principal coordinates of its *plain* latents up to the sign rule (the key
cancels, DESIGN.md section 4), but in the latent space of the hospital's own, private autoencoders. Mapping them back
to pixels needs that hospital's frame and decoder (a stolen key and site state: the positive control) or a guess of
its frame; from public data alone the attacker can only assume its own autoencoders' principal frame stands in for the
hospital's, which it has no reason to (:mod:`ppcmi.privacy.procedures`, A9).

Dropout and the batch order follow the hospital's fit seed (``site seed x 100019 + round``, the site seed being
``seed + 17 x index`` in ``simulate`` and ``bench``); the attacker is granted it (worst case). Later rounds start from
the hospital's trained adapters, which never cross; only round 1 is modelled exactly.

Adam's first step is ``lr * g / (|g| + eps)``, the sign of the gradient: one step of one row tells the sign of every
core gradient and, exactly, the batch means and variances behind every BatchNorm layer (its running statistics move by
``momentum x (batch statistic - running)``) when they cross (``federated_norm = "shared"``). The attack
(:func:`invert_update`) therefore matches the weights' update by cosine through an Adam whose ``eps`` is smoothed
(``smooth x`` the RMS of the denominator; a pure sign has no gradient) and the running statistics, where they cross, by
relative squared error.

Nothing here imports hospital code or key handling (the import contract in ``pyproject.toml`` checks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..errors import PpcmiError
from ..models import NORM_SCOPES, SCALES, MappingConfig, MappingNet, core_state, mapping_loss

ADAM_BETAS = (0.9, 0.999)   # torch.optim.Adam's defaults, which ppcmi.training.fit uses
ADAM_EPS = 1e-8
BN_MOMENTUM = 0.1           # torch.nn.BatchNorm2d's default, which the mapping network uses
_VICTIM = "victim"


def fit_seed(site_seed: int, round_: int) -> int:
    """The seed :func:`ppcmi.client.fedcore.local_round` gives ``fit`` for a hospital's round (batch order, dropout)."""
    return int(site_seed) * 100_019 + int(round_)


@dataclass(frozen=True)
class RoundSpec:
    """Everything that shapes one hospital's round 1 update besides its rows: public settings and what crossed.

    ``in_shapes`` / ``out_shapes``: ``{scale: (C, H, W)}`` of its image and mask latents (from ``autoencoder.width``,
    ``skips`` and the working size); ``lr`` the round's learning rate; ``seed`` the fit seed (:func:`fit_seed`); ``norm``
    the run's ``mapping.federated_norm`` (which tensors cross: :func:`ppcmi.models.core_state`)."""

    mapping: MappingConfig
    in_shapes: Mapping[str, tuple[int, int, int]]
    out_shapes: Mapping[str, tuple[int, int, int]]
    n_rows: int
    lr: float
    local_epochs: int
    batch_size: int
    seed: int
    norm: str

    def __post_init__(self) -> None:
        scales = [s for s in SCALES if s in self.in_shapes]
        if not scales or set(self.in_shapes) != set(scales) or set(self.out_shapes) != set(scales):
            raise PpcmiError(f"round spec: in_shapes and out_shapes need the same latent scales, got {sorted(self.in_shapes)} "
                             f"and {sorted(self.out_shapes)}")
        for name, lo in (("n_rows", 1), ("local_epochs", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise PpcmiError(f"round spec: {name} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise PpcmiError(f"round spec: lr must be a positive finite number, got {self.lr!r}")
        if self.norm not in NORM_SCOPES:
            raise PpcmiError(f"round spec: norm must be one of {', '.join(NORM_SCOPES)}, got {self.norm!r}")

    @property
    def scales(self) -> list[str]:
        return [s for s in SCALES if s in self.in_shapes]


class _Loss(nn.Module):
    """Stage 2's loss of ``net`` on a batch as a module, so that ``functional_call`` can swap its tensors."""

    def __init__(self, net: MappingNet, scales: list[str]):
        super().__init__()
        self.net = net
        self.fn = mapping_loss(scales)

    def forward(self, batch: list[torch.Tensor]) -> torch.Tensor:
        return self.fn(self.net, batch)


def _network(spec: RoundSpec) -> MappingNet:
    """A one-client network with identity frames and identity adapters (round 1's, in canonical coordinates)."""
    ch_in = {s: int(spec.in_shapes[s][0]) for s in spec.scales}
    ch_out = {s: int(spec.out_shapes[s][0]) for s in spec.scales}
    return MappingNet(ch_in, ch_out, [_VICTIM], spec.mapping)


def check_core(core: Mapping[str, torch.Tensor], spec: RoundSpec, what: str = "global core") -> dict[str, torch.Tensor]:
    """``core`` as float32 tensors in the network's order, checked against the architecture ``spec`` describes:
    the same names, shapes, finite values (one-line PpcmiError naming the first tensor that differs)."""
    own = core_state(_network(spec), norm=spec.norm)
    missing, extra = [k for k in own if k not in core], [k for k in core if k not in own]
    if missing or extra:
        raise PpcmiError(f"{what}: not the core of this architecture ({len(core)} tensors for {len(own)}; "
                         f"{'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
    out = {}
    for k, v in own.items():
        got = (core[k].detach() if isinstance(core[k], torch.Tensor) else torch.as_tensor(np.asarray(core[k]))).float()
        if tuple(got.shape) != tuple(v.shape):
            raise PpcmiError(f"{what}: {k} has shape {tuple(got.shape)}, the architecture's is {tuple(v.shape)}")
        if not torch.isfinite(got).all():
            raise PpcmiError(f"{what}: {k} holds non-finite values")
        out[k] = got
    return out


def check_rows(h: Mapping[str, torch.Tensor], t: Mapping[str, torch.Tensor], spec: RoundSpec) -> None:
    """Rows in canonical coordinates fit ``spec``: ``{scale: (n_rows, C, H, W)}`` image side ``h`` and mask side ``t``."""
    for side, rows, shapes in (("h", h, spec.in_shapes), ("t", t, spec.out_shapes)):
        if set(rows) != set(spec.scales):
            raise PpcmiError(f"rows {side}: expected scales {spec.scales}, got {sorted(rows)}")
        for s in spec.scales:
            want = (spec.n_rows, *shapes[s])
            if tuple(rows[s].shape) != want:
                raise PpcmiError(f"rows {side}[{s}]: shape {tuple(rows[s].shape)}, expected {want}")


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``fit``'s batch order: a permutation cut into batches; a lone last row is dropped (BatchNorm needs two)."""
    idx = torch.randperm(n, generator=gen)
    return [b for b in (idx[i:i + batch_size] for i in range(0, n, batch_size)) if len(b) >= 2 or n < 2]


def simulate_update(core: Mapping[str, torch.Tensor], h: Mapping[str, torch.Tensor], t: Mapping[str, torch.Tensor],
                    spec: RoundSpec, *, create_graph: bool = False, smooth: float = 0.0) -> dict[str, torch.Tensor]:
    """The core update (returned core minus ``core``) of a round 1 on rows ``h`` -> ``t`` in canonical coordinates.

    Replays ``ppcmi.training.fit`` as ``local_round`` calls it: per epoch the same seeding (dropout from
    ``seed x 100003 + epoch``, batch order from a generator seeded ``seed x 1000003 + epoch``), Adam over the core and the
    adapters (identity to start), BatchNorm's running statistics moved by ``BN_MOMENTUM``, and the epoch of lowest
    training loss kept. ``create_graph`` keeps the graph back to ``h`` and ``t`` (for :func:`invert_update`);
    ``smooth`` > 0 adds ``smooth x`` the RMS of Adam's denominator to its ``eps`` (the attacker's smoothed sign)."""
    core = check_core(core, spec)
    check_rows(h, t, spec)
    scales = spec.scales
    net = _network(spec)
    wrapper = _Loss(net, scales)
    names = [n for n, _ in wrapper.named_parameters()]
    params = {}
    for n, p in wrapper.named_parameters():
        key = n[len("net."):]
        params[n] = (core[key].clone() if key in core else p.detach().clone()).requires_grad_()
    bufs = {n: b.detach().clone() for n, b in wrapper.named_buffers()}
    # the running statistics, tracked here: the core's where they cross, else the hospital's own, which in round 1 are
    # BatchNorm's initial ones (as its affines are: fresh parameters above)
    running = {n: core.get(n[len("net."):], b) for n, b in bufs.items() if _is_stat(n)}
    bn = {name: m for name, m in wrapper.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0])) for name, m in bn.items()]
    b1, b2 = ADAM_BETAS
    m_state = {n: torch.zeros_like(params[n]) for n in names}
    v_state = {n: torch.zeros_like(params[n]) for n in names}
    rows = [torch.zeros(spec.n_rows, dtype=torch.long), *(h[s] for s in scales), *(t[s] for s in scales)]
    step = 0
    best, best_loss = None, math.inf
    try:
        for epoch in range(1, spec.local_epochs + 1):
            tot, count = 0.0, 0
            with torch.random.fork_rng():
                torch.manual_seed(spec.seed * 100_003 + epoch)
                gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
                wrapper.train()
                for idx in _batches(spec.n_rows, spec.batch_size, gen):
                    batch = [r[idx] for r in rows]
                    seen.clear()
                    if not create_graph:  # a fresh leaf each step: only this step's gradient is wanted
                        params = {n: p.detach().requires_grad_() for n, p in params.items()}
                    loss = torch.func.functional_call(wrapper, {**params, **{n: b.clone() for n, b in bufs.items()}}, (batch,))
                    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True)
                    for name in bn:  # running statistics, differentiably (the module's own update went to throwaway copies)
                        x = seen[name]
                        mean = x.mean((0, 2, 3))
                        var = x.var((0, 2, 3), unbiased=True)
                        running[f"{name}.running_mean"] = (1 - BN_MOMENTUM) * running[f"{name}.running_mean"] + BN_MOMENTUM * mean
                        running[f"{name}.running_var"] = (1 - BN_MOMENTUM) * running[f"{name}.running_var"] + BN_MOMENTUM * var
                    step += 1
                    c1, c2 = 1 - b1 ** step, (1 - b2 ** step) ** 0.5
                    new = {}
                    for n, g in zip(names, grads):
                        if g is None:
                            new[n] = params[n]
                            continue
                        # torch.optim.Adam's single-tensor arithmetic, op for op, out of place (so that it is differentiable)
                        m_state[n] = torch.lerp(m_state[n], g, 1 - b1)
                        v_state[n] = torch.addcmul(v_state[n].mul(b2), g, g, value=1 - b2)
                        denom = (v_state[n] + 1e-30).sqrt() / c2 if create_graph else v_state[n].sqrt() / c2
                        eps = ADAM_EPS + (smooth * denom.pow(2).mean().sqrt() if smooth > 0 else 0.0)  # (differentiable)
                        new[n] = torch.addcdiv(params[n], m_state[n], denom.add(eps), value=-(spec.lr / c1))
                    params = new if create_graph else {n: p.detach() for n, p in new.items()}
                    tot += float(loss.detach()) * len(idx)
                    count += len(idx)
            train_loss = tot / max(count, 1)
            if train_loss < best_loss - 1e-7 or best is None:
                best_loss = train_loss
                best = {**{n[len("net."):]: p for n, p in params.items()}, **{n[len("net."):]: r for n, r in running.items()}}
    finally:
        for hk in hooks:
            hk.remove()
    out = {k: best[k] - core[k] for k in core}
    return out if create_graph else {k: v.detach() for k, v in out.items()}


# ----------------------------------------------------------------------------- the attack


def _is_stat(name: str) -> bool:
    return name.endswith("running_mean") or name.endswith("running_var")


def update_distance(sim: Mapping[str, torch.Tensor], obs: Mapping[str, torch.Tensor], *, stat_weight: float = 1.0) -> torch.Tensor:
    """The attack's objective: cosine distance over the core's trained tensors (weights, biases, affines) plus
    ``stat_weight`` x the relative squared error of the running statistics' update."""
    w = [k for k in obs if not _is_stat(k)]
    a = torch.cat([sim[k].reshape(-1) for k in w]).double()  # (float64: a distance of 0 reads as 0)
    b = torch.cat([obs[k].reshape(-1) for k in w]).double()
    cos = 1 - (a * b).sum() / (a.norm() * b.norm() + 1e-20)
    st = [k for k in obs if _is_stat(k)]
    if not st or stat_weight == 0:
        return cos
    num = sum(((sim[k].double() - obs[k].double()) ** 2).sum() for k in st)
    den = sum((obs[k].double() ** 2).sum() for k in st) + 1e-20
    return cos + stat_weight * num / den


def _tv(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        return x.new_zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def check_update(update: Mapping[str, np.ndarray | torch.Tensor], spec: RoundSpec, what: str) -> dict[str, torch.Tensor]:
    """An observed update, checked like a core (names, shapes, finite values)."""
    return check_core(update, spec, what)


@dataclass(frozen=True)
class Inversion:
    """Recovered rows in canonical coordinates, ``{scale: (n_rows, C, H, W)}`` float32 arrays, per hospital, and the
    objective's trace (first, last)."""

    h: Mapping[str, Mapping[str, np.ndarray]]   # hospital -> image side
    t: Mapping[str, Mapping[str, np.ndarray]]   # hospital -> mask side
    objective: tuple[float, float]


def invert_update(core: Mapping[str, torch.Tensor], observed: Mapping[str, torch.Tensor],
                  specs: Mapping[str, RoundSpec], *, weights: Mapping[str, float] | None = None, iters: int = 300,
                  lr: float = 0.05, smooth: float = 0.05, stat_weight: float = 1.0, tv: float = 0.0, init_std: float = 1.0,
                  seed: int = 0, init: Mapping[str, tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]] | None = None
                  ) -> Inversion:
    """Dummy rows for every hospital in ``specs`` whose simulated round 1 updates, combined as ``observed`` was
    (one hospital: its own update; several: the FedAvg average ``sum_i w_i update_i / sum_i w_i`` that SecAgg+ reveals,
    ``weights`` = their row counts), match ``observed`` (:func:`update_distance`); optimised by Adam for ``iters``
    steps from ``init`` (the attacker's guess per hospital, ``(h, t)``; none: zero) plus ``init_std`` x N(0, 1) drawn from
    ``seed`` (a local generator), with an optional total-variation prior."""
    if not specs:
        raise PpcmiError("specs: at least one hospital's round is needed")
    first = next(iter(specs.values()))
    core = check_core(core, first)
    obs = check_update(observed, first, "observed update")
    weights = dict(weights or {n: float(s.n_rows) for n, s in specs.items()})
    if set(weights) != set(specs):
        raise PpcmiError(f"weights: expected one per hospital {sorted(specs)}, got {sorted(weights)}")
    total = sum(weights.values())
    g = torch.Generator().manual_seed(int(seed))
    init = init or {}

    def start(n: str, side: int, s: str, shape: tuple[int, ...]) -> torch.Tensor:
        noise = init_std * torch.randn(shape, generator=g)
        if n in init:
            guess = torch.as_tensor(np.asarray(init[n][side][s], np.float32))
            if tuple(guess.shape) != shape:
                raise PpcmiError(f"init[{n}][{'ht'[side]}][{s}]: shape {tuple(guess.shape)}, expected {shape}")
            noise = guess + noise
        return noise.requires_grad_()

    dummies = {n: ({s: start(n, 0, s, (sp.n_rows, *sp.in_shapes[s])) for s in sp.scales},
                   {s: start(n, 1, s, (sp.n_rows, *sp.out_shapes[s])) for s in sp.scales})
               for n, sp in specs.items()}
    leaves = [x for hd, td in dummies.values() for x in (*hd.values(), *td.values())]
    opt = torch.optim.Adam(leaves, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters))
    trace = []
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        sim = None
        for n, sp in specs.items():
            u = simulate_update(core, dummies[n][0], dummies[n][1], sp, create_graph=True, smooth=smooth)
            part = {k: v * (weights[n] / total) for k, v in u.items()}
            sim = part if sim is None else {k: sim[k] + part[k] for k in sim}
        loss = update_distance(sim, obs, stat_weight=stat_weight)
        if tv > 0:
            loss = loss + tv * sum(_tv(x) for x in leaves)
        if not torch.isfinite(loss):
            raise PpcmiError(f"invert_update: the objective became {float(loss)}; lower lr or raise smooth")
        loss.backward()
        opt.step()
        sched.step()
        trace.append(float(loss.detach()))
    return Inversion({n: {s: v.detach().numpy().copy() for s, v in hd.items()} for n, (hd, _) in dummies.items()},
                     {n: {s: v.detach().numpy().copy() for s, v in td.items()} for n, (_, td) in dummies.items()},
                     (trace[0], trace[-1]) if trace else (math.nan, math.nan))


# ----------------------------------------------------------------------------- canonical coordinates <-> latents


def to_canonical(z: Mapping[str, np.ndarray], frames: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """``Uᵀ (z - mu)`` per pixel, per scale: latents ``{scale: (N, C, H, W)}`` into a frame ``{scale: (U, mu)}``."""
    return {s: np.einsum("ck,nchw->nkhw", frames[s][0], z[s] - frames[s][1][None, :, None, None]) for s in z}


def from_canonical(c: Mapping[str, np.ndarray], frames: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """``U c + mu`` per pixel, per scale: the inverse of :func:`to_canonical`."""
    return {s: np.einsum("ck,nkhw->nchw", frames[s][0], c[s]) + frames[s][1][None, :, None, None] for s in c}


def match_rows(est: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]) -> np.ndarray:
    """The referee's row matching (a batch's update does not order its rows): ``perm`` with ``est[perm[i]]`` the
    estimate assigned to true row ``i`` by the least total squared distance over every scale (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    n = next(iter(truth.values())).shape[0]
    cost = np.zeros((n, n))
    for s in truth:
        a, b = truth[s].reshape(n, -1), est[s].reshape(n, -1)
        cost += ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / max(float((a ** 2).sum()), 1e-20)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def relative_error(est: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]) -> float:
    """``||est - truth|| / ||truth||`` over every scale."""
    num = sum(float(((est[s] - truth[s]) ** 2).sum()) for s in truth)
    den = sum(float((truth[s] ** 2).sum()) for s in truth)
    return math.sqrt(num / max(den, 1e-30))


__all__ = ["RoundSpec", "fit_seed", "simulate_update", "invert_update", "update_distance", "check_core", "check_rows",
           "Inversion", "to_canonical", "from_canonical", "match_rows", "relative_error", "ADAM_EPS", "BN_MOMENTUM"]
