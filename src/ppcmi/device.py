"""Where a party computes (neutral code, used by hospitals and by the coordinator): CPU, CUDA or MPS, and mixed precision.

The device is a per-party runtime choice (``--device``), never a shared setting: a hospital with a GPU
and a coordinator on a CPU train the same models from the same configuration. ``resolve_device("auto")``
picks CUDA, then MPS, then the CPU. Everything random (keys, splits, batch order, augmentation draws)
is drawn on the CPU with local generators and only then moved, so a device changes the arithmetic's
rounding, never what is drawn.

Mixed precision is on by default on CUDA only (bf16 autocast where the GPU supports it, else fp16 with a
:class:`torch.amp.GradScaler`); on the CPU and MPS every computation stays float32 unless asked, so a
CPU run gives today's results bit for bit.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import torch

from .errors import ConfigError

_SPEC = re.compile(r"auto|cpu|mps|cuda(?::([0-9]+))?")

Device = torch.device | str | None


def resolve_device(spec: Device = "auto", *, where: str = "--device") -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (or a ``torch.device``; ``None`` is the CPU) as a
    ``torch.device`` that is there; a device this machine lacks is a one-line :class:`ConfigError` naming ``where``
    (the option or setting it came from)."""
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec.strip().lower()):
        raise ConfigError(f"{where}: must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise ConfigError(f"{where}: mps is not available here (needs Apple silicon and a torch built with MPS); use cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}: {spec} is not available here (torch {torch.__version__} sees no CUDA GPU); use cpu or auto")
    index = int(_SPEC.fullmatch(spec).group(1) or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{where}: {spec} is not available here ({torch.cuda.device_count()} CUDA GPU(s): "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def describe(device: torch.device) -> str:
    """A device in words for logs and results files, e.g. ``cuda:0 (NVIDIA H200)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def mixed_dtype(device: torch.device, mixed: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None for float32.

    ``mixed=None`` is the device's default: on CUDA bf16 where supported, else fp16; float32 on the CPU and
    MPS. ``mixed=True`` asks for it anywhere (bf16 on the CPU, fp16 on MPS); ``mixed=False`` is float32."""
    if mixed is False or (mixed is None and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def autocast(device: torch.device, mixed: bool | None = None):
    """A context manager running the enclosed forward passes under :func:`mixed_dtype` (a no-op for float32)."""
    dtype = mixed_dtype(device, mixed)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, mixed: bool | None = None) -> torch.amp.GradScaler | None:
    """The gradient scaler fp16 training needs (None for float32 and bf16, which need none)."""
    if mixed_dtype(device, mixed) is torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def channels_last(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` moved to ``device``; on CUDA also in channels-last memory format (faster convolutions there).

    On the CPU only the move, which leaves the module as it is (code that already chose channels-last keeps it)."""
    module = module.to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return module


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a float32 numpy array on the host, from any device and dtype."""
    return t.detach().float().cpu().numpy()


__all__ = ["Device", "resolve_device", "describe", "mixed_dtype", "autocast", "grad_scaler", "channels_last",
           "to_numpy"]
