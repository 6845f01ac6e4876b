"""What the plane geometry alone costs: a perfect prediction taken to the network size and back; results JSON + markdown.

For each ground-truth mask, at each network size, with each resize mode (``pad``: aspect kept and padded, the
default; ``squash``: both sides to the size, as before config version 3) and each way back:

- probabilities: the mask's one-hot image resized like an image (bilinear), then restored by
  :func:`ppcmi.data.restore_labels` (padding dropped, bilinear to the native crop, argmax): the path every
  prediction now takes;
- labels: the mask resized by nearest neighbour (the training target), then upsampled as labels by nearest
  neighbour to the native grid: the path predictions took before.

Both are scored against the native mask with :func:`ppcmi.metrics.evaluate_cases` (merged foreground and per
class; HD95 in native pixels), so the table is the ceiling each path puts on a model's Dice.

    python benchmarks/geometry.py --data ../shared/data/acdc --name acdc --stride 8 --class-names background,rv,myo,lv
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ppcmi.config import Preprocess
from ppcmi.data import (discover_cases, discover_labels, forward_image, forward_mask, plane_geometry, read_mask, resize_mask,
                        restore_labels)
from ppcmi.fileio import atomic_write_json, atomic_write_text
from ppcmi.labels import parse_labels
from ppcmi.metrics import evaluate_cases, summarize


def _labels_back(mask: np.ndarray, prep: Preprocess) -> np.ndarray:
    """The old way back: nearest forward, nearest upsampling of the labels into the native crop."""
    g = plane_geometry(mask.shape, prep)
    pt, _, pl, _ = g.pad
    return resize_mask(forward_mask(mask, g)[pt:pt + g.scaled[0], pl:pl + g.scaled[1]], mask.shape)


def _probabilities_back(mask: np.ndarray, prep: Preprocess, k: int) -> np.ndarray:
    g = plane_geometry(mask.shape, prep)
    one_hot = np.eye(k, dtype=np.float32)[mask].transpose(2, 0, 1)
    return restore_labels(forward_image(one_hot, g)[None], [g])[0]


def run(data: Path, sizes: list[int], stride: int, class_names: str | None = None) -> dict:
    cases = discover_cases(data)[::stride]
    labels = discover_labels(cases)
    if class_names:
        labels = parse_labels(",".join(map(str, labels.values)), class_names)
    k = labels.n_classes
    masks = [labels.to_index(read_mask(c.mask_path, c.slice_index)[0], c.mask_path) for c in cases]
    ids = [c.case_id for c in cases]
    shapes = sorted({m.shape for m in masks})
    out: dict = {"data": data.name, "n_masks": len(masks), "stride": stride, "native_shapes": len(shapes),
                 "classes": list(labels.names), "rows": []}
    for size in sizes:
        for resize in ("pad", "squash"):
            prep = replace(Preprocess(size=size), resize=resize)
            for path in ("probabilities", "labels"):
                t0 = time.perf_counter()
                back = [_probabilities_back(m, prep, k) if path == "probabilities" else _labels_back(m, prep) for m in masks]
                rows = evaluate_cases(back, masks, ids, k, class_names=list(labels.names))
                s = summarize(rows, n_boot=1)  # means only
                per_class = {n: s[f"{n}_dice"]["mean"] for n in labels.names[1:]}
                out["rows"].append({"size": size, "resize": resize, "path": path, "fg_dice": s["fg_dice"]["mean"],
                                    "class_dice": per_class, "fg_hd95_px": s["fg_hd95_px"]["mean"],
                                    "seconds": time.perf_counter() - t0})
    return out


def markdown(res: dict) -> str:
    names = res["classes"][1:]
    lines = [f"### {res['data']}: a perfect prediction to the network size and back ({res['n_masks']} masks, "
             f"{res['native_shapes']} native shapes)", "",
             f"| size | resize | way back | merged-foreground Dice | {' | '.join(f'{n} Dice' for n in names)} | HD95 px |",
             "|---|---|---|---|" + "---|" * len(names) + "---|"]
    for r in res["rows"]:
        lines.append(f"| {r['size']} | {r['resize']} | {r['path']} | {r['fg_dice']:.4f} | "
                     + " | ".join(f"{r['class_dice'][n]:.4f}" for n in names) + f" | {r['fg_hd95_px']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--name", required=True, help="results go to OUT/geometry-NAME.{json,md}")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sizes", default="96,128,256")
    ap.add_argument("--stride", type=int, default=1, help="every STRIDE-th mask (in discovery order)")
    ap.add_argument("--class-names", default=None, help="e.g. background,rv,myo,lv")
    a = ap.parse_args()
    res = run(a.data, [int(s) for s in a.sizes.split(",")], a.stride, a.class_names)
    atomic_write_json(a.out / f"geometry-{a.name}.json", res)
    atomic_write_text(a.out / f"geometry-{a.name}.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
