"""Training sets in chunks: round trips, any arrival order, refusals by name, splitting under a limit, stage 2
streamed from chunk files on disk equal to stage 2 from one message in memory, bit for bit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ppcmi import protocol
from ppcmi.cli import app
from ppcmi.client.inference import encode_folder
from ppcmi.client.site import Hospital
from ppcmi.client.stages import write_training_set
from ppcmi.config import MappingTrainConfig
from ppcmi.errors import PpcmiError, ProtocolError
from ppcmi.experiment import synth
from ppcmi.server import inbox, mapping

runner = CliRunner()
TINY_AE = ["--set", "data.size=32", "--set", "autoencoder.epochs=1", "--set", "autoencoder.width=0.25"]
TINY_MAP = dict(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8), epochs=2, patience=5)


def _message(rng, n=10, client="h1", scales=("s3", "s4", "b")) -> protocol.LatentBatch:
    shapes = {"s3": (4, 8, 8), "s4": (8, 4, 4), "b": (16, 2, 2)}
    arrays = {f"zt_{m}_{s}": rng.standard_normal((n,) + shapes[s]).astype(np.float32) for m in ("img", "msk") for s in scales}
    return protocol.LatentBatch("train", client, arrays)


def _write(chunks, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in chunks:
        paths.append(folder / f"{c.client}-{c.index}.ppcmi")
        paths[-1].write_bytes(protocol.encode(c))
    return paths


def test_split_round_trip_and_headers(rng, tmp_path):
    msg = _message(rng, n=10)
    row = msg.nbytes() // msg.n
    chunks = protocol.split(msg, target=3 * row + 4096)
    assert [c.n for c in chunks] == [3, 3, 3, 1] and {c.count for c in chunks} == {4}
    assert len({c.set_id for c in chunks}) == 1 and protocol.QUERY_RE.match(chunks[0].set_id)
    blobs = [protocol.encode(c) for c in chunks]
    assert all(len(b) <= 3 * row + 4096 for b in blobs)
    back = [protocol.decode(b) for b in blobs]
    assert [(c.set_id, c.index, c.count) for c in back] == [(c.set_id, c.index, c.count) for c in chunks]
    whole = protocol.assemble(back[::-1])  # any order
    assert all(np.array_equal(whole.arrays[k], msg.arrays[k]) for k in msg.arrays)
    # the header of a chunk file, read without its arrays, says what decode says; nothing else is in it
    p = tmp_path / "c.ppcmi"
    p.write_bytes(blobs[2])
    h = protocol.read_header(p)
    assert (h.kind, h.client, h.set_id, h.index, h.count, h.n) == ("train", "h1", chunks[0].set_id, 2, 4, 3)
    meta = json.loads(blobs[2][8:8 + int.from_bytes(blobs[2][:8], "little")])["__metadata__"]
    assert set(meta) == {"ppcmi.version", "kind", "client", "set", "index", "count"}
    # an unchunked train message is a whole set of one, as before
    assert protocol.decode(protocol.encode(msg)).count == 1 and protocol.decode(protocol.encode(msg)).set_id == ""


def test_chunk_fields_are_validated(rng):
    arrays = _message(rng, n=2).arrays
    sid = protocol.new_set_id()
    for kwargs, match in (({"set_id": "x"}, "set: invalid set id"), ({"set_id": sid, "index": 3, "count": 3}, "index: chunk 3 of 3"),
                          ({"index": 1, "count": 2}, "carries no set id"), ({"set_id": sid, "count": 0}, "index:")):
        with pytest.raises(ProtocolError, match=match):
            protocol.LatentBatch("train", "h1", arrays, **kwargs)
    with pytest.raises(ProtocolError, match="never chunked"):
        protocol.LatentBatch("query", "h1", {k: v for k, v in arrays.items() if "img" in k}, set_id=sid)
    blob = protocol.encode(protocol.LatentBatch("train", "h1", arrays, set_id=sid, index=0, count=2))
    hacked = blob.replace(b'"count":"2"', b'"count":"x"')
    with pytest.raises(ProtocolError, match="count: not a small non-negative integer"):
        protocol.decode(hacked)


def test_open_sets_accepts_any_order_and_reads_the_same_rows(rng, tmp_path):
    a, b = _message(rng, n=11, client="h2"), _message(rng, n=5, client="h1")
    files = _write(protocol.split(a, 4 * (a.nbytes() // a.n) + 4096), tmp_path / "in") + \
        _write(protocol.split(b, 2 * (b.nbytes() // b.n) + 4096), tmp_path / "in")
    random.Random(0).shuffle(files)
    sets = inbox.open_sets(files)
    assert [(s.client, s.n, s.chunks) for s in sets] == [("h1", 5, 3), ("h2", 11, 3)]
    clients, _, _, cols = inbox.pool_sets(sets)
    assert clients == ["h1", "h2"] and cols[0].tolist() == [0] * 5 + [1] * 11
    mem = inbox.pool_sets(inbox.sets_from_batches([a, b]))[3]
    idx = torch.tensor([15, 0, 7, 3, 4, 5, 6, 12])
    for col, ref in zip(cols[1:], mem[1:]):
        assert torch.equal(col[idx], ref[idx]) and torch.equal(col.subset(idx)[torch.tensor([1, 0])], ref[idx[[1, 0]]])
    # a folder of chunks is a set too
    assert [s.n for s in inbox.open_sets([tmp_path / "in"])] == [5, 11]


def test_duplicate_mixed_and_incomplete_sets_are_refused_by_name(rng, tmp_path):
    msg = _message(rng, n=9)
    chunks = protocol.split(msg, 3 * (msg.nbytes() // msg.n) + 4096)
    files = _write(chunks, tmp_path / "a")
    with pytest.raises(ProtocolError, match=r"chunk 1 of 3 is missing") as e:
        inbox.open_sets([files[0], files[2]])
    assert "\n" not in str(e.value)
    dup = tmp_path / "dup.ppcmi"
    dup.write_bytes(files[1].read_bytes())
    with pytest.raises(ProtocolError, match=r"dup.ppcmi: repeats chunk 1 of set .* \(also .*h1-1.ppcmi\)"):
        inbox.open_sets(files + [dup])
    other = _write(protocol.split(msg, 3 * (msg.nbytes() // msg.n) + 4096), tmp_path / "b")
    with pytest.raises(ProtocolError, match=r"h1-0.ppcmi: chunk of set .*send one set per site"):
        inbox.open_sets(files + other[:1])
    with pytest.raises(ProtocolError, match=r"chunk 2 of 3 is missing"):
        protocol.assemble(chunks[:2])
    # a chunk file that was altered after it was written is refused before anything trains on it
    bad = tmp_path / "bad.ppcmi"
    bad.write_bytes(files[0].read_bytes()[:-4])
    with pytest.raises(PpcmiError, match="bad.ppcmi: "):
        inbox.open_sets([bad, files[1], files[2]])


def test_rows_per_chunk_stays_under_the_limit():
    assert protocol.rows_per_chunk(917_504) == (protocol.CHUNK_BYTES - 4096) // 917_504  # 256x256, published widths
    assert protocol.rows_per_chunk(10, 5000) == 90
    assert protocol.rows_per_chunk(10**6, 10) == 1
    with pytest.raises(ProtocolError, match="more than a message may carry"):
        protocol.rows_per_chunk(protocol.MAX_BYTES)


def test_streamed_frames_match_the_exact_ones(rng, monkeypatch):
    msg = _message(rng, n=40)
    msg.arrays["zt_img_s3"][:] = rng.gamma(2.0, 1.0, msg.arrays["zt_img_s3"].shape)  # skewed: the signs are pinned
    col = inbox.pool_sets(inbox.sets_from_batches(protocol.split(msg, 7 * (msg.nbytes() // msg.n) + 4096)))[3][1]
    rows = np.arange(40)
    u, mu = mapping._frame(col, rows)
    monkeypatch.setattr(mapping, "FRAME_EXACT_BYTES", 1)
    monkeypatch.setattr(mapping, "FRAME_BLOCK_ROWS", 6)
    u2, mu2 = mapping._frame(col, rows)
    assert np.allclose(u, u2, atol=1e-9) and np.allclose(mu, mu2, atol=1e-12)


# ----------------------------------------------------------------------------- through a real site and the CLI


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chunks")
    data = synth(root / "data", sites=1, patients_per_site=2, slices_per_patient=3, size=32, n_classes=2, seed=3)
    r = runner.invoke(app, ["client", "keygen", "--site-dir", str(root / "site")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["client", "train", "--site-dir", str(root / "site"), "--data", str(data), "--name", "h1", "-q", *TINY_AE,
                            "--set", "autoencoder.send_copies=3"])
    assert r.exit_code == 0, r.output
    return root / "site", data


def test_a_training_set_over_the_limit_is_split_and_equals_one_message(site, tmp_path):
    from ppcmi.client import stages
    from ppcmi.client.inference import label_map_of
    from ppcmi.data import discover_cases

    site_dir, data = site
    h = Hospital(site_dir)
    cfg = h.settings
    arr = stages.prepare(discover_cases(data), cfg, label_map_of(h))
    whole = stages.training_batch(h, arr, cfg)
    limit = 5 * h.row_bytes(32) + 4096  # a small limit: five pairs per chunk
    chunks = list(stages.training_chunks(h, arr, cfg, target=limit))
    assert whole.n == 3 * len(arr["images"]) == 18 and [c.n for c in chunks] == [5, 5, 5, 3]
    assert all(len(protocol.encode(c)) <= limit for c in chunks)
    joined = protocol.assemble(chunks)
    # the same rows in the same order; the keyed transform's matrix product rounds by batch size (~1 ulp) ...
    for k in whole.arrays:
        assert np.allclose(joined.arrays[k], whole.arrays[k], rtol=1e-5, atol=1e-6), k
    # ... so the same chunk target gives the same bits every time (what makes simulate and Flower agree)
    again = protocol.assemble(list(stages.training_chunks(h, arr, cfg, target=limit)))
    assert all(np.array_equal(joined.arrays[k], again.arrays[k]) for k in whole.arrays)
    one = protocol.assemble(list(stages.training_chunks(h, arr, cfg)))  # data that fits one chunk: exactly one message
    assert all(np.array_equal(one.arrays[k], whole.arrays[k]) for k in whole.arrays)


def test_server_train_from_chunk_files_equals_training_from_one_message(site, tmp_path):
    """``client encode --with-masks`` writes a folder of chunks (one commit); ``server train`` takes the folder, or the
    chunk files in any order, streams the rows from disk and trains exactly the network one whole message trains."""
    site_dir, data = site
    out = tmp_path / "h1.train"
    n, nbytes = encode_folder(site_dir, data, out, with_masks=True, chunk_bytes=4 * Hospital(site_dir).row_bytes(32) + 4096)
    files = sorted(out.iterdir())
    assert n == 18 and [p.name for p in files] == [protocol.chunk_name(i) for i in range(5)]
    assert sum(p.stat().st_size for p in files) == nbytes
    rec = json.loads((tmp_path / "h1.train.cases.json").read_text())
    assert rec["kind"] == "train" and rec["set"] == protocol.decode(files[0].read_bytes()).set_id
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # the issue-17 rules: nothing is overwritten, a refused encode leaves nothing half-written
    with pytest.raises(PpcmiError, match="already exists"):
        encode_folder(site_dir, data, out, with_masks=True)
    (tmp_path / "again.train.cases.json").write_text("{}")
    with pytest.raises(PpcmiError, match="again.train.cases.json: already exists"):
        encode_folder(site_dir, data, tmp_path / "again.train", with_masks=True)
    assert not (tmp_path / "again.train").exists()

    flags = ["--set", "mapping.widen=[8,8,8]", "--set", "mapping.mid=[8,8]", "--set", "mapping.down=[8,8,8]",
             "--set", "mapping.epochs=2", "-q"]
    shuffled = [str(p) for p in files]
    random.Random(1).shuffle(shuffled)
    for name, args in (("folder", [str(out)]), ("files", shuffled)):
        r = runner.invoke(app, ["server", "train", *args, "--out", str(tmp_path / name), *flags])
        assert r.exit_code == 0, r.output
    whole = protocol.assemble([protocol.decode(p.read_bytes()) for p in files])  # the same pairs as one message
    cfg = MappingTrainConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8), epochs=2)
    mapping.train_mapping([whole], cfg, tmp_path / "whole", seed=0, progress=False)
    from safetensors.numpy import load_file

    ref = load_file(str(tmp_path / "whole" / "mapping.safetensors"))
    for name in ("folder", "files"):
        got = load_file(str(tmp_path / name / "mapping.safetensors"))
        assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref), name
    # and the refusals reach the command line as one line naming the chunk
    r = runner.invoke(app, ["server", "train", str(files[0]), str(files[2]), str(files[3]), str(files[4]),
                            "--out", str(tmp_path / "x"), *flags])
    assert r.exit_code == 2 and "chunk 1 of 5 is missing" in r.output.strip().splitlines()[-1]


def test_flower_chunk_requests_are_checked():
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, RecordDict

    from ppcmi.flower import wire

    sid = protocol.new_set_id()
    assert wire.read_chunk_request(wire.chunk_request(3, sid, 1 << 20)) == (3, sid, 1 << 20)
    assert wire.read_chunk_request(RecordDict()) == (0, "", protocol.CHUNK_BYTES)
    for rec, match in (({"index": 1, "set": "", "bytes": 1 << 20}, "chunk.set"), ({"index": 0, "set": "", "bytes": 10}, "chunk.bytes"),
                       ({"index": 0, "set": "", "bytes": 1 << 20, "path": "/x"}, "expected only")):
        with pytest.raises(ProtocolError, match=match):
            wire.read_chunk_request(RecordDict({protocol.CHUNK: ConfigRecord(rec)}))
    with pytest.raises(PpcmiError, match="already exists"):
        write_training_set([], Path(__file__).parent)


def test_queries_to_the_service_stay_under_its_limit(site, tmp_path, monkeypatch):
    """``predict`` batches its queries by bytes (protocol.QUERY_BYTES), so no query outgrows the service's limit
    at any working size; the label maps are the same whatever the batch."""
    from ppcmi.client.inference import predict_files
    from ppcmi.server.mapping import MappingServer

    site_dir, data = site
    encode_folder(site_dir, data, tmp_path / "t", with_masks=True)
    mapping.train_mapping(inbox.open_sets([tmp_path / "t"]), MappingTrainConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8), epochs=1),
                          tmp_path / "m", progress=False)
    srv = MappingServer(tmp_path / "m")
    row = 4 * sum(int(np.prod(v)) for v in Hospital(site_dir).latent_shapes().values())
    sizes = []

    def send(blob: bytes) -> bytes:
        sizes.append(len(blob))
        return protocol.encode(srv.handle(protocol.decode(blob)))

    images = sorted((data / "images").iterdir())
    predict_files(site_dir, send, images, tmp_path / "p16")
    monkeypatch.setattr(protocol, "QUERY_BYTES", 2 * row)
    sizes.clear()
    predict_files(site_dir, send, images, tmp_path / "p2")
    assert len(sizes) == 3 and max(sizes) <= 2 * row + 4096  # 6 images, 2 per query
    for p in (tmp_path / "p16").iterdir():
        assert p.read_bytes() == (tmp_path / "p2" / p.name).read_bytes()


def test_columns_keep_few_files_open(rng, tmp_path):
    msg = _message(rng, n=30)
    files = _write(protocol.split(msg, msg.nbytes() // msg.n + 4096), tmp_path / "in")  # 30 chunks of one row
    cols = inbox.pool_sets(inbox.open_sets(files))[3]
    cols[1]._handles.limit = 4
    ref = inbox.pool_sets(inbox.sets_from_batches([msg]))[3]
    idx = torch.from_numpy(np.random.default_rng(1).permutation(30))
    for col, r in zip(cols[1:], ref[1:]):
        assert torch.equal(col.subset(idx)[torch.arange(30)], r[idx])
    assert len(cols[1]._handles.open) <= 4  # one shared, bounded set of open files for every column of the pool
    cols[1].close()
    assert not cols[2]._handles.open


def test_an_encode_that_fails_midway_leaves_nothing(site, tmp_path, monkeypatch):
    """One commit per set: a failure after some chunks were written leaves no set folder, no case list, no temporary."""
    from ppcmi.client import stages

    site_dir, data = site
    real = stages.training_chunks

    def breaks(*args, **kwargs):
        it = real(*args, **kwargs)
        yield next(it)
        raise RuntimeError("disk full")

    monkeypatch.setattr(stages, "training_chunks", breaks)
    with pytest.raises(RuntimeError, match="disk full"):
        encode_folder(site_dir, data, tmp_path / "h1.train", with_masks=True, chunk_bytes=8192)
    assert list(tmp_path.iterdir()) == []


def test_a_message_from_before_chunks_is_a_set_of_one(rng, tmp_path):
    msg = _message(rng, n=5)
    (tmp_path / "old.train").write_bytes(protocol.encode(msg))  # no set id: as `client encode` wrote it before chunks
    (s,) = inbox.open_sets([tmp_path / "old.train"])
    assert (s.n, s.chunks, s.set_id) == (5, 1, "")
    (tmp_path / "again.train").write_bytes(protocol.encode(msg))
    with pytest.raises(ProtocolError, match=r"again.train: a second whole training message from 'h1' \(also .*old.train\)"):
        inbox.open_sets([tmp_path / "old.train", tmp_path / "again.train"])


def test_loader_workers_read_the_same_rows_and_train_the_same(rng, tmp_path):
    import pickle

    from ppcmi.training import FitConfig, fit, loader_workers

    msg = _message(rng, n=23)
    files = _write(protocol.split(msg, 3 * (msg.nbytes() // msg.n) + 4096), tmp_path / "in")
    cols = inbox.pool_sets(inbox.open_sets(files))[3]
    x, y = cols[1], cols[4]  # zt_img_s3, zt_msk_s3
    x[torch.arange(3)]  # a file is open in this process before the workers fork: their reads must not move each other's
    assert torch.equal(pickle.loads(pickle.dumps(x))[torch.tensor([22, 0, 5])], torch.from_numpy(msg.arrays["zt_img_s3"][[22, 0, 5]]))
    assert loader_workers([x, y], torch.device("cpu")) == 0  # the cores are training on a CPU
    trained = []
    for workers in (0, 2):
        torch.manual_seed(0)
        net = torch.nn.Conv2d(4, 4, 1)
        fit(net, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), [x, y], None,
            FitConfig(epochs=3, batch_size=4, patience=3, workers=workers), tmp_path / f"w{workers}", progress=False)
        trained.append(net.state_dict())
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    with pytest.raises(PpcmiError, match="workers must be 0 or more"):
        fit(torch.nn.Conv2d(4, 4, 1), lambda m, b: m(b[0]).mean(), [x], None, FitConfig(epochs=1, workers=-1), tmp_path / "bad", progress=False)
    # a chunk file cut short during training (after epoch 1): a worker's read fails, and the caller gets its one line
    def cut(epoch, _):
        if epoch == 1:
            files[0].write_bytes(files[0].read_bytes()[:100])

    with pytest.raises(ProtocolError, match=r"^\S+: shorter than its header says \(changed after it was checked\?\)$"):
        fit(torch.nn.Conv2d(4, 4, 1), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), [x, y], None,
            FitConfig(epochs=2, batch_size=4, patience=2, workers=2), tmp_path / "cut", progress=False, on_epoch=cut)
