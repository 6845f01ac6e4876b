"""Devices (ppcmi.device): --device resolution and its one-line errors, CPU results unchanged by the device code, keys
that give one transform on every device, checkpoints that load anywhere; on a CUDA machine also CPU-vs-CUDA agreement,
checkpoints crossing between the two, and the service mapping on the GPU (skipped without a GPU).

Tolerances of the CUDA section (stated once, here): in float32 on CUDA (TF32 convolutions allowed, torch's default) the
keyed latents of the same trained networks differ from the CPU's by at most ``FP32_LATENT_TOL`` of their largest
magnitude and the class probabilities by at most ``FP32_PROB_TOL``; under the default mixed precision (bf16, or fp16)
the probabilities differ by at most ``MIXED_PROB_TOL``, and of the pixels the CPU labels with a margin of at least
``CONFIDENT`` between its top two classes, at least ``MIXED_LABEL_AGREEMENT`` get the CPU's label.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ppcmi import protocol
from ppcmi.augment import batch_augmenter
from ppcmi.cli import app as cli_app
from ppcmi.client.site import Hospital
from ppcmi.config import from_dict
from ppcmi.device import autocast, grad_scaler, mixed_dtype, resolve_device, to_numpy
from ppcmi.errors import ConfigError
from ppcmi.experiment import synth
from ppcmi.klt import KeyedLatentTransform
from ppcmi.server.mapping import MappingServer
from ppcmi.simulate import load_test, plan
from ppcmi.training import FitConfig, fit, host_state, load_weights, save_weights, seeded_init

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
FP32_PROB_TOL = 1e-2
FP32_LATENT_TOL = 1e-2
MIXED_PROB_TOL = 0.1
CONFIDENT = 0.1
MIXED_LABEL_AGREEMENT = 0.99
runner = CliRunner()


# ----------------------------------------------------------------------------- resolving --device


def test_cpu_and_none_resolve_to_the_cpu():
    for spec in ("cpu", "CPU", " cpu ", None, torch.device("cpu")):
        assert resolve_device(spec) == torch.device("cpu")


def test_auto_prefers_cuda_then_mps_then_the_cpu():
    want = "cuda" if CUDA else "mps" if MPS else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device().type == want


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cuda0", "", "cpu:0", "tpu", 3, 1.5])
def test_a_malformed_device_is_a_one_line_config_error(spec):
    with pytest.raises(ConfigError) as e:
        resolve_device(spec)
    assert str(e.value).startswith("--device: must be auto, cpu, cuda, cuda:N or mps")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_one_line_error_naming_the_option(spec):
    with pytest.raises(ConfigError, match=rf"^--device: {spec} is not available here \(torch .* sees no CUDA GPU\); use cpu or auto$"):
        resolve_device(spec)


@needs_cuda
def test_a_gpu_index_past_the_last_is_a_one_line_error():
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"^--device: cuda:{n} is not available here \({n} CUDA GPU"):
        resolve_device(f"cuda:{n}")


@pytest.mark.skipif(MPS, reason="this machine has MPS")
def test_mps_without_apple_silicon_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^--device: mps is not available here"):
        resolve_device("mps")


def test_the_error_names_the_setting_it_came_from():
    with pytest.raises(ConfigError, match=r"^node_config: device: must be"):
        resolve_device("gpu", where="node_config: device")


@pytest.mark.parametrize("argv", [["server", "map", "--model", "m", "--query", "q", "--out", "r"],
                                  ["client", "encode", "--site-dir", "s", "--data", "d", "--out", "o"],
                                  ["simulate", "--data", "d"], ["bench", "--dataset", "psfhs", "--data", "d", "--out", "o"],
                                  ["audit", "--run", "."]])
def test_cli_refuses_a_bad_device_in_one_line_before_any_work(argv, tmp_path):
    r = runner.invoke(cli_app, argv + ["--device", "gpu"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert lines == ["error: --device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"], r.output


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_cli_refuses_cuda_on_a_machine_without_one():
    r = runner.invoke(cli_app, ["server", "map", "--model", "m", "--query", "q", "--out", "r", "--device", "cuda"])
    assert r.exit_code == 2
    assert r.output.strip().startswith("error: --device: cuda is not available here") and len(r.output.strip().splitlines()) == 1


def test_each_supernode_names_its_own_device_and_the_serverapp_its_own(tmp_path):
    from ppcmi.client.node import NodeSite
    from ppcmi.errors import PpcmiError

    base = {"site-dir": str(tmp_path / "site"), "data-dir": str(tmp_path / "data"), "name": "hospital1"}
    assert NodeSite.from_node_config(base).device == "auto"
    assert NodeSite.from_node_config({**base, "device": "cpu"}).device == "cpu"
    with pytest.raises(PpcmiError, match=r"^node_config: device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'$"):
        NodeSite.from_node_config({**base, "device": "gpu"})
    pytest.importorskip("flwr")
    from ppcmi.config import Config
    from ppcmi.flower import wire

    rc = wire.run_config(Config(), wire.FlowerSettings(nodes=2, server_device="cuda:1"))
    assert rc["flower"]["server-device"] == "cuda:1" and "device" not in rc  # the coordinator's, not a shared setting
    flat = {**{k: v for k, v in rc.items() if not isinstance(v, dict)},
            **{f"{sec}.{k}": v for sec, vals in rc.items() if isinstance(vals, dict) for k, v in vals.items()}}
    assert wire.read_run_config(flat)[1].server_device == "cuda:1"


# ----------------------------------------------------------------------------- precision


def test_float32_everywhere_but_cuda_by_default():
    cpu = torch.device("cpu")
    assert mixed_dtype(cpu) is None and mixed_dtype(cpu, False) is None
    assert mixed_dtype(cpu, True) is torch.bfloat16  # asked for: bf16 autocast on the CPU
    assert grad_scaler(cpu) is None and grad_scaler(cpu, True) is None  # bf16 needs no scaler
    x = torch.ones(2, 3)
    with autocast(cpu):
        assert (x @ x.T).dtype == torch.float32
    with autocast(cpu, True):
        assert (x @ x.T).dtype == torch.bfloat16


@needs_cuda
def test_cuda_defaults_to_bf16_or_fp16_with_a_scaler():
    dev = resolve_device("cuda")
    dtype = mixed_dtype(dev)
    assert dtype is (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert (grad_scaler(dev) is not None) == (dtype is torch.float16)
    assert mixed_dtype(dev, False) is None


def test_to_numpy_returns_float32_host_arrays():
    a = to_numpy(torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.tolist() == [[0, 1, 2], [3, 4, 5]]


# ----------------------------------------------------------------------------- keys: one transform on every device


def test_a_key_gives_the_same_matrices_whatever_the_cpu_device_spec(key):
    channels = {"s3": 8, "s4": 16, "b": 32}
    ref = KeyedLatentTransform(key, channels)
    for dev in (None, "cpu", torch.device("cpu"), resolve_device("cpu")):
        k = KeyedLatentTransform(key, channels, device=dev)
        for m in ("image", "mask"):
            for s in channels:
                assert torch.equal(k.matrix(m, s), ref.matrix(m, s))
                assert torch.equal(k.bias(m, s), ref.bias(m, s))


def test_the_transform_equals_the_cpu_derived_matrix_applied_by_hand(key):
    """T(z) = M z + b per pixel, M = P Q^T derived on the CPU in float64 from the key; applied here in float64."""
    channels = {"s3": 8, "b": 16}
    k = KeyedLatentTransform(key, channels, device="cpu")
    g = torch.Generator().manual_seed(5)
    z = {s: torch.randn(3, c, 4, 4, generator=g) for s, c in channels.items()}
    zt = k.forward(z, "image")
    for s in channels:
        m, b = k.matrix("image", s).double(), k.bias("image", s).double()
        want = torch.einsum("ij,bjhw->bihw", m, z[s].double()) + b[None, :, None, None]
        assert torch.allclose(zt[s].double(), want, atol=1e-5)
        assert torch.allclose(m @ m.T, torch.eye(channels[s], dtype=torch.float64), atol=1e-6)  # orthogonal
    back = k.inverse(zt, "image")
    for s in channels:
        assert torch.allclose(back[s], z[s], atol=1e-5)


@needs_cuda
def test_a_key_gives_the_same_transform_on_cuda(key):
    channels = {"s3": 8, "s4": 16, "b": 32}
    cpu, gpu = KeyedLatentTransform(key, channels), KeyedLatentTransform(key, channels, device="cuda")
    for m in ("image", "mask"):
        for s in channels:
            assert torch.equal(gpu.matrix(m, s).cpu(), cpu.matrix(m, s))  # derived on the CPU, then moved: bit for bit
    z = {s: torch.randn(2, c, 4, 4) for s, c in channels.items()}
    a = cpu.forward(z, "mask")
    b = gpu.forward({s: v.cuda() for s, v in z.items()}, "mask")
    for s in channels:
        assert torch.allclose(b[s].cpu(), a[s], atol=1e-5)


# ----------------------------------------------------------------------------- fit and checkpoints on the CPU


def _conv():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Conv2d(4, 1, 3, padding=1), torch.nn.Sigmoid())


def _images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g)


def _bce(m, b):
    return torch.nn.functional.binary_cross_entropy(m(b[0]), b[0])


FIT = FitConfig(epochs=3, batch_size=4, lr=1e-2, patience=10, seed=2)


def test_fit_on_the_cpu_equals_fit_without_a_device_bit_for_bit(tmp_path):
    x = _images()
    runs = {}
    for name, dev in (("none", None), ("cpu", "cpu"), ("auto-cpu", torch.device("cpu"))):
        m = seeded_init(_conv, 0)
        r = fit(m, _bce, [x[:8]], [x[8:]], FIT, tmp_path / name, progress=False, device=dev,
                augment=batch_augmenter(["image"]))
        runs[name] = (r.history, host_state(m))
    for name in ("cpu", "auto-cpu"):
        assert runs[name][0] == runs["none"][0]
        for k, v in runs["none"][1].items():
            assert torch.equal(runs[name][1][k], v), k
    for name in ("cpu", "auto-cpu"):  # and so do the checkpoints' bytes
        assert (tmp_path / name / "state.json").exists()
        best = sorted((tmp_path / name).glob("best-*.safetensors"))[0]
        assert best.read_bytes() == (tmp_path / "none" / best.name).read_bytes()


def test_mixed_precision_training_runs_the_stage_losses_under_autocast(tmp_path):
    """The CUDA default (autocast) on the CPU, in bf16: the autoencoder's BCE + Dice (float32 inside) and the mapping
    network's routed forward (mixed_forward, whose parts come out in bf16) train, and the weights stay float32."""
    from ppcmi.models import AEConfig, Autoencoder, MappingConfig, MappingNet
    from ppcmi.server.mapping import _loss_fn
    from ppcmi.training import bce_dice_loss

    x = torch.nn.functional.interpolate(_images(4), size=32)
    ae = seeded_init(lambda: Autoencoder(AEConfig(in_channels=1, width=0.25)), 0)
    r = fit(ae, lambda m, b: bce_dice_loss(m(b[0]), b[0]), [x], None, FitConfig(epochs=1, batch_size=2, lr=1e-2, patience=5, seed=1),
            tmp_path / "ae", progress=False, mixed=True)
    assert len(r.history) == 1 and np.isfinite(r.history[0]["train_loss"])
    assert all(p.dtype == torch.float32 for p in ae.parameters())
    net = seeded_init(lambda: MappingNet({"s3": 8, "b": 16}, {"s3": 8, "b": 16}, ["a", "b"],
                                         MappingConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8))), 0)
    g = torch.Generator().manual_seed(3)
    rows = [torch.tensor([0, 1] * 4), torch.randn(8, 8, 8, 8, generator=g), torch.randn(8, 16, 2, 2, generator=g),
            torch.randn(8, 8, 8, 8, generator=g), torch.randn(8, 16, 2, 2, generator=g)]
    r = fit(net, _loss_fn(["s3", "b"]), rows, None, FitConfig(epochs=3, batch_size=4, lr=1e-2, patience=5, seed=1), tmp_path / "map",
            progress=False, mixed=True)
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]


def test_checkpoints_are_host_tensors_and_load_onto_the_modules_device(tmp_path):
    m = seeded_init(_conv, 1).to(memory_format=torch.channels_last)
    state = host_state(m)
    assert all(v.device.type == "cpu" and v.is_contiguous() for v in state.values())
    save_weights(m, tmp_path / "w.safetensors")
    other = seeded_init(_conv, 2)
    load_weights(other, tmp_path / "w.safetensors")
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k])


def test_a_trained_site_and_server_on_the_cpu_give_the_same_bytes_as_without_a_device(tiny_run):
    """``Hospital(..., device="cpu")`` and ``MappingServer(..., device="cpu")`` are today's CPU path, bit for bit."""
    site, model, images = tiny_run["site"], tiny_run["model"], tiny_run["images"]
    old_h, new_h = Hospital(site), Hospital(site, device="cpu")
    old_s, new_s = MappingServer(model), MappingServer(model, device="cpu")
    q = old_h.protect(images, noise=0.1, seed=3)
    q2 = new_h.protect(images, noise=0.1, seed=3)
    for k in q.arrays:
        assert np.array_equal(q.arrays[k], q2.arrays[k])
    r, r2 = old_s.handle(q), new_s.handle(q)
    for k in r.arrays:
        assert np.array_equal(r.arrays[k], r2.arrays[k]) and r2.arrays[k].dtype == np.float32
    assert torch.equal(old_h.scores(r), new_h.scores(r2))
    assert new_h.scores(r2).device.type == "cpu"


# ----------------------------------------------------------------------------- a tiny trained run (module fixture)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The GPU benchmark's own path (simulate on the device, score, time, estimate, write) on tiny synthetic data on the
    CPU; its trained hospital and server are what the other tests compare devices on."""
    root = tmp_path_factory.mktemp("device")
    data = synth(root / "data", sites=2, patients_per_site=2, slices_per_patient=3, size=32, n_classes=3, seed=2)
    gpu = _gpu_bench()
    a = gpu.parse_args(["--data", str(data), "--out", str(root / "run"), "--results", str(root / "results"), "--quick",
                        "--reps", "1", "--batches", "1,2", "--set", "autoencoder.epochs=1", "--set", "mapping.epochs=1", "--set", "data.size=32", "--set", "autoencoder.width=0.25", "--set", "mapping.widen=[8, 8, 8]",
                        "--set", "mapping.mid=[8, 8]", "--set", "mapping.down=[8, 8, 8]", "--set", "clients=2"])
    record = gpu.run(a, torch.device("cpu"))
    cfg = from_dict({k: v for k, v in record["config"].items() if k != "data_dir"})
    images = load_test(plan(cfg, data))["images"][:4]
    return {"root": root, "record": record, "site": root / "run" / "sites" / "hospital1", "model": root / "run" / "server",
            "images": images}


def _gpu_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)


def _agreement(probs: torch.Tensor, ref: torch.Tensor) -> float:
    """The share of the pixels ``ref`` labels with a top-two margin of at least CONFIDENT that ``probs`` labels alike."""
    top2 = ref.topk(2, dim=1).values
    sure = (top2[:, 0] - top2[:, 1]) >= CONFIDENT
    same = probs.argmax(1) == ref.argmax(1)
    return same[sure].float().mean().item() if sure.any() else 1.0


@needs_cuda
def test_cpu_and_cuda_predictions_agree(tiny_run):
    site, model, images = tiny_run["site"], tiny_run["model"], tiny_run["images"]
    cpu_h, cpu_s = Hospital(site, device="cpu"), MappingServer(model, device="cpu")
    q = cpu_h.protect(images)
    p_cpu = cpu_h.scores(cpu_s.handle(q))
    # float32 on CUDA
    gpu_h, gpu_s = Hospital(site, device="cuda", mixed=False), MappingServer(model, device="cuda", mixed=False)
    assert next(gpu_h.models["image"].parameters()).is_cuda and next(gpu_s.model.parameters()).is_cuda
    qg = gpu_h.protect(images)
    for k in q.arrays:
        scale = np.abs(q.arrays[k]).max()
        assert np.abs(qg.arrays[k] - q.arrays[k]).max() <= FP32_LATENT_TOL * scale, k
    rg = gpu_s.handle(q)
    p_gpu = gpu_h.scores(rg)
    assert p_gpu.device.type == "cpu"
    assert (p_gpu - p_cpu).abs().max().item() <= FP32_PROB_TOL
    # the default mixed precision on CUDA
    mix_h, mix_s = Hospital(site, device="cuda"), MappingServer(model, device="cuda")
    p_mix = mix_h.scores(mix_s.handle(mix_h.protect(images)))
    assert (p_mix - p_cpu).abs().max().item() <= MIXED_PROB_TOL
    assert _agreement(p_mix, p_cpu) >= MIXED_LABEL_AGREEMENT


def _cuda_fit(tmp_path, name, device, epochs=3, resume=False, stop_at=None):
    m = seeded_init(_conv, 0)

    def stop(epoch, rec):
        if stop_at is not None and epoch == stop_at:
            raise KeyboardInterrupt

    r = fit(m, _bce, [_images()[:8]], [_images()[8:]], FitConfig(epochs=epochs, batch_size=4, lr=1e-2, patience=10, seed=2),
            tmp_path / name, progress=False, device=device, resume=resume, on_epoch=stop)
    return m, r


@needs_cuda
def test_a_checkpoint_saved_on_cuda_loads_on_the_cpu_and_back(tmp_path):
    m, _ = _cuda_fit(tmp_path, "gpu", "cuda")
    assert next(m.parameters()).is_cuda
    save_weights(m, tmp_path / "gpu.safetensors")
    cpu = seeded_init(_conv, 5)
    load_weights(cpu, tmp_path / "gpu.safetensors")
    for k, v in cpu.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, m.state_dict()[k].cpu())
    back = seeded_init(_conv, 6).cuda()
    load_weights(back, tmp_path / "gpu.safetensors")
    for k, v in back.state_dict().items():
        assert v.is_cuda and torch.equal(v.cpu(), cpu.state_dict()[k])


@needs_cuda
@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_run_interrupted_on_one_device_resumes_on_the_other(tmp_path, first, then):
    with pytest.raises(KeyboardInterrupt):
        _cuda_fit(tmp_path, "run", first, stop_at=2)
    m, r = _cuda_fit(tmp_path, "run", then, resume=True)
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    assert next(m.parameters()).device.type == then


@needs_cuda
def test_the_service_maps_on_the_gpu(tiny_run, tmp_path):
    uvicorn = pytest.importorskip("uvicorn")
    from ppcmi import certs
    from ppcmi.client.remote import ServiceClient
    from ppcmi.server.service import create_app, uvicorn_config

    tls = tmp_path / "tls"
    certs.init_ca(tls)
    certs.issue_client("hospital1", tls)
    app = create_app(tiny_run["model"], device="cuda")
    assert app.state.mapping.device.type == "cuda" and all(p.is_cuda for p in app.state.mapping.model.parameters())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, cert=tls / "server.pem", key=tls / "server.key", client_ca=tls / "ca.pem",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)
        h = Hospital(tiny_run["site"], device="cpu")
        q = h.protect(tiny_run["images"])
        with ServiceClient(f"https://127.0.0.1:{port}", cert=tls / "clients" / "hospital1.pem",
                           key=tls / "clients" / "hospital1.key", ca=tls / "ca.pem") as client:
            reply = protocol.decode(client.map(protocol.encode(q)))
    finally:
        server.should_exit = True
        thread.join(10)
    want = MappingServer(tiny_run["model"], device="cpu").handle(q)
    assert reply.query == q.query and reply.client == "hospital1"
    p_gpu, p_cpu = h.scores(reply), h.scores(want)
    assert (p_gpu - p_cpu).abs().max().item() <= MIXED_PROB_TOL  # the service maps in its default (mixed) precision
    assert _agreement(p_gpu, p_cpu) >= MIXED_LABEL_AGREEMENT


@needs_cuda
def test_rows_from_chunk_files_reach_the_gpu_through_loader_workers(tmp_path):
    """On CUDA, rows read from chunk files come through DataLoader workers into pinned memory by default; float32
    training gives the same weights as reading them in the training thread, within float32 rounding."""
    from ppcmi import protocol
    from ppcmi.server import inbox
    from ppcmi.training import loader_workers

    g = np.random.default_rng(3)
    arrays = {f"zt_{m}_{s}": g.standard_normal((19, 4, 8, 8)).astype(np.float32) for m in ("img", "msk") for s in ("s3", "s4", "b")}
    msg = protocol.LatentBatch("train", "h1", arrays)
    (tmp_path / "in").mkdir()
    for c in protocol.split(msg, 3 * (msg.nbytes() // msg.n) + 4096):
        (tmp_path / "in" / f"h1-{c.index}.ppcmi").write_bytes(protocol.encode(c))
    cols = inbox.pool_sets(inbox.open_sets([tmp_path / "in"]))[3]
    assert loader_workers(cols[1:], torch.device("cuda")) >= 1
    trained = []
    for workers in (None, 0):
        net = seeded_init(lambda: torch.nn.Conv2d(4, 4, 1), 0)
        fit(net, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), [cols[1], cols[4]], None,
            FitConfig(epochs=2, batch_size=4, patience=2, workers=workers), tmp_path / f"w{workers}", progress=False,
            device="cuda", mixed=False)
        trained.append({k: v.cpu() for k, v in net.state_dict().items()})
    assert all(torch.allclose(trained[0][k], trained[1][k], atol=1e-6) for k in trained[0])


# ----------------------------------------------------------------------------- the GPU benchmark, here where there is none


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: the benchmark would run")
def test_bench_gpu_refuses_in_one_line_without_a_gpu():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--quick"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: bench-gpu needs a CUDA GPU")
    assert not r.stdout.strip()


def test_bench_gpu_defaults_are_the_published_widths_and_schedule():
    from ppcmi.models import MappingConfig

    gpu = _gpu_bench()
    full, quick = gpu.config(gpu.parse_args([])), gpu.config(gpu.parse_args(["--quick"]))
    pub = MappingConfig.published()
    for cfg in (full, quick):
        assert cfg.data.size == 256 and cfg.autoencoder.width == 1.0 and cfg.data.labels == "0,1,2"
        assert (cfg.mapping.widen, cfg.mapping.mid, cfg.mapping.down) == (pub.widen, pub.mid, pub.down)
    assert (full.autoencoder.epochs, full.autoencoder.patience, full.mapping.epochs, full.mapping.patience) == (100, 15, 150, 20)
    assert quick.autoencoder.epochs == quick.mapping.epochs == 2


def test_bench_gpu_measures_end_to_end_on_any_device(tiny_run):
    rec, results = tiny_run["record"], tiny_run["root"] / "results"
    assert json.loads((results / "gpu-quick.json").read_text())["dice"] == rec["dice"]
    md = (results / "gpu-quick.md").read_text()
    assert [(r["precision"], r["batch"]) for r in rec["latency"]] == [("fp32", 1), ("fp32", 2), ("mixed", 1), ("mixed", 2)]
    assert all(r["total_ms"] > 0 and r["peak_gpu_mib"] is None for r in rec["latency"])
    assert rec["schedule"] == {"autoencoder.epochs": 1, "autoencoder.patience": 2, "mapping.epochs": 1, "mapping.patience": 2}
    e = rec["estimate"]
    assert e["autoencoders"] == 4 and e["stage2_full_s"] == pytest.approx(e["stage2_epoch_s"] * 150)
    assert e["stage1_full_s"] == pytest.approx(e["stage1_epoch_s"] * 100 * 4)
    assert "Full schedule, extrapolated" in md and md.count("\n| fp32") == 2
