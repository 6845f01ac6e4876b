"""Train / validation / test splits of one hospital's cases (hospital side): patient-disjoint by
group, from a seed, or from provided lists.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .discovery import Case

log = logging.getLogger(__name__)

def _count(frac: float, n: int) -> int:
    return int(math.floor(frac * n + 0.5))


def split_cases(cases: Sequence[Case], *, val_frac: float = 0.2, test_frac: float = 0.2, seed: int = 0,
                by_group: bool = True) -> dict[str, list[Case]]:
    """Random train/val/test split; with ``by_group`` whole groups (patients) go to one split.

    Fractions are of groups (``by_group``) or of cases. With 3 or more units every non-zero
    fraction gets at least one unit and train keeps at least one. Deterministic for a seed.
    """
    for name, f in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0 <= f < 1:
            raise DataError(f"{name}: must be in [0, 1), got {f}")
    if val_frac + test_frac >= 1:
        raise DataError(f"val_frac + test_frac: must be below 1, got {val_frac} + {test_frac}")
    if not cases:
        raise DataError("split_cases: no cases to split")
    units = sorted({c.group for c in cases}) if by_group else sorted(c.case_id for c in cases)
    n = len(units)
    n_test, n_val = _count(test_frac, n), _count(val_frac, n)
    if n >= 3:
        n_test = max(n_test, 1) if test_frac > 0 else 0
        n_val = max(n_val, 1) if val_frac > 0 else 0
    while n_test + n_val > n - 1 and n_test + n_val > 0:  # keep at least one unit for training
        if n_val >= n_test and n_val > (1 if n >= 3 and val_frac > 0 else 0):
            n_val -= 1
        elif n_test > (1 if n >= 3 and test_frac > 0 else 0):
            n_test -= 1
        elif n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    perm = np.random.default_rng(seed).permutation(n)
    where = {}
    for rank, i in enumerate(perm):
        where[units[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    out: dict[str, list[Case]] = {"train": [], "val": [], "test": []}
    for c in sorted(cases, key=lambda c: c.case_id):
        out[where[c.group if by_group else c.case_id]].append(c)
    log.info("split (%s, seed %d): %s", "by group" if by_group else "by case", seed,
             ", ".join(f"{k} {len(v)}" for k, v in out.items()))
    return out


def split_from_lists(cases: Sequence[Case], lists: dict[str, str | Path]) -> dict[str, list[Case]]:
    """Split by list files (one volume or slice name per line; ``#`` comments and blank lines skipped).

    A case belongs to a split if its case_id equals an entry or starts with ``entry + "_"``. A case
    matched by two splits is a DataError; cases in no list are dropped (logged). A relative list
    path that does not exist is also looked up in the dataset root (the parent of ``images/``).
    """
    if not lists:
        raise DataError("split_lists: no list files given")
    root = Path(cases[0].image_path).parent.parent if cases else None
    entry_split: dict[str, str] = {}
    entry_file: dict[str, Path] = {}
    for split, lp in lists.items():
        path = Path(lp)
        if not path.is_absolute() and not path.exists() and root is not None and (root / path).exists():
            path = root / path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise DataError(f"{path}: cannot read the {split!r} list ({type(e).__name__}: {e.strerror or e})") from e
        for line in lines:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry in entry_split and entry_split[entry] != split:
                raise DataError(f"{path}: {entry!r} is listed in both {entry_split[entry]!r} ({entry_file[entry]}) "
                                f"and {split!r}")
            entry_split[entry], entry_file[entry] = split, path
    out: dict[str, list[Case]] = {k: [] for k in lists}
    used: set[str] = set()
    dropped = 0
    for c in sorted(cases, key=lambda c: c.case_id):
        cid = c.case_id
        keys = [cid] + [cid[:i] for i, ch in enumerate(cid) if ch == "_"]
        hits = {k: entry_split[k] for k in keys if k in entry_split}
        splits = set(hits.values())
        if len(splits) > 1:
            detail = ", ".join(f"{k!r} in {entry_file[k]}" for k in hits)
            raise DataError(f"{c.image_path}: case {cid!r} is listed in {len(splits)} splits ({detail})")
        if not splits:
            dropped += 1
            continue
        used.update(hits)
        out[splits.pop()].append(c)
    if dropped:
        log.info("split lists: %d of %d cases are in no list and were dropped", dropped, len(cases))
    unused = len(entry_split) - len(used)
    if unused:
        log.warning("split lists: %d of %d entries match no case (e.g. %r)", unused, len(entry_split),
                    next(e for e in entry_split if e not in used))
    log.info("split from lists: %s", ", ".join(f"{k} {len(v)}" for k, v in out.items()))
    return out
