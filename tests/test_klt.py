import stat

import numpy as np
import pytest
import torch

from ppcmi.client.keys import keygen, load_key
from ppcmi.errors import KeyFileError
from ppcmi.klt import KeyedLatentTransform, haar_orthogonal

CH = {"s3": 16, "s4": 32, "b": 64}


def _latents(seed: int, n: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"s3": torch.rand(n, 16, 8, 8, generator=g) * 3, "s4": torch.rand(n, 32, 4, 4, generator=g), "b": torch.rand(n, 64, 2, 2, generator=g)}


@pytest.mark.parametrize("modality", ["image", "mask"])
def test_inverse_is_exact(key, modality):
    t = KeyedLatentTransform(key, CH)
    z = _latents(0)
    back = t.inverse(t.forward(z, modality), modality)
    for s in z:
        assert torch.max(torch.abs(back[s] - z[s])) <= 1e-5


def test_transform_is_orthogonal_plus_bias_per_pixel(key):
    t = KeyedLatentTransform(key, CH)
    m = t.matrix("image", "s4").double()
    assert torch.allclose(m @ m.T, torch.eye(32, dtype=torch.float64), atol=1e-5)
    z = _latents(1)
    zt = t.forward(z, "image")["s4"]
    # the same affine map at every pixel: zt[:, :, i, j] = M z[:, :, i, j] + b
    expect = torch.einsum("ij,bjhw->bihw", m.float(), z["s4"]) + t.bias("image", "s4")[None, :, None, None]
    assert torch.allclose(zt, expect, atol=1e-5)
    # norms of bias-removed latents are preserved
    u = zt - t.bias("image", "s4")[None, :, None, None]
    assert torch.allclose(u.norm(dim=1), z["s4"].norm(dim=1), atol=1e-4)


def test_deterministic_from_key(key):
    a, b = KeyedLatentTransform(key, CH), KeyedLatentTransform(bytes(key), CH)
    z = _latents(2)
    for s in z:
        assert torch.equal(a.forward(z, "mask")[s], b.forward(z, "mask")[s])


def test_different_keys_modalities_scales_differ(key):
    other = bytes([255 - x for x in key])
    a, b = KeyedLatentTransform(key, CH), KeyedLatentTransform(other, CH)
    for s in CH:
        assert not torch.allclose(a.matrix("image", s), b.matrix("image", s))
        assert not torch.allclose(a.matrix("image", s), a.matrix("mask", s))
        assert not torch.allclose(a.bias("image", s), b.bias("image", s))
    # a wrong key does not invert
    z = _latents(3)
    wrong = b.inverse(a.forward(z, "image"), "image")
    assert torch.max(torch.abs(wrong["s3"] - z["s3"])) > 0.5


def test_haar_is_orthogonal_with_sign_fix():
    q = haar_orthogonal(8, np.random.default_rng(0))
    assert np.allclose(q @ q.T, np.eye(8), atol=1e-12)
    # sign fix makes the QR factor's diagonal positive: q.T @ g is upper triangular with positive diagonal
    g = np.random.default_rng(0).standard_normal((8, 8))
    r = q.T @ g
    assert np.allclose(np.tril(r, -1), 0, atol=1e-10) and (np.diag(r) > 0).all()


@pytest.mark.parametrize("bad, got", [(b"", "got 0"), (b"x" * 31, "got 31"), (b"x" * 33, "got 33"), ("a" * 32, "got str")])
def test_rejects_bad_key(bad, got):
    # the documented key is 32 bytes; the error names the expected and the actual length (or type)
    with pytest.raises(ValueError, match=f"key: expected 32 bytes, {got}$"):
        KeyedLatentTransform(bad, CH)


def test_keygen_writes_32_random_bytes_mode_0600_that_load_and_build_a_transform(tmp_path):
    a, b = keygen(tmp_path / "a.key"), keygen(tmp_path / "b.key")
    for p in (a, b):
        assert p.stat().st_size == 32 and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert a.read_bytes() != b.read_bytes()  # fresh randomness per key (equal with probability 2^-256)
    key = load_key(a)
    assert key == a.read_bytes()
    KeyedLatentTransform(key, CH)
    # a key file of the wrong length is refused by name, with both lengths
    short = tmp_path / "short.key"
    short.write_bytes(key[:31])
    short.chmod(0o600)
    with pytest.raises(KeyFileError, match="short.key: key file holds 31 bytes, expected 32"):
        load_key(short)
