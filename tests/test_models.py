import pytest
import torch

from ppcmi.models import AEConfig, Autoencoder, MappingConfig, MappingNet, count_parameters
from ppcmi.training import bce_dice_loss, seeded_init


def test_published_autoencoder_shapes_and_size():
    ae = Autoencoder(AEConfig())
    z = ae.encode(torch.zeros(1, 1, 256, 256))
    assert {k: tuple(v.shape[1:]) for k, v in z.items()} == {"s3": (64, 32, 32), "s4": (128, 16, 16), "b": (256, 8, 8)}
    assert ae.decode(z).shape == (1, 1, 256, 256)
    assert 0.85e6 < count_parameters(ae) < 0.91e6  # the paper's ~0.88 M
    assert sum(v.numel() for v in z.values()) == 114_688  # values per image per direction (DESIGN.md §2)


def test_bottleneck_only_variant():
    cfg = AEConfig(in_channels=3, width=0.5, skips=False)
    ae = Autoencoder(cfg)
    z = ae.encode(torch.zeros(2, 3, 64, 64))
    assert list(z) == ["b"] and z["b"].shape == (2, 128, 2, 2)
    assert ae.decode(z).shape == (2, 3, 64, 64)
    assert cfg.latent_shapes(64) == {"b": (128, 2, 2)}


def test_published_mapping_widths_are_constructible():
    ch = AEConfig().latent_channels()
    m = MappingNet(ch, ch, ["a"], MappingConfig.published())
    n = count_parameters(m)
    assert 55e6 < n < 65e6, n  # the paper reports ~58.8 M
    cpu = MappingNet(ch, ch, ["a"], MappingConfig())
    assert count_parameters(cpu) < n / 10


@pytest.mark.parametrize("size", [32, 64, 128])
def test_mapping_handles_small_inputs(size):
    cfg = AEConfig(width=0.25)
    shapes = cfg.latent_shapes(size)
    ch = {s: v[0] for s, v in shapes.items()}
    m = MappingNet(ch, ch, ["a", "b"], MappingConfig(widen=(8, 8, 16), mid=(16, 16), down=(8, 8, 8))).eval()
    z = {s: torch.randn(2, *v) for s, v in shapes.items()}
    out = m(z, "b")
    assert {s: tuple(v.shape[1:]) for s, v in out.items()} == shapes


def test_adapters_start_as_identity_and_unknown_client_fails():
    m = MappingNet({"b": 8}, {"b": 4}, ["a"], MappingConfig(widen=(8, 8, 8), mid=(8, 8), down=(8, 8, 8)))
    w = m.in_adapters["a"]["b"].weight
    assert torch.equal(w[:, :, 0, 0], torch.eye(8))
    with pytest.raises(KeyError, match="unknown client"):
        m({"b": torch.zeros(1, 8, 4, 4)}, "zz")


@pytest.mark.slow
def test_autoencoder_overfits_a_tiny_batch():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centres = [(20, 20, 9), (40, 30, 14), (30, 44, 7), (44, 44, 11)]
    x = torch.stack([((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).float()[None] for cy, cx, r in centres])  # binary discs
    ae = seeded_init(lambda: Autoencoder(AEConfig(width=0.5)), 0)
    opt = torch.optim.Adam(ae.parameters(), 1e-2)
    first = None
    for _ in range(120):
        loss = bce_dice_loss(ae(x), x)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ae.eval()
    with torch.no_grad():
        err = (ae(x) - x).abs().mean().item()
    assert loss.item() < 0.25 * first and err < 0.05
