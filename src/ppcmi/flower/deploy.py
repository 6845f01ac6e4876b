"""``ppcmi deploy``: a real Flower federation on one machine (plays every role, each in its own processes).

It creates a project CA and the SuperLink's TLS certificate, one SuperNode authentication key
pair per hospital, partitions the dataset into hospital data folders (symlinks to the case
files, as ``ppcmi simulate`` would split them), starts ``flower-superlink`` with TLS and
SuperNode authentication, registers the hospitals' public keys, starts one ``flower-supernode``
per hospital, runs the ppcmi Flower app with ``flwr run`` and returns the aggregate summary.
Every process it started is stopped, by its id, when it ends, fails or is interrupted.

Run folder (the split shows what would live where in a real deployment)::

    RUN/config.json                 resolved ppcmi configuration
    RUN/app/pyproject.toml          the Flower app: shared settings only
    RUN/coordinator/certs/          ca.pem (to every hospital), ca.key, server.pem, server.key
    RUN/coordinator/supernodes/     the hospitals' registered public keys (NAME.pub)
    RUN/coordinator/server/run-ID/  the ServerApp's output: mapping network, summary.json, what it received
    RUN/coordinator/flwr/, cli/     FLWR_HOME of the SuperLink and of the flwr command
    RUN/sites/NAME/data/, test/     the hospital's cases (symlinks, in the dataset's own layout: :func:`link_cases`)
    RUN/sites/NAME/site/            its site folder: klt.key, autoencoders, local evaluation results
    RUN/sites/NAME/auth/            its SuperNode key pair (supernode.key stays here)
    RUN/sites/NAME/flwr/            its SuperNode's FLWR_HOME
    RUN/logs/                       superlink.log, NAME.log, register.log, flwr-run.log
    RUN/summary.json                the aggregate summary
    RUN/plan.json                   with --plan: the plan the hospitals applied (a copy of the ServerApp's)
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from ..certs import CA_CERT, SERVER_CERT, SERVER_KEY, init_ca
from ..client.stages import site_seed
from ..config import Config, to_dict
from ..data import Case, case_files
from ..data import link_cases as link_dataset
from ..device import resolve_device
from ..errors import PpcmiError
from ..fileio import atomic_write_json, atomic_write_text
from ..metrics import write_summary
from ..server.stages import refuse_federated
from ..simulate import Plan, plan
from .auth import PRIVATE, PUBLIC, supernode_keygen
from .server_app import PROGRESS_PREFIX, SERVER_DIR_ENV
from .wire import FlowerSettings, write_app

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONNECTION = "ppcmi-deploy"
OFFLINE_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
STARTUP_TIMEOUT = 60.0


class DeployError(PpcmiError):
    """A deployment step failed (a process died, a port is taken, a run failed)."""


# ----------------------------------------------------------------------------- helpers


def tail(path: Path, lines: int = 12) -> str:
    """The last ``lines`` non-empty lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    kept = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join("    " + ln for ln in kept) or "    (empty log)"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on the loopback interface."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            raise DeployError(f"port {port} on {HOST} is in use; choose another --port") from None


def tool(name: str) -> str:
    """A Flower executable from this Python environment."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        raise DeployError(f"{name}: not found; install the Flower extra (pip install 'ppcmi[flower]', or make install)")
    return path


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment of every Flower process: offline, this Python's tools first, a FLWR_HOME of its own."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env.update(extra)
    return env


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc); Flower detaches some of its helpers into new sessions."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


class Processes:
    """The processes a deployment started: each in its own process group, stopped by id on exit."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.files: list = []

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        logf = open(self.logs / f"{name}.log", "ab")
        self.files.append(logf)
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             cwd=cwd, start_new_session=True)
        self.procs[name] = p
        log.debug("started %s (pid %d): %s", name, p.pid, " ".join(cmd))
        return p

    def check_alive(self, skip: tuple[str, ...] = ()) -> None:
        for name, p in self.procs.items():
            if name not in skip and p.poll() is not None:
                raise DeployError(f"{name} (pid {p.pid}) exited early with status {p.returncode}; "
                                  f"the end of {self.logs / (name + '.log')}:\n{tail(self.logs / (name + '.log'))}")

    def stop(self, grace: float = 8.0) -> None:
        """SIGTERM to every process group we started and to their descendants, then SIGKILL what is left."""
        pids: set[int] = set()
        for p in self.procs.values():
            if p.poll() is None:
                pids.add(p.pid)
            pids.update(_children(p.pid))
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in self.files:
            f.close()


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_listening(procs: Processes, name: str, port: int, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until ``port`` accepts connections; fails with the log tail if ``name`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.3)
    raise DeployError(f"{name} did not listen on {HOST}:{port} within {timeout:.0f} s; the end of its log:\n"
                      f"{tail(procs.logs / (name + '.log'))}")


# ----------------------------------------------------------------------------- data


def link_cases(assignments: dict[str, list[Case]], root: str | Path, run: Path) -> None:
    """Symlink each destination's cases into ``run/<destination>/`` in the layout of the dataset ``root`` they were
    discovered in (:func:`ppcmi.data.link_cases`: ``images/`` + ``masks/``, nnU-Net's ``imagesTr/`` + ``labelsTr/``
    with its ``dataset.json``, DICOM-RT patient folders), so that discovery there gives the same cases.

    A destination holds whole files: the slices of one volume must not be split across them.
    """
    owner: dict[Path, str] = {}
    for dest, cases in assignments.items():
        for c in cases:
            for src in case_files(c):
                src = src.resolve()
                if owner.setdefault(src, dest) != dest:
                    raise DeployError(f"{src}: slices of this volume fall into {owner[src]} and {dest}; "
                                      "use data.partition=group so that a volume stays in one place")
    for dest, cases in assignments.items():
        link_dataset(cases, root, run / dest)


def node_config(site: Path, name: str, threads: int, seed: int, send_noise: float, modality: str | None = None,
                 device: str = "auto") -> str:
    values = {"site-dir": site / "site", "data-dir": site / "data", "test-dir": site / "test"}
    for k, v in values.items():
        if "'" in str(v):
            raise DeployError(f"{v}: a path with a single quote cannot be passed in a Flower node_config")
    text = " ".join(f"{k}='{v}'" for k, v in values.items()) + f' name="{name}" threads={threads} seed={seed} send-noise={float(send_noise)!r}'
    text += f" device={json.dumps(device)}"
    return text + (f" modality={json.dumps(modality)}" if modality else "")


def _shared_rois(cfg: Config, found: set[tuple[str, ...]]) -> str | None:
    """``data.rois`` for every hospital: the ROIs the coordinator's discovery chose from the RTSTRUCT masks (the
    same classes at every site), ``cfg``'s own value when set, None without RTSTRUCT masks."""
    found.discard(())
    if cfg.data.rois is not None or not found:
        return cfg.data.rois
    (rois,) = found  # one dataset, one choice
    odd = [r for r in rois if "," in r or r != r.strip()]
    if odd:
        raise DeployError(f"data.rois: the RTSTRUCT ROI {odd[0]!r} cannot be named in a comma-separated data.rois; "
                          "rename it in the RTSTRUCT files")
    return ",".join(rois)


def deal(cfg: Config, data: str | Path, run: Path) -> tuple[Config, Plan]:
    """Split ``data`` as ``simulate`` does (:func:`ppcmi.simulate.plan`: ``cfg.clients`` hospitals and the held-out
    test patients) and link each hospital's cases into ``run/sites/NAME/data/`` and the test cases into
    ``run/test/`` (:func:`link_cases`). Returns the configuration with the classes fixed for every hospital
    (``data.labels``, ``data.class_names``, ``data.rois``) and the split."""
    pl = plan(cfg, data)
    rois = {c.rois for cases in [*pl.hospitals.values(), pl.test] for c in cases}
    cfg = replace(cfg, data=replace(cfg.data, labels=",".join(map(str, pl.labels.values)),
                                    class_names=",".join(pl.labels.names), rois=_shared_rois(cfg, rois)))
    link_cases({f"sites/{n}/data": cases for n, cases in pl.hospitals.items()} | {"test": pl.test}, data, run)
    return cfg, pl


# ----------------------------------------------------------------------------- the deployment


def deploy(cfg: Config, data: str | Path, out: str | Path, *, sites: int, port: int | None = None,
           settings: FlowerSettings | None = None, echo: Callable[[str], None] = log.info,
           run_timeout: float = 24 * 3600.0, modality: str | None = None, device: str = "auto") -> dict:
    """Run the whole pipeline on a local federation of ``sites`` SuperNodes; returns the aggregate summary.

    ``modality`` (CT, MR, US, ...; where ``dataset.json`` or a DICOM header does not tell) goes into every
    SuperNode's ``node_config``: each hospital states its own data's modality in its fingerprint. ``device`` goes
    into every SuperNode's ``node_config`` and into the ServerApp's ``flower.server-device`` (one machine plays
    every role here; in a real federation each party sets its own)."""
    refuse_federated(cfg.mapping, "this app (the shared and per-hospital scopes)")
    run = Path(out).absolute()
    if run.exists() and any(run.iterdir()):
        raise DeployError(f"{run}: folder is not empty; choose another --out")
    if sites < 1:
        raise DeployError(f"--sites: need at least 1 hospital, got {sites}")
    if port is not None:
        check_port(port)
    if modality is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,16}", modality):
        raise DeployError(f"--modality: a name such as CT, MR or US, got {modality!r}")
    cfg, pl = deal(replace(cfg, clients=sites), data, run)
    settings = settings or FlowerSettings()
    resolve_device(device)  # a device this machine lacks fails before anything starts
    settings = replace(settings, nodes=sites, server_device=device)
    atomic_write_json(run / "config.json", {**to_dict(cfg), "data_dir": str(Path(data).absolute())})

    write_app(run / "app", cfg, settings)
    names = list(pl.hospitals)
    seeds = {n: site_seed(cfg.seed, i) for i, n in enumerate(names)}  # as simulate numbers the same hospitals
    for n in names:
        (run / "sites" / n / "test").symlink_to(run / "test", target_is_directory=True)
    echo(f"{len(names)} hospitals: " + ", ".join(f"{n} ({len(pl.hospitals[n])} images)" for n in names)
         + f"; {len(pl.test)} held-out test images")
    threads = max(1, (os.cpu_count() or 1) // sites)
    node_configs = {n: node_config(run / "sites" / n, n, threads, seeds[n], cfg.autoencoder.send_noise, modality, device)
                    for n in names}
    t_start = time.perf_counter()
    with federation(run, node_configs, port=port, echo=echo) as fed:
        echo(f"{len(names)} SuperNodes started; running the app (flwr run)")
        summary = run_app(run / "app", fed.cli_env, fed.procs, fed.server, echo, run_timeout)
    if (Path(summary["server_dir"]) / "plan.json").exists():  # with --plan: the plan the hospitals applied, beside the summary
        shutil.copyfile(Path(summary["server_dir"]) / "plan.json", run / "plan.json")
    summary["deployment"] = {"sites": names, "superlink": fed.superlink, "wall_s": time.perf_counter() - t_start,
                             "tls": True, "supernode_auth": True}
    write_summary(summary, run / "summary.json")
    return summary


@dataclass(frozen=True)
class Federation:
    """A running federation (:func:`federation`): what ``flwr run`` needs to reach it and what to watch."""

    procs: Processes
    cli_env: dict[str, str]  # the environment of the flwr command (its FLWR_HOME knows the SuperLink)
    server: Path  # the SuperLink's PPCMI_SERVER_DIR: ServerApps write run-ID/ here
    superlink: str  # HOST:PORT


@contextmanager
def federation(run: Path, node_configs: dict[str, str], *, port: int | None = None,
               echo: Callable[[str], None] = log.info) -> Iterator[Federation]:
    """A Flower federation on loopback for the hospitals of ``node_configs`` (site name -> its SuperNode's
    ``--node-config``): a project CA and the SuperLink's TLS certificate (``run/coordinator/certs``), one
    SuperNode key pair per hospital (``run/sites/NAME/auth``, the public half registered), ``flower-superlink``
    with TLS and SuperNode authentication, one ``flower-supernode`` per hospital. Every process it started is
    stopped, by its id, when the block ends, fails or is interrupted (SIGTERM counts as Ctrl-C)."""
    coord = run / "coordinator"
    certs = coord / "certs"
    init_ca(certs)
    names = list(node_configs)
    for n in names:
        site = run / "sites" / n
        site.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(certs / CA_CERT, site / CA_CERT)
        supernode_keygen(site / "auth", comment=n)
        (coord / "supernodes").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / "auth" / PUBLIC, coord / "supernodes" / f"{n}.pub")
    link_port, *node_ports = [p for p in free_ports(len(names) + 2) if p != port][: len(names) + 1]
    link_port = port if port is not None else link_port
    cli_home = coord / "cli"
    cli_home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cli_home / "config.toml",
                      f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                      f'address = "{HOST}:{link_port}"\nroot-certificates = {json.dumps(str(certs / CA_CERT))}\n')
    cli_env = flower_env(cli_home)
    logs = run / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = Processes(logs)
    old_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if old_term is not None:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        procs.start("superlink", [tool("flower-superlink"), "--ssl-ca-certfile", str(certs / CA_CERT),
                                  "--ssl-certfile", str(certs / SERVER_CERT), "--ssl-keyfile", str(certs / SERVER_KEY),
                                  "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                                  "--host", HOST, "--port", str(link_port)],
                    flower_env(coord / "flwr", **{SERVER_DIR_ENV: str(coord / "server")}), cwd=coord)
        wait_listening(procs, "superlink", link_port)
        echo(f"SuperLink listening on {HOST}:{link_port} (TLS, SuperNode authentication on)")
        for n in names:
            node_id = register(coord / "supernodes" / f"{n}.pub", cli_env, logs / "register.log")
            echo(f"registered {n}'s SuperNode public key (node {node_id})")
        for n, p in zip(names, node_ports):
            site = run / "sites" / n
            procs.start(n, [tool("flower-supernode"), "--superlink", f"{HOST}:{link_port}",
                            "--root-certificates", str(site / CA_CERT), "--auth-supernode-private-key", str(site / "auth" / PRIVATE),
                            "--host", HOST, "--port", str(p), "--node-config", node_configs[n]],
                        flower_env(site / "flwr"), cwd=site)
        for n, p in zip(names, node_ports):
            wait_listening(procs, n, p)
        yield Federation(procs, cli_env, coord / "server", f"{HOST}:{link_port}")
    except KeyboardInterrupt:
        echo("interrupted: stopping every process this deployment started")
        raise
    finally:
        procs.stop()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _raise_interrupt(signum, frame):  # SIGTERM ends a deployment like Ctrl-C: through the finally that stops processes
    raise KeyboardInterrupt


def register(pub: Path, env: dict[str, str], logfile: Path) -> str:
    """``flwr supernode register``: allow the SuperNode holding ``pub``'s private key to connect."""
    res = subprocess.run([tool("flwr"), "supernode", "register", str(pub), CONNECTION, "--format", "json"], env=env,
                         capture_output=True, text=True, timeout=120)
    with open(logfile, "a", encoding="utf-8") as f:
        f.write(res.stdout + res.stderr)
    try:
        answer = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        answer = {}
    if res.returncode != 0 or not answer.get("success"):
        raise DeployError(f"registering {pub.name} failed (flwr exit status {res.returncode}); the end of {logfile}:\n{tail(logfile)}")
    return str(answer["node-id"])


def run_app(app: Path, env: dict[str, str], procs: Processes, server: Path, echo: Callable[[str], None] = log.info,
            timeout: float = 24 * 3600.0) -> dict:
    """``flwr run APP --stream``: relay the ServerApp's progress lines, watch every process, read the summary.

    ``server`` is the SuperLink's ``PPCMI_SERVER_DIR``, where the ServerApp writes ``run-ID/summary.json``.
    """
    logfile = procs.logs / "flwr-run.log"
    lines: queue.Queue = queue.Queue()
    with open(logfile, "a", encoding="utf-8") as lf:
        p = subprocess.Popen([tool("flwr"), "run", str(app), CONNECTION, "--stream"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        procs.procs["flwr-run"] = p  # stopped with the others on any exit

        def pump():
            for line in p.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline, last_error, run_id = time.monotonic() + timeout, None, None
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                procs.check_alive(skip=("flwr-run",))
                if time.monotonic() > deadline:
                    raise DeployError(f"the run did not finish within {timeout:.0f} s; see {logfile}")
                continue
            if line is None:
                break
            lf.write(line)
            lf.flush()
            text = line.rstrip("\n")
            started = re.search(r"Successfully started run (\d+)", text)
            if started:
                run_id = started.group(1)
            if text.startswith(PROGRESS_PREFIX):
                echo(text[len(PROGRESS_PREFIX):])
                if text[len(PROGRESS_PREFIX):].startswith("error:"):
                    last_error = text[len(PROGRESS_PREFIX):]
        p.wait()
    result = server / f"run-{run_id}" / "summary.json"
    if run_id is None:
        raise DeployError(f"flwr run did not start a run (exit status {p.returncode}); the end of {logfile}:\n{tail(logfile)}")
    if last_error or not result.exists():
        raise DeployError(f"the Flower run failed: {last_error or 'no summary was written'}; the end of {logfile}:\n{tail(logfile)}")
    summary = json.loads(result.read_text())
    summary["server_dir"] = str(result.parent)
    return summary
