import math

import torch

from ppcmi.augment import AugmentConfig, augment_batch, jitter_intensity, random_grid

NO_INTENSITY = AugmentConfig(gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0)


def _phantom(n=6, s=48):
    y = torch.zeros(n, 1, s, s, dtype=torch.long)
    y[:, :, 14:34, 18:30] = 1
    y[:, :, 20:26, 21:26] = 2
    return y


def test_image_and_masks_stay_aligned():
    lab = _phantom()
    onehot = torch.nn.functional.one_hot(lab[:, 0], 3).permute(0, 3, 1, 2).float()
    img = 0.2 + 0.3 * lab.float()  # intensity encodes the class
    a, m, l2 = augment_batch([img, onehot, lab], ["image", "mask", "label"], torch.Generator().manual_seed(3), NO_INTENSITY)
    assert torch.equal(m.argmax(1, keepdim=True), l2)
    assert torch.allclose(m.sum(1), torch.ones(6, 48, 48))  # still one-hot everywhere, corners included
    from_image = torch.round((a - 0.2) / 0.3).long()
    agree = (from_image == l2).float().mean().item()
    assert agree > 0.97, agree  # only interpolated boundary pixels may differ
    assert set(l2.unique().tolist()) <= {0, 1, 2} and l2.dtype == torch.long


def test_identity_when_every_range_is_degenerate():
    cfg = AugmentConfig(rotate=0.0, flip=0.0, scale=(1.0, 1.0), shift=0.0, gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    (y,) = augment_batch([x], ["image"], torch.Generator().manual_seed(1), cfg)
    assert torch.allclose(x, y, atol=1e-5)


def test_flip_and_half_turn_are_exact():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(5, 1, 1, 1)
    flip = AugmentConfig(rotate=0.0, flip=1.0, scale=(1.0, 1.0), shift=0.0)
    grid = random_grid(5, 8, 8, torch.Generator().manual_seed(0), flip)
    y = torch.nn.functional.grid_sample(x, grid, mode="nearest", align_corners=False)
    assert torch.equal(y, x.flip(-1))
    # rotate in [pi - 1e-7, pi]: a half turn
    half = AugmentConfig(rotate=math.pi, flip=0.0, scale=(1.0, 1.0), shift=0.0)
    g = torch.Generator().manual_seed(0)
    grid = random_grid(2000, 8, 8, g, half)
    angles = torch.atan2(grid[:, 0, 0, 1] - grid[:, 0, -1, 1], grid[:, 0, 0, 0] - grid[:, 0, -1, 0])
    assert angles.std() > 1.0  # angles spread over the circle, not a fixed rotation


def test_seeded_and_in_range():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    a = augment_batch([x], ["image"], torch.Generator().manual_seed(7))[0]
    b = augment_batch([x], ["image"], torch.Generator().manual_seed(7))[0]
    c = augment_batch([x], ["image"], torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    j = jitter_intensity(torch.linspace(0, 1, 11).view(1, 1, 1, 11), torch.Generator().manual_seed(0))
    assert torch.all(j[..., 1:] >= j[..., :-1])  # gamma and gain keep the order of intensities
