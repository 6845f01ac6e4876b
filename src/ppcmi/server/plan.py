"""The federated plan (coordinator side): hospitals' fingerprints in, one set of shared settings out, with reasons.

The coordinator never sees an image: it combines the :class:`ppcmi.protocol.Fingerprint` of every hospital
(counts, sums, quantiles and a histogram in shared bins) into pooled statistics, and :func:`make_plan` turns
them into settings every hospital applies, each with the reason it was chosen, plus the time the run is
expected to take and warnings about the data. :func:`apply_plan` lays the settings under what the user set
explicitly (``--set``, ``--config``): a user value always wins and is recorded as an override.

What the plan decides (``plan.json``'s ``settings``):

- ``data.intensity`` (and ``data.window``, ``data.stats``): by modality. CT: clip to the pooled foreground
  0.5 / 99.5 percentiles, then z-score with the pooled foreground mean and std (nnU-Net's CT scheme);
  MR, ultrasound and the rest: a z-score per image. Either z-score is laid onto [0, 1] (``data.zrange``),
  which the sigmoid autoencoders need.
- ``data.spacing``: the target in-plane spacing, the median of the hospitals' median spacings (nnU-Net's rule;
  an axis more than 3x coarser than the other with under a third of its pixels takes its 5 % quantile instead),
  coarsened when the network size cannot hold the median field at it; None when most planes record no spacing.
- ``data.crop`` / ``data.roi``: the region kept. The union of every hospital's training foreground boxes plus a
  margin is either held by a central fraction (``data.crop``), or, when the foreground sits in a consistent
  part of the field away from the centre, by a box (``data.roi``) that keeps at most half of what the central
  crop would; else the whole plane.
- ``data.size``: the median field inside the region, in pixels at the target spacing (native pixels without
  one), rounded to a multiple of 32, capped at 256 and lowered until the time budget affords enough epochs.
- batch sizes, epochs, patience, augmented copies, augmentation and the mapping network's schedule, from the
  number of training planes and the time budget (``--budget MINUTES``), through a per-step cost model whose
  table was measured on a 2-core CPU (:data:`COST_TABLE`).

Besides the settings, ``plan.json``'s ``reference`` gives the centralized U-Net that ``demo`` and ``bench`` train
next to PPCMI-SF the same time: ``unet.epochs`` (and patience) so that its estimated training time equals the two
stages' (experiment settings; they never cross to a hospital).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import Config, load_config, to_dict
from ..errors import ConfigError, PpcmiError
from ..models import AEConfig, Autoencoder, MappingConfig, MappingNet, make_unet
from ..protocol import QUANTILES, Fingerprint, hist_edges

PLAN_VERSION = 1
DEFAULT_BUDGET_MIN = 20.0       # minutes for both stages on one 2-core CPU playing every role
SIZE_CAP = 256                  # the published working size; cost grows with its square
SIZE_FLOOR = 64
MIN_CLASS_SIDE = 16             # the budget never shrinks the smallest class below about 16 x 16 pixels where it is present
CT_PERCENTILES = (0.5, 99.5)
CROP_MARGIN = 0.05              # of the field, on every side of the pooled foreground box
CROP_MAX = 0.8                  # a crop keeping more than this fraction of each side is not worth it
ROI_STEP = 16                   # region edges snap outward to multiples of 1/16 of the field
ROI_GAIN = 0.5                  # a box is chosen over the central crop when it keeps at most this share of the crop's area
ANISO = 3.0                     # nnU-Net's ANISO_THRESHOLD: an axis this much coarser than the other is anisotropic
SPACING_RATIO = 2.0             # hospitals' median spacings further apart than this: a warning
MIN_ROWS = 2000                 # stage 2 aims for at least this many training rows (augmented copies)
MAX_COPIES = 8
MIN_STEPS_PER_EPOCH = 8
MIN_BATCH = 8                   # BatchNorm statistics need a few samples per batch
AE_EPOCHS = (20, 100)           # (fewest the plan accepts before lowering the size, the published most)
MAP_EPOCHS = (20, 150)
UNET_MAX_EPOCHS = 2000          # the reference U-Net's epochs are capped here however small the data
STAGE1_SHARE = 0.4              # of the budget beyond both minimums, before a stage that needs less hands its rest on

# Seconds per bare training step (forward, loss, backward, Adam) at batch 16 on a 2-core AMD EPYC (torch 2.13, 2 threads),
# measured by benchmarks/plan_costs.py for the default widths (autoencoder.width 1.0; mapping widen 32-64-128, mid 128-256,
# down 64-32-16), with the training FLOPs of the same step: per size the fastest cell over the runs of that script
# (benchmarks/results/plan_costs.json), taken while other work shared the machine. The planner divides a
# configuration's FLOPs by the throughput at the nearest measured size, so other widths are costed through their FLOPs.
# "unet" is the centralized reference U-Net of demo and bench (ppcmi.models.make_unet, MONAI's DiceCE loss), measured
# later (--networks unet, fastest of 15) with the machine's two other jobs at nice 10 and 19.
COST_TABLE = {
    # size: {network: (seconds per step, GFLOP per step)}
    64: {"image_ae": (0.049, 4.15), "mask_ae": (0.054, 4.22), "mapping": (0.080, 8.94), "unet": (0.044, 4.57)},
    128: {"image_ae": (0.18, 16.6), "mask_ae": (0.18, 16.9), "mapping": (0.16, 35.5), "unet": (0.154, 18.3)},
    256: {"image_ae": (0.86, 66.4), "mask_ae": (0.86, 67.5), "mapping": (0.56, 141.4), "unet": (0.605, 73.1)},
}
COST_THREADS = 2
# The same steps on one torch thread (benchmarks/plan_costs.py --threads 1: benchmarks/results/plan_costs-1thread.json, the
# same 2-core AMD EPYC): what each of ``ppcmi demo``'s two concurrent trainings (the pipeline and the reference U-Net) gets
# on two cores. A plan for fewer threads than COST_THREADS uses it (``make_plan(threads=1)``).
# Measured with the machine otherwise idle (load average about 1): 1.5x to 2.0x COST_TABLE's seconds. As in COST_TABLE,
# the image and mask autoencoders (2 % apart in FLOPs) share the faster of their two cells.
COST_TABLE_1THREAD = {
    64: {"image_ae": (0.084, 4.15), "mask_ae": (0.084, 4.22), "mapping": (0.121, 8.94), "unet": (0.082, 4.57)},
    128: {"image_ae": (0.275, 16.6), "mask_ae": (0.275, 16.9), "mapping": (0.326, 35.5), "unet": (0.264, 18.3)},
    256: {"image_ae": (1.71, 66.4), "mask_ae": (1.71, 67.5), "mapping": (1.10, 141.4), "unet": (1.13, 73.1)},
}


def cost_table(threads: int | None = None) -> dict[int, dict[str, tuple[float, float]]]:
    """The measured step costs for a training that gets ``threads`` torch threads (None: :data:`COST_THREADS`):
    :data:`COST_TABLE_1THREAD` for one, :data:`COST_TABLE` (measured on two) otherwise; the plan never assumes more
    speed than two threads gave."""
    return COST_TABLE_1THREAD if threads is not None and threads < COST_THREADS else COST_TABLE
# The training loop around a bare step (augmentation, validation passes, per-epoch checkpoints, the stage-2 encoding):
# in the PSFHS benchmark (benchmarks/results/bench-psfhs.json, default widths at 128, an Intel Xeon) 24 more mapping
# epochs of 55 steps took 540 s, 0.41 s a step, 2.5x the bare step above; stage 1 came out alike (at least 0.43 s).
OVERHEAD = 2.5
# The reference U-Net's loop adds little to its bare step: in the planned msd_hippocampus demo (64 px, one thread) it
# trained 13 epochs of 373 steps in 394 s, 0.081 s a step with augmentation, validation and checkpoints, against the
# 0.082 s bare step above. Its estimate had used the image autoencoder's throughput times OVERHEAD and came out 2.9x
# too long (1132 s). 1.1 allows for the validation pass weighing more on smaller sets.
UNET_OVERHEAD = 1.1


# ----------------------------------------------------------------------------- pooling fingerprints


@dataclass(frozen=True)
class Pooled:
    """What the coordinator knows once every fingerprint is in: federation-wide aggregates."""

    hospitals: tuple[str, ...]
    modality: str
    n_planes: tuple[int, ...]            # per hospital
    n_classes: int
    channels: int
    rows: float                          # median native plane size (the planes' weighted median of hospital medians)
    cols: float
    spacing: tuple[float, float] | None  # the same for spacing (mm), over the hospitals that record it
    spacings: dict[str, tuple[float, float]]
    n_spacing: int                       # planes that record a spacing, in all
    spacing_low: tuple[float, float] | None  # the same weighted median of the hospitals' 5 % spacing quantiles
    field_mm: tuple[float, float] | None  # the weighted median of the hospitals' median rows x row spacing (and columns)
    fg_pixels: int
    fg_mean: float
    fg_std: float
    percentiles: tuple[float, float]     # pooled foreground percentiles CT_PERCENTILES, from the histograms
    extent: tuple[float, float, float, float]  # union of every foreground box: top, bottom, left, right (fractions)
    class_planes: tuple[tuple[int, ...], ...]  # per hospital, per class
    class_share: tuple[float, ...]       # per class: its mean share of a plane's pixels, over the planes that hold it
    constant_planes: int


def _weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    order = np.argsort(values)
    v, w = np.asarray(values, dtype=np.float64)[order], np.asarray(weights, dtype=np.float64)[order]
    cum = np.cumsum(w)
    return float(v[np.searchsorted(cum, cum[-1] / 2.0)])


def hist_percentiles(hist: dict[int, int], qs: Sequence[float]) -> list[float]:
    """Percentiles ``qs`` (0-100) of the values a ``{bin: count}`` histogram in the shared bins counts, by
    linear interpolation inside the bin where the cumulative count crosses ``q`` % of the total."""
    bins = np.asarray(sorted(hist), dtype=np.int64)
    counts = np.asarray([hist[b] for b in bins], dtype=np.float64)
    cum = np.cumsum(counts)
    lo, hi = hist_edges(bins)
    out = []
    for q in qs:
        target = q / 100.0 * cum[-1]
        i = int(min(np.searchsorted(cum, target), len(bins) - 1))
        before = cum[i] - counts[i]
        frac = 0.0 if counts[i] == 0 else min(1.0, max(0.0, (target - before) / counts[i]))
        out.append(float(lo[i] + frac * (hi[i] - lo[i])))
    return out


def pool(fingerprints: Sequence[Fingerprint]) -> tuple[Pooled, list[str]]:
    """Combine fingerprints (one per hospital, distinct sites); returns the aggregates and the warnings.

    Errors: no fingerprints, a site twice, different class counts, modalities that disagree, no foreground."""
    if not fingerprints:
        raise PpcmiError("plan: no fingerprints to combine")
    names = [fp.client for fp in fingerprints]
    if len(set(names)) != len(names):
        raise PpcmiError(f"plan: a hospital sent two fingerprints ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    warnings: list[str] = []
    ks = {fp.n_classes for fp in fingerprints}
    ks_n = fingerprints[0].n_classes
    if len(ks) > 1:
        raise PpcmiError(f"plan: hospitals count different classes ({', '.join(f'{fp.client}: {fp.n_classes}' for fp in fingerprints)}); "
                         "every hospital must use the same data.labels")
    known = {fp.modality for fp in fingerprints if fp.modality != "UNKNOWN"}
    if len(known) > 1:
        raise PpcmiError(f"plan: hospitals report different modalities ({', '.join(f'{fp.client}: {fp.modality}' for fp in fingerprints)}); "
                         "one plan normalises one modality (set --modality at the hospital that is wrong)")
    modality = known.pop() if known else "UNKNOWN"
    unknown = [fp.client for fp in fingerprints if fp.modality == "UNKNOWN"]
    if unknown and modality != "UNKNOWN":
        warnings.append(f"{', '.join(unknown)}: modality unknown; planned as {modality}, which the other hospitals report")
    mid = QUANTILES.index(0.5)
    weights = [fp.n_planes for fp in fingerprints]
    with_sp = [fp for fp in fingerprints if fp.n_spacing]
    spacings = {fp.client: (fp.spacing_rows[mid], fp.spacing_cols[mid]) for fp in with_sp}
    spacing = low = field = None
    if with_sp:
        w_sp = [fp.n_spacing for fp in with_sp]
        spacing = (_weighted_median([fp.spacing_rows[mid] for fp in with_sp], w_sp),
                   _weighted_median([fp.spacing_cols[mid] for fp in with_sp], w_sp))
        q05 = QUANTILES.index(0.05)
        low = (_weighted_median([fp.spacing_rows[q05] for fp in with_sp], w_sp),
               _weighted_median([fp.spacing_cols[q05] for fp in with_sp], w_sp))
        field = (_weighted_median([fp.rows[mid] * fp.spacing_rows[mid] for fp in with_sp], w_sp),
                 _weighted_median([fp.cols[mid] * fp.spacing_cols[mid] for fp in with_sp], w_sp))
    n = sum(fp.fg_pixels for fp in fingerprints)
    if n == 0:
        raise PpcmiError("plan: no hospital has any foreground in its training masks")
    mean = sum(fp.fg_pixels * fp.fg_mean for fp in fingerprints) / n
    var = sum(fp.fg_pixels * (fp.fg_std ** 2 + (fp.fg_mean - mean) ** 2) for fp in fingerprints) / n
    hist: dict[int, int] = {}
    for fp in fingerprints:
        for b, c in fp.hist:
            hist[b] = hist.get(b, 0) + c
    fg = [fp for fp in fingerprints if fp.n_fg_planes]
    extent = (min(fp.extent_top[0] for fp in fg), max(fp.extent_bottom[-1] for fp in fg),
              min(fp.extent_left[0] for fp in fg), max(fp.extent_right[-1] for fp in fg))
    pooled = Pooled(
        hospitals=tuple(names), modality=modality, n_planes=tuple(weights), n_classes=ks.pop(),
        channels=max(fp.channels for fp in fingerprints),
        rows=_weighted_median([fp.rows[mid] for fp in fingerprints], weights),
        cols=_weighted_median([fp.cols[mid] for fp in fingerprints], weights), spacing=spacing, spacings=spacings,
        n_spacing=sum(fp.n_spacing for fp in fingerprints), spacing_low=low, field_mm=field,
        fg_pixels=n, fg_mean=float(mean), fg_std=float(math.sqrt(max(var, 0.0))),
        percentiles=tuple(hist_percentiles(hist, CT_PERCENTILES)),  # type: ignore[arg-type]
        extent=extent, class_planes=tuple(fp.class_planes for fp in fingerprints),
        class_share=tuple(sum(fp.class_fraction[k] * fp.n_planes for fp in fingerprints)
                          / max(1, sum(fp.class_planes[k] for fp in fingerprints)) for k in range(ks_n)),
        constant_planes=sum(fp.constant_planes for fp in fingerprints))
    return pooled, warnings


def data_warnings(pooled: Pooled, class_names: Sequence[str] | None = None) -> list[str]:
    """Warnings about the federation's data: a class missing at a hospital, spacings far apart, constant planes."""
    out = []
    names = list(class_names or []) or [f"class{k}" for k in range(pooled.n_classes)]
    for h, planes in zip(pooled.hospitals, pooled.class_planes):
        missing = [names[k] for k in range(1, pooled.n_classes) if planes[k] == 0]
        if missing:
            out.append(f"{h}: no training plane holds {', '.join(missing)} (data.labels); its mask autoencoder never learns "
                       f"{'that class' if len(missing) == 1 else 'those classes'} and its predictions will lack it")
    if len(pooled.spacings) > 1:
        sizes = {h: math.sqrt(r * c) for h, (r, c) in pooled.spacings.items()}
        lo, hi = min(sizes, key=sizes.get), max(sizes, key=sizes.get)  # type: ignore[arg-type]
        if sizes[hi] > SPACING_RATIO * sizes[lo]:
            out.append(f"{lo} and {hi}: median pixel spacings {sizes[lo]:.3g} mm and {sizes[hi]:.3g} mm differ by more than "
                       f"{SPACING_RATIO:g}x; at one target spacing (data.spacing) one hospital's planes are interpolated far from "
                       "their own resolution, without one the same anatomy appears at different scales (check their spacings)")
    if pooled.constant_planes:
        out.append(f"{pooled.constant_planes} training plane(s) hold one value only (blank slices); they train on zeros")
    if pooled.modality == "CT" and not (-1200.0 <= pooled.percentiles[0] and pooled.percentiles[1] <= 4000.0):
        out.append(f"CT foreground percentiles {pooled.percentiles[0]:.0f} to {pooled.percentiles[1]:.0f} are not in the "
                   "Hounsfield range (-1024 to 3071): if the data store HU shifted, set data.offset (e.g. 1024)")
    return out


# ----------------------------------------------------------------------------- the cost model


def training_gflop(size: int, cfg: Config, n_classes: int, channels: int = 1, batch: int = 16) -> dict[str, float]:
    """GFLOP of one training step (forward + backward, counted as 3x the forward) of each network at ``size``,
    counted by torch's FLOP counter on the meta device (no arithmetic is done)."""
    key = (size, cfg.autoencoder.width, cfg.autoencoder.skips,
           tuple((f.name, getattr(cfg.mapping, f.name)) for f in dataclasses.fields(MappingConfig)), n_classes, channels, batch)
    if key not in _GFLOP:
        _GFLOP[key] = _count_gflop(size, cfg, n_classes, channels, batch)
    return dict(_GFLOP[key])


_GFLOP: dict[tuple, dict[str, float]] = {}


def _count_gflop(size: int, cfg: Config, n_classes: int, channels: int, batch: int) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model: torch.nn.Module, *args) -> float:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(*args)
        return 3.0 * fc.get_total_flops() * batch / 1e9

    shapes = AEConfig(width=cfg.autoencoder.width, skips=cfg.autoencoder.skips).latent_shapes(size)
    mc = MappingConfig(**{f.name: getattr(cfg.mapping, f.name) for f in dataclasses.fields(MappingConfig)})
    with torch.device("meta"):
        ae = lambda cin: Autoencoder(AEConfig(in_channels=cin, width=cfg.autoencoder.width, skips=cfg.autoencoder.skips))  # noqa: E731
        net = MappingNet({s: c for s, (c, _, _) in shapes.items()}, {s: c for s, (c, _, _) in shapes.items()}, ["h"], mc)
        z = {s: torch.zeros(1, *shp) for s, shp in shapes.items()}
        return {"image_ae": flops(ae(channels), torch.zeros(1, channels, size, size)),
                "mask_ae": flops(ae(n_classes), torch.zeros(1, n_classes, size, size)),
                "mapping": flops(net, z, "h")}


def step_seconds(size: int, gflop: dict[str, float], threads: int | None = None) -> dict[str, float]:
    """Seconds per training step: ``gflop`` at the throughput measured at the nearest size (:func:`cost_table`)."""
    table = cost_table(threads)
    ref = min(table, key=lambda s: abs(math.log(s / size)))
    return {k: g * table[ref][k][0] / table[ref][k][1] for k, g in gflop.items()}


def unet_gflop(size: int, n_classes: int, channels: int = 1, batch: int = 16) -> float:
    """GFLOP of one training step of the centralized reference U-Net (:func:`ppcmi.models.make_unet`) at ``size``,
    counted like :func:`training_gflop`."""
    key = ("unet", size, n_classes, channels, batch)
    if key not in _GFLOP:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            net = make_unet(channels, n_classes).eval()
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                net(torch.zeros(1, channels, size, size))
        _GFLOP[key] = {"unet": 3.0 * fc.get_total_flops() * batch / 1e9}
    return _GFLOP[key]["unet"]


def reference_epochs(seconds: float, size: int, pooled: Pooled, channels: int, batch: int,
                     val_frac: float = 0.2, threads: int | None = None) -> tuple[int, float]:
    """Epochs of the centralized reference U-Net on every hospital's planes pooled (``val_frac`` held out, batches of
    ``batch``) that take about ``seconds``, and the seconds of one epoch: its FLOPs at the throughput its own step
    was measured at (the ``unet`` cells of :func:`cost_table`), times :data:`UNET_OVERHEAD`."""
    table = cost_table(threads)
    ref = min(table, key=lambda s: abs(math.log(s / size)))
    sec, gflop = table[ref]["unet"]
    n = sum(pooled.n_planes)
    n_train = max(1, n - max(1, int(round(n * val_frac)))) if n >= 4 else n
    epoch = UNET_OVERHEAD * unet_gflop(size, pooled.n_classes, channels, batch) * sec / gflop * math.ceil(n_train / batch)
    return max(1, min(UNET_MAX_EPOCHS, int(seconds / epoch))), epoch


def _batch(n: int, cap: int = 16) -> int:
    """The largest power of two up to ``cap`` giving at least MIN_STEPS_PER_EPOCH steps per epoch over ``n`` rows,
    but at least MIN_BATCH (or ``cap`` when that is smaller)."""
    b = cap
    while b // 2 >= MIN_BATCH and n / b < MIN_STEPS_PER_EPOCH:
        b //= 2
    return b


def _epochs(budget_s: float, epoch1: float, epoch2: float) -> tuple[int, int]:
    """Epochs of stage 1 and stage 2 within ``budget_s`` seconds: the minimum of each first, then STAGE1_SHARE of
    what is left to stage 1 and the rest to stage 2, each capped at the published epochs, and what one stage
    cannot use to the other; when even the minimums do not fit, both shrink in proportion."""
    (m1, c1), (m2, c2) = AE_EPOCHS, MAP_EPOCHS
    base = m1 * epoch1 + m2 * epoch2
    if base > budget_s:
        f = budget_s / base
        return int(m1 * f), int(m2 * f)
    e1 = min(c1, m1 + int((budget_s - base) * STAGE1_SHARE / epoch1))
    e2 = min(c2, int((budget_s - e1 * epoch1) / epoch2))
    e1 = min(c1, int((budget_s - e2 * epoch2) / epoch1))
    return e1, e2


# ----------------------------------------------------------------------------- the plan


def _round32(x: float) -> int:
    return max(32, int(math.floor(x / 32.0 + 0.5)) * 32)


def choose_region(extent: Sequence[float]) -> tuple[dict[str, object], str]:
    """``{"data.crop": c, "data.roi": box or None}`` and the reason, for the union ``extent`` (top, bottom, left,
    right; fractions of the field) of every training foreground box.

    The union plus :data:`CROP_MARGIN` on every side, snapped outward to 1/:data:`ROI_STEP`, is the box; the central
    crop is the smallest central fraction in 1/16 steps holding the same. The box wins when it keeps at most
    :data:`ROI_GAIN` of the area the central crop would (the foreground sits consistently away from the centre);
    else the central crop when it keeps at most :data:`CROP_MAX` of each side; else the whole plane. The union,
    not a quantile, so that no training foreground falls outside the region (outside it every prediction is
    background)."""
    top, bottom, left, right = (float(v) for v in extent)
    half = max(0.5 - top, bottom - 0.5, 0.5 - left, right - 0.5) + CROP_MARGIN
    crop = min(1.0, math.ceil(2 * half * ROI_STEP) / ROI_STEP)
    lo = lambda v: max(0.0, math.floor((v - CROP_MARGIN) * ROI_STEP + 1e-9) / ROI_STEP)  # noqa: E731
    hi = lambda v: min(1.0, math.ceil((v + CROP_MARGIN) * ROI_STEP - 1e-9) / ROI_STEP)  # noqa: E731
    box = [lo(top), hi(bottom), lo(left), hi(right)]
    area = (box[1] - box[0]) * (box[3] - box[2])
    central = crop * crop if crop <= CROP_MAX else 1.0
    seen = f"every training foreground box of every hospital lies within rows {top:.2f}-{bottom:.2f} and columns {left:.2f}-{right:.2f} of the field"
    if area <= ROI_GAIN * central:
        return {"data.crop": 1.0, "data.roi": box}, (
            f"{seen}: the box rows {box[0]:g}-{box[1]:g}, columns {box[2]:g}-{box[3]:g} (a margin of {CROP_MARGIN:g}, edges in "
            f"steps of 1/{ROI_STEP}) keeps {area:.0%} of the field, at most {ROI_GAIN:g} of the {central:.0%} a central crop "
            "would: the foreground sits in a consistent part of the field away from its centre")
    if crop <= CROP_MAX:
        return {"data.crop": crop, "data.roi": None}, (
            f"{seen}: the central {crop:g} of each side holds them with a margin of {CROP_MARGIN:g}")
    return {"data.crop": 1.0, "data.roi": None}, (
        f"the training foreground spans rows {top:.2f}-{bottom:.2f} and columns {left:.2f}-{right:.2f} of the field: a central "
        f"crop would keep more than {CROP_MAX:g} of each side and a box {area:.0%} of the field, so the whole plane is used")


def target_spacing(pooled: Pooled) -> tuple[tuple[float, float] | None, str]:
    """The target in-plane spacing (row_mm, col_mm) before the size is known, and the reason; None when fewer than
    half the training planes record a spacing.

    Per axis the planes' weighted median of the hospitals' median spacings (nnU-Net's median target spacing). nnU-Net's
    anisotropy rule, in the plane: when one axis is more than :data:`ANISO` times coarser than the other and the
    median field has fewer than a third as many pixels along it, that axis takes the (pooled) 5 % quantile of its
    spacings instead, but not finer than the other axis, so that the few planes scanned finer along it are not
    interpolated down to the median's few pixels."""
    total = sum(pooled.n_planes)
    if pooled.spacing is None or 2 * pooled.n_spacing < total:
        return None, (f"{pooled.n_spacing} of {total} training planes record a pixel spacing (PNG files tell none): planes are "
                      "fitted to the network size by pixels, aspect kept")
    sp = list(pooled.spacing)
    why = (f"{pooled.n_spacing} of {total} training planes record a pixel spacing: each plane is resampled to the median "
           f"spacing {sp[0]:.4g} x {sp[1]:.4g} mm (rows, columns; the planes' median of the hospitals' medians), so a structure "
           "covers the same pixels at every hospital")
    coarse = int(np.argmax(sp))
    fine = 1 - coarse
    px = (pooled.field_mm[0] / sp[0], pooled.field_mm[1] / sp[1])  # type: ignore[index]
    if sp[coarse] > ANISO * sp[fine] and px[coarse] * ANISO < px[fine]:
        new = max(sp[fine], pooled.spacing_low[coarse])  # type: ignore[index]
        why += (f"; the {'rows' if coarse == 0 else 'columns'} are more than {ANISO:g}x coarser with under a third of the pixels "
                f"(anisotropic, nnU-Net's rule): that axis takes its 5 % quantile {new:.4g} mm instead")
        sp[coarse] = new
    if pooled.n_spacing < total:
        why += f"; the {total - pooled.n_spacing} plane(s) without one are fitted by pixels"
    return (sp[0], sp[1]), why


def make_plan(fingerprints: Sequence[Fingerprint], cfg: Config, *, budget_min: float = DEFAULT_BUDGET_MIN,
              class_names: Sequence[str] | None = None, sequential: bool = True, threads: int | None = None) -> dict:
    """The plan for these hospitals: ``{"version", "settings", "reasons", "expected", "warnings", "pooled"}``.

    ``cfg`` supplies what the plan does not choose (network widths, validation shares, ``data.offset``);
    ``sequential``: one machine plays every hospital in turn (``simulate``), so stage 1 takes the sum of the
    hospitals' times; otherwise (a federation) the largest hospital's. ``threads``: the torch threads each training
    will get (None: :data:`COST_THREADS`; ``ppcmi demo`` trains the pipeline and its reference U-Net side by side,
    half the cores each), which picks the measured step costs (:func:`cost_table`)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"plan threads: must be a positive integer, got {threads!r}")
    if not budget_min > 0:
        raise ConfigError(f"--budget: must be a positive number of minutes, got {budget_min!r}")
    pooled, warnings = pool(fingerprints)
    warnings += data_warnings(pooled, class_names)
    settings: dict[str, object] = {}
    reasons: dict[str, str] = {}

    # intensity normalisation, by modality
    if pooled.modality == "CT":
        lo, hi = pooled.percentiles
        if not hi > lo:
            raise PpcmiError(f"plan: the pooled CT foreground is one value ({lo:g}); check data.labels and the images")
        settings.update({"data.intensity": "ct", "data.window": [round(lo, 2), round(hi, 2)],
                         "data.stats": [round(pooled.fg_mean, 3), round(max(pooled.fg_std, 1e-3), 3)]})
        reasons["data.intensity"] = (f"CT: intensities are physical (HU), so one normalisation fits every hospital: clip to the "
                                     f"pooled foreground {CT_PERCENTILES[0]} / {CT_PERCENTILES[1]} percentiles ({lo:.1f}, {hi:.1f}) "
                                     f"and z-score with the pooled foreground mean {pooled.fg_mean:.1f} and std {pooled.fg_std:.1f} "
                                     f"({pooled.fg_pixels} foreground pixels at {len(pooled.hospitals)} hospitals)")
    else:
        settings["data.intensity"] = "zscore"
        what = {"MR": "MR intensities have no physical unit", "US": "ultrasound gain and depth vary by machine and patient",
                "UNKNOWN": "the modality is unknown (dataset.json, a DICOM header or --modality would tell)"}.get(
                    pooled.modality, f"{pooled.modality} intensities are not calibrated across scanners")
        reasons["data.intensity"] = f"{pooled.modality}: {what}, so each image is z-scored on its own"
    reasons["data.intensity"] += f"; z-scores in [-{cfg.data.zrange:g}, {cfg.data.zrange:g}] map onto [0, 1] (data.zrange)"

    # region of interest: a central crop, a box, or the whole plane
    region, why_region = choose_region(pooled.extent)
    settings.update(region)
    reasons["data.crop"] = reasons["data.roi"] = why_region
    roi = region["data.roi"] or [(1 - region["data.crop"]) / 2, (1 + region["data.crop"]) / 2] * 2  # type: ignore[operator]
    frac_r, frac_c = roi[1] - roi[0], roi[3] - roi[2]

    # target spacing, and the field it gives in pixels
    spacing, why_spacing = target_spacing(pooled)
    field_r, field_c = pooled.rows, pooled.cols  # native pixels
    if spacing is not None:
        field_r, field_c = pooled.field_mm[0] / spacing[0], pooled.field_mm[1] / spacing[1]  # type: ignore[index]
    # working resolution and schedule, from the cost model and the budget
    native = max(field_r * frac_r, field_c * frac_c)  # the median field's longer side inside the region
    size = min(SIZE_CAP, _round32(native))
    val_ae, val_map = cfg.autoencoder.val_frac, cfg.mapping.val_frac
    n_train = [max(1, int(n * (1 - val_ae))) for n in pooled.n_planes]
    pairs = sum(pooled.n_planes)
    copies = int(min(MAX_COPIES, max(1, math.ceil(MIN_ROWS / pairs))))
    rows = pairs * copies
    b_ae = _batch(min(n_train), cfg.autoencoder.batch_size if cfg.autoencoder.batch_size >= 2 else 16)
    b_map = _batch(int(rows * (1 - val_map)), cfg.mapping.batch_size if cfg.mapping.batch_size >= 2 else 16)
    budget_s = budget_min * 60.0
    k_small = 1 + int(np.argmin(pooled.class_share[1:]))
    share = pooled.class_share[k_small] / (frac_r * frac_c)  # of the region
    floor = min(size, max(SIZE_FLOOR, 32 * math.ceil(MIN_CLASS_SIDE / math.sqrt(max(share, 1e-12)) / 32)))
    chosen = None
    for s in range(size, floor - 1, -32):
        g = training_gflop(s, cfg, pooled.n_classes, 3 if cfg.data.color == "rgb" else 1)
        t = step_seconds(s, g, threads)
        steps1 = [math.ceil(n / b_ae) for n in n_train]
        epoch1 = OVERHEAD * (t["image_ae"] + t["mask_ae"]) * (b_ae / 16) * (sum(steps1) if sequential else max(steps1))
        epoch2 = OVERHEAD * t["mapping"] * (b_map / 16) * math.ceil(rows * (1 - val_map) / b_map)
        e1, e2 = _epochs(budget_s, epoch1, epoch2)
        chosen = (s, e1, e2, epoch1, epoch2)
        if e1 >= AE_EPOCHS[0] and e2 >= MAP_EPOCHS[0]:
            break
    s, e1, e2, epoch1, epoch2 = chosen  # type: ignore[misc]
    if e1 < AE_EPOCHS[0] or e2 < MAP_EPOCHS[0]:
        need = (AE_EPOCHS[0] * epoch1 + MAP_EPOCHS[0] * epoch2) / 60.0
        why = (f"the smallest class ({(list(class_names or [])[k_small:k_small + 1] or [f'class {k_small}'])[0]}, "
               f"{100 * share:.1f} % of the field where present) needs {s} x {s} to keep about {MIN_CLASS_SIDE} x "
               f"{MIN_CLASS_SIDE} pixels" if s > SIZE_FLOOR else f"{SIZE_FLOOR} x {SIZE_FLOOR}, the smallest size the plan uses")
        warnings.append(f"--budget {budget_min:g} minutes affords only {e1} autoencoder and {e2} mapping epochs at {s} x {s} "
                        f"({why}); {AE_EPOCHS[0]} and {MAP_EPOCHS[0]} epochs would take about {need:.0f} minutes: raise --budget")
        e1, e2 = max(e1, 1), max(e2, 1)
    settings["data.size"] = s
    field = (f"the median native plane is {pooled.rows:.0f} x {pooled.cols:.0f} pixels" if spacing is None else
             f"the median field is {pooled.field_mm[0]:.0f} x {pooled.field_mm[1]:.0f} mm, {field_r:.0f} x {field_c:.0f} "  # type: ignore[index]
             f"pixels at the median spacing")
    reasons["data.size"] = (f"{field}, {native:.0f} on its longer side inside the region: {_round32(native)} as a multiple of 32" + (
                                f", capped at {SIZE_CAP}" if _round32(native) > SIZE_CAP else "")
                            + (f", lowered to {s} so that the budget affords at least {AE_EPOCHS[0]} autoencoder and "
                               f"{MAP_EPOCHS[0]} mapping epochs" if s < min(SIZE_CAP, _round32(native)) else "")
                            + (f"; not below {floor}, where the smallest class keeps about {MIN_CLASS_SIDE} x {MIN_CLASS_SIDE} "
                               f"pixels" if floor > SIZE_FLOOR and s == floor else ""))
    if spacing is not None and native > s * (1 + 1e-6):
        coarse = native / s
        why_spacing += (f"; coarsened {coarse:.3g}x to {spacing[0] * coarse:.4g} x {spacing[1] * coarse:.4g} mm so that the median "
                        f"field ({native:.0f} pixels on its longer side inside the region) fits the network size {s} (planes are "
                        "fed whole: a larger one is scaled down to fit, a smaller one padded)")
        spacing = (spacing[0] * coarse, spacing[1] * coarse)
    elif spacing is not None:
        why_spacing += (f"; the median field inside the region ({native:.0f} pixels on its longer side) fits the network size {s}: "
                        "a plane larger than that at this spacing is scaled down to fit, a smaller one padded")
    settings["data.spacing"] = None if spacing is None else [round(spacing[0], 4), round(spacing[1], 4)]
    reasons["data.spacing"] = why_spacing
    settings.update({"autoencoder.batch_size": b_ae, "autoencoder.epochs": e1, "autoencoder.patience": max(5, e1 // 6),
                     "autoencoder.augment": True, "autoencoder.send_copies": copies,
                     "mapping.batch_size": b_map, "mapping.epochs": e2, "mapping.patience": e2, "mapping.lr_schedule": "cosine"})
    reasons["autoencoder.batch_size"] = (f"the smallest hospital trains on {min(n_train)} planes: batch {b_ae} gives it "
                                         f"{min(n_train) // b_ae or 1} or more steps per epoch (batches of at least {MIN_BATCH})"
                                         if b_ae < 16 else f"the published batch of 16 (the smallest hospital trains on {min(n_train)} planes)")
    reasons["autoencoder.epochs"] = (f"{e1} epochs at about {epoch1:.1f} s each ({'all hospitals in turn' if sequential else 'the largest hospital'}) "
                                     f"fit the budget (at most the published {AE_EPOCHS[1]}); patience about a sixth of them")
    reasons["autoencoder.patience"] = reasons["autoencoder.epochs"]
    reasons["autoencoder.augment"] = "random rotation, flip, scale and intensity: every hospital's own data are few"
    reasons["autoencoder.send_copies"] = (f"{pairs} training pairs in all: {copies} cop{'y' if copies == 1 else 'ies'} each "
                                          f"(augmented, at most {MAX_COPIES}) give the mapping network at least "
                                          f"{min(MIN_ROWS, pairs * MAX_COPIES)} rows to train on")
    reasons["mapping.batch_size"] = (f"{rows} rows at the coordinator: batch {b_map}" + (
        f" gives {int(rows * (1 - val_map)) // b_map or 1} or more steps per epoch" if b_map < 16 else " (the published batch)"))
    reasons["mapping.epochs"] = (f"{e2} epochs at about {epoch2:.1f} s each fit the budget (at most the published {MAP_EPOCHS[1]}); "
                                 "the budget fixes the schedule, so a cosine decay ends it and every epoch runs (patience = epochs)")
    reasons["mapping.patience"] = reasons["mapping.lr_schedule"] = reasons["mapping.epochs"]
    stage1, stage2 = e1 * epoch1, e2 * epoch2
    channels = 3 if cfg.data.color == "rgb" else 1
    e_unet, epoch_unet = reference_epochs(stage1 + stage2, s, pooled, channels, b_map, threads=threads)
    reference = {"unet.epochs": e_unet, "unet.patience": e_unet}
    reasons["unet.epochs"] = reasons["unet.patience"] = (
        f"the centralized reference U-Net of demo and bench gets the time both stages are expected to take "
        f"({(stage1 + stage2) / 60:.1f} min): {e_unet} epochs at about {epoch_unet:.1f} s each over the {sum(pooled.n_planes)} "
        f"planes pooled, in batches of {b_map} (the mapping network's), with its cosine schedule; every epoch runs")
    expected = {"stage1_s": round(stage1), "stage2_s": round(stage2), "total_s": round(stage1 + stage2),
                "budget_s": round(budget_s), "runner": "one machine plays every hospital in turn" if sequential
                else "hospitals train stage 1 in parallel",
                "threads": COST_THREADS if threads is None else threads,
                "note": "an estimate for a 2-core CPU like the ones COST_TABLE, COST_TABLE_1THREAD and OVERHEAD were measured "
                        "on, for a training with `threads` torch threads "
                        "(ppcmi.server.plan; these differed up to 2.4x between sessions), for an otherwise idle machine; "
                        "early stopping may end stage 1 sooner; unet_s is the centralized reference U-Net of demo and bench, "
                        "trained beside the two stages, not after them"}
    expected["unet_s"] = round(e_unet * epoch_unet)
    return {"version": PLAN_VERSION, "settings": settings, "reference": reference, "reasons": reasons, "expected": expected,
            "warnings": warnings,
            "pooled": _pooled_json(pooled), "budget_min": budget_min}


def _pooled_json(p: Pooled) -> dict:
    d = json.loads(json.dumps(dataclasses.asdict(p)))
    d["extent"] = dict(zip(("top", "bottom", "left", "right"), d["extent"]))
    return d


def _flat(raw: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in raw.items():
        if isinstance(v, dict) and k != "split_lists":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


LINKED = (frozenset({"data.crop", "data.roi"}),)  # settings that describe one choice together


def apply_plan(cfg: Config, plan: dict, explicit: Sequence[str] = ()) -> tuple[Config, dict]:
    """``cfg`` with the plan's settings, except those named in ``explicit`` (the user's ``--set`` / ``--config``
    keys), which keep ``cfg``'s value; naming ``data.crop`` or ``data.roi`` keeps both (one region). Returns the
    configuration and the plan with its ``overrides`` (``{key: {"plan": value, "used": value}}``).

    ``data.spacing`` was chosen for the plan's ``data.size``: with ``data.size`` set by the user and ``data.spacing``
    not, the plan's spacing stays (every hospital rebuilds the same settings from the plan's record), so a field
    that no longer fits is scaled down to fit and a smaller one padded; the plan's warnings say so."""
    current = _flat(to_dict(cfg))
    explicit = set(explicit)
    for group in LINKED:  # a region the user chose is kept whole: neither half of the plan's applies
        if explicit & group:
            explicit |= group
    sets, overrides = [], {}
    for key, value in {**plan["settings"], **plan.get("reference", {})}.items():
        if key in explicit:
            if json.loads(json.dumps(current[key])) != value:
                overrides[key] = {"plan": value, "used": current[key]}
            continue
        sets.append(f"{key}={','.join(str(v) for v in value) if isinstance(value, (list, tuple)) else value}")
    warnings = list(plan.get("warnings", []))
    if "data.size" in overrides and "data.spacing" not in explicit and plan["settings"].get("data.spacing") is not None:
        note = (f"data.size = {overrides['data.size']['used']} (set by you) keeps the plan's data.spacing "
                f"{plan['settings']['data.spacing']} mm, chosen for data.size {plan['settings']['data.size']}: planes stay at that "
                "spacing, padded or scaled down to fit; set data.spacing too to resample them otherwise")
        if note not in warnings:
            warnings.append(note)
    return load_config(None, sets, base=cfg), {**plan, "overrides": overrides, "warnings": warnings}


def describe(plan: dict) -> str:
    """The plan's choices and reasons as lines of text (what ``ppcmi plan`` prints)."""
    lines = []
    shown_reason = None
    p = plan.get("pooled", {})
    lines.append(f"{len(p.get('hospitals', []))} hospital(s), {sum(p.get('n_planes', []))} training planes, modality "
                 f"{p.get('modality')}, {p.get('n_classes')} classes")
    for key, value in {**plan["settings"], **plan.get("reference", {})}.items():
        over = plan.get("overrides", {}).get(key)
        shown = f"{over['used']} (set by you; the plan chose {value})" if over else value
        lines.append(f"  {key} = {shown}")
        if key in plan["reasons"] and not key.endswith(("patience", "lr_schedule")) and plan["reasons"][key] != shown_reason:
            lines.append(f"      because {plan['reasons'][key]}")
        shown_reason = plan["reasons"].get(key)
    e = plan["expected"]
    lines.append(f"expected: stage 1 about {e['stage1_s'] / 60:.1f} min, stage 2 about {e['stage2_s'] / 60:.1f} min, in all "
                 f"{e['total_s'] / 60:.1f} of the {e['budget_s'] / 60:.0f} min budget ({e['runner']}"
                 + (f", {e['threads']} torch thread{'s' if e['threads'] != 1 else ''} per training" if "threads" in e else "") + ")"
                 + (f"; the reference U-Net of demo and bench about {e['unet_s'] / 60:.1f} min beside them" if "unet_s" in e else ""))
    for w in plan.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


__all__ = ["PLAN_VERSION", "DEFAULT_BUDGET_MIN", "COST_TABLE", "COST_TABLE_1THREAD", "COST_THREADS", "cost_table", "Pooled", "pool",
           "hist_percentiles", "data_warnings",
           "choose_region", "target_spacing",
           "training_gflop", "step_seconds", "unet_gflop", "reference_epochs", "make_plan", "apply_plan", "describe"]
