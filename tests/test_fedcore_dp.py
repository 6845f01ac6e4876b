"""Patient-level DP-SGD in the federated core's rounds (ppcmi.client.dp): the mechanism, its accounting, the rounds."""

import json
import math

import pytest
import torch

pytest.importorskip("opacus")

from ppcmi.client import dp as DP  # noqa: E402
from ppcmi.client import fedcore  # noqa: E402
from ppcmi.config import load_config  # noqa: E402
from ppcmi.errors import ConfigError, PpcmiError  # noqa: E402
from ppcmi.flower.core_wire import initial_core  # noqa: E402

from test_fedcore import TINY, _pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DPCFG = ["mapping.scope=federated", "mapping.dp=true", "mapping.adapter_init=identity", "mapping.norm=group"]


def _cfg(*extra):
    return load_config(None, [*TINY, *DPCFG, *extra])


def _mech(sigma=0.0, clip=1.0, q=1.0, n=3):
    return DP.PatientDP(sigma, clip, q, max(1, round(1 / q)), n, 1 / n)


class _Lin(torch.nn.Module):
    """loss = mean over rows of (w . x - y)^2 / 2: per-row gradient (w . x - y) x, by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))


def _lin_loss(m, batch):
    x, y = batch
    return 0.5 * ((x @ m.w - y) ** 2).mean()


def test_the_mechanism_for_a_budget_reaches_the_target_epsilon_per_patient():
    cfg = _cfg("mapping.dp_epsilon=4", "mapping.dp_patients=8").mapping
    m = DP.plan_dp(cfg, 40, 10)
    assert (m.sample_rate, m.steps_per_epoch, m.n_patients, m.delta) == (0.2, 5, 40, 1 / 40)
    assert m.max_grad_norm == cfg.dp_clip and m.noise_multiplier > 0.5
    assert m.epsilon(0) == 0.0 and m.epsilon(10) < m.epsilon(25) < m.epsilon(50)
    assert abs(m.epsilon(50) - 4.0) < 0.05  # the whole budget: 10 epochs x 5 steps
    few = DP.plan_dp(cfg, 5, 10)  # fewer patients than a step's expected 8: every patient every step
    assert (few.sample_rate, few.steps_per_epoch) == (1.0, 1)
    fixed = DP.plan_dp(_cfg("mapping.dp_noise=2.5").mapping, 40, 10)
    assert fixed.noise_multiplier == 2.5 and fixed.report(7)["steps"] == 7 and fixed.report(7)["unit"].startswith("one patient")


def test_rows_are_mapped_to_their_planes_patients_through_every_copy():
    patient, names = DP.patients_of_rows(["p2", "p1", "p2"], 6)  # 3 planes, 2 copies (planes, then the copies' block)
    assert names == ["p1", "p2"] and patient.tolist() == [1, 0, 1, 1, 0, 1]
    with pytest.raises(PpcmiError, match=r"^mapping.dp: 7 training rows are not whole copies of 3 planes$"):
        DP.patients_of_rows(["p2", "p1", "p2"], 7)


def test_the_private_gradient_is_the_sum_of_clipped_patient_means_plus_noise_over_the_expected_count():
    m = _Lin()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([0.0, 0.0, 1.0, 0.0])
    groups = [torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3])]  # patient 0 has two rows
    # by hand, residuals r = w.x - y: 1, -2, -2, 2; per-row gradients r x: (1, 0), (0, -2), (-2, -2), (4, 0);
    # per patient: (0.5, -1) (the mean of its two rows), (-2, -2), (4, 0)
    g, loss = DP.noisy_gradient(m, _lin_loss, [x, y], groups, [0, 1, 2], _mech(clip=100.0), torch.Generator().manual_seed(0),
                                batch_size=1)  # chunks of one row: a patient's mean over its chunks all the same
    assert torch.allclose(g[0], torch.tensor([2.5, -3.0]) / 3)
    assert math.isclose(loss, (0.5 * (1 + 4) / 2) + 0.5 * 4 + 0.5 * 4, rel_tol=1e-6)
    g, _ = DP.noisy_gradient(m, _lin_loss, [x, y], groups, [0, 1, 2], _mech(clip=1.0), torch.Generator().manual_seed(0), batch_size=4)
    clipped = [torch.tensor([0.5, -1.0]) / math.hypot(0.5, 1.0), torch.tensor([-1.0, -1.0]) / math.sqrt(2), torch.tensor([1.0, 0.0])]
    assert torch.allclose(g[0], sum(clipped) / 3, atol=1e-6)
    # a patient not chosen contributes nothing; another patient's rows do not change a patient's term
    g1, _ = DP.noisy_gradient(m, _lin_loss, [x, y], groups, [1], _mech(clip=1.0, q=1 / 3), torch.Generator(), batch_size=4)
    y2 = y.clone()
    y2[3] = 100.0
    g2, _ = DP.noisy_gradient(m, _lin_loss, [x, y2], groups, [1], _mech(clip=1.0, q=1 / 3), torch.Generator(), batch_size=4)
    assert torch.allclose(g1[0], clipped[1]) and torch.equal(g1[0], g2[0])
    # the noise: standard deviation sigma x clip before the division by q P (here 1 x 3 patients)
    draws = torch.stack([DP.noisy_gradient(m, _lin_loss, [x, y], groups, [], _mech(sigma=2.0, clip=0.5), gen, batch_size=4)[0][0]
                         for gen in [torch.Generator().manual_seed(1)] for _ in range(4000)])
    assert abs(float(draws.std()) * 3 - 1.0) < 0.03 and abs(float(draws.mean())) < 0.02


def test_dp_rounds_compose_their_epsilon_keep_the_final_weights_and_send_no_loss(tmp_path):
    cfg = _cfg("mapping.dp_noise=1.0", "mapping.dp_patients=2", "mapping.epochs=2")
    pairs = _pairs(12)  # 6 planes of 3 patients, 2 copies each
    groups = ["a", "b", "c", "a", "b", "c"]
    core = {k: torch.from_numpy(v) for k, v in initial_core(cfg).items()}
    one = fedcore.local_round(core, pairs, cfg.mapping, site="hospital1", site_dir=tmp_path, round_=1, rounds=2, local_epochs=1,
                              seed=3, init_seed=cfg.seed, groups=groups)
    two = fedcore.local_round(one.core, pairs, cfg.mapping, site="hospital1", site_dir=tmp_path, round_=2, rounds=2,
                              local_epochs=1, seed=3, init_seed=cfg.seed, groups=groups)
    mech = DP.plan_dp(cfg.mapping, 3, 2)
    assert (mech.sample_rate, mech.steps_per_epoch) == (2 / 3, 2)
    assert one.epsilon == pytest.approx(mech.epsilon(2)) and two.epsilon == pytest.approx(mech.epsilon(4)) and two.epsilon > one.epsilon
    assert math.isnan(one.train_loss) and math.isnan(two.train_loss)
    logged = json.loads((tmp_path / "fedcore" / "rounds" / "round-2.json").read_text())
    assert logged["train_loss"] is None and logged["dp"]["steps"] == 4 and logged["dp"]["n_patients"] == 3
    assert any(not torch.equal(two.core[k], one.core[k]) for k in one.core)
    again = fedcore.local_round(core, pairs, cfg.mapping, site="hospital1", site_dir=tmp_path / "again", round_=1, rounds=2,
                                local_epochs=1, seed=3, init_seed=cfg.seed, groups=groups)
    assert all(torch.equal(again.core[k], one.core[k]) for k in one.core)  # seeded: sampling, dropout, noise
    with pytest.raises(PpcmiError, match=r"^mapping.dp: a DP round needs the patient of every training row$"):
        fedcore.local_round(core, pairs, cfg.mapping, site="hospital1", site_dir=tmp_path / "x", round_=1, rounds=2,
                            local_epochs=1, seed=3, init_seed=cfg.seed)


def test_dp_settings_that_the_accounting_would_not_cover_are_refused():
    with pytest.raises(ConfigError, match=r'^mapping.dp: the default mapping.adapter_init = "pca" reads'):
        load_config(None, [*TINY, "mapping.scope=federated", "mapping.dp=true"])
    for scope in ("federated", "shared"):  # BatchNorm mixes a batch's rows (and cannot normalise a patient of one row)
        with pytest.raises(ConfigError, match=r'^mapping.dp: DP-SGD needs mapping.norm = "group"'):
            load_config(None, [*TINY, f"mapping.scope={scope}", "mapping.dp=true", "mapping.adapter_init=identity"])
    with pytest.raises(ConfigError, match=r"^mapping.dp_patients: "):
        _cfg("mapping.dp_patients=0")
    assert _cfg().mapping.federated_norm == "local"  # the GroupNorm affines stay at the hospital too
