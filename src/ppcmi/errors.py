"""Error types shared by every side; each message is one line that names the file or field.

The ``check_*`` helpers test a setting's type and range and raise :class:`ConfigError` naming it.
"""

import math

SERVICE_EXTRA_HINT = 'pip install -c constraints.txt -e ".[service]" (or make install)'


class PpcmiError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2."""


class DataError(PpcmiError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class KeyFileError(PpcmiError):
    """A key file is missing, has the wrong length or unsafe permissions."""


class ProtocolError(PpcmiError):
    """A message that crosses between hospital and server failed validation."""


class ConfigError(PpcmiError):
    """A configuration file or override is invalid."""


class CheckpointError(PpcmiError):
    """A checkpoint is missing, unreadable or does not match its configuration."""


class CertError(PpcmiError):
    """A TLS certificate or private key is missing, invalid, or would be overwritten."""


class ServiceError(PpcmiError):
    """The HTTPS inference service could not be reached or refused a request."""


def check_int(where: str, value: object, lo: int, hi: int | None = None, why: str = "",
              error: type[PpcmiError] = ConfigError) -> int:
    """``value`` if it is an integer (not a bool) in ``lo..hi``; otherwise an ``error`` naming ``where``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise error(f"{where}: must be an integer {span}{why}, got {value!r}")
    return value


def check_real(where: str, value: object, lo: float, hi: float | None = None, *, lo_open: bool = False,
               hi_open: bool = False, why: str = "", error: type[PpcmiError] = ConfigError) -> float:
    """``float(value)`` if it is a finite number (not a bool) in the interval from ``lo`` to ``hi`` (open ends
    where asked); otherwise an ``error`` naming ``where``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok and lo == -math.inf and hi is None:
        raise error(f"{where}: must be a finite number{why}, got {value!r}")
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
        top = "inf" if hi is None else f"{hi:g}"
        raise error(f"{where}: must be a finite number in {left}{lo:g}, {top}{right}{why}, "
                          f"got {value!r}")
    return float(value)


def check_bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    return value
