"""The federated mapping core (``mapping.scope = "federated"``): hospitals train on their own keyed latents; Flower's FedAvg
under SecAgg+ combines only the cores.

The fast tests check the pieces without processes: stage 2's loss (moved to :mod:`ppcmi.models`, checked by hand against
torch's MSE), a hospital's round (deterministic, changes only the core and its adapters, which stay in its site folder,
refuses a core of another network), the clipping guard, the SecAgg+ settings for 2 and 3 hospitals and the app's run
configuration. The slow test runs ``ppcmi simulate --set mapping.scope=federated`` once on a real federation on loopback (SuperLink
with TLS and SuperNode authentication, two SuperNodes, Flower's SecAgg+, two rounds) on a few images of the bundled
Sunnybrook subset at 32 x 32 with tiny networks, and checks (a) that the final global core is the weighted average of
what the hospitals computed, within SecAgg+'s stated quantization tolerance, (b) from the message log, that every array
that crossed is shaped like a core tensor (or is SecAgg+'s one-element weight factor) and every other value is a small
protocol item, and (c) that each hospital's local model folder maps its own queries with its own adapters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ppcmi.client import fedcore  # noqa: E402
from ppcmi.config import load_config  # noqa: E402
from ppcmi.errors import ConfigError, PpcmiError  # noqa: E402
from ppcmi.flower.core_wire import (FedCoreSettings, initial_core, quantization_tolerance, read_core_run_config,  # noqa: E402
                                    secagg_parameters, write_core_app)
from ppcmi.flower.fedcore import core_rounds, reuse_stage1  # noqa: E402
from ppcmi.flower.wire import FlowerSettings  # noqa: E402
from ppcmi.models import MappingConfig, MappingNet, core_state, mapping_loss  # noqa: E402
from ppcmi.training import evaluate_loss, recalibrate_batchnorm, seeded_init  # noqa: E402
from conftest import BUNDLED, processes_mentioning  # noqa: E402

TINY = ["clients=2", "data.size=32", "data.intensity=percentile", "data.crop=0.375", "data.group_regex=^(SCD\\d+)_",
        "data.partition=group", "data.test_frac=0.34", "autoencoder.width=0.25", "autoencoder.epochs=1", "autoencoder.patience=1",
        "autoencoder.batch_size=4", "autoencoder.send_copies=1", "mapping.widen=[8,8,8]", "mapping.mid=[8,8]",
        "mapping.down=[8,8,8]", "mapping.batch_size=4", "mapping.epochs=2"]  # 2 epochs: 2 rounds of 1 local epoch
CHANNELS = {"s3": 16, "s4": 32, "b": 64}  # autoencoder.width 0.25; at size 32: 4x4, 2x2, 1x1
SIDE = {"s3": 4, "s4": 2, "b": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_stat(name: str) -> bool:
    """A BatchNorm statistic: a hospital re-estimates these on its own pairs for its local model."""
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _pairs(n: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"zt_{k}_{s}": 2 * torch.randn(n, c, SIDE[s], SIDE[s], generator=g) + 0.5
            for k in ("img", "msk") for s, c in CHANNELS.items()}


def _cfg(*extra: str):
    return load_config(None, [*TINY, "mapping.scope=federated", *extra])


def _core(cfg) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in initial_core(cfg).items()}


def _round(cfg, site_dir, pairs, core=None, round_=1, seed=3, name="hospital1"):
    return fedcore.local_round(core if core is not None else _core(cfg), pairs, cfg.mapping, site=name, site_dir=site_dir,
                               round_=round_, rounds=2, local_epochs=1, seed=seed, init_seed=cfg.seed)


# ----------------------------------------------------------------------------- stage 2's loss, moved


def test_stage2_loss_is_the_shared_one_and_equals_the_sum_over_scales_of_torch_mse():
    from ppcmi.server import mapping

    assert mapping._loss_fn is mapping_loss  # one definition: the coordinator's stage 2 trains with the shared loss
    scales = ["s3", "b"]
    net = seeded_init(lambda: MappingNet({s: CHANNELS[s] for s in scales}, {s: CHANNELS[s] for s in scales}, ["a", "b"],
                                         MappingConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8))), 0).eval()
    p = _pairs(6)
    cid = torch.tensor([0, 1, 0, 1, 1, 0])
    batch = [cid, *(p[f"zt_img_{s}"] for s in scales), *(p[f"zt_msk_{s}"] for s in scales)]
    with torch.no_grad():
        got = mapping._loss_fn(scales)(net, batch).item()
        hand = 0.0  # each row through its own hospital's adapters (eval mode: rows are independent), then torch's MSE
        for s in scales:
            pred = torch.empty_like(p[f"zt_msk_{s}"])
            for c, name in enumerate(["a", "b"]):
                m = cid == c
                pred[m] = net({k: p[f"zt_img_{k}"][m] for k in scales}, name)[s]
            hand += torch.nn.functional.mse_loss(pred, p[f"zt_msk_{s}"]).item()
            assert torch.nn.functional.mse_loss(pred, p[f"zt_msk_{s}"]).item() == pytest.approx(
                float(((pred - p[f"zt_msk_{s}"]) ** 2).mean()), rel=1e-6)
    assert got == pytest.approx(hand, rel=1e-5) and got > 0


def test_the_coordinators_stage_2_refuses_the_federated_scope():
    from ppcmi.server.stages import train_mappings

    with pytest.raises(ConfigError, match=r"^mapping.scope: \"federated\" keeps the latents at the hospitals and trains the core "
                                          r"through Flower with secure aggregation \(ppcmi simulate, ppcmi deploy or ppcmi bench "
                                          r"--methods ppcmi_federated run it on a loopback federation\); the coordinator's stage 2 "
                                          r"does not$"):
        train_mappings([], _cfg().mapping, "unused", seed=0)
    with pytest.raises(ConfigError, match=r"^mapping.scope: must be one of shared, per_hospital, federated, got 'secure'$"):
        load_config(None, ["mapping.scope=secure"])


def test_the_shared_scopes_runners_refuse_the_federated_scope_before_any_work(tmp_path):
    from ppcmi.flower.deploy import deploy
    from ppcmi.simulate import run_simulation

    cfg = load_config(None, ["mapping.scope=federated"])
    for run, where in ((lambda out: run_simulation(cfg, BUNDLED, out, progress=False), "run_simulation"),
                       (lambda out: deploy(cfg, BUNDLED, out, sites=2), "this app")):
        out = tmp_path / where
        with pytest.raises(ConfigError, match=rf"run it on a loopback federation\); {where} \(the shared and per-hospital "
                                              r"scopes\) does not$"):
            run(out)
        assert not out.exists()  # refused before the run folder, let alone stage 1


def test_the_cli_runs_the_federated_scope_and_refuses_what_it_cannot_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from ppcmi.cli import app
    from ppcmi.flower.fedcore import default_local_epochs

    assert [default_local_epochs(e) for e in (50, 30, 24, 17, 2, 1, 100)] == [5, 2, 2, 1, 1, 1, 5]
    cli = CliRunner()
    fed = ["--set", "mapping.scope=federated", "--set", "mapping.epochs=4", "--no-plan"]
    cases = [
        (["simulate", "--data", str(BUNDLED), *fed, "--local-epochs", "3"],
         "--local-epochs: 3 does not divide mapping.epochs = 4, so the rounds could not sum to stage 2's budget"),
        (["simulate", "--data", str(BUNDLED), *fed, "--resume"],
         "--resume: a Flower run cannot resume; mapping.scope \"federated\" starts again in a new --out"),
        (["simulate", "--data", str(BUNDLED), "--no-plan", "--local-epochs", "2"],
         "--local-epochs: only with --set mapping.scope=federated (rounds of the federated core)"),
        (["deploy", "--sites", "2", "--set", "mapping.scope=federated", "--set", "mapping.epochs=4", "--local-epochs", "3"],
         "--local-epochs: 3 does not divide mapping.epochs = 4, so the rounds could not sum to stage 2's budget"),
        (["deploy", "--sites", "2", "--local-epochs", "2"],
         "--local-epochs: only with --set mapping.scope=federated (rounds of the federated core)"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        r = cli.invoke(app, [*args, "--out", str(out)])
        assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == f"error: {message}", (args, r.output)
        assert not out.exists(), args  # before the run folder, let alone stage 1


# ----------------------------------------------------------------------------- a hospital's round


def test_a_round_is_deterministic_and_changes_only_the_core_and_this_hospitals_adapters(tmp_path):
    cfg = _cfg()
    pairs = _pairs()
    start = _core(cfg)
    a = _round(cfg, tmp_path / "a", pairs)
    b = _round(cfg, tmp_path / "b", pairs)
    net = fedcore.local_network("hospital1", pairs, cfg.mapping, 0)
    assert list(a.core) == list(start) == list(core_state(net, norm="local"))
    norm_layers = set(core_state(net, norm="shared")) - set(a.core)  # FedBN: the affines and statistics it keeps
    assert norm_layers and all(k.endswith((".weight", ".bias", ".running_mean", ".running_var")) for k in norm_layers)
    assert all(torch.equal(a.core[k], b.core[k]) for k in a.core)  # the same seed, the same core
    assert a.n_rows == 10 and a.max_abs == max(float(v.abs().max()) for v in a.core.values())
    assert sum(not torch.equal(a.core[k], start[k]) for k in start) > len(start) // 2  # it trained the core
    other = _round(cfg, tmp_path / "c", pairs, seed=4)
    assert any(not torch.equal(a.core[k], other.core[k]) for k in a.core)  # (and the seed matters)

    own_a, own_b = (load_file(str(d / "fedcore" / "own.safetensors")) for d in (tmp_path / "a", tmp_path / "b"))
    assert set(own_a) & set(a.core) == set() and all(torch.equal(own_a[k], own_b[k]) for k in own_a)
    assert not any("adapters" in k or "frames" in k for k in a.core)  # nothing of its own is in what it sends
    fresh = fedcore.local_network("hospital1", pairs, cfg.mapping, cfg.seed).state_dict()
    adapters = [k for k in own_a if "_adapters." in k]
    frames = [k for k in own_a if "_frames." in k]
    counters = {k for k in own_a if k.endswith("num_batches_tracked")}
    assert adapters and frames and set(own_a) == set(adapters) | set(frames) | counters | norm_layers
    assert all(not torch.equal(own_a[k], fresh[k]) for k in norm_layers if k.endswith("running_var"))  # they trained here
    assert all(torch.equal(own_a[k], fresh[k]) for k in frames)  # frames are fixed (pca: from its own pairs)
    assert any(not torch.equal(frames_w := own_a[k], torch.eye(frames_w.shape[0])) for k in frames if k.endswith("weight"))
    assert sum(not torch.equal(own_a[k], fresh[k]) for k in adapters) == len(adapters)  # every adapter trained

    # round 2 starts from the adapters kept after round 1; the round's core and numbers are logged at the hospital
    two = _round(cfg, tmp_path / "a", pairs, core=a.core, round_=2)
    assert any(not torch.equal(two.core[k], a.core[k]) for k in a.core)
    logged = load_file(str(tmp_path / "a" / "fedcore" / "rounds" / "round-2.safetensors"))
    assert all(torch.equal(logged[k], two.core[k]) for k in two.core)
    assert json.loads((tmp_path / "a" / "fedcore" / "rounds" / "round-2.json").read_text())["rows"] == 10
    with pytest.raises(PpcmiError, match=r"round 2 needs the adapters this hospital kept after round 1$"):
        _round(cfg, tmp_path / "new", pairs, core=a.core, round_=2)


def test_the_held_out_rows_are_whole_patients_with_every_copy_of_their_planes():
    groups = ["p1", "p1", "p2", "p3", "p3", "p4", "p5", "p5", "p5", "p2"]  # 10 planes of 5 patients
    tr, va = fedcore.holdout_rows(groups, 30, seed=7, val_frac=0.2)  # the planes, then two blocks of augmented copies
    held = {groups[int(r) % 10] for r in va}
    assert len(held) == 1 and held.isdisjoint({groups[int(r) % 10] for r in tr})  # round(5 x 0.2) = 1 patient, all of him
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(30))
    assert len(va) == 3 * groups.count(next(iter(held)))
    again = fedcore.holdout_rows(groups, 30, seed=7, val_frac=0.2)
    assert torch.equal(again[0], tr) and torch.equal(again[1], va)  # seeded
    assert len(fedcore.holdout_rows(groups, 30, seed=7, val_frac=0.99)[0]) > 0  # never every patient
    assert len(fedcore.holdout_rows(["a", "b", "c", "a"], 4, seed=7, val_frac=0.5)[1]) == 0  # below 4 patients: none
    with pytest.raises(PpcmiError, match=r"^mapping.federated_select: 31 training rows are not whole copies of 10 planes$"):
        fedcore.holdout_rows(groups, 31, seed=7, val_frac=0.2)


def test_val_selection_keeps_the_core_that_scored_best_on_held_out_patients(tmp_path):
    cfg = _cfg("mapping.federated_select=val", "mapping.val_frac=0.34")
    pairs = _pairs(12)
    groups = [f"p{i // 2}" for i in range(12)]  # 6 patients of 2 planes: 2 held out
    tr, va = fedcore.holdout_rows(groups, 12, seed=3, val_frac=0.34)
    assert len(va) == 4

    def rnd(core, round_):
        return fedcore.local_round(core, pairs, cfg.mapping, site="hospital1", site_dir=tmp_path, round_=round_, rounds=3,
                                   local_epochs=1, seed=3, init_seed=cfg.seed, groups=groups)

    one = rnd(_core(cfg), 1)
    assert one.n_rows == 8 and not (tmp_path / "fedcore" / "best.json").exists()  # it trains on its 8 training rows only
    rnd(one.core, 2)  # round 2 first scores the core it received (round 1's) on the held-out rows and keeps it
    best = json.loads((tmp_path / "fedcore" / "best.json").read_text())
    logged = json.loads((tmp_path / "fedcore" / "rounds" / "round-2.json").read_text())
    assert best["round"] == 1 and logged["rows"] == 8 and logged["received_val_loss"] == best["val_loss"] > 0
    kept = load_file(str(tmp_path / "fedcore" / "best.safetensors"))

    ruined = {k: v * 50 for k, v in one.core.items()}  # a final core far worse on every row
    folder = fedcore.save_local_model(ruined, pairs, cfg.mapping, site="hospital1", site_dir=tmp_path, init_seed=cfg.seed,
                                      seed=3, groups=groups)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["selected"]["rule"] == "val" and meta["selected"]["round"] == 1
    assert meta["selected"]["val_loss"] == best["val_loss"] < meta["selected"]["last_val_loss"]
    assert meta["n_val_rows"] == 4 and meta["n_train_rows"] == 8
    saved = load_file(str(folder / "mapping.safetensors"))
    assert set(saved) == set(kept) and all(torch.equal(saved[k], kept[k]) for k in kept)  # exactly the kept model
    net = fedcore.local_network("hospital1", pairs, cfg.mapping, cfg.seed, frames=False)
    net.load_state_dict(saved)
    rows = fedcore._tensors(pairs, list(CHANNELS))
    assert evaluate_loss(net, mapping_loss(list(CHANNELS)), [t[va] for t in rows], 4) == pytest.approx(best["val_loss"], rel=1e-5)

    with pytest.raises(PpcmiError, match=r'^mapping.federated_select: "val" needs the patient of every training row$'):
        fedcore.local_round(one.core, pairs, cfg.mapping, site="hospital1", site_dir=tmp_path, round_=2, rounds=3,
                            local_epochs=1, seed=3, init_seed=cfg.seed)
    with pytest.raises(ConfigError, match=r'^mapping.dp: DP-SGD trains a fixed budget and keeps its last weights'):
        load_config(None, ["mapping.federated_select=val", "mapping.dp=true", "mapping.norm=group",
                           "mapping.adapter_init=identity"])
    with pytest.raises(ConfigError, match=r"^mapping.federated_select: must be one of last, val, got 'best'$"):
        load_config(None, ["mapping.federated_select=best"])


def test_stage1_settings_compare_as_settings_so_a_newer_default_is_no_difference():
    from ppcmi.config import to_dict
    from ppcmi.flower.fedcore import stage1_difference

    now = {**to_dict(_cfg()), "data_dir": "/data/x"}
    older = {**now, "data": {k: v for k, v in now["data"].items() if k != "volume_regex"}}  # written before the setting
    assert stage1_difference(older, now) is None
    assert stage1_difference({**now, "mapping": {**now["mapping"], "epochs": 9}}, now) is None  # stage 2 may differ
    assert stage1_difference({**now, "autoencoder": {**now["autoencoder"], "epochs": 9}}, now) == "autoencoder"
    assert stage1_difference({**now, "data_dir": "/data/y"}, now) == "data_dir"


def test_a_round_refuses_a_core_of_another_network(tmp_path):
    cfg = _cfg()
    pairs = _pairs()
    wider = _core(_cfg("mapping.widen=[8,8,16]"))
    with pytest.raises(PpcmiError, match=r"^global core: cores\.\S+ has shape \(\d+(, \d+)*\), this hospital's mapping network "):
        _round(cfg, tmp_path, pairs, core=wider)
    short = dict(list(_core(cfg).items())[:-1])
    with pytest.raises(PpcmiError, match=r"^global core: does not fit this hospital's mapping network \(131 tensors for 132; missing "):
        _round(cfg, tmp_path, pairs, core=short)
    # a core that carries the normalisation layers (federated_norm "shared": 39 BatchNorm layers x 4 tensors more) is refused
    # by a hospital that keeps them (the default "local"), and the other way round
    shared = _core(_cfg("mapping.federated_norm=shared"))
    with pytest.raises(PpcmiError, match=r"^global core: does not fit this hospital's mapping network \(288 tensors for 132; "
                                         r"unexpected cores\.s3\.widen\.0\.2\.weight\)$"):
        _round(cfg, tmp_path, pairs, core=shared)
    with pytest.raises(PpcmiError, match=r"\(132 tensors for 288; missing cores\.s3\.widen\.0\.2\.weight\)$"):
        _round(_cfg("mapping.federated_norm=shared"), tmp_path, pairs, core=_core(cfg))
    bad = {**_core(cfg)}
    bad[next(iter(bad))] = bad[next(iter(bad))] * float("nan")
    with pytest.raises(PpcmiError, match=r"^global core: cores\.s3\.\S+ holds non-finite values$"):
        _round(cfg, tmp_path, pairs, core=bad)


@pytest.mark.parametrize("norm", ["local", "shared"])
def test_the_local_model_folder_maps_with_the_global_core_and_this_hospitals_adapters(tmp_path, norm):
    from ppcmi.protocol import LatentBatch
    from ppcmi.server.mapping import MappingServer

    cfg = _cfg(f"mapping.federated_norm={norm}")
    pairs = _pairs()
    r = _round(cfg, tmp_path, pairs)
    folder = fedcore.save_local_model(r.core, pairs, cfg.mapping, site="hospital1", site_dir=tmp_path, init_seed=cfg.seed)
    assert folder == tmp_path / "fedcore" / "model"
    server = MappingServer(folder)  # the coordinator's loading code reads it as a stage-2 model folder
    assert server.clients == ["hospital1"] and server.meta["scope"] == "federated"
    saved = load_file(str(folder / "mapping.safetensors"))
    own = load_file(str(tmp_path / "fedcore" / "own.safetensors"))
    stats = {k for k in saved if _bn_stat(k) and k.startswith("cores.")}
    assert stats and all(torch.equal(saved[k], r.core[k]) for k in r.core if k not in stats)  # the global core's weights
    assert all(torch.equal(saved[k], own[k]) for k in own if not _bn_stat(k))  # its own adapters, frames (and with "local" affines)
    assert (set(r.core) & stats == set()) == (norm == "local")  # with "local" no statistic crossed
    ref = r.core if norm == "shared" else own
    assert all(not torch.equal(saved[k], ref[k]) for k in stats if "running" in k)  # BatchNorm: re-estimated on its own pairs
    net = fedcore.local_network("hospital1", pairs, cfg.mapping, cfg.seed, frames=False)
    net.load_state_dict({**r.core, **own})
    rows = fedcore._tensors(pairs, list(CHANNELS))
    assert recalibrate_batchnorm(net, mapping_loss(list(CHANNELS)), rows, cfg.mapping.batch_size) > 0
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())  # exactly that re-estimate
    q = {f"zt_img_{s}": pairs[f"zt_img_{s}"][:3].numpy() for s in CHANNELS}
    reply = server.handle(LatentBatch("query", "hospital1", q, query="0" * 32))
    with torch.no_grad():
        want = net.eval()({s: torch.from_numpy(q[f"zt_img_{s}"]) for s in CHANNELS}, "hospital1")
    for s in CHANNELS:
        np.testing.assert_allclose(reply.arrays[f"zt_msk_{s}"], want[s].numpy(), rtol=1e-4, atol=1e-5)
    assert 0 < fedcore.pairs_loss(folder, pairs, cfg.mapping, site="hospital1", init_seed=cfg.seed) == pytest.approx(
        evaluate_loss(net, mapping_loss(list(CHANNELS)), rows, cfg.mapping.batch_size), rel=1e-6)


# ----------------------------------------------------------------------------- SecAgg+ settings


def test_a_core_secagg_would_clip_is_refused_and_flower_does_clip_it():
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    fed = FedCoreSettings(clip=4.0, max_weight=20)
    ok = fedcore.CoreRound({}, n_rows=10, train_loss=0.0, max_abs=7.9)
    assert fedcore.check_clipping(ok, clip=fed.clip, max_weight=fed.max_weight) == pytest.approx(3.95)  # 7.9 x 10/20 fits
    with pytest.raises(PpcmiError, match=r"^fedcore.clip: a core value of magnitude 8.2 \(x 10/20 rows = 4.1\) lies outside "
                                         r"SecAgg\+'s clipping range \+-4, where Flower would clip it; raise fedcore.clip$"):
        fedcore.check_clipping(fedcore.CoreRound({}, 10, 0.0, 8.2), clip=fed.clip, max_weight=fed.max_weight)
    with pytest.raises(PpcmiError, match=r"^fedcore.max_weight: 20 is below this hospital's 21 training rows"):
        fedcore.check_clipping(fedcore.CoreRound({}, 21, 0.0, 0.1), clip=fed.clip, max_weight=fed.max_weight)
    # why: Flower's quantization clips silently (a value of 4.1 comes back as 4)
    back = dequantize(quantize([np.array([4.1, -1.0])], 4.0, 2**20), 4.0, 2**20)[0]
    np.testing.assert_allclose(back, [4.0, -1.0], atol=1e-5)


def test_secagg_settings_suit_two_and_three_hospitals():
    from flwr.server.workflow import SecAggPlusWorkflow

    fed = FedCoreSettings()
    wf = SecAggPlusWorkflow(**secagg_parameters(fed))  # Flower accepts them
    assert (wf.num_shares, wf.reconstruction_threshold) == (1.0, 1.0)  # all hospitals share; every share needed
    for n in (2, 3):
        fed.check_nodes(n)
        assert round(wf.num_shares * n) == n and max(round(wf.reconstruction_threshold * n), 2) == n  # Flower's resolution
    with pytest.raises(ConfigError, match=r"^mapping.scope: \"federated\" needs at least 2 hospitals for secure aggregation, got 1$"):
        fed.check_nodes(1)
    with pytest.raises(ConfigError, match=r"^fedcore.quantization: 256 hospitals x 16777216 levels reach SecAgg\+'s modulus 2\*\*32"):
        fed.check_nodes(256)
    # the tolerance: hospitals x (1 level + float32 rounding in levels) / the summed weight ratios
    assert quantization_tolerance(FedCoreSettings(clip=8.0, quantization=2**20, max_weight=10), [10, 5]) == pytest.approx(
        2 * (1 + 2**-3 + 3 * 2**-5) * (16 / 2**20) / 1.5)
    with pytest.raises(ConfigError, match=r"^fedcore.quantization: must be an integer from 256 to 2\*\*24 \(Flower quantizes"):
        FedCoreSettings(quantization=2**26)
    with pytest.raises(ConfigError, match=r"^fedcore.clip: must be a positive number below 1e6, got 0$"):
        FedCoreSettings(clip=0)
    with pytest.raises(ConfigError, match=r"^fedcore.max_weight: must be an integer from 1 to 1000000000, got 0$"):
        FedCoreSettings(max_weight=0)


def test_rounds_sum_to_stage_2s_epochs():
    assert core_rounds(_cfg()) == 2 and core_rounds(_cfg("mapping.epochs=6"), 3) == 2
    with pytest.raises(PpcmiError, match=r"^--local-epochs: 4 does not divide mapping.epochs = 6, so the rounds could not "
                                         r"sum to stage 2's budget$"):
        core_rounds(_cfg("mapping.epochs=6"), 4)


def test_the_core_apps_run_config_round_trips(tmp_path):
    import tomllib

    from flwr.common.config import flatten_dict

    from ppcmi.config import shared_settings

    cfg = _cfg()
    fed = FedCoreSettings(rounds=3, local_epochs=2, clip=16.0, quantization=2**24, max_weight=77)
    write_core_app(tmp_path / "app", cfg, FlowerSettings(nodes=3), fed)
    meta = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert meta["components"] == {"serverapp": "ppcmi.flower.core_server_app:app", "clientapp": "ppcmi.flower.core_client_app:app"}
    got_cfg, settings, got = read_core_run_config(flatten_dict(meta["config"]))
    assert got == fed and settings.nodes == 3 and shared_settings(got_cfg) == shared_settings(cfg)
    assert got_cfg.mapping.scope == "federated"
    with pytest.raises(ConfigError, match=r"^run config: unknown key 'fedcore.noise'$"):
        read_core_run_config({**flatten_dict(meta["config"]), "fedcore.noise": 1.0})


# ----------------------------------------------------------------------------- a real federation with SecAgg+


def _subset(root: Path) -> Path:
    """4, 6 and 8 images of three patients of the bundled Sunnybrook subset (symlinks): one test patient, two hospitals
    holding different numbers of images."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for pid, n in (("SCD0000101", 4), ("SCD0000201", 6), ("SCD0000301", 8)):
        for p in sorted((BUNDLED / "images").glob(f"{pid}_*"))[6:6 + n]:
            for sub in ("images", "masks"):
                os.symlink(BUNDLED / sub / p.name, root / sub / p.name)
    return root


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
    """``ppcmi simulate --set mapping.scope=federated``: the command a user types (bench's ppcmi_federated and deploy's
    federated scope call the same :func:`ppcmi.flower.fedcore.run_federated_core`)."""
    from typer.testing import CliRunner

    from ppcmi.cli import app

    root = tmp_path_factory.mktemp("fedcore")
    data = _subset(root / "data")
    # one round of one local epoch (Flower's polling makes a SecAgg+ round cost ~45 s on 2 cores; a second round's start
    # from the kept adapters is tested without processes above)
    settings = [*TINY, "mapping.epochs=1", "mapping.scope=federated"]
    cfg = load_config(None, settings)  # the configuration the run is given
    out = root / "simulate"
    sets = [a for s in settings for a in ("--set", s)]
    r = CliRunner().invoke(app, ["simulate", "--data", str(data), "--clients", "2", "--no-plan", *sets, "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return cfg, data, out, json.loads((out / "summary.json").read_text()), processes_mentioning(str(out)), r.output


def _sites(out: Path) -> dict[str, Path]:
    return {p.name: p / "site" for p in sorted((out / "federation" / "sites").iterdir())}


@pytest.mark.slow
def test_the_global_core_is_secaggs_aggregate_of_the_hospitals_cores(federated):
    _, _, out, result, leftovers, _ = federated
    assert not leftovers, f"processes still running after the federation: {leftovers}"
    f = result["federated"]
    assert f["rounds"] == 1 and f["local_epochs"] == 1 and f["secagg"]["num_shares_resolved"] == 2
    glob = load_file(str(Path(f["server_dir"]) / "global.safetensors"))
    sites = _sites(out)
    assert set(sites) == set(f["hospitals"]) == {"hospital1", "hospital2"}
    cores = {h: load_file(str(s / "fedcore" / "rounds" / "round-1.safetensors")) for h, s in sites.items()}
    rows = {h: json.loads((s / "fedcore" / "rounds" / "round-1.json").read_text())["rows"] for h, s in sites.items()}
    assert rows == {h: v["num_examples"] for h, v in f["hospitals"].items()}
    fed = FedCoreSettings(clip=f["secagg"]["clipping_range"], quantization=f["secagg"]["quantization_range"],
                          max_weight=int(f["secagg"]["max_weight"]))
    tol = quantization_tolerance(fed, list(rows.values()))
    assert tol < 2e-4  # clip 128, 2**24 levels: about 1.5e-5 a level
    total = sum(rows.values())
    worst, spread = 0.0, 0.0
    for k, g in glob.items():
        avg = sum(cores[h][k].double() * (rows[h] / total) for h in cores)
        # SecAgg+'s rounding, then float32 storage of the aggregate
        worst = max(worst, float((g.double() - avg).abs().max() - 1.2e-7 * avg.abs().max()))
        spread = max(spread, float((cores["hospital1"][k].double() - cores["hospital2"][k].double()).abs().max()))
    assert worst <= tol, (worst, tol)
    assert spread > 10 * tol  # the hospitals' cores differ far beyond the tolerance, so the check can tell an average apart
    assert sorted(glob) == sorted(initial_core(load_config(None, [*TINY, "mapping.scope=federated"])))


@pytest.mark.slow
def test_no_array_that_crossed_has_a_per_image_dimension(federated):
    cfg, _, out, result, _, _ = federated
    f = result["federated"]
    core = initial_core(load_config(None, [*TINY, "mapping.scope=federated"]))
    shapes = [list(v.shape) for v in core.values()]
    n_params = sum(v.size for v in core.values())
    assert n_params == f["core_parameters"]
    log = [json.loads(line) for line in (Path(f["server_dir"]) / "messages.jsonl").read_text().splitlines()]
    # 1 round x 4 SecAgg+ steps + the final evaluation, each way, for each of the 2 hospitals
    assert len(log) == f["messages"] == (1 * 4 + 1) * 2 * 2
    images = {h: len(list((out / "federation" / "sites" / h / "data" / "images").iterdir())) for h in f["hospitals"]}
    carried = 0
    for e in log:
        arrays = e["arrays"]
        if e["step"] == "collect_masked_vectors" and e["direction"] == "up":  # SecAgg+'s masked vector: weight factor + core
            assert [a["shape"] for a in arrays] == [[1]] + shapes and {a["dtype"] for a in arrays} == {"<i8"}, e["step"]
            assert not any(v["record"].startswith("fitres.parameters") for v in e["values"])  # the plain core never left
            carried += 1
        elif e["step"] in ("collect_masked_vectors", "evaluate") and e["direction"] == "down":  # the global core
            assert [a["shape"] for a in arrays] == shapes and {a["dtype"] for a in arrays} == {"<f4"}, e["step"]
            assert sum(int(np.prod(a["shape"])) for a in arrays) == n_params
            carried += 1
        else:
            assert arrays == [], (e["step"], e["direction"])
        for v in e["values"]:  # everything else: keys, shares, node ids, counts, settings
            assert v["bytes"] <= 1024 and v["items"] <= 2, v  # at most one item per hospital (2), none above 1 KiB
        assert e["bytes"] <= 4096 or arrays, e  # messages without core tensors are small whatever the number of images
    assert carried == 1 * 2 * 2 + 2  # per round: the core down and the masked core up, each hospital; the final core down
    # hospitals holding different numbers of images send and receive the same bytes at every step: nothing is sized by them
    assert len(set(images.values())) == 2, images
    for step in ("setup", "share_keys", "collect_masked_vectors", "unmask", "evaluate"):
        for direction in ("down", "up"):
            sizes = {e["node"]: e["bytes"] for e in log if e["step"] == step and e["direction"] == direction and e["round"] == 1}
            assert len(sizes) == 2 and len(set(sizes.values())) == 1, (step, direction, sizes)
    assert all(v["uploaded_bytes"] > 0 and v["downloaded_bytes"] > 0 for v in f["hospitals"].values())


@pytest.mark.slow
def test_each_hospital_predicts_with_its_own_local_model(federated):
    from ppcmi.client.site import Hospital
    from ppcmi.errors import ProtocolError
    from ppcmi.metrics import summarize
    from ppcmi.server.mapping import MappingServer
    from ppcmi.simulate import infer_and_score, load_test, plan

    cfg, data, out, result, _, printed = federated
    f = result["federated"]
    glob = load_file(str(Path(f["server_dir"]) / "global.safetensors"))
    sites = _sites(out)
    servers = {h: MappingServer(s / "fedcore" / "model") for h, s in sites.items()}
    adapters = {}
    for h, s in sites.items():
        saved = load_file(str(s / "fedcore" / "model" / "mapping.safetensors"))
        own = load_file(str(s / "fedcore" / "own.safetensors"))
        assert servers[h].clients == [h]
        assert not any(_bn_stat(k) for k in glob)  # federated_norm "local" (FedBN): no normalisation statistic was averaged
        assert all(torch.equal(saved[k], glob[k]) for k in glob)  # the final global core's weights
        assert all(torch.equal(saved[k], own[k]) for k in own if not _bn_stat(k))  # its own adapters, frames, norm affines
        adapters[h] = {k.replace(h, "*"): v for k, v in own.items() if "_adapters." in k or (k.startswith("cores.") and not _bn_stat(k))}
    a, b = adapters.values()
    assert any(k.startswith("cores.") for k in a) and not set(a) & set(glob)
    assert all(not torch.equal(a[k], b[k]) for k in a)  # two hospitals, two sets of adapters and normalisation affines
    pl = plan(load_config(None, [*TINY, "mapping.scope=federated"]), data)
    test = load_test(pl)
    hospitals = {h: Hospital(s) for h, s in sites.items()}
    q = hospitals["hospital1"].protect(test["images"][:2])
    with pytest.raises(ProtocolError, match=r"^client: unknown hospital 'hospital1'$"):
        servers["hospital2"].handle(q)  # another hospital's model has no adapters for it
    _, rows = infer_and_score(hospitals, servers, test, pl.labels)  # the bench's scoring path, each with its own model
    assert len(rows) == 2 * len(pl.test) and {r["site"] for r in rows} == set(sites)
    # the same models and test cases; the run scored them under another torch thread count, which may round a borderline
    # pixel the other way (one pixel of 16 test planes moves the mean by about 1e-5)
    assert result["ppcmi"]["fg_dice"]["mean"] == pytest.approx(summarize(rows, group_key="site")["fg_dice"]["mean"], abs=1e-4)
    assert 0 <= result["ppcmi"]["fg_dice"]["mean"] <= 1
    t = result["timings_s"]
    assert t["flwr_run_s"] >= t["train_s"] > 0 and t["stage1_s"] > 0
    assert len((out / "eval" / "per_case.csv").read_text().splitlines()) == 1 + len(rows)  # the per-case rows, a line each
    assert "| PPCMI-SF federated core | overall |" in printed and "1 round x 1 local epoch under SecAgg+" in printed


def test_predict_maps_with_the_sites_own_local_model_by_default(federated, tmp_path):
    from typer.testing import CliRunner

    from ppcmi.cli import app

    cfg, data, out, result, _, _ = federated
    site = _sites(out)["hospital1"]
    images = [str(p) for p in sorted((data / "images").iterdir())[:2]]
    cli = CliRunner()
    r = cli.invoke(app, ["predict", *images, "--site-dir", str(site), "--out", str(tmp_path / "own")])
    assert r.exit_code == 0, r.output
    assert f"mapping with this site's own local model of the federated core: {site / 'fedcore' / 'model'}" in r.output
    r2 = cli.invoke(app, ["predict", *images, "--site-dir", str(site), "--out", str(tmp_path / "named"),
                          "--model", str(site / "fedcore" / "model")])
    assert r2.exit_code == 0, r2.output
    own, named = sorted((tmp_path / "own").iterdir()), sorted((tmp_path / "named").iterdir())
    assert [p.name for p in own] == [p.name for p in named] and len(own) == 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(own, named))
    # a site without a local model still has to name a mapping
    bare = tmp_path / "bare"
    bare.mkdir()
    r3 = cli.invoke(app, ["predict", *images, "--site-dir", str(bare), "--out", str(tmp_path / "x")])
    assert r3.exit_code == 2 and r3.output.strip().splitlines()[-1].endswith(
        f"{bare} has no local model of the federated core ({bare / 'fedcore' / 'model'}) to use by default")


@pytest.mark.slow
def test_a_later_run_reuses_each_hospitals_stage1_only_under_the_same_settings(federated, tmp_path):
    """``benchmarks/fedcore_dp_curve.py`` trains stage 1 once: a later federation folder copies every hospital's
    autoencoders, key and site record (not its federated-core state), and only when the data and settings agree."""
    _, _, out, _, _, _ = federated
    src = out / "federation"
    before = json.loads((src / "config.json").read_text())
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**before, "mapping": {**before["mapping"], "dp_noise": 3.0}}))  # stage 2 only
    sites = {h: run / "sites" / h / "site" for h in _sites(out)}
    reuse_stage1(src, run, sites)
    for h, d in sites.items():
        assert (d / "klt.key").read_bytes() == (src / "sites" / h / "site" / "klt.key").read_bytes()
        assert (d / "image_ae").is_dir() and (d / "mask_ae").is_dir() and not (d / "fedcore").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**before, "autoencoder": {**before["autoencoder"], "epochs": 99}}))
    with pytest.raises(PpcmiError, match=r"its stage 1 was made with other 'autoencoder' settings; train stage 1 again$"):
        reuse_stage1(src, other, {h: other / "sites" / h / "site" for h in sites})
    assert not (other / "sites").exists()


# ----------------------------------------------------------------------------- mapping.federated_loss = "decoded"


def _toy_decoder(k: int = 3, seed: int = 5):
    """A fixed differentiable decoder of keyed mask latents: a 1x1 convolution of the s3 latents, upsampled to 8 x 8."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, CHANNELS["s3"], 1, 1, generator=g)

    def decode(zt: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.interpolate(torch.nn.functional.conv2d(zt["s3"], w), scale_factor=2, mode="nearest")

    return decode


def test_the_decoded_round_loss_is_stage_2s_plus_the_mask_loss_of_the_decoded_prediction():
    from ppcmi.models import mixed_forward
    from ppcmi.training import mask_loss

    scales = list(CHANNELS)
    net = seeded_init(lambda: MappingNet(CHANNELS, CHANNELS, ["a"], MappingConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8))), 0).eval()
    p = _pairs(6)
    dec = _toy_decoder()
    labels = fedcore.decoded_targets(dec, p, batch_size=4)  # (in two batches)
    with torch.no_grad():
        assert labels.dtype == torch.uint8 and labels.shape == (6, 8, 8)
        assert torch.equal(labels, dec({s: p[f"zt_msk_{s}"] for s in scales}).argmax(1).to(torch.uint8))
        assert len(labels.unique()) > 1
        batch = [torch.zeros(6, dtype=torch.long), *(p[f"zt_img_{s}"] for s in scales), *(p[f"zt_msk_{s}"] for s in scales)]
        got = fedcore.round_loss(scales, dec)(net, [*batch, labels]).item()
        latent = mapping_loss(scales)(net, batch).item()
        pred = mixed_forward(net, {s: p[f"zt_img_{s}"] for s in scales}, batch[0])
        onehot = torch.nn.functional.one_hot(labels.long(), 3).permute(0, 3, 1, 2).float()
        assert got == pytest.approx(latent + mask_loss(dec(pred), onehot).item(), rel=1e-5) and got > latent > 0
        assert fedcore.round_loss(scales)(net, [*batch, labels]).item() == pytest.approx(latent, rel=1e-6)  # (the rest unread)


def test_a_decoded_round_fits_the_decoded_prediction_better_than_a_latent_one_and_needs_the_decoder(tmp_path):
    from ppcmi.training import load_weights

    cfg = _cfg("mapping.federated_loss=decoded")
    pairs = _pairs(12)
    dec = _toy_decoder()
    scales = list(CHANNELS)
    with pytest.raises(PpcmiError, match=r'^mapping\.federated_loss: "decoded" needs this hospital\'s keyed mask decoder$'):
        _round(cfg, tmp_path / "none", pairs)
    rows = [*fedcore._tensors(pairs, scales), fedcore.decoded_targets(dec, pairs)]

    def decoded_term(c, site_dir):  # of the local model the round leaves, in evaluation mode, on the hospital's pairs
        r = fedcore.local_round(_core(c), pairs, c.mapping, site="hospital1", site_dir=site_dir, round_=1, rounds=1,
                                local_epochs=8, seed=3, init_seed=c.seed, decoder=dec)  # (a latent round ignores it)
        folder = fedcore.save_local_model(r.core, pairs, c.mapping, site="hospital1", site_dir=site_dir, init_seed=c.seed)
        net = fedcore.local_network("hospital1", pairs, c.mapping, c.seed, frames=False)
        load_weights(net, folder / "mapping.safetensors")
        both, latent = (evaluate_loss(net, fedcore.round_loss(scales, d), rows, 4) for d in (dec, None))
        return r, both - latent

    r, decoded = decoded_term(cfg, tmp_path / "decoded")
    r0, latent = decoded_term(_cfg(), tmp_path / "latent")
    assert list(r.core) == list(r0.core) and any(not torch.equal(r.core[k], r0.core[k]) for k in r.core)
    assert 0 < decoded < 0.9 * latent  # (0.79 against 1.11 when written)


def test_the_decoded_loss_is_refused_with_dp_and_outside_the_federated_scope_and_an_unknown_loss_is_named():
    with pytest.raises(ConfigError, match=r'^mapping\.dp: patient-level DP-SGD is implemented for the latent loss only'):
        _cfg("mapping.federated_loss=decoded", "mapping.dp=true", "mapping.adapter_init=identity", "mapping.norm=group")
    with pytest.raises(ConfigError, match=r"mapping\.federated_loss"):
        _cfg("mapping.federated_loss=pixels")
    with pytest.raises(ConfigError, match=r'^mapping\.federated_loss: "decoded" needs mapping\.scope = "federated" .*\'shared\''):
        load_config(None, [*TINY, "mapping.federated_loss=decoded"])


def test_the_keyed_decoder_decodes_as_the_hospital_does_with_gradients_to_the_latents_only(tmp_path):
    from typer.testing import CliRunner

    from ppcmi.cli import app
    from ppcmi.client.site import Hospital
    from ppcmi.experiment import synth

    data = synth(tmp_path / "data", sites=1, patients_per_site=2, slices_per_patient=2, size=32, n_classes=3, seed=4)
    runner = CliRunner()
    for args in (["client", "keygen"], ["client", "train", "--data", str(data), "--name", "h1", "-q", "--set", "data.size=32",
                                        "--set", "autoencoder.epochs=1", "--set", "autoencoder.width=0.25"]):
        r = runner.invoke(app, [*args, "--site-dir", str(tmp_path / "site")])
        assert r.exit_code == 0, r.output
    h = Hospital(tmp_path / "site")
    g = torch.Generator().manual_seed(0)
    batch = h.training_batch(torch.rand(3, 1, 32, 32, generator=g).numpy(), torch.randint(0, 3, (3, 32, 32), generator=g).numpy())
    from ppcmi.protocol import LatentBatch

    reply = LatentBatch("reply", "h1", {k: v for k, v in batch.arrays.items() if k.startswith("zt_msk_")}, query="0" * 32)
    zt = {k[len("zt_msk_"):]: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in reply.arrays.items()}
    logits = h.keyed_decoder()(zt)
    assert logits.shape == (3, 3, 32, 32)
    assert torch.allclose(torch.softmax(logits, 1), h.scores(reply), atol=1e-5)
    logits.square().sum().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in zt.values())
    assert all(p.grad is None for p in h.models["mask"].parameters())  # (its own decoder is untouched)


@pytest.mark.slow
def test_core_membership_scores_m1_with_its_patient_permutation_on_a_real_federation(federated, tmp_path):
    """benchmarks/core_membership.py against the fixture's federation: one victim patient against one test patient,
    so whatever the AUC, relabelling the two patients gives 1 - AUC or AUC: p is exactly 1, and the table says so."""
    import importlib.util

    _, _, out, _, _, _ = federated
    spec = importlib.util.spec_from_file_location("core_membership", Path(__file__).resolve().parents[1] / "benchmarks" / "core_membership.py")
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    r = cm.main(["--run", str(out), "--references", "0", "--tag", "t", "--out", str(tmp_path)])
    m1 = r["results"]["M1"]
    q = m1["patient_permutation"]
    assert r["colluder"] == "hospital1" and r["victims"] == ["hospital2"]
    assert q["member_patients"] == 1 and q["nonmember_patients"] == 1 and q["p_two_sided"] == 1.0
    assert q["observed_auc"] == pytest.approx(m1["attack"]["auc"], abs=1e-12)
    assert r["rows"]["victim_members"] > 0 and r["rows"]["nonmembers"] > 0
    md = (tmp_path / "core-membership-t.md").read_text()
    assert "p = 1.000 (1 / 1 patients)" in md
