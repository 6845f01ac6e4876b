import json
import struct

import numpy as np
import pytest

from ppcmi import protocol
from ppcmi.errors import ProtocolError
from ppcmi.protocol import LatentBatch

SHAPES = {"s3": (8, 16, 16), "s4": (16, 8, 8), "b": (32, 4, 4)}


def _arrays(rng, prefixes=("zt_img_",), n=2, dtype=np.float32):
    return {p + s: rng.standard_normal((n, *shape)).astype(dtype) for p in prefixes for s, shape in SHAPES.items()}


def test_round_trip_preserves_everything(rng):
    msg = LatentBatch("train", "hospital1", _arrays(rng, ("zt_img_", "zt_msk_")))
    back = protocol.decode(protocol.encode(msg), expected=SHAPES)
    assert back.kind == "train" and back.client == "hospital1" and back.n == 2
    assert back.scales == ["s3", "s4", "b"]
    for k, v in msg.arrays.items():
        assert np.array_equal(back.arrays[k], v)


def test_float16_halves_payload(rng):
    a32 = protocol.encode(LatentBatch("query", "h", _arrays(rng)))
    a16 = protocol.encode(LatentBatch("query", "h", _arrays(rng, dtype=np.float16)))
    values = sum(int(np.prod(s)) * 2 for s in SHAPES.values())
    assert len(a32) - len(a16) == pytest.approx(values * 2, abs=64)


def test_bottleneck_only_is_allowed(rng):
    msg = LatentBatch("query", "h", {"zt_img_b": rng.standard_normal((1, 32, 4, 4)).astype(np.float32)})
    assert protocol.decode(protocol.encode(msg)).scales == ["b"]


def _raw(arrays: dict, meta: dict) -> bytes:
    from safetensors.numpy import save

    return save(arrays, metadata=meta)


META = {"ppcmi.version": "1", "kind": "query", "client": "h1"}


@pytest.mark.parametrize("mutate, field", [
    (lambda a, m: a.update({"z_img_s3": a.pop("zt_img_s3")}), "z_img_s3"),               # plain-latent name
    (lambda a, m: a.update({"patient_id": a.pop("zt_img_s3")}), "patient_id"),           # unknown name
    (lambda a, m: m.update({"filename": "case001.png"}), "__metadata__"),                # smuggled file name
    (lambda a, m: m.update({"ppcmi.version": "2"}), "version"),                          # wrong version
    (lambda a, m: m.update({"kind": "weights"}), "kind"),                                # unknown kind
    (lambda a, m: m.update({"client": "../etc/passwd"}), "client"),                      # bad site id
    (lambda a, m: m.update({"client": "h1\n"}), "client"),                               # a final newline ($ let it pass)
    (lambda a, m: m.update({"query": "0" * 32 + "\n"}), "query"),                         # a query id with a final newline
    (lambda a, m: a.update({"zt_img_s3": a["zt_img_s3"].astype(np.float64)}), "dtype"),  # wrong dtype
    (lambda a, m: a.update({"zt_img_s3": a["zt_img_s3"][0]}), "zt_img_s3"),              # wrong rank
    (lambda a, m: a.update({"zt_img_s4": a["zt_img_s4"][:1]}), "batch size"),            # inconsistent N
    (lambda a, m: a["zt_img_b"].__setitem__((0, 0, 0, 0), np.nan), "NaN"),               # NaN
    (lambda a, m: a["zt_img_b"].__setitem__((0, 0, 0, 0), np.inf), "NaN or Inf"),        # Inf
    (lambda a, m: a.pop("zt_img_s4"), "scales"),                                         # incomplete scale set
    (lambda a, m: a.update({"zt_msk_s3": a["zt_img_s3"]}), "zt_msk_s3"),                 # mask latents in a query
])
def test_malformed_messages_are_refused_with_the_field(rng, mutate, field):
    arrays, meta = _arrays(rng), dict(META)
    mutate(arrays, meta)
    with pytest.raises(ProtocolError, match=field.replace("(", r"\(")):
        protocol.decode(_raw(arrays, meta))


def test_wrong_shape_against_expected(rng):
    data = protocol.encode(LatentBatch("query", "h", _arrays(rng)))
    bad = dict(SHAPES, s3=(8, 32, 32))
    with pytest.raises(ProtocolError, match=r"arrays.zt_img_s3: shape"):
        protocol.decode(data, expected=bad)


def test_size_limit_and_garbage(rng):
    data = protocol.encode(LatentBatch("query", "h", _arrays(rng)))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        protocol.decode(data, max_bytes=len(data) - 1)
    for junk in (b"", b"1234", b"\xff" * 64, struct.pack("<Q", 10) + b"not json!!", data[: len(data) // 2]):
        with pytest.raises(ProtocolError):
            protocol.decode(junk)
    # nesting deep enough to exhaust the JSON parser, and metadata values that are not strings
    deep = b"[" * 100_000
    with pytest.raises(ProtocolError, match="header: not valid JSON"):
        protocol.decode(struct.pack("<Q", len(deep)) + deep)
    for meta in ({**META, "kind": ["query"]}, {**META, "ppcmi.version": 1}):
        header = json.dumps({"__metadata__": meta}).encode()
        with pytest.raises(ProtocolError, match="__metadata__: every value must be a string"):
            protocol.decode(struct.pack("<Q", len(header)) + header)
    # a pickle is just garbage here
    import pickle

    with pytest.raises(ProtocolError):
        protocol.decode(pickle.dumps({"zt_img_s3": [1, 2, 3]}))


def test_header_has_no_room_for_identifiers(rng):
    data = protocol.encode(LatentBatch("train", "hospital2", _arrays(rng, ("zt_img_", "zt_msk_"))))
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    assert header.pop("__metadata__") == {"ppcmi.version": "1", "kind": "train", "client": "hospital2"}
    assert set(header) <= protocol.ALLOWED_NAMES


def test_a_message_must_carry_exactly_the_scales_the_receiver_serves():
    """A query holding only zt_img_b for a model serving s3, s4 and b (and a reply holding only zt_msk_b for a
    decoder expecting all three) is refused by name, not a KeyError further on."""
    expected = {"s3": (4, 4, 4), "s4": (4, 2, 2), "b": (4, 1, 1)}
    only_b = {"zt_img_b": np.zeros((2, 4, 1, 1), np.float32)}
    with pytest.raises(ProtocolError, match="missing zt_img_s3, zt_img_s4;"):
        protocol.validate(LatentBatch("query", "h1", only_b), expected)
    with pytest.raises(ProtocolError, match="missing zt_msk_s3, zt_msk_s4;"):
        protocol.decode(protocol.encode(LatentBatch("reply", "h1", {"zt_msk_b": np.zeros((2, 4, 1, 1), np.float32)})), expected=expected)
    protocol.validate(LatentBatch("query", "h1", only_b), {"b": (4, 1, 1)})  # a bottleneck-only model takes it
