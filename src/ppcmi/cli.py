"""The ``ppcmi`` command line: thin wrappers over the library, grouped by trust side.

``ppcmi client ...`` runs at a hospital, ``ppcmi server ...`` at the coordinator; ``simulate``
and ``demo`` play every role in one process. Errors print one line (``error: ...``) and exit 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from typer.core import TyperGroup

from .errors import PpcmiError


def _one_line_usage_error(e: click.ClickException) -> typer.Exit:
    """A command-line mistake (an unknown option, a missing one, a value of the wrong type) as the one
    error line every other failure prints, with the command whose help to read."""
    ctx = getattr(e, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    typer.echo(f"error: {e.format_message()}{where}", err=True)
    return typer.Exit(2)


_SHOWS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2: a bare group shows its help


class _Group(TyperGroup):
    """The top-level group: click's usage errors become ``error: ...`` lines with exit status 2, like every
    other failure of user input (a bare ``ppcmi`` or ``ppcmi client`` still shows the help)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _SHOWS_HELP:
            raise
        except click.ClickException as e:
            raise _one_line_usage_error(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _SHOWS_HELP:
            raise
        except click.ClickException as e:
            raise _one_line_usage_error(e) from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="markdown",
                  help="PPCMI-SF: hospitals share only keyed latents; a key-less server maps image latents to mask latents.")
client_app = typer.Typer(no_args_is_help=True, help="Hospital side: keys, local training, encode+protect, unprotect+decode.")
server_app = typer.Typer(no_args_is_help=True, help="Coordinator side: train the mapping network and map keyed queries.")
certs_app = typer.Typer(no_args_is_help=True, help="Certificates for mutual TLS: a project CA, the server's certificate, "
                        "one client certificate per hospital (CN = its site id).")
flower_app = typer.Typer(no_args_is_help=True, help="Flower deployment files: SuperNode keys, the app folder (SuperLink certificates: ppcmi certs init).")
app.add_typer(client_app, name="client")
app.add_typer(server_app, name="server")
app.add_typer(certs_app, name="certs")
app.add_typer(flower_app, name="flower")

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file ([data], [autoencoder], [mapping] sections).")
SetOpt = typer.Option(None, "--set", help="Typed override, e.g. --set autoencoder.epochs=5 (repeatable).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
LabelsOpt = typer.Option(None, "--labels", help="Raw mask values in class order, e.g. 0,1,2 (default: discovered); "
                         "a mask value outside them is an error.")
NamesOpt = typer.Option(None, "--class-names", help="Class names in the same order, e.g. background,ps,fh.")
SizeOpt = typer.Option(None, "--size", help="Network input size in pixels (square).")
WindowOpt = typer.Option(None, "--window", help="Fixed intensity window LOW,HIGH after --offset (e.g. -1000,1000 for CT).")
OffsetOpt = typer.Option(None, "--offset", help="Subtracted from raw values first (1024 for CT stored as HU+1024).")
BudgetOpt = typer.Option(None, "--budget", help="Minutes both training stages may take on this machine (the plan sizes "
                         "resolution, batches and epochs to it; default 20, for a 2-core CPU).")
DeviceOpt = typer.Option("auto", "--device", help="Where this party computes: auto (CUDA, then MPS, then the CPU), cpu, "
                         "cuda, cuda:N or mps. Each party chooses its own; it is not a shared setting. Mixed precision "
                         "(bf16, or fp16 with a gradient scaler) and channels-last are used on CUDA only.")
ModalityOpt = typer.Option(None, "--modality", help="CT, MR, US, XR, PET or OTHER, where dataset.json or a DICOM header does "
                           "not tell (it picks the intensity normalisation).")


LocalEpochsOpt = typer.Option(None, "--local-epochs", min=1, help="With --set mapping.scope=federated: local epochs per Flower "
                              "round (rounds = mapping.epochs / this; default: the divisor giving about 15 rounds).")


def _federated_core(cfg, data: Path, out: Path, *, local_epochs: Optional[int], device: str, quiet: bool,
                    planned=None, port: Optional[int] = None, settings=None, title: str = "PPCMI-SF federated core") -> dict:
    """``mapping.scope = "federated"`` for ``simulate`` and ``deploy``: the latents stay at the hospitals, so the core trains
    on a real loopback Flower federation with SecAgg+ (:func:`ppcmi.flower.fedcore.run_federated_core`) whichever runner
    asked; prints the scores and what crossed."""
    from .demo import table
    from .fileio import atomic_write_json
    from .flower.fedcore import run_federated_core
    from .simulate import public_summary, write_plan

    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise PpcmiError(f"{out}: folder is not empty; choose another --out")
    res = run_federated_core(cfg, data, out, local_epochs=local_epochs, settings=settings, port=port, progress=not quiet,
                             device=device, echo=lambda line: typer.echo(line))
    if planned is not None:
        write_plan(out, *planned)
    atomic_write_json(out / "summary.json", public_summary(res))
    f, t = res["federated"], res["timings_s"]
    typer.echo("")
    typer.echo(table({"methods": {title: res["ppcmi"]}}))
    per = ", ".join(f"{h} {b['uploaded_bytes'] / 1e6:.1f} / {b['downloaded_bytes'] / 1e6:.1f}" for h, b in f["hospitals"].items())
    rounds = f"{f['rounds']} round{'s' * (f['rounds'] != 1)} x {f['local_epochs']} local epoch{'s' * (f['local_epochs'] != 1)}"
    typer.echo(f"\n{rounds} under SecAgg+; MB per hospital up / down: {per}; "
               f"wall time: stage 1 {t['stage1_s']:.0f} s, federation {t['flwr_run_s']:.0f} s; results in {out}")
    return res


def _data_sets(labels: Optional[str], names: Optional[str], size: Optional[int], window: Optional[str],
               offset: Optional[float]) -> list[str]:
    """The data options as --set overrides (they win over the config file)."""
    out = []
    if labels is not None:
        out.append(f"data.labels={labels}")
    if names is not None:
        out.append(f"data.class_names={names}")
    if size is not None:
        out.append(f"data.size={size}")
    if window is not None:
        out += [f"data.window={window}", "data.intensity=window"]
    if offset is not None:
        out.append(f"data.offset={offset}")
    return out


def _explicit(config: Optional[Path], sets: Optional[List[str]]) -> list[str]:
    """The settings the user chose (``--config`` file keys and ``--set`` keys): a plan never replaces them."""
    import tomllib

    keys = [ov.split("=", 1)[0].strip() for ov in sets or []]
    if config is not None and Path(config).is_file():
        def flat(raw: dict, prefix: str = "") -> list[str]:
            return [n for k, v in raw.items()
                    for n in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "split_lists" else [f"{prefix}{k}"])]
        try:
            keys += flat(tomllib.loads(Path(config).read_text()))
        except tomllib.TOMLDecodeError:
            pass  # load_config reports it
    return keys


def _planned(cfg, config: Optional[Path], sets: list[str], data: Path, budget: Optional[float], modality: Optional[str],
             threads: Optional[int] = None):
    """(run configuration, (plan, fingerprint bytes)) of a planned simulated run (:func:`ppcmi.simulate.plan_run`;
    ``threads``: the torch threads each training will get)."""
    if budget is not None and not budget > 0:
        raise PpcmiError(f"--budget: must be a positive number of minutes, got {budget:g}")
    from .server.plan import DEFAULT_BUDGET_MIN, describe
    from .simulate import plan_run

    run_cfg, planned, wire = plan_run(cfg, data, explicit=_explicit(config, sets),
                                      budget_min=DEFAULT_BUDGET_MIN if budget is None else budget, modality=modality,
                                      threads=threads)
    typer.echo(describe(planned), err=True)
    return run_cfg, (planned, wire)


def _device(spec: str):
    """``--device`` as a torch device that this machine has (a one-line error otherwise)."""
    from .device import resolve_device

    return resolve_device(spec)


def _guard(fn):
    """Turn failures of user input and local files into one line on stderr and exit status 2.

    Library errors (:class:`ppcmi.errors.PpcmiError`) carry their own line; an OSError that names a
    file (unreadable, a folder where a file should be, no permission, ...) is printed with that name;
    anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except PpcmiError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except OSError as e:
            if e.filename is None:  # not about a file: shown in full
                raise
            names = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
            typer.echo(f"error: {names}: {e.strerror or type(e).__name__}", err=True)
            raise typer.Exit(2)
        except MemoryError as e:  # a last line of defence: sizes and counts are bounded where they are read
            typer.echo(f"error: out of memory ({str(e) or 'MemoryError'}); a size, count or input is larger than this "
                       "machine can hold", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted: completed epochs are saved; rerun with --resume to continue", err=True)
            raise typer.Exit(130)

    return wrapper


# Whose settings each side's commands read: shared settings are for everyone (one settings file serves
# every party); a hospital's own settings and an experiment's are refused where nothing reads them.
COORDINATOR_READS = ("shared",)
HOSPITAL_READS = ("shared", "hospital")


def _cfg(config: Optional[Path], sets: Optional[List[str]], base=None, *, command: str | None = None,
         reads: tuple[str, ...] | None = None):
    from .config import load_config, reader

    for ov in (sets or []) if reads is not None else []:
        key = ov.split("=", 1)[0].strip()
        if reader(key) not in reads:
            raise PpcmiError(f"--set {key}: {'an' if reader(key) == 'experiment' else 'a'} {reader(key)} setting, which "
                             f"'ppcmi {command}' does not read; leave it out here")
    return load_config(config, sets or [], base=base)


# ----------------------------------------------------------------------------- data


@app.command()
@_guard
def synth(out: Path = typer.Argument(..., help="Output folder (images/, masks/, groups.csv)."),
          sites: int = typer.Option(3, help="Number of sites with their own intensity and noise."),
          patients: int = typer.Option(4, help="Patients per site."),
          slices: int = typer.Option(8, help="Slices per patient."),
          size: int = typer.Option(128, help="Image size in pixels."),
          classes: int = typer.Option(3, help="Number of classes including background."),
          seed: int = typer.Option(0, help="Random seed."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier 'ppcmi synth' output in OUT: its "
                                         "images/, masks/, groups.csv and README.md, each file atomically, once every new "
                                         "file is ready. A file in images/ or masks/ that synth did not write is still refused.")):
    """Write synthetic multi-site, multi-class phantom data in the images/ + masks/ layout.

    Nothing is written into a folder that already holds images/ or masks/ entries, groups.csv or
    README.md, unless --overwrite is given.
    """
    from .experiment import synth as _synth

    p = _synth(out, sites=sites, patients_per_site=patients, slices_per_patient=slices, size=size, n_classes=classes,
               seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {sites * patients * slices} synthetic cases to {p} (group CSV: {p / 'groups.csv'})")


# ----------------------------------------------------------------------------- hospital side


@client_app.command("keygen")
@_guard
def client_keygen(site_dir: Path = typer.Option(..., "--site-dir", "-s", help="The hospital's private site folder.")):
    """Create this hospital's 32-byte secret key (mode 0600). Never overwrites an existing key.

    There is deliberately no --overwrite: a lost key makes every reply to this site undecodable.
    'ppcmi client rotate-key' replaces a key and keeps the old one as klt.key.N.bak.
    """
    from .client.keys import key_path, keygen
    from .fileio import ensure_dir

    ensure_dir(site_dir)
    p = keygen(key_path(site_dir))
    typer.echo(f"key written to {p} (mode 0600); back it up: without it this site's latents cannot be decoded")


@client_app.command("train")
@_guard
def client_train(site_dir: Path = typer.Option(..., "--site-dir", "-s", help="Site folder holding the key."),
                 data: Path = typer.Option(..., "--data", "-d", help="This hospital's training data (images/ + masks/)."),
                 name: str = typer.Option(..., "--name", "-n", help="This hospital's site id, as the server knows it."),
                 config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                 labels: Optional[str] = LabelsOpt, class_names: Optional[str] = NamesOpt, size: Optional[int] = SizeOpt,
                 window: Optional[str] = WindowOpt, offset: Optional[float] = OffsetOpt,
                 resume: bool = typer.Option(False, help="Continue an interrupted run from its last completed epoch (the same "
                                             "data settings, labels and topology; site.json changes only if it succeeds)."),
                 overwrite: bool = typer.Option(False, "--overwrite", help="Train this site's autoencoders again from scratch "
                                                "(the key stays): the new ones train in SITE/.retrain/ and replace the old ones "
                                                "and site.json only once both are complete. The server's adapters for this site "
                                                "then no longer fit: send a new 'train' message."),
                 seed: Optional[int] = typer.Option(None, min=0, max=2**32 - 1, help="This hospital's site seed (validation split, batch "
                                                    "order); default: derived from the shared seed and --name."),
                 device: str = DeviceOpt, quiet: bool = QuietOpt):
    """Stage 1: train the image and mask autoencoders on this hospital's data only.

    A site that already has trained autoencoders is refused unless --resume or --overwrite is given.
    A refused or failed run leaves site.json as it was (a failed --resume keeps the epochs it completed
    for the next --resume; a failed --overwrite leaves the old autoencoders in place).
    """
    from .client import stages
    from .client.keys import key_path, load_key
    from .config import to_dict
    from .data import discover_cases, discover_labels
    from .fileio import atomic_write_json
    from .labels import parse_labels

    if resume and overwrite:
        raise PpcmiError("--resume and --overwrite: choose one (continue the run here, or start over)")
    cfg = _cfg(config, (set_ or []) + _data_sets(labels, class_names, size, window, offset), command="client train",
               reads=HOSPITAL_READS)
    dev = _device(device)
    load_key(key_path(site_dir))  # a missing or unsafe key fails before the data is read
    cases = discover_cases(data, group_regex=cfg.data.group_regex, group_csv=cfg.data.group_csv, rois=cfg.data.roi_names())
    labels = parse_labels(cfg.data.labels, cfg.data.class_names) or discover_labels(cases)
    arr = stages.prepare(cases, cfg, labels, progress=not quiet)
    res = stages.train_autoencoders(site_dir, name, arr, cfg, labels, seed=stages.default_site_seed(cfg.seed, name) if seed is None else seed,
                                    resume=resume, overwrite=overwrite, progress=not quiet, create_key=False, device=dev)
    atomic_write_json(site_dir / "config.json", to_dict(cfg))
    for kind, r in res.items():
        typer.echo(f"{kind} autoencoder: best val loss {r.best_val:.4f} at epoch {r.best_epoch} ({len(r.history)} epochs, {r.seconds:.0f} s)")


@client_app.command("encode")
@_guard
def client_encode(site_dir: Path = typer.Option(..., "--site-dir", "-s"),
                  data: Path = typer.Option(..., "--data", "-d", help="A dataset folder (images/ [+ masks/]) or one image file."),
                  out: Path = typer.Option(..., "--out", "-o", help="Message file to send to the server (with --with-masks: "
                                           "a new folder of chunk files, the hospital's training set)."),
                  with_masks: bool = typer.Option(False, "--with-masks", help="Send keyed image+mask pairs for stage 2 (a set of 'train' chunks)."),
                  float16: bool = typer.Option(False, "--float16", help="Send float16 latents (half the payload)."),
                  noise: Optional[float] = typer.Option(None, min=0.0, help="Gaussian noise std added to latents before they "
                                                        "leave (a privacy knob; default: the site's autoencoder.send_noise)."),
                  device: str = DeviceOpt):
    """Encode and protect: write keyed latents as one protocol message (and a local case list beside it)."""
    from .client.inference import encode_folder

    n, size = encode_folder(site_dir, data, out, with_masks=with_masks, float16=float16, noise=noise, device=_device(device))
    chunks = f" in {sum(1 for _ in out.iterdir())} chunks" if out.is_dir() else ""
    typer.echo(f"wrote {out}: {n} {'keyed training pairs' if with_masks else 'images'}, {size} bytes{chunks} "
               f"(case list kept locally in {out}.cases.json)")


@client_app.command("decode")
@_guard
def client_decode(site_dir: Path = typer.Option(..., "--site-dir", "-s"),
                  reply: Path = typer.Option(..., "--reply", "-r", help="The server's reply message."),
                  cases: Path = typer.Option(None, "--cases", help="Local case list written by 'client encode' (default: QUERY.cases.json)."),
                  out: Path = typer.Option(..., "--out", "-o", help="Folder for the label maps."),
                  overwrite: bool = typer.Option(False, "--overwrite", help="Replace label maps of the same names already in "
                                                 "OUT (each atomically). Without it one existing file refuses them all, "
                                                 "before any is written."),
                  device: str = DeviceOpt):
    """Unprotect and decode the server's reply into label maps in the inputs' format.

    Every output path is checked before anything is written: a refusal leaves no label map behind.
    """
    from .client.inference import decode_reply

    written = decode_reply(site_dir, reply, cases, out, overwrite=overwrite, device=_device(device))
    typer.echo(f"wrote {len(written)} label maps to {out}")


@client_app.command("rotate-key")
@_guard
def client_rotate_key(site_dir: Path = typer.Option(..., "--site-dir", "-s", help="The hospital's site folder (trained)."),
                      data: Path = typer.Option(..., "--data", "-d", help="This hospital's training data (images/ + masks/)."),
                      out: Path = typer.Option(..., "--out", "-o", help="The new 'train' message for the server."),
                      copies: Optional[int] = typer.Option(None, help="Pairs plus copies-1 augmented copies (default: the site's send_copies)."),
                      noise: Optional[float] = typer.Option(None, help="Latent noise std (default: the site's send_noise)."),
                      device: str = DeviceOpt):
    """Replace the key (the old one is kept as klt.key.N.bak, mode 0600) and re-encode the training pairs under the new key.

    Send OUT to the server, which re-fits only this hospital's adapters ('ppcmi server refit-adapters').
    """
    from .client.inference import rotate_and_encode

    new, backup, n, size = rotate_and_encode(site_dir, data, out, copies=copies, noise=noise, device=_device(device))
    typer.echo(f"new key in {new}; old key kept in {backup} (mode 0600)")
    typer.echo(f"wrote {out}: {n} keyed training rows, {size} bytes; send it to the server for 'ppcmi server refit-adapters'")


# ----------------------------------------------------------------------------- coordinator side


@server_app.command("refit-adapters")
@_guard
def server_refit_adapters(model: Path = typer.Option(..., "--model", "-m", help="The trained model folder (left untouched)."),
                          message: Path = typer.Option(..., "--message", help="The hospital's new training set (its folder) after a key rotation."),
                          out: Path = typer.Option(..., "--out", "-o", help="New model folder."),
                          previous: Optional[Path] = typer.Option(None, "--previous", help="The hospital's earlier 'train' message: "
                                                                  "the old-to-new change of frame goes into its fixed frames (see PRIVACY.md)."),
                          config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt, device: str = DeviceOpt,
                          quiet: bool = QuietOpt):
    """Re-fit one hospital's 1x1 adapters on its new message with the shared core frozen (after 'client rotate-key').

    With --previous, the least-squares old-to-new change of frame goes into the hospital's fixed frames
    and its trained adapters are kept (any model). Without it, a model trained with canonical frames
    (mapping.adapter_init = "pca", the default) takes the new key's frames and keeps its adapters; a
    model with identity adapters restarts them from the identity, which fails in practice (PRIVACY.md).
    """
    from .server.inbox import read_set
    from .server.mapping import refit_adapters

    cfg = _cfg(config, set_, command="server refit-adapters", reads=COORDINATOR_READS)
    dev = _device(device)
    msgs = [read_set(p) for p in [message] + ([previous] if previous else [])]
    _, res = refit_adapters(model, msgs[0], cfg.mapping, out, seed=cfg.seed, previous=msgs[1] if previous else None, progress=not quiet,
                            device=dev)
    typer.echo(f"adapters of {msgs[0].client}: best val loss {res.best_val:.4f} at epoch {res.best_epoch} ({len(res.history)} epochs) -> {out}")


@server_app.command("train")
@_guard
def server_train(messages: List[Path] = typer.Argument(..., help="The hospitals' training sets: their folders, or chunk files in any order."),
                 out: Path = typer.Option(..., "--out", "-o", help="Model folder."),
                 config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                 resume: bool = typer.Option(False, help="Continue an interrupted run."), device: str = DeviceOpt,
                 quiet: bool = QuietOpt):
    """Stage 2: train the mapping network on the hospitals' keyed latent pairs (with mapping.scope=per_hospital,
    one network per hospital in OUT/<hospital>/, each served with --model OUT/<hospital>)."""
    from .config import to_dict
    from .fileio import atomic_write_json
    from .server.inbox import open_sets
    from .server.stages import train_mappings

    cfg = _cfg(config, set_, command="server train", reads=COORDINATOR_READS)
    dev = _device(device)
    sets = open_sets(messages)  # every chunk checked; rows read from disk while training
    trained = train_mappings(sets, cfg.mapping, out, seed=cfg.seed, resume=resume, progress=not quiet, device=dev)
    atomic_write_json(out / "run_config.json", to_dict(cfg))
    for sub, res in trained.fits.items():
        where = out / sub if sub else out
        typer.echo(f"mapping network{' for ' + sub if sub else ''}: best val loss {res.best_val:.4f} at epoch {res.best_epoch} "
                   f"({len(res.history)} epochs, {res.seconds:.0f} s) -> {where}")


@server_app.command("map")
@_guard
def server_map(model: Path = typer.Option(..., "--model", "-m", help="Model folder from 'server train'."),
               query: Path = typer.Option(..., "--query", help="A 'query' message from a hospital."),
               out: Path = typer.Option(..., "--out", "-o", help="Reply message file."),
               device: str = DeviceOpt):
    """Map a hospital's keyed image latents to keyed mask latents with its adapters."""
    from . import protocol
    from .fileio import atomic_write_bytes
    from .server.mapping import MappingServer

    srv = MappingServer(model, device=_device(device))
    try:
        q = protocol.decode(query.read_bytes())
    except PpcmiError as e:
        raise PpcmiError(f"{query}: {e}") from None
    reply = protocol.encode(srv.handle(q))
    atomic_write_bytes(out, reply, overwrite=False)
    typer.echo(f"wrote {out}: {len(reply)} bytes for {q.n} images of {q.client}")


@server_app.command("serve")
@_guard
def server_serve(model: Path = typer.Option(..., "--model", "-m", help="Model folder from 'server train'."),
                 cert: Path = typer.Option(..., "--cert", help="Server certificate (server.pem from 'ppcmi certs init')."),
                 key: Path = typer.Option(..., "--key", help="Server private key (server.key)."),
                 client_ca: Path = typer.Option(..., "--client-ca", help="CA that signed the hospitals' client certificates (ca.pem); "
                                                "a connection without a certificate from it is refused during the TLS handshake."),
                 host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface); "
                                          "hospitals must reach it under a name in the server certificate."),
                 port: int = typer.Option(8443, help="TCP port."),
                 max_bytes: int = typer.Option(16 * 1024 * 1024, "--max-bytes",
                                               help="Largest query body accepted (bytes); larger ones get HTTP 413 before being read. "
                                                    "The default holds 36 images of 256x256 at full autoencoder width in float32."),
                 concurrency: int = typer.Option(1, help="Queries mapped at the same time (each uses all of torch's threads)."),
                 header_timeout: float = typer.Option(10.0, "--header-timeout",
                                                      help="Seconds a connection has, from its first byte (or its opening), to "
                                                           "send a request's complete headers; then it is closed unanswered."),
                 body_timeout: float = typer.Option(60.0, "--body-timeout",
                                                    help="Seconds a request's whole body has to arrive (16 MiB at >= 280 kB/s); "
                                                         "then the answer is HTTP 408 and the connection is closed."),
                 keep_alive_timeout: float = typer.Option(5.0, "--keep-alive-timeout",
                                                          help="Seconds an idle keep-alive connection stays open between requests."),
                 log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."),
                 device: str = DeviceOpt):
    """Serve the mapping network over HTTPS with mutual TLS: POST /v1/map, GET /healthz, /openapi.json.

    Each hospital connects with its client certificate ('ppcmi certs issue-client'); the
    certificate's CN is its site id, which selects its adapters, and a query sent for another
    hospital is refused (HTTP 403). Bad input gets a 4xx with a JSON error naming the field.
    Stop it with Ctrl-C.
    """
    from .server.service import serve

    dev = _device(device)
    typer.echo(f"serving {model} on https://{host}:{port} (mutual TLS; client CA {client_ca}); Ctrl-C to stop", err=True)
    serve(model, cert=cert, key=key, client_ca=client_ca, host=host, port=port, max_bytes=max_bytes, concurrency=concurrency,
          log_level=log_level, header_timeout=header_timeout, body_timeout=body_timeout, keep_alive_timeout=keep_alive_timeout,
          device=dev)


# ----------------------------------------------------------------------------- certificates


@certs_app.command("init")
@_guard
def certs_init(out: Path = typer.Option(..., "--out", "-o", help="Folder for ca.pem, ca.key, server.pem, server.key."),
               host: Optional[List[str]] = typer.Option(None, "--host", help="Another DNS name or IP address hospitals use to reach "
                                                        "the server (repeatable); localhost and 127.0.0.1 are always included."),
               days: int = typer.Option(825, help="Validity of the server certificate in days (the CA's is 10 years).")):
    """Create the project CA and the server's certificate (ECDSA P-256; private keys mode 0600; never overwrites).

    Keep ca.key with the coordinator (offline if possible); it signs every hospital's
    certificate. The same files serve Flower's TLS: flower-superlink --ssl-ca-certfile ca.pem
    --ssl-certfile server.pem --ssl-keyfile server.key.
    """
    from .certs import DEFAULT_HOSTS, init_ca

    paths = init_ca(out, host or [], days=days)
    for p in paths.values():
        typer.echo(str(p))
    names = ", ".join(dict.fromkeys([*DEFAULT_HOSTS, *(host or [])]))
    typer.echo(f"server certificate valid for: {names}; next: ppcmi certs issue-client SITE_ID --ca-dir {out}")


@certs_app.command("issue-client")
@_guard
def certs_issue_client(name: str = typer.Argument(..., help="The hospital's site id: the 'site' in its site.json, the 'client' "
                                                  "of its protocol messages (letters, digits, '_', '.', '-')."),
                       ca_dir: Path = typer.Option(..., "--ca-dir", help="Folder holding ca.pem and ca.key ('ppcmi certs init')."),
                       out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: CA_DIR/clients)."),
                       days: int = typer.Option(825, help="Validity in days.")):
    """Issue a hospital's client certificate: CN = NAME, its only identity (key mode 0600; never overwrites).

    Hand NAME.pem, NAME.key and ca.pem to that hospital over a trusted channel; never ca.key.
    """
    from .certs import issue_client

    cert, key = issue_client(name, ca_dir, out, days=days)
    typer.echo(f"{cert}\n{key}")
    typer.echo(f"give the hospital {cert.name}, {key.name} and {ca_dir / 'ca.pem'}; it connects with "
               f"ppcmi predict --server https://HOST:PORT --cert {cert.name} --key {key.name} --ca ca.pem ...")


# ----------------------------------------------------------------------------- both / evaluation


@app.command()
@_guard
def predict(images: List[Path] = typer.Argument(..., help="Image files (PNG, JPEG, TIFF, NIfTI, MHA) or DICOM series folders."),
            site_dir: Path = typer.Option(..., "--site-dir", "-s", help="This hospital's site folder."),
            out: Path = typer.Option(..., "--out", "-o", help="Folder for the label maps (PNG for 2D, NIfTI for volumes)."),
            model: Optional[Path] = typer.Option(None, "--model", "-m", help="Mapping model folder (an in-process server). "
                                                 "Default with neither option: this site's own local model of the "
                                                 "federated core (SITE/fedcore/model), where it has one."),
            server: Optional[str] = typer.Option(None, "--server", help="Inference service URL, https://HOST:PORT "
                                                 "('ppcmi server serve'), instead of --model."),
            cert: Optional[Path] = typer.Option(None, "--cert", help="With --server: this hospital's client certificate "
                                                "('ppcmi certs issue-client'; its CN must be this site's id)."),
            key: Optional[Path] = typer.Option(None, "--key", help="With --server: the client certificate's private key."),
            ca: Optional[Path] = typer.Option(None, "--ca", help="With --server: the project CA certificate (ca.pem) "
                                              "that the server's certificate must chain to."),
            overwrite: bool = typer.Option(False, "--overwrite", help="Replace label maps of the same names already in OUT "
                                           "(each atomically). Without it one existing file refuses them all, before "
                                           "anything is sent."),
            device: str = DeviceOpt):
    """Hospital -> server -> hospital for image files; writes label maps in the inputs' format.

    With --model the server runs in this process; with --server the keyed latents travel to the
    inference service over mutual TLS. Either way only keyed latents leave this site. A site that trained
    in the federated core mode (mapping.scope = "federated") maps with its own local model by default,
    so nothing leaves it at all. Every output
    path is checked before any image is sent: two inputs with the same file name, or (without
    --overwrite) an existing label map, refuse the whole call and nothing is written.
    """
    from .client.fedcore import FOLDER, local_model_dir
    from .client.inference import predict_files, predict_remote

    if model is None and server is None:
        model = local_model_dir(site_dir)
        if model is not None:
            typer.echo(f"mapping with this site's own local model of the federated core: {model}", err=True)
        else:
            raise PpcmiError("give exactly one of --model (in-process server) and --server (HTTPS inference service); "
                             f"{site_dir} has no local model of the federated core ({site_dir / FOLDER / 'model'}) to use by default")
    if model is not None and server is not None:
        raise PpcmiError("give exactly one of --model (in-process server) and --server (HTTPS inference service)")
    dev = _device(device)
    if server is not None:
        missing = [o for o, v in (("--cert", cert), ("--key", key), ("--ca", ca)) if v is None]
        if missing:
            raise PpcmiError(f"--server needs {', '.join(missing)} (mutual TLS)")
        written = predict_remote(site_dir, server, images, out, cert=cert, key=key, ca=ca, overwrite=overwrite, device=dev)
    else:
        from . import protocol
        from .server.mapping import MappingServer

        mapper = MappingServer(model, device=dev)
        written = predict_files(site_dir, lambda q: protocol.encode(mapper.handle(protocol.decode(q))), images, out,
                                overwrite=overwrite, device=dev)
    for p in written:
        typer.echo(str(p))


@app.command()
@_guard
def evaluate(pred: Path = typer.Option(..., "--pred", "-p", help="Folder of predicted label maps."),
             data: Path = typer.Option(..., "--data", "-d", help="Dataset folder with the ground truth (masks/)."),
             out: Path = typer.Option(..., "--out", "-o", help="Folder for per_case.csv and summary.json."),
             labels: Optional[str] = typer.Option(None, help="Raw label values in class order, e.g. 0,1,2 (default: discovered)."),
             rois: Optional[str] = typer.Option(None, "--rois", help="RTSTRUCT ground truth: the ROI names that are classes 1, "
                                                "2, ..., comma-separated, as data.rois in training (default: every ROI, sorted)."),
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier per_case.csv and summary.json in OUT "
                                            "(each atomically). Without it an existing one is refused before any scoring.")):
    """Score label maps against ground truth: Dice, HD95, ASD per class and merged foreground.

    Never replaces an earlier evaluation in OUT unless --overwrite is given.
    """
    from .client.inference import evaluate_folder

    from .config import DataConfig

    summ = evaluate_folder(pred, data, out, labels, overwrite=overwrite, rois=DataConfig(rois=rois).roi_names())
    fg = summ.get("fg_dice", {})
    lo, hi = (fg.get("ci95") or [float("nan")] * 2)[:2]
    typer.echo(f"{summ['n_cases']} cases: merged-foreground Dice {fg.get('mean', float('nan')):.4f} "
               f"(95% bootstrap CI {lo:.4f} to {hi:.4f}) -> {out / 'summary.json'}")


@app.command("plan")
@_guard
def plan_cmd(data: Path = typer.Option(..., "--data", "-d", help="Dataset folder (images/ + masks/)."),
             clients: int = typer.Option(3, "--clients", "-n", help="Number of simulated hospitals the data are dealt to."),
             budget: Optional[float] = BudgetOpt, modality: Optional[str] = ModalityOpt,
             out: Path = typer.Option(Path("plan.json"), "--out", "-o", help="Where to write the plan (never overwritten)."),
             config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             labels: Optional[str] = LabelsOpt, class_names: Optional[str] = NamesOpt, offset: Optional[float] = OffsetOpt):
    """The federated plan for a dataset dealt to --clients hospitals, as `simulate` makes it.

    Each hospital fingerprints its own training cases (aggregates only); the coordinator combines the
    fingerprints into settings with reasons, the time it expects the run to take and warnings. `--set`
    and `--config` values win over the plan and are listed as overrides."""
    from .fileio import atomic_write_json

    if out.exists():
        raise PpcmiError(f"{out}: already exists; choose another --out")
    sets = (set_ or []) + _data_sets(labels, class_names, None, None, offset) + [f"clients={clients}"]
    cfg = _cfg(config, sets)
    from .server.plan import DEFAULT_BUDGET_MIN, describe
    from .simulate import plan_run

    _, planned, _ = plan_run(cfg, data, explicit=_explicit(config, sets), budget_min=DEFAULT_BUDGET_MIN if budget is None else budget,
                             modality=modality)
    atomic_write_json(out, planned)
    typer.echo(describe(planned))
    typer.echo(f"plan written to {out}")


@app.command()
@_guard
def simulate(data: Path = typer.Option(..., "--data", "-d", help="Dataset folder (images/ + masks/)."),
             clients: int = typer.Option(3, "--clients", "-n", help="Number of simulated hospitals."),
             out: Path = typer.Option(Path("runs/simulate"), "--out", "-o"),
             config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             labels: Optional[str] = LabelsOpt, class_names: Optional[str] = NamesOpt, size: Optional[int] = SizeOpt,
             window: Optional[str] = WindowOpt, offset: Optional[float] = OffsetOpt,
             plan: bool = typer.Option(True, "--plan/--no-plan", help="Plan the run from the hospitals' fingerprints "
                                       "(default); --no-plan runs the configuration as given."),
             budget: Optional[float] = BudgetOpt, modality: Optional[str] = ModalityOpt,
             resume: bool = typer.Option(False, help="Reuse finished stages and continue interrupted ones."),
             device: str = typer.Option("auto", "--device", help="Where every role computes (one machine plays them all): "
                                        "auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps."),
             local_epochs: Optional[int] = LocalEpochsOpt, quiet: bool = QuietOpt):
    """All roles in one process, through the same protocol bytes: plan, stage 1, stage 2, inference, evaluation.

    With --set mapping.scope=federated (the privacy mode: the latents never leave the hospitals) the mapping core trains
    on a real Flower federation on loopback with SecAgg+ instead, as that mode always does, and each hospital then
    segments the test images with its own local model."""
    from .simulate import public_summary, run_simulation
    from .fileio import atomic_write_json

    sets = (set_ or []) + _data_sets(labels, class_names, size, window, offset) + [f"clients={clients}"]
    cfg = _cfg(config, sets)
    dev = _device(device)
    planned = None
    if not plan and (budget is not None or modality is not None):
        raise PpcmiError("--budget/--modality: they steer the plan; leave them out with --no-plan")
    if plan and resume and (out / "plan.json").exists():  # the run was planned before: keep its configuration
        from .config import from_dict

        cfg = from_dict({k: v for k, v in json.loads((out / "config.json").read_text()).items() if k != "data_dir"})
    elif plan:
        cfg, planned = _planned(cfg, config, sets, data, budget, modality)
    if cfg.mapping.scope == "federated":
        if resume:
            raise PpcmiError("--resume: a Flower run cannot resume; mapping.scope \"federated\" starts again in a new --out")
        _federated_core(cfg, data, out, local_epochs=local_epochs, device=device, quiet=quiet, planned=planned)
        return
    if local_epochs is not None:
        raise PpcmiError("--local-epochs: only with --set mapping.scope=federated (rounds of the federated core)")
    res = run_simulation(cfg, data, out, resume=resume, progress=not quiet, planned=planned, device=dev)
    res.pop("_arrays", None)
    atomic_write_json(out / "summary.json", public_summary(res))
    from .demo import table

    typer.echo(table({"methods": {"PPCMI-SF": res["ppcmi"]}}))
    typer.echo(f"payload per image per direction: {res['payload']['float32_bytes']} bytes (float32); results in {out}")


@app.command()
@_guard
def demo(data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset folder (default: the bundled Sunnybrook LV subset)."),
         name: str = typer.Option("demo", help="Run name: results go to runs/NAME (runs/NAME-2, -3, ... if it is taken)."),
         out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (overrides --name)."),
         config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
         labels: Optional[str] = LabelsOpt, class_names: Optional[str] = NamesOpt, size: Optional[int] = SizeOpt,
         window: Optional[str] = WindowOpt, offset: Optional[float] = OffsetOpt,
         plan: Optional[bool] = typer.Option(None, "--plan/--no-plan", help="Plan the run from the hospitals' fingerprints "
                                             "(the default with --data; the bundled demo keeps its documented settings "
                                             "unless --plan)."),
         budget: Optional[float] = BudgetOpt, modality: Optional[str] = ModalityOpt,
         device: str = typer.Option("auto", "--device", help="Where every role and the U-Net compute (one machine plays "
                                    "them all): auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps."),
         quiet: bool = QuietOpt):
    """The whole pipeline next to a centralized MONAI U-Net; prints a table, payload and latency.

    Without --data it runs on the bundled Sunnybrook LV subset with its documented settings (a few
    minutes on 2 cores; --plan plans it instead). With --data the hospitals' fingerprints plan the
    run (see `ppcmi plan`; --no-plan: whole planes at 128 x 128) and cases are split at random; pass
    --config or --set for a patient grouping (data.group_regex); --set values win over the plan.
    """
    from .demo import demo_config, run_demo, training_threads

    if out is None:  # a fresh folder each time: an earlier run is never touched
        out, k = Path("runs") / name, 1
        while out.exists() and any(out.iterdir()):
            k += 1
            out = Path("runs") / f"{name}-{k}"
    sets = (set_ or []) + _data_sets(labels, class_names, size, window, offset)
    cfg = _cfg(config, sets, base=demo_config(bundled=data is None))
    planned = None
    planning = plan if plan is not None else data is not None
    if not planning and (budget is not None or modality is not None):
        raise PpcmiError("--budget/--modality: they steer the plan; add --plan (the bundled demo does not plan by default)")
    if planning:
        from .demo import bundled_data

        cfg, planned = _planned(cfg, config, sets, data if data is not None else bundled_data(), budget, modality,
                                threads=training_threads())  # the pipeline and the U-Net train side by side
    s = run_demo(data, out, cfg, progress=not quiet, planned=planned, device=_device(device))
    lat, t = s["latency_ms"], s["timings_s"]
    typer.echo("")
    typer.echo(s["table_md"])
    if "volume_table_md" in s:
        typer.echo("\nWhole test volumes (3D Dice of the restacked planes):\n" + s["volume_table_md"])
    gap = s["dice_gap_points"]
    typer.echo(f"\nPPCMI-SF overall Dice is {abs(gap):.2f} points {'below' if gap >= 0 else 'above'} the centralized U-Net's.")
    typer.echo(f"payload per image per direction: {s['payload']['float32_bytes']} bytes float32 "
               f"({s['payload']['values_per_image']} values; {s['payload']['wire_bytes_query']} bytes on the wire)")
    typer.echo(f"latency per image (batch 1, median): encode+KLT {lat['encode']:.1f} ms | map {lat['map']:.1f} ms | "
               f"inverse KLT+decode {lat['decode']:.1f} ms | total {lat['total']:.1f} ms")
    typer.echo(f"wall time: stage 1 {t['stage1_s']:.0f} s, stage 2 {t['stage2_s']:.0f} s, U-Net {t['unet_s']:.0f} s (in parallel), total {t['total_s']:.0f} s")
    typer.echo(f"results: {out}/summary.json, report.md, per_case.csv, loss_curves.png, overlays.png")


@app.command()
@_guard
def bench(dataset: str = typer.Option(..., "--dataset", help="Preset: psfhs, acdc or sunnybrook_lv (split, labels, partition, budget)."),
          data: Path = typer.Option(..., "--data", "-d", help="The dataset folder, e.g. ../shared/data/psfhs."),
          out: Path = typer.Option(..., "--out", "-o", help="Results folder; finished methods are skipped on a rerun."),
          methods: str = typer.Option("ppcmi_cpu,ppcmi_cpu_pca,no_klt,no_skips,no_pyramid,per_hospital_mapping,unet_centralized,unet_local,"
                                      "ppcmi_cpu_matched,ppcmi_published",
                                      help="Comma-separated methods to run, in order. Variants that keep the autoencoder "
                                           "settings reuse ppcmi_cpu's autoencoders (with fresh keys), so run it first. "
                                           "Also: unet_fedavg, unet_fedprox (Flower U-Nets) and ppcmi_federated (the "
                                           "federated core under SecAgg+)."),
          published_epochs: Optional[int] = typer.Option(None, "--published-epochs", min=1,
                                                         help="Mapping epochs for ppcmi_published and ppcmi_cpu_matched "
                                                              "(default: the preset's; the published network is ~10x slower)."),
          config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
          plan: bool = typer.Option(False, "--plan/--no-plan", help="Let the hospitals' fingerprints plan the run: the "
                                    "plan replaces the preset's settings (not labels, split or partition; --set wins); "
                                    "OUT/plan.json records it. Default: the preset as it is, reproducible."),
          budget: Optional[float] = BudgetOpt, modality: Optional[str] = ModalityOpt,
          device: str = typer.Option("auto", "--device", help="Where every method computes: auto (CUDA, then MPS, then "
                                     "the CPU), cpu, cuda, cuda:N or mps."),
          quiet: bool = QuietOpt,
          local_epochs: int = typer.Option(1, "--local-epochs", min=1, help="unet_fedavg / unet_fedprox / ppcmi_federated: "
                                           "local epochs per Flower round (rounds = the centralized U-Net's epochs / this; "
                                           "ppcmi_federated: mapping.epochs / this)."),
          proximal_mu: float = typer.Option(0.01, "--proximal-mu", min=0.0, help="unet_fedprox: FedProx's mu "
                                            "(proximal term mu/2 ||w - w_global||^2).")):
    """PPCMI-SF, its ablations and U-Net baselines on one dataset with the same split and budget.

    Writes OUT/METHOD/ (runs, per-case CSVs) and OUT/results.json + OUT/results.md covering every
    finished method. Plots: benchmarks/plots.py.
    """
    from .bench import run_bench

    if not plan and (budget is not None or modality is not None):
        raise PpcmiError("--budget/--modality: they steer the plan; add --plan (bench presets are not planned by default)")
    dev = _device(device)
    run_bench(dataset, data, out, [m.strip() for m in methods.split(",") if m.strip()], config=config,
              overrides=set_ or [], published_epochs=published_epochs, progress=not quiet, plan=plan,
              explicit=_explicit(config, set_ or []), budget_min=budget, modality=modality, device=dev,
              local_epochs=local_epochs, proximal_mu=proximal_mu)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"results: {out / 'results.json'}, {out / 'results.md'}")


# ----------------------------------------------------------------------------- Flower (multi-site deployment)


@app.command()
@_guard
def deploy(sites: int = typer.Option(3, "--sites", "-n", help="Number of hospitals, one SuperNode each."),
           data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset folder (default: the bundled Sunnybrook LV subset)."),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/deploy, runs/deploy-2, ...)."),
           config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
           port: Optional[int] = typer.Option(None, "--port", help="SuperLink port on 127.0.0.1 (default: a free one)."),
           retries: int = typer.Option(2, help="Extra attempts for a hospital whose reply carries an error or does not come."),
           timeout: float = typer.Option(3600.0, help="Seconds to wait for the replies of one step."),
           plan: bool = typer.Option(False, "--plan/--no-plan", help="A fingerprint round first: the ServerApp plans the run "
                                     "from the hospitals' fingerprints and sends the plan's settings with every step "
                                     "(--set values win)."),
           budget: Optional[float] = BudgetOpt, modality: Optional[str] = ModalityOpt,
           device: str = typer.Option("auto", "--device", help="Where the SuperNodes and the ServerApp compute (the SuperNodes' "
                                      "node_config device, the run config's flower.server-device): auto (CUDA, then MPS, "
                                      "then the CPU), cpu, cuda, cuda:N or mps."),
           local_epochs: Optional[int] = LocalEpochsOpt):
    """A real Flower federation on this machine: SuperLink (TLS, SuperNode authentication), one SuperNode per hospital.

    Without --config it uses the demo's settings (for the bundled data, the demo's crop and schedule) with
    data.partition=group (a volume's slices stay at one hospital); --set overrides any of them, e.g. --set autoencoder.epochs=5 --set mapping.epochs=5 for a short run.

    With --set mapping.scope=federated (the privacy mode) the hospitals train their autoencoders, then the mapping core
    with Flower's FedAvg under SecAgg+ on the same kind of federation; only the core's masked updates cross, and each
    hospital segments its test images with its own local model. --plan then plans from the same fingerprints before
    the federation starts.
    """
    from dataclasses import replace

    from .demo import bundled_data, demo_config, table
    from .flower.deploy import deploy as run_deploy
    from .flower.wire import FlowerSettings

    if data is None:
        data = bundled_data()
    if out is None:
        out, k = Path("runs") / "deploy", 1
        while out.exists() and any(out.iterdir()):
            k += 1
            out = Path("runs") / f"deploy-{k}"
    bundled = data.resolve() == bundled_data().resolve()
    base = demo_config(bundled=bundled)
    # a SuperNode receives whole files, so a 3D volume's slices stay at one hospital: deal by group (a patient, or
    # the file itself without data.group_regex), not slice by slice as the demo deals other datasets
    base = replace(base, data=replace(base.data, partition="group"))
    cfg = _cfg(config, set_, base=None if config is not None else base)
    if (budget is not None or modality is not None) and not plan:
        raise PpcmiError("--budget/--modality: they steer the plan; add --plan")
    settings = FlowerSettings(retries=retries, timeout=timeout, plan=plan, keep=",".join(_explicit(config, set_)),
                              **({} if budget is None else {"budget": budget}))
    if cfg.mapping.scope == "federated":
        planned = None
        cfg = replace(cfg, clients=sites)
        if plan:
            cfg, planned = _planned(cfg, config, list(set_ or []) + [f"clients={sites}"], data, budget, modality)
        try:
            _federated_core(cfg, data, out, local_epochs=local_epochs, device=device, quiet=True, planned=planned, port=port,
                            settings=replace(settings, plan=False), title="PPCMI-SF federated core (Flower)")
        except KeyboardInterrupt:
            typer.echo("interrupted: every process ppcmi deploy started has been stopped", err=True)
            raise typer.Exit(130)
        return
    if local_epochs is not None:
        raise PpcmiError("--local-epochs: only with --set mapping.scope=federated (rounds of the federated core)")
    try:
        s = run_deploy(cfg, data, out, sites=sites, port=port, settings=settings, modality=modality, device=device,
                       echo=lambda line: typer.echo(line))
    except KeyboardInterrupt:
        typer.echo("interrupted: every process ppcmi deploy started has been stopped", err=True)
        raise typer.Exit(130)
    t = s["timings_s"]
    typer.echo("")
    typer.echo(table({"methods": {"PPCMI-SF (Flower)": s["ppcmi"]}}))
    typer.echo(f"\nwall time: stage 1 {t['stage1_s']:.0f} s, stage 2 {t['stage2_s']:.0f} s, evaluation {t['evaluation_s']:.0f} s, "
               f"total {s['deployment']['wall_s']:.0f} s (processes included)")
    server_dir = Path(s["server_dir"])
    if server_dir.is_relative_to(Path.cwd()):
        server_dir = server_dir.relative_to(Path.cwd())
    typer.echo(f"results: {out / 'summary.json'}; the server's output: {server_dir}; logs: {out / 'logs'}")


@flower_app.command("keygen")
@_guard
def flower_keygen(out: Path = typer.Option(..., "--out", "-o", help="Folder for supernode.key (0600) and supernode.pub."),
                  name: str = typer.Option("ppcmi-supernode", help="Comment on the public key line (e.g. the site id).")):
    """At a hospital: the SuperNode's authentication key pair; send only supernode.pub to the coordinator."""
    from .flower.auth import supernode_keygen

    priv, pub = supernode_keygen(out, comment=name)
    typer.echo(f"wrote {priv} (mode 0600, stays here) and {pub} (send it to the coordinator to register)")


@flower_app.command("app")
@_guard
def flower_app_dir(out: Path = typer.Option(..., "--out", "-o", help="Folder for the app's pyproject.toml."),
                   nodes: int = typer.Option(..., "--nodes", help="SuperNodes the ServerApp waits for."),
                   config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                   labels: Optional[str] = LabelsOpt, class_names: Optional[str] = NamesOpt, size: Optional[int] = SizeOpt,
                   retries: int = typer.Option(2, help="Extra attempts for a failed or missing reply."),
                   timeout: float = typer.Option(3600.0, help="Seconds to wait for the replies of one step."),
                   plan: bool = typer.Option(False, "--plan/--no-plan", help="A fingerprint round first: the ServerApp plans "
                                             "the run from the hospitals' fingerprints (--set and --config values win)."),
                   budget: Optional[float] = BudgetOpt,
                   server_device: str = typer.Option("auto", "--server-device", help="Where the ServerApp trains and maps "
                                                     "(run config flower.server-device): auto, cpu, cuda, cuda:N or mps, as "
                                                     "the coordinator's machine has it. Each SuperNode names its own in its "
                                                     "node_config (device=\"cuda\").")):
    """At the coordinator: the Flower app folder (shared settings only) for 'flwr run'.

    A modality is not the coordinator's to set: with --plan, a hospital whose data do not record it
    (dataset.json, a DICOM header) names it in its SuperNode's node_config (modality="CT"). For RTSTRUCT
    masks, --set data.rois=NAME,NAME fixes the classes for every hospital."""
    import re

    from .errors import ConfigError
    from .flower.wire import FlowerSettings, write_app

    sets = (set_ or []) + _data_sets(labels, class_names, size, None, None)
    cfg = _cfg(config, sets)
    if not cfg.data.labels:
        raise ConfigError("data.labels: give the label values (--labels 0,1) so that every hospital uses the same classes")
    if budget is not None and not plan:
        raise PpcmiError("--budget: it steers the plan; add --plan")
    if not isinstance(server_device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", server_device):
        raise ConfigError(f"--server-device: must be auto, cpu, cuda, cuda:N or mps, got {server_device!r}")
    write_app(out, cfg, FlowerSettings(nodes=nodes, retries=retries, timeout=timeout, plan=plan, server_device=server_device,
                                       keep=",".join(k for k in _explicit(config, sets) if k not in ("data.labels", "data.class_names")),
                                       **({} if budget is None else {"budget": budget})))
    typer.echo(f"wrote {out / 'pyproject.toml'}; run it with: flwr run {out} CONNECTION --stream")


@app.command()
@_guard
def audit(run: Path = typer.Option(..., "--run", "-r", help="A finished run folder from 'ppcmi simulate' or 'ppcmi demo'."),
          threats: Optional[str] = typer.Option(None, "--threats", help="Comma-separated threat levels T0..T5 (default: all)."),
          aux: Optional[Path] = typer.Option(None, "--aux", help="The attacker's public data (images/ + masks/); default: the run's "
                                             "held-out test patients."),
          data: Optional[Path] = typer.Option(None, "--data", "-d", help="The run's dataset folder, if not where config.json says."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Audit folder (default RUN/audit)."),
          shadow_models: int = typer.Option(4, "--shadow-models", help="Reference networks for M3 (even; 0 skips M3)."),
          shadow_epochs: Optional[int] = typer.Option(None, "--shadow-epochs", help="Their epochs (default: the run's mapping.epochs)."),
          control_epochs: int = typer.Option(150, "--control-epochs", help="Epochs of the memorising positive-control network."),
          device: str = typer.Option("auto", "--device", help="Where the attacker's autoencoders and the reference and control "
                                     "networks train: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps."),
          quiet: bool = QuietOpt):
    """Privacy audit (DESIGN.md section 4): attacks A1, A5-A8, M1, M3 with positive controls and prior-only baselines.

    Writes RUN/audit/report.md, audit.json, roc.png and a1_maps.png.
    """
    from .privacy.audit import parse_threats, run_audit

    parse_threats(threats)  # a bad threat fails before any work
    dev = _device(device)
    if not run.is_dir():
        raise PpcmiError(f"{run}: run folder not found")
    res = run_audit(run, threats=threats, aux_dir=aux, data_dir=data, out=out, shadow_models=shadow_models,
                    shadow_epochs=shadow_epochs, control_epochs=control_epochs, progress=not quiet, device=dev)
    for a, r in res["results"].items():
        typer.echo(f"{a}: {r['status']}")
    typer.echo(f"{res['conclusion']}; report: {(out or run / 'audit') / 'report.md'}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
