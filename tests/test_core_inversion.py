"""A9, inverting the federated core's round updates (:mod:`ppcmi.privacy.inversion`, ``procedures.a9``).

Fast and in-process, as ``tests/test_fedcore.py`` runs a hospital's round: the attacker's replay of a round equals the
round :func:`ppcmi.client.fedcore.local_round` really runs (to float rounding with identity frames; in canonical
coordinates with the hospital's principal frames, to the rounding that Adam's sign step amplifies), the objective is
zero at the true rows and grows away from them (the update identifies them), its gradient is its finite difference
(smoothed Adam included), the inversion lowers it, the SecAgg+ case
holds and inverts only the sum, the positive control's mapping back (frames, key, decoder) is exact, and bad input is
a one-line error naming the field. Randomness comes only from local generators.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ppcmi.client import fedcore
from ppcmi.config import load_config
from ppcmi.errors import PpcmiError
from ppcmi.latent import principal_frame
from ppcmi.models import MappingConfig, core_state
from ppcmi.privacy import inversion as INV
from ppcmi.privacy import procedures as P
from ppcmi.privacy.views import CoreUpdates, PublicData, StolenKey, VictimFrames, threat_of

CHANNELS = {"s3": 16, "s4": 32, "b": 64}  # autoencoder.width 0.25
SIDE = {"s3": 8, "s4": 4, "b": 2}          # at size 64
SCALES = ["s3", "s4", "b"]
TINY = ["clients=2", "data.size=64", "autoencoder.width=0.25", "mapping.widen=[8,8,8]", "mapping.mid=[8,8]",
        "mapping.down=[8,8,8]", "mapping.batch_size=4", "mapping.epochs=2", "mapping.scope=federated"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*extra: str):
    return load_config(None, [*TINY, *extra])


def _pairs(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"zt_{k}_{s}": 2 * torch.randn(n, c, SIDE[s], SIDE[s], generator=g) + 0.5
            for k in ("img", "msk") for s, c in CHANNELS.items()}


def _core(cfg, pairs) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in core_state(fedcore.local_network("hospital1", pairs, cfg.mapping, cfg.seed, frames=False),
                                                 norm=cfg.mapping.federated_norm).items()}


def _spec(cfg, n: int, site_seed: int = 3) -> INV.RoundSpec:
    shapes = {s: (CHANNELS[s], SIDE[s], SIDE[s]) for s in SCALES}
    return INV.RoundSpec(MappingConfig(**{f.name: getattr(cfg.mapping, f.name) for f in fields(MappingConfig)}), shapes, shapes,
                         n, fedcore.round_lr(cfg.mapping, 1, 2, 1), 1, cfg.mapping.batch_size, INV.fit_seed(site_seed, 1),
                         cfg.mapping.federated_norm)


def _real_update(cfg, pairs, core, tmp_path, site_seed: int = 3) -> dict[str, torch.Tensor]:
    res = fedcore.local_round(core, pairs, cfg.mapping, site="hospital1", site_dir=tmp_path, round_=1, rounds=2, local_epochs=1,
                              seed=site_seed, init_seed=cfg.seed)
    return {k: res.core[k] - core[k] for k in core}


def _frame_op(x: torch.Tensor, frame) -> torch.Tensor:
    """``Uᵀ (x - mu)`` computed as the network's input frame computes it (float32, a 1x1 convolution)."""
    u, mu = frame
    return F.conv2d(x, torch.as_tensor(u.T.copy()).float()[:, :, None, None], torch.as_tensor((-u.T @ mu).copy()).float())


def _canonical(pairs):
    fi = {s: principal_frame(pairs[f"zt_img_{s}"].numpy()) for s in SCALES}
    fm = {s: principal_frame(pairs[f"zt_msk_{s}"].numpy()) for s in SCALES}
    return ({s: _frame_op(pairs[f"zt_img_{s}"], fi[s]) for s in SCALES}, {s: _frame_op(pairs[f"zt_msk_{s}"], fm[s]) for s in SCALES})


def _cos(a, b) -> float:
    x, y = torch.cat([a[k].reshape(-1) for k in b]).double(), torch.cat([b[k].reshape(-1) for k in b]).double()
    return float(x @ y / (x.norm() * y.norm()))


# ----------------------------------------------------------------------------- the attacker models the hospital


def test_the_replayed_round_equals_local_round_with_identity_frames(tmp_path):
    cfg = _cfg("mapping.adapter_init=identity")
    pairs = _pairs(10)  # batches of 4, 4, 2: three Adam steps, dropout on
    core = _core(cfg, pairs)
    real = _real_update(cfg, pairs, core, tmp_path)
    sim = INV.simulate_update(core, {s: pairs[f"zt_img_{s}"] for s in SCALES}, {s: pairs[f"zt_msk_{s}"] for s in SCALES},
                              _spec(cfg, 10))
    assert list(sim) == list(real)
    # federated_norm "local" (the default, FedBN): no normalisation affine or statistic is in what crosses, yet the
    # hospital's own BatchNorm layers (starting from their initial values) are replayed exactly with the rest
    net = fedcore.local_network("hospital1", pairs, cfg.mapping, cfg.seed, frames=False)
    norm_layers = set(core_state(net, norm="shared")) - set(core_state(net, norm="local"))
    assert cfg.mapping.federated_norm == "local" and any(k.endswith(".running_var") for k in norm_layers)
    assert not norm_layers & set(real) and len(norm_layers) == 4 * len([m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert max(float((sim[k] - real[k]).abs().max()) for k in real) < 1e-6  # (core + update - core: float rounding only)
    assert sum(int((real[k] != 0).sum()) for k in real) > 0.5 * sum(v.numel() for v in real.values())  # it trained
    other = INV.simulate_update(core, {s: pairs[f"zt_img_{s}"] for s in SCALES}, {s: pairs[f"zt_msk_{s}"] for s in SCALES},
                                _spec(cfg, 10, site_seed=4))
    assert max(float((other[k] - real[k]).abs().max()) for k in real) > 1e-4  # the fit seed matters (dropout, order)


def test_the_replayed_round_in_canonical_coordinates_matches_the_pca_framed_round(tmp_path):
    # adapter_init = "pca": the hospital's private principal frames around its adapters; federated_norm "shared": the
    # BatchNorm statistics cross too (the worst case: they tell the batch means and variances)
    cfg = _cfg("mapping.federated_norm=shared")
    pairs = _pairs(12)
    core = _core(cfg, pairs)
    real = _real_update(cfg, pairs, core, tmp_path)
    h, t = _canonical(pairs)
    sim = INV.simulate_update(core, h, t, _spec(cfg, 12))
    assert _cos(sim, real) > 0.9999
    stats = [k for k in real if k.endswith("running_mean") or k.endswith("running_var")]
    assert max(float((sim[k] - real[k]).abs().max() / real[k].abs().max()) for k in stats) < 5e-3
    # one step, one batch: only Adam's sign of near-zero gradients can differ
    one = _pairs(4, seed=1)
    real1 = _real_update(cfg, one, core, tmp_path / "one")
    sim1 = INV.simulate_update(core, *_canonical(one), _spec(cfg, 4))
    differ = sum(int(((sim1[k] - real1[k]).abs() > 1e-6).sum()) for k in real1)
    assert differ < 1e-3 * sum(v.numel() for v in real1.values())


def test_the_objective_is_zero_at_the_true_rows_and_grows_away_from_them():
    cfg = _cfg()
    g = torch.Generator().manual_seed(5)
    spec = _spec(cfg, 4)
    h = {s: torch.randn((4, *spec.in_shapes[s]), generator=g) for s in SCALES}
    t = {s: torch.randn((4, *spec.out_shapes[s]), generator=g) for s in SCALES}
    core = _core(cfg, _pairs(4))
    obs = INV.simulate_update(core, h, t, spec)
    assert float(INV.update_distance(INV.simulate_update(core, h, t, spec), obs)) < 1e-9
    far = {s: v + torch.randn(v.shape, generator=g) for s, v in h.items()}
    assert float(INV.update_distance(INV.simulate_update(core, far, t, spec), obs)) > 0.3
    # the rows are unordered in a batch's update: the referee's matching undoes any permutation
    est = {s: v.numpy()[[2, 0, 3, 1]] for s, v in h.items()}
    perm = INV.match_rows(est, {s: v.numpy() for s, v in h.items()})
    assert INV.relative_error({s: v[perm] for s, v in est.items()}, {s: v.numpy() for s, v in h.items()}) == 0.0


def test_the_inversion_lowers_the_objective_and_is_reproducible():
    cfg = _cfg()
    spec = INV.RoundSpec(_spec(cfg, 2).mapping, {"s3": (4, 4, 4)}, {"s3": (4, 4, 4)}, 2, 1e-3, 1, 4, INV.fit_seed(3, 1), "shared")
    from ppcmi.models import MappingNet
    from ppcmi.training import seeded_init

    core = {k: v.clone() for k, v in core_state(seeded_init(lambda: MappingNet({"s3": 4}, {"s3": 4}, ["x"], spec.mapping), 0), norm="shared").items()}
    g = torch.Generator().manual_seed(2)
    h, t = {"s3": torch.randn(2, 4, 4, 4, generator=g)}, {"s3": torch.randn(2, 4, 4, 4, generator=g)}
    obs = INV.simulate_update(core, h, t, spec)
    a = INV.invert_update(core, obs, {"v": spec}, iters=15, lr=0.05, seed=1)
    b = INV.invert_update(core, obs, {"v": spec}, iters=15, lr=0.05, seed=1)
    assert a.objective[1] < a.objective[0]
    assert np.array_equal(a.h["v"]["s3"], b.h["v"]["s3"]) and np.array_equal(a.t["v"]["s3"], b.t["v"]["s3"])
    assert a.h["v"]["s3"].shape == (2, 4, 4, 4)


def test_the_objectives_gradient_is_the_finite_difference_of_the_objective():
    """The attacker descends the replayed round's real gradient, smoothed Adam included (float64 differences)."""
    cfg = _cfg("mapping.dropout=0")
    spec = INV.RoundSpec(_spec(cfg, 4).mapping, {"s3": (16, 4, 4)}, {"s3": (16, 4, 4)}, 4, 1.0, 1, 16, INV.fit_seed(3, 1), "shared")
    from ppcmi.models import MappingNet
    from ppcmi.training import seeded_init

    core = {k: v.clone() for k, v in core_state(seeded_init(lambda: MappingNet({"s3": 16}, {"s3": 16}, ["x"], spec.mapping), 0), norm="shared").items()}
    g = torch.Generator().manual_seed(5)
    h, t = {"s3": torch.randn(4, 16, 4, 4, generator=g)}, {"s3": torch.randn(4, 16, 4, 4, generator=g)}
    obs = INV.simulate_update(core, h, t, spec, smooth=100)
    hd, td = {"s3": torch.randn(4, 16, 4, 4, generator=g).requires_grad_()}, {"s3": torch.randn(4, 16, 4, 4, generator=g).requires_grad_()}

    def f(a, b, graph=False):
        return INV.update_distance(INV.simulate_update(core, a, b, spec, create_graph=graph, smooth=100), obs, stat_weight=0)

    f(hd, td, True).backward()
    for side, d in (("h", hd), ("t", td)):
        for idx in ((1, 3, 2, 1), (2, 5, 1, 3)):
            e = torch.zeros(4, 16, 4, 4)
            e[idx] = 1e-3
            a, b = hd["s3"].detach(), td["s3"].detach()
            ea, eb = (e, 0) if side == "h" else (0, e)
            fd = (float(f({"s3": a + ea}, {"s3": b + eb})) - float(f({"s3": a - ea}, {"s3": b - eb}))) / 2e-3
            assert float(d["s3"].grad[idx]) == pytest.approx(fd, rel=0.05), (side, idx)


# ----------------------------------------------------------------------------- SecAgg+: only the sum


def test_with_secagg_the_coordinator_holds_and_inverts_only_the_average(monkeypatch, tmp_path):
    cfg = _cfg("mapping.adapter_init=identity")
    pa, pb = _pairs(6, seed=1), _pairs(4, seed=2)
    core = _core(cfg, pa)
    ua, ub = _real_update(cfg, pa, core, tmp_path / "a", 3), _real_update(cfg, pb, core, tmp_path / "b", 20)
    avg = {k: (6 * ua[k] + 4 * ub[k]) / 10 for k in core}
    specs = {"hospital1": _spec(cfg, 6, 3), "hospital2": _spec(cfg, 4, 20)}
    np_core = {k: v.numpy() for k, v in core.items()}
    with pytest.raises(PpcmiError, match=r"^core updates: with SecAgg\+ the coordinator holds only the sum, got updates "
                                         r"\['hospital1', 'hospital2'\]$"):
        CoreUpdates(np_core, {"hospital1": ua, "hospital2": ub}, specs, True)
    view = CoreUpdates(np_core, {"sum": {k: v.numpy() for k, v in avg.items()}}, specs, True)
    # the attacker's model of the sum: the weighted average of the replayed rounds at the true rows is what it saw
    rows = {n: ({s: p[f"zt_img_{s}"] for s in SCALES}, {s: p[f"zt_msk_{s}"] for s in SCALES}) for n, p in (("hospital1", pa), ("hospital2", pb))}
    sims = {n: INV.simulate_update(core, *rows[n], specs[n]) for n in specs}
    assert float(INV.update_distance({k: (6 * sims["hospital1"][k] + 4 * sims["hospital2"][k]) / 10 for k in core}, avg)) < 1e-5
    calls = []

    def spy(core_, observed, specs_, **kw):
        calls.append((observed, dict(specs_), kw.get("weights")))
        return INV.Inversion({n: {} for n in specs_}, {n: {} for n in specs_}, (1.0, 0.5))

    monkeypatch.setattr(INV, "invert_update", spy)
    P.invert_core_updates(view, iters=1)
    assert len(calls) == 1  # one joint inversion, against the average only
    observed, got_specs, weights = calls[0]
    assert set(got_specs) == {"hospital1", "hospital2"} and weights == {"hospital1": 6.0, "hospital2": 4.0}
    assert all(torch.equal(observed[k], avg[k]) for k in avg)


def test_threat_labels_follow_from_the_views():
    assert threat_of((CoreUpdates, PublicData)).label == "T2 + the federated core's round updates"
    assert threat_of((CoreUpdates, StolenKey, VictimFrames)).label == ("T4 + the federated core's round updates + the victim's "
                                                                     "mapping frames (kept at the hospital)")


# ----------------------------------------------------------------------------- the positive control's mapping back


def test_the_controls_mapping_back_is_exact_frames_then_key_then_decoder():
    from ppcmi.klt import KeyedLatentTransform
    from ppcmi.models import AEConfig, Autoencoder
    from ppcmi.privacy.views import SiteKit
    from ppcmi.training import seeded_init

    ae = AEConfig(width=0.25)
    models = {"image": seeded_init(lambda: Autoencoder(ae), 1).eval(), "mask": seeded_init(lambda: Autoencoder(ae), 2).eval()}
    key = bytes(np.random.default_rng(7).integers(0, 256, 32, dtype=np.uint8))
    kit = SiteKit("hospital1", models, KeyedLatentTransform(key, ae.latent_channels()))
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(3)).numpy()
    z = kit.encode_plain(x, "image")
    with torch.no_grad():
        zt = {s: v.numpy() for s, v in kit.transform.forward({s: torch.from_numpy(a) for s, a in z.items()}, "image").items()}
    frames = {s: principal_frame(a) for s, a in zt.items()}
    c = INV.to_canonical({s: a.astype(np.float64) for s, a in zt.items()}, frames)
    back = INV.from_canonical(c, frames)
    assert max(float(np.abs(back[s] - zt[s]).max()) for s in zt) < 1e-4
    np.testing.assert_allclose(kit.decode_keyed(back, "image"), kit.decode_plain(z, "image"), atol=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_bad_cores_updates_and_specs_are_one_line_errors_naming_the_field():
    cfg = _cfg()
    spec = _spec(cfg, 4)
    core = _core(cfg, _pairs(4))
    first = next(iter(core))
    with pytest.raises(PpcmiError, match=rf"^observed update: not the core of this architecture \({len(core) - 1} tensors for "
                                         rf"{len(core)}; missing {first}\)$"):
        INV.check_update({k: v for k, v in core.items() if k != first}, spec, "observed update")
    with pytest.raises(PpcmiError, match=r"^global core: not the core of this architecture .*; unexpected cores.s9.x\)$"):
        INV.check_core({**core, "cores.s9.x": torch.zeros(1)}, spec)
    with pytest.raises(PpcmiError, match=rf"^global core: {first} has shape \(1,\), the architecture's is "):
        INV.check_core({**core, first: torch.zeros(1)}, spec)
    bad = core[first].clone()
    bad.view(-1)[0] = float("nan")
    with pytest.raises(PpcmiError, match=rf"^observed update: {first} holds non-finite values$"):
        INV.invert_update(core, {**core, first: bad}, {"v": spec}, iters=1)
    with pytest.raises(PpcmiError, match=r"^round spec: n_rows must be an integer >= 1, got 0$"):
        INV.RoundSpec(spec.mapping, spec.in_shapes, spec.out_shapes, 0, 1e-3, 1, 4, 0, "shared")
    with pytest.raises(PpcmiError, match=r"^round spec: lr must be a positive finite number, got nan$"):
        INV.RoundSpec(spec.mapping, spec.in_shapes, spec.out_shapes, 4, float("nan"), 1, 4, 0, "shared")
    with pytest.raises(PpcmiError, match=r"^rows h\[s3\]: shape \(3, 16, 8, 8\), expected \(4, 16, 8, 8\)$"):
        h = {s: torch.zeros((4, *spec.in_shapes[s])) for s in SCALES}
        INV.simulate_update(core, {**h, "s3": torch.zeros(3, 16, 8, 8)}, h, spec)
    with pytest.raises(PpcmiError, match=r"^core updates: per-hospital updates \['nobody'\] must name hospitals of specs \['v'\]$"):
        CoreUpdates({k: v.numpy() for k, v in core.items()}, {"nobody": {}}, {"v": spec}, False)
    with pytest.raises(PpcmiError, match=r"^init\[v\]\[h\]\[s3\]: shape \(1, 16, 8, 8\), expected \(4, 16, 8, 8\)$"):
        z = {s: np.zeros((4, *spec.in_shapes[s]), np.float32) for s in SCALES}
        INV.invert_update(core, core, {"v": spec}, iters=1, init={"v": ({**z, "s3": np.zeros((1, 16, 8, 8))}, z)})
