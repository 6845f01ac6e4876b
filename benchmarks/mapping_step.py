"""The mapping network's training step on the CPU: what each execution variant costs (issue 15, section 3).

One step is what ``ppcmi.training.fit`` does per batch in stage 2: the pooled batch through each hospital's
adapters and the shared core (:func:`ppcmi.models.mixed_forward`), the sum over scales of MSE, backward and an
Adam step. The network gets seeded untrained weights and seeded random latents of the shapes its autoencoders
give (a step's cost does not depend on their values). Variants:

- ``fp32``: float32, contiguous NCHW tensors: what the package does on the CPU;
- ``channels_last``: the network and its inputs in channels-last memory format;
- ``bf16``: the forward pass under bfloat16 autocast (``--mixed`` / ``mixed=True`` on the CPU);
- ``compile``: each scale's shared core under ``torch.compile`` (float32, static shapes), compile time excluded;

each on 1 torch thread (what the demo gives each of its two concurrent trainings on 2 cores) and on every
core. It prints and writes ``mapping-step.json`` and ``mapping-step.md`` (``--tag T``: ``mapping-step-T.*``; median and interquartile range of
``--steps`` timed steps after ``--warmup`` untimed ones) into ``--out``.

    .venv/bin/python benchmarks/mapping_step.py --out benchmarks/results
    .venv/bin/python benchmarks/mapping_step.py --out benchmarks/results --configs demo --variants fp32,compile --tag compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from ppcmi.experiment import machine
from ppcmi.fileio import atomic_write_json, atomic_write_text
from ppcmi.models import AEConfig, MappingConfig, MappingNet, count_parameters, mapping_loss
from ppcmi.training import seeded_init

# name: (autoencoder width, network input size, mapping widths, what uses it)
CONFIGS = {
    "demo": (0.5, 96, MappingConfig(widen=(16, 32, 64), mid=(64, 128), down=(32, 16, 8)),
             "make demo: half-width autoencoders at 96 px, the demo's compact mapping widths"),
    "cpu": (1.0, 128, MappingConfig(), "the package's CPU widths at 128 px"),
}
VARIANTS = ("fp32", "channels_last", "bf16", "compile")
CLIENTS = ("h1", "h2", "h3")


def build(width: float, size: int, mcfg: MappingConfig, n_classes: int = 3):
    img = AEConfig(in_channels=1, width=width).latent_shapes(size)
    msk = AEConfig(in_channels=n_classes, width=width).latent_shapes(size)
    scales = list(img)
    net = seeded_init(lambda: MappingNet({s: img[s][0] for s in scales}, {s: msk[s][0] for s in scales}, list(CLIENTS), mcfg), 0)
    return net, scales, img, msk


def batch_for(scales, img, msk, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    cid = torch.arange(batch) % len(CLIENTS)
    return [cid, *(torch.randn(batch, *img[s], generator=gen) for s in scales),
            *(torch.randn(batch, *msk[s], generator=gen) for s in scales)]


def time_variant(cfg_name: str, variant: str, threads: int, batch: int, steps: int, warmup: int) -> dict:
    width, size, mcfg, _ = CONFIGS[cfg_name]
    torch.set_num_threads(threads)
    net, scales, img, msk = build(width, size, mcfg)
    gen = torch.Generator().manual_seed(1)
    data = batch_for(scales, img, msk, batch, gen)
    loss_fn = mapping_loss(scales)
    if variant == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        data = [data[0], *(t.contiguous(memory_format=torch.channels_last) for t in data[1:])]
    if variant == "compile":  # each scale's shared core, which sees the whole pooled batch (the adapters' per-hospital
        for sc in scales:      # splits have data-dependent sizes, which the compiler's pooling lowering rejects)
            net.cores[sc] = torch.compile(net.cores[sc], dynamic=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()

    def step() -> None:
        if variant == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(net, data)
        else:
            loss = loss_fn(net, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()  # the first step (compilation, for compile)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"config": cfg_name, "variant": variant, "threads": threads, "batch": batch, "steps": steps,
            "median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "first_step_s": first_s,
            "parameters": count_parameters(net)}


def table(rows: list[dict], base: dict[tuple, float]) -> str:
    out = ["| config | threads | variant | step ms (median) | IQR ms | speed vs fp32, same threads | first step s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = base[(r["config"], r["threads"])]
        out.append(f"| {r['config']} | {r['threads']} | {r['variant']} | {r['median_ms']:.1f} | "
                   f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f} | {ref / r['median_ms']:.2f}x | {r['first_step_s']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for mapping-step.{json,md}")
    ap.add_argument("--configs", default="demo,cpu", help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--variants", default="fp32,channels_last,bf16",
                    help=f"comma-separated, from {', '.join(VARIANTS)} (compile is not in the default: its first step "
                         "compiles for minutes on 2 cores)")
    ap.add_argument("--tag", default="", help="results go to mapping-step-TAG.{json,md} (default: mapping-step.{json,md})")
    ap.add_argument("--batch", type=int, default=16, help="rows per step (the mapping network's batch; default 16)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (default 3)")
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"--configs: unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    cores = os.cpu_count() or 1
    rows, failed = [], []
    for c in configs:
        for threads in sorted({1, cores}):
            for v in variants:
                try:
                    r = time_variant(c, v, threads, args.batch, args.steps, args.warmup)
                except Exception as e:  # a variant torch cannot run here is a result too, not the end of the table
                    print(f"{c:5s} {threads} thread(s) {v:14s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    failed.append({"config": c, "variant": v, "threads": threads,
                                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                    continue
                print(f"{c:5s} {threads} thread(s) {v:14s} {r['median_ms']:8.1f} ms/step", flush=True)
                rows.append(r)
    base = {(r["config"], r["threads"]): r["median_ms"] for r in rows if r["variant"] == "fp32"}
    for r in rows:  # (without an fp32 row, the first variant is the reference)
        base.setdefault((r["config"], r["threads"]), r["median_ms"])
    about = "; ".join(f"{c}: {CONFIGS[c][3]}" for c in configs)
    m = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"mapping-step-{args.tag}" if args.tag else "mapping-step"
    atomic_write_json(args.out / f"{stem}.json", {"machine": m, "batch": args.batch, "configs": about, "rows": rows,
                                                  "failed": failed})
    md = (f"# The mapping network's training step on the CPU\n\n{m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']}; "
          f"batch {args.batch} pooled over {len(CLIENTS)} hospitals; median of {args.steps} steps after {args.warmup + 1} untimed. "
          f"Configs: {about}.\n\n" + table(rows, base) + "\n"
          + "".join(f"\n- {f['config']}, {f['threads']} thread(s), {f['variant']}: failed ({f['error']})" for f in failed))
    atomic_write_text(args.out / f"{stem}.md", md)
    print(md)


if __name__ == "__main__":
    main()
