"""Label maps (neutral; settings that cross): raw mask values -> class indices, and the ``--labels``
spec that every hospital and the coordinator share.

No reader and no image lives here, so the coordinator can check a label map without loading
hospital code; finding the values in a hospital's masks is :func:`ppcmi.data.discover_labels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

@dataclass(frozen=True)
class LabelMap:
    """Raw mask values -> class indices: ``values[i]`` is class i; ``values[0]`` is background."""

    values: tuple[int, ...]
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            values = tuple(int(v) for v in self.values)
        except (TypeError, ValueError) as e:
            raise DataError(f"labels: values must be integers, got {self.values!r}") from e
        if len(values) < 2:
            raise DataError(f"labels: need at least 2 values (background and one class), got {values}")
        if len(set(values)) != len(values):
            raise DataError(f"labels: values must be distinct, got {values}")
        if not all(-2**31 <= v < 2**31 for v in values):  # masks hold at most 32-bit integers (PNG 16, NIfTI int32)
            raise DataError(f"labels: values must fit in 32-bit integers, got {values}")
        names = tuple(str(n) for n in self.names) or ("background",) + tuple(f"class{i}" for i in range(1, len(values)))
        if len(names) != len(values):
            raise DataError(f"labels: {len(names)} names {names} for {len(values)} values {values}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "names", names)

    @property
    def n_classes(self) -> int:
        return len(self.values)

    def to_index(self, mask: np.ndarray, source: str | Path) -> np.ndarray:
        """int64 class indices of ``mask``; a value outside ``values`` is a DataError naming ``source``."""
        mask = np.asarray(mask)
        vals = np.asarray(self.values, dtype=np.int64)
        order = np.argsort(vals, kind="stable")
        sorted_vals = vals[order]
        pos = np.clip(np.searchsorted(sorted_vals, mask), 0, len(vals) - 1)
        ok = sorted_vals[pos] == mask
        if not ok.all():
            unknown = np.unique(mask[~ok])
            shown = ", ".join(str(v) for v in unknown[:10].tolist()) + (", ..." if len(unknown) > 10 else "")
            raise DataError(f"{source}: mask has label values [{shown}] outside the mapping {self.values}")
        return order[pos].astype(np.int64)


def parse_labels(spec: str | None, names: str | None = None) -> LabelMap | None:
    """``"0,1,2"`` (and optional ``"bg,ps,fh"``) -> LabelMap; ``None``/empty -> None (discover instead)."""
    if spec is None or not str(spec).strip():
        if names is not None and str(names).strip():
            raise DataError(f"--class-names: given ({names!r}) without --labels; give the label values too")
        return None
    parts = [p.strip() for p in str(spec).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise DataError(f"--labels: expected comma-separated integers such as '0,1,2', got {spec!r}") from None
    if len(values) < 2 or len(set(values)) != len(values):
        raise DataError(f"--labels: need at least 2 distinct values (background first), got {spec!r}")
    name_list: tuple[str, ...] = ()
    if names is not None and str(names).strip():
        name_list = tuple(n.strip() for n in str(names).split(","))
        if len(name_list) != len(values) or not all(name_list):
            raise DataError(f"--class-names: {names!r} must give {len(values)} non-empty names "
                            f"to match --labels {spec!r}")
        if "fg" in name_list[1:]:
            raise DataError(f"--class-names: 'fg' is reserved for the merged foreground; rename it in {names!r}")
    return LabelMap(values, name_list)
