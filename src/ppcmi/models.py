"""Networks (public, neutral code used by both sides): the skip autoencoder and the mapping network.

``Autoencoder`` runs at a hospital (image and mask autoencoders); ``MappingNet`` runs at the
server (or, with ``mapping.scope = "federated"``, at each hospital, only its core shared). Neither knows anything about keys: the server's per-client 1x1 adapters learn to absorb
each hospital's keyed transform (DESIGN.md section 3.1).

Shapes at the published size (256x256, width 1.0)::

    x (B, C, 256, 256) -> encoder -> s3 (B, 64, 32, 32), s4 (B, 128, 16, 16), b (B, 256, 8, 8)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, check_bool, check_int, check_real

SCALES = ("s3", "s4", "b")
MAX_WIDTH = 8.0      # autoencoder.width: 8x the published channels (2048 in the bottleneck)
MAX_CHANNELS = 4096  # mapping widths: 4x the widest published layer (1024)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


@dataclass(frozen=True)
class AEShape:
    """The autoencoder settings of its topology (``autoencoder.width``, ``autoencoder.skips``): ``width`` scales
    the published channels (16, 32, 64, 128, 256); ``skips = False`` sends and decodes the bottleneck only."""

    width: float = 1.0
    skips: bool = True  # False: bottleneck only (the Privacy-SF-like baseline)

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", check_real("autoencoder.width", self.width, 0.0, MAX_WIDTH, lo_open=True,
                                                     why=" (a multiple of the published channels)"))
        check_bool("autoencoder.skips", self.skips)


@dataclass(frozen=True)
class AEConfig(AEShape):
    """Autoencoder topology: its settings plus the input's channel count (from the data, not a setting)."""

    in_channels: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("autoencoder.in_channels", self.in_channels, 1, 64)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(max(4, int(round(c * self.width))) for c in (16, 32, 64, 128, 256))

    def latent_channels(self) -> dict[str, int]:
        c = self.channels
        return {"s3": c[2], "s4": c[3], "b": c[4]}

    def latent_shapes(self, size: int) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of each latent sent for an input of ``size`` x ``size``; bottleneck-only sends ``b``."""
        if size % 32:
            raise ValueError(f"size must be a multiple of 32, got {size}")
        ch = self.latent_channels()
        shapes = {"s3": (ch["s3"], size // 8, size // 8), "s4": (ch["s4"], size // 16, size // 16), "b": (ch["b"], size // 32, size // 32)}
        return shapes if self.skips else {"b": shapes["b"]}


class Autoencoder(nn.Module):
    """Five stride-2 conv-BN-ReLU stages; decoder with bilinear x2 + conv, two skip concatenations, sigmoid.

    ``encode(x)`` returns ``{"s3", "s4", "b"}`` (only ``"b"`` when ``skips=False``);
    ``decode(latents)`` returns sigmoid outputs of shape (B, in_channels, H, W).
    """

    def __init__(self, cfg: AEConfig = AEConfig()):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        ins = (cfg.in_channels,) + c[:-1]
        self.enc = nn.ModuleList([_conv_bn_relu(i, o, stride=2) for i, o in zip(ins, c)])
        s = 1 if cfg.skips else 0
        # decoder: b (c4) -> up 1/16 -> [cat s4] -> up 1/8 -> [cat s3] -> up 1/4 -> up 1/2 -> up 1/1
        self.dec = nn.ModuleList([
            _conv_bn_relu(c[4], c[3]),
            _conv_bn_relu(c[3] + s * c[3], c[2]),
            _conv_bn_relu(c[2] + s * c[2], c[1]),
            _conv_bn_relu(c[1], c[0]),
            _conv_bn_relu(c[0], c[0]),
        ])
        self.head = nn.Conv2d(c[0], cfg.in_channels, 3, padding=1)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = []
        for stage in self.enc:
            x = stage(x)
            feats.append(x)
        if not self.cfg.skips:
            return {"b": feats[4]}
        return {"s3": feats[2], "s4": feats[3], "b": feats[4]}

    def decode_logits(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        x = z["b"]
        for i, block in enumerate(self.dec):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = block(x)
            if self.cfg.skips and i == 0:
                x = torch.cat([x, z["s4"]], dim=1)
            elif self.cfg.skips and i == 1:
                x = torch.cat([x, z["s3"]], dim=1)
        return self.head(x)

    def decode(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# ----------------------------------------------------------------------------- mapping network


@dataclass(frozen=True)
class MappingConfig:
    """Mapping-network widths. ``published()`` gives the paper's widths (about 58.8 M parameters
    with three scales); the default is a narrow CPU configuration."""

    widen: tuple[int, int, int] = (32, 64, 128)   # 3x3 conv in -> w0 -> w1 -> w2 (published 128, 256, 512)
    mid: tuple[int, int] = (128, 256)             # after the first pyramid pooling: w2 -> m0 -> m1 (published 512, 1024)
    down: tuple[int, int, int] = (64, 32, 16)     # three max-pool steps (published 256, 128, 64)
    pyramid: bool = True                          # False: the "no pyramid pooling" ablation
    bins: tuple[int, ...] = (1, 3, 5, 7)
    dropout: float = 0.2
    norm: str = "batch"                           # "batch" | "group" (GroupNorm, for DP-SGD)

    def __post_init__(self) -> None:
        for name, n in (("widen", 3), ("mid", 2), ("down", 3), ("bins", None)):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not value or (n is not None and len(value) != n):
                raise ConfigError(f"mapping.{name}: expected {n or 'one or more'} integers, got {value!r}")
            for v in value:
                check_int(f"mapping.{name}", v, 1, MAX_CHANNELS if name != "bins" else 64)
        check_bool("mapping.pyramid", self.pyramid)
        object.__setattr__(self, "dropout", check_real("mapping.dropout", self.dropout, 0.0, 1.0, hi_open=True))
        if self.norm not in ("batch", "group"):
            raise ConfigError(f"mapping.norm: must be one of batch, group, got {self.norm!r}")

    @staticmethod
    def published() -> "MappingConfig":
        return MappingConfig(widen=(128, 256, 512), mid=(512, 1024), down=(256, 128, 64))

    @staticmethod
    def scaled(mult: float) -> "MappingConfig":
        p = MappingConfig.published()
        r = lambda t: tuple(max(8, int(round(v * mult))) for v in t)  # noqa: E731
        return MappingConfig(widen=r(p.widen), mid=r(p.mid), down=r(p.down))


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, c), c)
    return nn.BatchNorm2d(c)


def _conv_lrelu_norm(cin: int, cout: int, norm: str, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.LeakyReLU(0.1, inplace=True), _norm(norm, cout))


class PyramidPooling(nn.Module):
    """Real 1/3/5/7 pyramid pooling: each branch average-pools to its own bin grid, reduces channels
    by 1x1 conv, and is upsampled back; branches are concatenated to the input and fused.

    Bins larger than the feature map are clamped to its size (a 5x5 map gets 1, 3, 5, 5).
    """

    def __init__(self, c: int, bins: tuple[int, ...], norm: str):
        super().__init__()
        self.bins = bins
        cb = max(4, c // len(bins))
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(c, cb, 1), nn.LeakyReLU(0.1, inplace=True)) for _ in bins])
        self.fuse = _conv_lrelu_norm(c + cb * len(bins), c, norm, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = [x]
        for b, branch in zip(self.bins, self.branches):
            p = F.adaptive_avg_pool2d(x, (min(b, h), min(b, w)))
            outs.append(F.interpolate(branch(p), size=(h, w), mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(outs, dim=1))


class MappingBlock(nn.Module):
    """The shared core for one scale: widen, pyramid pooling, bottleneck, three pool/upsample steps
    with skip concatenations, pyramid pooling, 1x1 to the output channel count.

    Max-pooling stops before a map would shrink below 2x2, so small inputs (a 2x2 bottleneck at
    size 64) still work: skipped steps become identities.
    """

    def __init__(self, cin: int, cout: int, cfg: MappingConfig):
        super().__init__()
        w0, w1, w2 = cfg.widen
        m0, m1 = cfg.mid
        d0, d1, d2 = cfg.down
        n = cfg.norm
        self.widen = nn.Sequential(_conv_lrelu_norm(cin, w0, n), _conv_lrelu_norm(w0, w1, n), _conv_lrelu_norm(w1, w2, n))
        self.ppm1 = PyramidPooling(w2, cfg.bins, n) if cfg.pyramid else nn.Identity()
        self.mid = nn.Sequential(_conv_lrelu_norm(w2, m0, n), _conv_lrelu_norm(m0, m1, n))
        self.downs = nn.ModuleList([_conv_lrelu_norm(a, b, n) for a, b in ((m1, d0), (d0, d1), (d1, d2))])
        # up path: d2 -> (cat d1) -> ... -> (cat m1) back to w2 channels
        self.ups = nn.ModuleList([
            _conv_lrelu_norm(d2 + d1, d1, n),
            _conv_lrelu_norm(d1 + d0, d0, n),
            _conv_lrelu_norm(d0 + m1, w2, n),
        ])
        self.ppm2 = PyramidPooling(w2, cfg.bins, n) if cfg.pyramid else nn.Identity()
        self.drop = nn.Dropout2d(cfg.dropout)
        self.out = nn.Conv2d(w2, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ppm1(self.widen(x))
        x = self.mid(x)
        skips = [x]
        for down in self.downs:
            if min(x.shape[-2:]) >= 2:
                x = F.max_pool2d(x, 2)
            x = down(x)
            skips.append(x)
        # skips: [m1, d0, d1, d2]; x == d2
        for up, skip in zip(self.ups, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        x = self.drop(self.ppm2(x))
        return self.out(x)


class Frame(nn.Module):
    """A fixed per-pixel affine map of the channels, ``y = W x + b`` (buffers, never trained); the identity
    unless the server sets it (``mapping.adapter_init = "pca"``: a hospital's canonical frame)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("weight", torch.eye(channels))
        self.register_buffer("bias", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class MappingNet(nn.Module):
    """Server mapping network: per scale,
    ``out_frame[client] o out_adapter[client] o core o in_adapter[client] o in_frame[client]``.

    Adapters are linear 1x1 convolutions with bias (no activation), one input and one output
    adapter per client and per scale, so a client's orthogonal keyed transform plus bias on
    inputs and outputs can be absorbed exactly. Frames are fixed maps around them, the identity
    unless the server sets them to a hospital's canonical frames (``mapping.adapter_init = "pca"``),
    which take its keyed latents to coordinates that do not depend on its key; the adapters then
    train in those coordinates. ``forward(zt, client)`` takes keyed image latents of one client
    ``{scale: (B, C, H, W)}`` and returns keyed mask latents.
    """

    def __init__(self, in_channels: dict[str, int], out_channels: dict[str, int], clients: list[str],
                 cfg: MappingConfig = MappingConfig()):
        super().__init__()
        self.cfg = cfg
        self.scales = [s for s in SCALES if s in in_channels]
        self.clients = list(clients)
        self.cores = nn.ModuleDict({s: MappingBlock(in_channels[s], out_channels[s], cfg) for s in self.scales})
        self.in_adapters = nn.ModuleDict()
        self.out_adapters = nn.ModuleDict()
        self.in_frames = nn.ModuleDict()
        self.out_frames = nn.ModuleDict()
        for c in self.clients:
            self.add_client(c, in_channels, out_channels)

    def add_client(self, client: str, in_channels: dict[str, int], out_channels: dict[str, int]) -> None:
        self.in_adapters[client] = nn.ModuleDict({s: nn.Conv2d(in_channels[s], in_channels[s], 1) for s in self.scales})
        self.out_adapters[client] = nn.ModuleDict({s: nn.Conv2d(out_channels[s], out_channels[s], 1) for s in self.scales})
        for s in self.scales:
            for conv in (self.in_adapters[client][s], self.out_adapters[client][s]):
                nn.init.eye_(conv.weight.view(conv.weight.shape[0], -1))
                nn.init.zeros_(conv.bias)
        self.in_frames[client] = nn.ModuleDict({s: Frame(in_channels[s]) for s in self.scales})
        self.out_frames[client] = nn.ModuleDict({s: Frame(out_channels[s]) for s in self.scales})
        if client not in self.clients:
            self.clients.append(client)

    def forward(self, zt: dict[str, torch.Tensor], client: str) -> dict[str, torch.Tensor]:
        if client not in self.in_adapters:
            raise KeyError(f"client: unknown client {client!r}; known: {sorted(self.in_adapters)}")
        out = {}
        for s in self.scales:
            h = self.in_adapters[client][s](self.in_frames[client][s](zt[s]))
            h = self.cores[s](h)
            out[s] = self.out_frames[client][s](self.out_adapters[client][s](h))
        return out


def mixed_forward(model: MappingNet, zt: dict[str, torch.Tensor], cid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward a batch mixing hospitals: each sample goes through its own hospital's adapters,
    and the shared core sees the whole batch (so normalisation statistics pool all hospitals)."""
    out = {}
    present = cid.unique().tolist()
    for s in model.scales:
        x = zt[s]
        h = None
        for c in present:
            m, name = cid == c, model.clients[c]
            part = model.in_adapters[name][s](model.in_frames[name][s](x[m]))
            # the parts' dtype, not the input's: under mixed precision the adapters compute in bf16 or fp16
            h = (torch.zeros_like(x, dtype=part.dtype) if h is None else h).index_put((m,), part)
        y = model.cores[s](h)
        o = None
        for c in present:
            m, name = cid == c, model.clients[c]
            part = model.out_frames[name][s](model.out_adapters[name][s](y[m]))
            o = (torch.zeros_like(y, dtype=part.dtype) if o is None else o).index_put((m,), part)
        out[s] = o
    return out


def mapping_loss(scales: list[str], extra=None):
    """Stage 2's loss, ``loss(model, batch)``: the sum over ``scales`` of the MSE of the mapped keyed image latents
    against the keyed mask latents; ``batch`` is ``[hospital index per row, img_<scale>..., msk_<scale>..., *more]``
    (rows through their own hospital's adapters: :func:`mixed_forward`). The coordinator's stage 2 and a hospital's
    federated round (:mod:`ppcmi.client.fedcore`) both train with this one definition. ``extra(pred, target, more)``,
    where given, is added: a term only a hospital can compute (``mapping.federated_loss = "decoded"``); ``pred`` and
    ``target`` are the keyed latents by scale, ``more`` the batch's tensors after them."""
    k = len(scales)

    def loss_fn(m: MappingNet, batch) -> torch.Tensor:
        c, rest = batch[0], batch[1:]
        pred = mixed_forward(m, dict(zip(scales, rest[:k])), c)
        target = dict(zip(scales, rest[k:2 * k]))
        loss = sum(F.mse_loss(pred[s], target[s]) for s in scales)
        return loss if extra is None else loss + extra(pred, target, rest[2 * k:])

    return loss_fn


@torch.no_grad()
def set_frames(net: MappingNet, client: str, img: dict, msk: dict) -> None:
    """Set ``client``'s fixed frames from principal frames ``(U, mu)`` per scale (arrays; ``mapping.adapter_init = "pca"``):
    the input frame takes keyed image latents to principal coordinates (``U^T (x - mu)``), the output frame takes
    principal coordinates of mask latents back to the keyed frame (``U y + mu``)."""
    for s in net.scales:
        for frame, (u, mu), inverse in ((net.in_frames[client][s], img[s], False), (net.out_frames[client][s], msk[s], True)):
            w, b = (u, mu) if inverse else (u.T, -u.T @ mu)
            frame.weight.copy_(torch.as_tensor(w.copy()).float())
            frame.bias.copy_(torch.as_tensor(b.copy()).float())


NORM_SCOPES = ("local", "shared")


def core_state(net: MappingNet, *, norm: str) -> dict[str, torch.Tensor]:
    """What a federated round shares of ``net`` (``mapping.scope = "federated"``): the floating-point tensors of the shared
    core ``net.cores``, named as in ``net.state_dict()``, in its order. ``norm`` (``mapping.federated_norm``) says where the
    normalisation layers live: "local" (FedBN, Li et al., ICLR 2021): their affines and running statistics stay at each
    hospital and only the convolutions cross; "shared": they cross and are averaged with the rest. The adapters, the frames
    and the integer ``num_batches_tracked`` counters (unused with a fixed BatchNorm momentum) are never part of it."""
    if norm not in NORM_SCOPES:
        raise ConfigError(f"mapping.federated_norm: must be one of {', '.join(NORM_SCOPES)}, got {norm!r}")
    kept = set()
    if norm == "local":
        kept = {f"cores.{name}." for name, m in net.cores.named_modules()
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))}
    return {k: v for k, v in net.state_dict().items()
            if k.startswith("cores.") and v.is_floating_point() and not any(k.startswith(p) for p in kept)}


def config_dict(cfg) -> dict:
    return asdict(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_unet(in_channels: int, n_classes: int) -> nn.Module:
    """The centralized reference's network: a MONAI ``UNet`` (2D, channels 16 to 256, two residual units per level).
    Here, not in :mod:`ppcmi.baselines`, so that the coordinator's planner can count its FLOPs."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=n_classes, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)
