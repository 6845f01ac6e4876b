"""Flower on loopback, no mocks: a real SuperLink with TLS and SuperNode authentication, real SuperNodes.

One tiny end-to-end ``ppcmi deploy --plan`` (2 hospitals, 32 x 32 synthetic data, 1 epoch per stage, a fingerprint round first) and a
second small federation for the failure paths: a SuperNode whose key is not registered is refused,
and a hospital whose ClientApp fails is asked again, then reported by name without its error text.
Every process is stopped in teardown and checked to be gone.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from typer.testing import CliRunner  # noqa: E402

from ppcmi import protocol  # noqa: E402
from ppcmi.certs import CA_CERT, SERVER_CERT, SERVER_KEY, init_ca  # noqa: E402
from ppcmi.cli import app  # noqa: E402
from ppcmi.config import Config, DataConfig  # noqa: E402
from ppcmi.errors import DataError, PpcmiError  # noqa: E402
from ppcmi.experiment import synth  # noqa: E402
from ppcmi.flower import wire  # noqa: E402
from ppcmi.flower.auth import PRIVATE, PUBLIC, supernode_keygen  # noqa: E402
from ppcmi.flower.deploy import (CONNECTION, DeployError, Processes, flower_env, free_ports, register, run_app, tool,  # noqa: E402
                                 wait_listening)
from ppcmi.flower.server_app import SERVER_DIR_ENV  # noqa: E402
from conftest import processes_mentioning  # noqa: E402

TINY = ["--set", "data.size=32", "--set", "data.group_csv=groups.csv", "--set", "data.partition=site",
        "--set", "data.test_frac=0.25", "--set", "autoencoder.width=0.25", "--set", "autoencoder.epochs=1",
        "--set", "autoencoder.send_copies=1", "--set", "mapping.epochs=1", "--set", "mapping.widen=[8,8,8]",
        "--set", "mapping.mid=[8,8]", "--set", "mapping.down=[8,8,8]",
        "--set", "chunk_bytes=12288"]  # two pairs per chunk (4 KB each): stage 2 takes several Flower rounds
METRIC_KEY = re.compile(r"^(n_cases|[A-Za-z0-9_]+\.(mean|std|n|n_undefined|ci95)|counts\.[A-Za-z0-9_]+\.[a-z_]+)$")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower")
    data = synth(root / "data", sites=2, patients_per_site=2, slices_per_patient=3, size=32, n_classes=2, seed=3)
    run = root / "run"
    r = CliRunner().invoke(app, ["deploy", "--sites", "2", "--data", str(data), "--out", str(run), "--retries", "1",
                                 "--timeout", "1800", "--plan", "--modality", "MR", *TINY])  # a fingerprint round first
    leftovers = processes_mentioning(str(run))
    assert r.exit_code == 0, f"exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    return root, data, run, r.output, leftovers


@pytest.mark.slow
def test_deploy_end_to_end_gives_metrics_for_both_hospitals(deployed):
    root, data, run, output, leftovers = deployed
    assert not leftovers, f"processes still running after deploy: {leftovers}"
    for row in ("| PPCMI-SF (Flower) | hospital1 |", "| PPCMI-SF (Flower) | hospital2 |", "| PPCMI-SF (Flower) | overall |"):
        assert row in output, output
    s = json.loads((run / "summary.json").read_text())
    assert s["deployment"]["tls"] and s["deployment"]["supernode_auth"]
    assert s["not_evaluated"] == []
    by = s["ppcmi"]["by_group"]
    assert set(by) == {"hospital1", "hospital2"}
    n_test = len(list((run / "test" / "images").iterdir()))
    all_dice = []
    for h, summ in by.items():
        assert summ["n_cases"] == n_test
        assert summ["counts"]["fg"]["ok"] + summ["counts"]["fg"]["pred_empty"] + summ["counts"]["fg"]["both_empty"] \
            + summ["counts"]["fg"]["gt_empty"] == n_test
        # per-case results stay at the hospital; the summary that crossed is their mean
        with open(next((run / "sites" / h / "site" / "eval").glob("run-*/per_case.csv"))) as f:
            local = list(csv.DictReader(f))
        assert sorted(r["case_id"] for r in local) == sorted(p.stem for p in (run / "test" / "images").iterdir())
        dice = [float(r["fg_dice"]) for r in local]
        assert summ["fg_dice"]["mean"] == pytest.approx(sum(dice) / len(dice), abs=1e-9), h
        all_dice += dice
    assert s["ppcmi"]["n_cases"] == 2 * n_test
    assert s["ppcmi"]["fg_dice"]["mean"] == pytest.approx(sum(all_dice) / len(all_dice), abs=1e-9)  # pooled over both hospitals
    for h in ("hospital1", "hospital2"):
        assert s["hospitals"][h]["stage1"]["status"] == "trained" and s["hospitals"][h]["stage1"]["image_epochs"] == 1
    assert (Path(s["server_dir"]) / "mapping" / "mapping.safetensors").exists()


@pytest.mark.slow
def test_deploy_plans_from_fingerprints_and_every_hospital_applies_the_plan(deployed):
    root, data, run, output, _ = deployed
    planned = json.loads((run / "plan.json").read_text())
    assert planned == json.loads((Path(json.loads((run / "summary.json").read_text())["server_dir"]) / "plan.json").read_text())
    assert planned["pooled"]["modality"] == "MR" and "modality MR, 2 classes" in output  # --modality, through node_config
    assert sorted(planned["pooled"]["hospitals"]) == ["hospital1", "hospital2"]
    # the user's --set values win and are recorded as overrides; the plan's other settings are applied
    assert planned["overrides"]["autoencoder.epochs"] == {"plan": planned["settings"]["autoencoder.epochs"], "used": 1}
    chosen = {k: v for k, v in planned["settings"].items() if k not in planned["overrides"]}
    assert {"data.intensity", "autoencoder.batch_size", "mapping.lr_schedule"} <= set(chosen)
    for h in ("hospital1", "hospital2"):
        site = json.loads((run / "sites" / h / "site" / "site.json").read_text())
        used = {f"{sec}.{k}": v for sec in ("data", "autoencoder") for k, v in site[sec].items()}
        assert {k: used[k] for k in chosen if k in used} == {k: v for k, v in chosen.items() if k in used}, h
        assert used["autoencoder.epochs"] == 1 and used["data.size"] == 32
    server = json.loads((Path(json.loads((run / "summary.json").read_text())["server_dir"]) / "config.json").read_text())
    assert server["mapping"]["lr_schedule"] == chosen["mapping.lr_schedule"] and server["mapping"]["epochs"] == 1


@pytest.mark.slow
def test_server_received_only_protocol_latents_and_metrics(deployed):
    root, data, run, output, _ = deployed
    server = next((run / "coordinator" / "server").glob("run-*"))
    entries = [json.loads(ln) for ln in (server / "received.jsonl").read_text().splitlines()]
    assert {e["step"] for e in entries} == {protocol.FINGERPRINT_STEP, protocol.STAGE1, protocol.TRAIN_LATENTS, protocol.TEST_LATENTS,
                                            protocol.SCORE}
    n_chunks = len(list((server / "wire").rglob("chunk-*.ppcmi")))
    assert n_chunks > 2 and sum(e["step"] == protocol.TRAIN_LATENTS for e in entries) == n_chunks  # one chunk per message
    assert len(entries) == 8 + n_chunks and not any("error" in e for e in entries)
    for e in entries:
        recs = e["records"]
        assert set(recs) in [set(x) for x in protocol.REPLY_RECORDS[e["step"]]], e
        if protocol.SITE in recs:
            assert recs[protocol.SITE]["keys"] == ["site", "status"]
            assert recs[protocol.SITE]["values"]["site"] in ("hospital1", "hospital2")
        if protocol.WIRE in recs:
            assert recs[protocol.WIRE] == {"type": "ArrayRecord", "keys": ["bytes"]}
        if protocol.METRICS in recs:
            keys = set(recs[protocol.METRICS]["keys"])
            assert keys == set(protocol.STAGE1_METRICS) if e["step"] == protocol.STAGE1 else all(METRIC_KEY.match(k) for k in keys), keys
    assert sorted(b.name for b in (server / "wire").iterdir()) == ["hospital1.fingerprint.json", "hospital1.query.ppcmi", "hospital1.train",
                                                                   "hospital2.fingerprint.json", "hospital2.query.ppcmi", "hospital2.train"]
    blobs = sorted(p for p in (server / "wire").rglob("*.ppcmi"))  # a training set is a folder of chunks
    for h in ("hospital1", "hospital2"):
        chunks = [protocol.decode(p.read_bytes()) for p in sorted((server / "wire" / f"{h}.train").iterdir())]
        assert [(c.index, c.count) for c in chunks] == [(i, len(chunks)) for i in range(len(chunks))]
        assert len({c.set_id for c in chunks}) == 1
    for b in blobs:
        msg = protocol.decode(b.read_bytes())
        where = b.name if b.parent == server / "wire" else b.parent.name
        assert msg.client == where.split(".")[0] and msg.kind == where.split(".")[1]
        assert all(name.startswith("zt_") for name in msg.arrays)
    # nothing private anywhere on the coordinator's side: case ids, data and site paths, key bytes
    secrets = [c.stem.encode() for c in (data / "images").iterdir()] + [str(data).encode(), str(run / "sites").encode()]
    for h in ("hospital1", "hospital2"):
        key = (run / "sites" / h / "site" / "klt.key").read_bytes()
        secrets += [key, key.hex().encode()]
    coordinator = [p for p in (run / "coordinator").rglob("*") if p.is_file()]
    coordinator += [run / "logs" / "superlink.log", run / "logs" / "flwr-run.log"]
    assert len(coordinator) > 10
    for p in coordinator:
        blob = p.read_bytes()
        leaks = [s for s in secrets if s in blob]
        assert not leaks, f"{p.relative_to(run)} holds private material {leaks[:3]}"


def _chunks(folder: Path) -> list:
    return [protocol.decode(p.read_bytes()) for p in sorted(folder.iterdir())]


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_simulate_trains_what_deploy_trains(deployed):
    """One configuration, two runners: ``simulate`` in one process and ``deploy`` on real Flower train the same
    autoencoders bit for bit, send the same keyed pairs, the coordinator's stage trains the same mapping
    network from them, and the hospitals' predictions score identically case by case (the stages and seeds
    are defined once, in the stage API).

    The mapping network is compared by training it from simulate's messages at the thread count the ServerApp
    had (all cores), because CPU float sums depend on the thread count: deploy runs each SuperNode with
    cores / sites threads and the ServerApp with all cores, while simulate runs every role under one setting."""
    import torch

    from ppcmi.config import from_dict, shared_settings
    from ppcmi.server.inbox import read_set
    from ppcmi.server.plan import apply_plan
    from ppcmi.server.mapping import train_mapping
    from ppcmi.simulate import run_simulation

    root, data, run, _, _ = deployed
    sim = root / "sim"
    raw = json.loads((run / "config.json").read_text())  # the configuration deploy resolved, before the plan
    planned = json.loads((run / "plan.json").read_text())  # and the plan's settings, as the hospitals applied them
    cfg, _ = apply_plan(from_dict({k: v for k, v in raw.items() if k != "data_dir"}), planned, planned["overrides"])
    server_cfg = json.loads((next((run / "coordinator" / "server").glob("run-*")) / "config.json").read_text())
    assert shared_settings(cfg) == shared_settings(from_dict({k: v for k, v in server_cfg.items() if k != "flower"}))
    for h in ("hospital1", "hospital2"):  # the same secret keys, so the same keyed latents can be compared
        (sim / "sites" / h).mkdir(parents=True)
        shutil.copy2(run / "sites" / h / "site" / "klt.key", sim / "sites" / h / "klt.key")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # as deploy gives each of its 2 SuperNodes
        run_simulation(cfg, data, sim, resume=True, progress=False)  # (resume: the folder already holds the keys)
        torch.set_num_threads(os.cpu_count() or 1)  # as the ServerApp runs
        sent = [c for h in ("hospital2", "hospital1") for c in _chunks(sim / "wire" / f"{h}.train")]
        train_mapping(sent, cfg.mapping, root / "sim-mapping", seed=cfg.seed, progress=False)  # (any arrival order)
    finally:
        torch.set_num_threads(threads)
    server = next((run / "coordinator" / "server").glob("run-*"))
    for h in ("hospital1", "hospital2"):
        for ae in ("image_ae", "mask_ae"):
            a, b = _tensors(sim / "sites" / h / ae / "model.safetensors"), _tensors(run / "sites" / h / "site" / ae / "model.safetensors")
            assert a.keys() == b.keys()
            differ = [k for k in a if a[k].shape != b[k].shape or (a[k] != b[k]).any()]
            assert not differ, f"{h} {ae}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
        mine = read_set(sim / "wire" / f"{h}.train")
        got = read_set(server / "wire" / f"{h}.train")
        assert mine.arrays.keys() == got.arrays.keys() and mine.n == got.n
        assert all((mine.arrays[k] == got.arrays[k]).all() for k in mine.arrays), f"{h}: the keyed training pairs differ"
    a, b = _tensors(root / "sim-mapping" / "mapping.safetensors"), _tensors(server / "mapping" / "mapping.safetensors")
    assert a.keys() == b.keys()
    differ = [k for k in a if (a[k] != b[k]).any()]
    assert not differ, f"the mapping networks differ in {len(differ)} of {len(a)} tensors, e.g. {differ[:3]}"
    # the same label maps: simulate's sites send the same query latents, and scoring the coordinator stage's
    # replies with the SuperNode's own scoring stage gives deploy's per-case results exactly
    from ppcmi.client.node import NodeSite, score, test_latents
    from ppcmi.server.mapping import MappingServer

    mapper = MappingServer(root / "sim-mapping")
    for h in ("hospital1", "hospital2"):
        node = NodeSite.from_node_config({"site-dir": str(sim / "sites" / h), "data-dir": str(run / "sites" / h / "data"),
                                          "test-dir": str(run / "test"), "name": h})
        sent = protocol.decode((server / "wire" / f"{h}.query.ppcmi").read_bytes())
        again = test_latents(node, cfg)  # simulate's site, encoding deploy's test folder
        assert all((sent.arrays[k] == again.arrays[k]).all() for k in sent.arrays), f"{h}: the queries differ"
        score(node, cfg, mapper.handle(again), root / "sim-eval" / h)  # (the same arrays as deploy's query)
        mine = (root / "sim-eval" / h / "per_case.csv").read_text()
        theirs = next((run / "sites" / h / "site" / "eval").glob("run-*/per_case.csv")).read_text()
        assert mine == theirs, f"{h}: per-case results differ"


# ----------------------------------------------------------------------------- failure paths


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink (TLS, SuperNode authentication) with one registered SuperNode whose data folder is missing."""
    root = tmp_path_factory.mktemp("federation")
    certs = root / "certs"
    init_ca(certs)
    supernode_keygen(root / "registered")
    supernode_keygen(root / "stranger")
    logs = root / "logs"
    logs.mkdir()
    link_port, node_port, stranger_port = free_ports(3)
    cli = root / "cli"
    cli.mkdir()
    (cli / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n[superlink.{CONNECTION}]\n'
                                     f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{certs / CA_CERT}"\n')
    procs = Processes(logs)
    try:
        procs.start("superlink", [tool("flower-superlink"), "--ssl-ca-certfile", str(certs / CA_CERT), "--ssl-certfile",
                                  str(certs / SERVER_CERT), "--ssl-keyfile", str(certs / SERVER_KEY), "--enable-supernode-auth",
                                  "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link_port)],
                    flower_env(root / "link-home", **{SERVER_DIR_ENV: str(root / "server")}))
        wait_listening(procs, "superlink", link_port)
        register(root / "registered" / PUBLIC, flower_env(cli), logs / "register.log")
        node_config = f"site-dir='{root / 'site'}' data-dir='{root / 'no-such-data'}' name=\"hospital9\" threads=1"
        procs.start("hospital9", [tool("flower-supernode"), "--superlink", f"127.0.0.1:{link_port}", "--root-certificates",
                                  str(certs / CA_CERT), "--auth-supernode-private-key", str(root / "registered" / PRIVATE),
                                  "--port", str(node_port), "--node-config", node_config], flower_env(root / "node-home"))
        wait_listening(procs, "hospital9", node_port)
        yield root, procs, link_port, stranger_port
    finally:
        procs.stop()
        assert not processes_mentioning(str(root)), "processes still running after teardown"


@pytest.mark.slow
def test_unregistered_supernode_is_refused(federation):
    root, procs, link_port, stranger_port = federation
    own = Processes(root / "logs")  # the federation's watch list must not see this one exit
    try:
        p = own.start("stranger", [tool("flower-supernode"), "--superlink", f"127.0.0.1:{link_port}", "--root-certificates",
                                   str(root / "certs" / CA_CERT), "--auth-supernode-private-key", str(root / "stranger" / PRIVATE),
                                   "--port", str(stranger_port), "--node-config", "name=\"intruder\""],
                      flower_env(root / "stranger-home"))
        assert p.wait(timeout=300) != 0  # it gives up: it never gets a node id, so it can pull no message
    finally:
        own.stop()
    log = (root / "logs" / "stranger.log").read_text()
    assert "Failed to initialize the connection to the SuperLink" in log and "SuperNode ID" not in log
    assert "No SuperNode found with the given public key" in (root / "logs" / "superlink.log").read_text()
    assert "SuperNode ID" in (root / "logs" / "hospital9.log").read_text()  # the registered one did connect


@pytest.mark.slow
def test_error_reply_is_retried_then_reported_by_name_without_its_text(federation):
    root, procs, _, _ = federation
    cfg = Config(data=DataConfig(size=32, labels="0,1"))
    wire.write_app(root / "app", cfg, wire.FlowerSettings(nodes=1, retries=1, timeout=1800, connect_timeout=600))
    with pytest.raises(DeployError) as e:
        run_app(root / "app", flower_env(root / "cli"), procs, root / "server", timeout=3600)
    msg = str(e.value)
    assert "train.autoencoders: node " in msg and "(after 2 attempts)" in msg, msg
    assert "hospital9: stage 1 (autoencoder training) failed (DataError)" in msg, msg
    assert "no-such-data" not in msg.splitlines()[0]  # the hospital's path stayed in its own log
    received = [json.loads(ln) for ln in next((root / "server").glob("run-*/received.jsonl")).read_text().splitlines()]
    assert len(received) == 2 and all("error" in r and "no-such-data" not in r["error"]["reason"] for r in received)
    assert "no-such-data" in (root / "logs" / "hospital9.log").read_text()


@pytest.mark.slow
def test_sigterm_stops_every_process_deploy_started(tmp_path):
    data = synth(tmp_path / "data", sites=2, patients_per_site=2, slices_per_patient=2, size=32, n_classes=2, seed=4)
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "ppcmi.cli", "deploy", "--sites", "2", "--data", str(data), "--out", str(run),
                          *TINY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        reader = threading.Thread(target=lambda: seen.extend(p.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 600  # bounded; a few seconds on an idle machine
        while not any("SuperNodes started" in ln for ln in seen) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("SuperNodes started" in ln for ln in seen), "".join(seen)
        assert processes_mentioning(str(run))  # the federation is up
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=180) == 130, "".join(seen)
        reader.join(timeout=10)
        assert "interrupted" in "".join(seen)
        assert not processes_mentioning(str(run)), "processes survived SIGTERM"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = CliRunner().invoke(app, ["deploy", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--port", str(port)])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == f"error: port {port} on 127.0.0.1 is in use; choose another --port"


# ----------------------------------------------------------------------------- a hospital's data folder, in its dataset's layout


def _nifti(path: Path, arr) -> None:
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([0.8, 0.9, 3.0, 1.0])), str(path))


def _nnunet(root: Path, flavour: str) -> Path:
    """Five 3D cases: v2 (two channel files CASE_0000, CASE_0001 each) or MSD / v1 (a 'training' and a 'test' list)."""
    import numpy as np

    rng = np.random.default_rng(11)
    cases = [f"pt{k}" for k in range(5)]
    for i, case in enumerate(cases):
        m = np.zeros((12, 10, 3), np.uint8)
        m[2 + i % 3:8, 3:7, :] = 1
        m[4:6, 4:6, 1:] = 2
        _nifti(root / "labelsTr" / f"{case}.nii.gz", m)
        for c in range(2 if flavour == "v2" else 1):
            name = f"{case}_{c:04d}" if flavour == "v2" else case
            _nifti(root / "imagesTr" / f"{name}.nii.gz", (rng.normal(size=m.shape) + 50 * c + 10 * m).astype(np.float32))
    _nifti(root / "imagesTs" / ("new_0000.nii.gz" if flavour == "v2" else "new.nii.gz"), np.zeros((12, 10, 3), np.float32))
    if flavour == "v2":
        meta = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "zone": 1, "lesion": 2},
                "numTraining": 5, "file_ending": ".nii.gz"}
    else:
        meta = {"name": "TOY", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "zone", "2": "lesion"},
                "numTraining": 5, "numTest": 1, "test": ["./imagesTs/new.nii.gz"],
                "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _same_cases(mine: list, theirs: list) -> None:
    """The same case ids, slices, channel counts, file names, groups, labels and ROIs, and the same raw planes."""
    import numpy as np

    from ppcmi.data import read_case_mask, read_image

    assert [c.case_id for c in mine] == [c.case_id for c in theirs]
    for a, b in zip(mine, theirs):
        assert (a.slice_index, a.group, a.labels, a.rois, len(a.image_paths)) == (b.slice_index, b.group, b.labels, b.rois,
                                                                                  len(b.image_paths)), a.case_id
        assert [p.name for p in a.image_paths] == [p.name for p in b.image_paths]
        np.testing.assert_array_equal(read_image(a.image_source, a.slice_index)[0], read_image(b.image_source, b.slice_index)[0])
        np.testing.assert_array_equal(read_case_mask(a)[0], read_case_mask(b)[0])


@pytest.mark.parametrize("flavour", ["v2", "v1"])
def test_supernode_data_folders_keep_the_nnunet_layout_and_discover_to_the_same_cases(tmp_path, flavour):
    from ppcmi.data import dataset_info, discover_cases
    from ppcmi.data.discovery import dataset_modalities
    from ppcmi.flower.deploy import deal

    data = _nnunet(tmp_path / "Dataset007_Toy", flavour)
    run = tmp_path / "run"
    cfg, pl = deal(Config(clients=2, data=DataConfig(size=32, test_frac=0.2)), data, run)
    assert cfg.data.labels == "0,1,2" and cfg.data.class_names == "background,zone,lesion" and cfg.data.rois is None
    folders = {n: run / "sites" / n / "data" for n in pl.hospitals} | {"test": run / "test"}
    dealt = pl.hospitals | {"test": pl.test}
    assert sorted(c.group for cases in dealt.values() for c in cases) == sorted(c.group for c in discover_cases(data))
    for name, folder in folders.items():
        assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
        _same_cases(discover_cases(folder), dealt[name])
        assert dataset_modalities(folder) == dataset_modalities(data)  # what the hospital's fingerprint reads
        meta = json.loads((folder / "dataset.json").read_text())
        groups = sorted({c.group for c in dealt[name]})
        assert meta["numTraining"] == len(groups) and dataset_info(folder)["num_test"] == 0
        if flavour == "v1":
            assert [Path(e["label"]).name for e in meta["training"]] == [f"{g}.nii.gz" for g in groups]
            assert "test" not in meta and meta["numTest"] == 0
        else:
            assert len(list((folder / "imagesTr").iterdir())) == 2 * len(groups)  # both channels of every case


def test_supernode_data_folders_of_a_dicom_rt_export_keep_its_rois(tmp_path):
    from test_formats import _ct_series, _rt_image, _rtstruct

    from ppcmi.client.node import NodeSite, fingerprint
    from ppcmi.data import discover_cases, link_cases
    from ppcmi.flower.deploy import deal

    image = _rt_image()
    export = tmp_path / "export"
    for p in ("p1", "p2", "p3"):
        _ct_series(export / p / "CT", image)
        _rtstruct(export / p / "RTSTRUCT" / "rs.dcm", export / p / "CT", image)
    base = Config(clients=2, data=DataConfig(size=32, test_frac=0.3))
    cfg, pl = deal(base, export, tmp_path / "run")
    assert cfg.data.rois == "Body,Cord,Tumour" and cfg.data.class_names == "background,Body,Cord,Tumour"  # fixed for every hospital
    node = tmp_path / "run" / "sites" / "hospital1" / "data"
    (patient,) = [p.name for p in node.iterdir()]
    assert sorted(str(p.relative_to(node)) for p in node.rglob("*") if p.is_symlink()) == [f"{patient}/CT", f"{patient}/RTSTRUCT/rs.dcm"]
    for name, folder in {n: tmp_path / "run" / "sites" / n / "data" for n in pl.hospitals}.items():
        _same_cases(discover_cases(folder, rois=cfg.data.roi_names()), pl.hospitals[name])
    _same_cases(discover_cases(tmp_path / "run" / "test", rois=cfg.data.roi_names()), pl.test)
    fp = fingerprint(NodeSite(tmp_path / "site", node, "hospital1"), cfg)  # as the SuperNode reads its folder
    assert fp.modality == "CT"
    with pytest.raises(PpcmiError, match=r"^data\.rois: .*rs\.dcm is an RTSTRUCT; .*--set data\.rois=Body,Cord,Tumour\) so that every"):
        fingerprint(NodeSite(tmp_path / "site", node, "hospital1"), replace_rois(cfg, None))  # each site's own default: refused

    chosen = replace_rois(base, "Tumour, Body")
    cfg2, pl2 = deal(chosen, export, tmp_path / "run2")
    assert cfg2.data.rois == "Tumour, Body" and cfg2.data.class_names == "background,Tumour,Body"
    _same_cases(discover_cases(tmp_path / "run2" / "test", rois=cfg2.data.roi_names()), pl2.test)
    with pytest.raises(DataError, match=r"p\d/RTSTRUCT/rs\.dcm: no ROI named 'Lung' \(the RTSTRUCT holds 'Body', 'Tumour', 'Cord'\)"):
        deal(replace_rois(base, "Body,Lung"), export, tmp_path / "run3")

    flat = tmp_path / "flat"  # one patient's flat export: the series and its RTSTRUCT in one folder
    _ct_series(flat, image)
    _rtstruct(flat / "rs.dcm", flat, image)
    _same_cases(discover_cases(link_cases(discover_cases(flat), flat, tmp_path / "flat-linked")), discover_cases(flat))


def replace_rois(cfg: Config, rois: str) -> Config:
    from dataclasses import replace

    return replace(cfg, data=replace(cfg.data, rois=rois))


def test_deploy_modality_needs_the_plan_and_a_plain_name(tmp_path):
    r = CliRunner().invoke(app, ["deploy", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--modality", "MR"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == ["error: --budget/--modality: they steer the plan; add --plan"]
    r = CliRunner().invoke(app, ["deploy", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--plan", "--modality", "M R"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == ["error: --modality: a name such as CT, MR or US, got 'M R'"]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the wire, without processes


def _batch(kind: str = "train", client: str = "hospital1"):
    import numpy as np

    prefixes = protocol.KIND_PREFIXES[kind]
    arrays = {f"{p}b": np.ones((2, 4, 1, 1), np.float32) for p in prefixes}
    return protocol.LatentBatch(kind, client, arrays)


def test_run_config_carries_shared_settings_only_and_round_trips(tmp_path):
    """No hospital or experiment setting enters the run configuration every node and the coordinator see."""
    from dataclasses import replace

    from flwr.common.config import flatten_dict

    from ppcmi.config import EXPERIMENT, HOSPITAL, reader, setting_names, shared_settings
    from ppcmi.demo import demo_config
    from ppcmi.flower.wire import read_run_config, run_config

    cfg = demo_config()
    cfg = replace(cfg, clients=7, data=replace(cfg.data, labels="0,1", group_csv="/private/groups.csv", group_regex="^(pt_secret)_",
                                               partition="site", test_frac=0.3, resize="squash"),
                  autoencoder=replace(cfg.autoencoder, send_noise=0.123457))
    rc = run_config(cfg, wire.FlowerSettings(nodes=3, retries=1))
    flat = flatten_dict(rc)
    assert set(HOSPITAL) | set(EXPERIMENT) <= set(setting_names(cfg))  # the reader table names real settings
    assert {k for k in flat if not k.startswith("flower.")} == {n for n in setting_names(cfg) if reader(n) == "shared"}
    wire.write_app(tmp_path, cfg, wire.FlowerSettings(nodes=3))
    written = (tmp_path / "pyproject.toml").read_text()
    for private in ("/private/groups.csv", "pt_secret", "0.123457", "send_noise", "partition"):
        assert private not in written and private not in str(flat), private
    back, settings = read_run_config(flat)
    assert settings == wire.FlowerSettings(nodes=3, retries=1)
    assert shared_settings(back) == shared_settings(cfg)
    assert back.data.resize == "squash"  # a shared setting: every hospital resizes the same way
    assert back.data.group_csv is None and back.autoencoder.send_noise == 0.0 and back.clients == 3  # never sent


def test_write_app_is_a_valid_flower_app(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    wire.write_app(tmp_path, Config(data=DataConfig(size=32, labels="0,1")), wire.FlowerSettings(nodes=2))
    config, _ = load_and_validate(tmp_path / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "ppcmi.flower.client_app:app"
    assert config["tool"]["flwr"]["app"]["config"]["flower"]["nodes"] == 2


def test_replies_are_checked_before_use():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from ppcmi.errors import ProtocolError

    content = wire.wire_record(_batch())
    wire.check_reply(content, protocol.TRAIN_LATENTS)
    msg, blob = wire.read_wire(content, kind="train", client="hospital1")
    assert msg.n == 2 and protocol.decode(blob).client == "hospital1"
    with pytest.raises(ProtocolError, match="expected 'hospital2'"):
        wire.read_wire(content, kind="train", client="hospital2")
    with pytest.raises(ProtocolError, match="expected a 'query'"):
        wire.read_wire(content, kind="query")
    extra = wire.wire_record(_batch())
    extra["note"] = ConfigRecord({"file": "patient1.png"})
    with pytest.raises(ProtocolError, match="not allowed"):
        wire.check_reply(extra, protocol.TRAIN_LATENTS)
    bad_site = RecordDict({protocol.SITE: ConfigRecord({"site": "hospital1", "status": "trained", "path": "/data"}),
                           protocol.METRICS: MetricRecord({"seconds": 1.0})})
    with pytest.raises(ProtocolError, match="exactly the strings"):
        wire.check_reply(bad_site, protocol.STAGE1)
    columns = wire.summary_structures(Config(data=DataConfig(labels="0,1")))
    with pytest.raises(ProtocolError, match="unexpected key 'patient7.mean'"):
        protocol.unflatten_summary({"n_cases": 2, "patient7.mean": 0.5}, columns)
    with pytest.raises(ProtocolError, match="unexpected key 'counts.patient7.ok'"):
        protocol.unflatten_summary({"n_cases": 2, "counts.patient7.ok": 1}, columns)


def test_metric_summary_round_trips_through_a_metric_record():
    from flwr.app import MetricRecord

    summ = {"n_cases": 3, "fg_dice": {"mean": 0.8, "std": 0.1, "n": 3, "n_undefined": 0, "ci95": [0.7, 0.9]},
            "fg_hd95_mm": {"mean": float("nan"), "std": float("nan"), "n": 0, "n_undefined": 3, "ci95": [float("nan")] * 2},
            "counts": {"fg": {"ok": 3, "both_empty": 0, "pred_empty": 0, "gt_empty": 0}}, "empty_rule": "text"}
    columns = wire.summary_structures(Config(data=DataConfig(labels="0,1", class_names="bg,fg1")))
    summ["fg1_dice"] = summ["fg_dice"]
    back = protocol.unflatten_summary(dict(MetricRecord(protocol.flatten_summary(summ))), columns)
    assert back["fg_dice"] == summ["fg_dice"] and back["counts"] == summ["counts"] and back["n_cases"] == 3
    assert back["fg_hd95_mm"]["n_undefined"] == 3


def test_flower_commands_have_help_and_write_their_files(tmp_path):
    runner = CliRunner()
    for cmd in (["deploy"], ["certs", "init"], ["flower", "keygen"], ["flower", "app"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, (cmd, r.output)
    assert runner.invoke(app, ["flower", "keygen", "--out", str(tmp_path / "auth")]).exit_code == 0
    assert oct((tmp_path / "auth" / PRIVATE).stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "auth" / PUBLIC).read_text().startswith("ecdsa-sha2-nistp384 ")
    r = runner.invoke(app, ["flower", "keygen", "--out", str(tmp_path / "auth")])
    assert r.exit_code == 2 and "refusing to overwrite" in r.output
    r = runner.invoke(app, ["flower", "app", "--out", str(tmp_path / "app"), "--nodes", "2"])
    assert r.exit_code == 2 and "data.labels" in r.output
