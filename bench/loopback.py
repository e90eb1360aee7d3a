"""A real deployment on loopback: Flower's own ``flower-superlink`` and SuperNodes (started as
``seedtune silo supernode``, client/supernode.py), TLS and node authentication on, credentials from
deploy/credentials.py, runs from ``flwr run``. The deployment tests and ``seedtune bench deploy``
use it; it needs a source checkout (the Flower app's pyproject.toml and deploy/)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from seedtune.bench.processes import kill_marked
from seedtune.common.errors import SeedtuneError

ROOT = Path(__file__).resolve().parents[1]  # the checkout (an editable install: ./scripts/setup.sh)
BIN = Path(sys.executable).parent  # flwr, flower-superlink, seedtune: the venv's own


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Loopback:
    """One SuperLink and any number of SuperNodes under ``root``; ``close`` stops every process
    started here (and whatever those detached), by the marker in their environment."""

    def __init__(self, root: Path, silos: int, epsilon: float = 8.0):
        if not (ROOT / "deploy" / "credentials.py").exists():
            raise SeedtuneError(f"a loopback deployment runs from a source checkout, not from {ROOT}: clone "
                                "the repository and run ./scripts/setup.sh")
        self.root = root
        self.silos = silos
        self.epsilon = epsilon  # each silo's budget
        self.marker = uuid.uuid4().hex
        self.port = free_port()
        self.credentials = root / "credentials"
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(root / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "SEEDTUNE_TEST_MARKER": self.marker}
        self.supernodes: dict[int, subprocess.Popen] = {}
        self.engines: dict[int, subprocess.Popen] = {}
        subprocess.run([sys.executable, str(ROOT / "deploy" / "credentials.py"), "--out", str(self.credentials),
                        "--silos", str(silos + 1), "--server-name", "localhost", "--server-name", "127.0.0.1"],
                       check=True, capture_output=True)
        (root / "flwr").mkdir()
        (root / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.credentials / "ca.crt"}"\n')

    def _start(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        return subprocess.Popen(command, env={**self.env, **(env or {})}, cwd=self.root, stdout=log,
                                stderr=subprocess.STDOUT)

    def start_superlink(self) -> None:
        c = self.credentials
        self.superlink = self._start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"),
            "--ssl-certfile", str(c / "superlink.crt"), "--ssl-keyfile", str(c / "superlink.key"),
            "--enable-supernode-auth", "--database", str(self.root / "superlink-state.db"),
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError("flower-superlink exited:\n" + self.log("superlink")[-3000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("flower-superlink did not start listening in 60 s")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def register(self, silo: int) -> None:
        result = self.flwr("supernode", "register", str(self.credentials / f"silo-{silo}.pub"), "loopback")
        if result.returncode != 0 or "registered successfully" not in result.stdout:
            raise RuntimeError(f"registering silo-{silo} failed:\n{result.stdout}{result.stderr}")

    def _silo_settings(self, silo: int, data: Path | None) -> str:
        """What binds a silo (its state, budget and data): the SuperNode's, or its engine's. Its data:
        the file ``data``, or else its share of the run's dataset, split as a simulation splits it."""
        settings = f'name="silo-{silo}" state-dir="{self.root / f"silo-{silo}"}" epsilon={self.epsilon}'
        if data is not None:
            settings += f' data-path="{data}" public-size=500'
        else:
            settings += f" partition-id={silo} num-partitions={self.silos}"
        return settings

    def engine_socket(self, silo: int) -> Path:
        return self.root / f"engine-{silo}.sock"

    def start_engine(self, silo: int, *, data: Path | None = None, seconds: float = 120) -> subprocess.Popen:
        """``seedtune silo serve`` for one silo; returns once it answers on its socket. Its torch
        runs one thread, as each silo does on the simulation engine (a Ray worker with one CPU):
        several engines on one machine, each on every core, would slow one another down."""
        from seedtune.client.channel import EngineUnavailable, ask

        process = self._start(f"engine-{silo}", [sys.executable, "-m", "seedtune.cli.main", "silo", "serve",
                                                 "--socket", str(self.engine_socket(silo)),
                                                 "--node-config", self._silo_settings(silo, data)],
                              env={"OMP_NUM_THREADS": "1"})
        self.engines[silo] = process
        deadline = time.monotonic() + seconds
        while True:
            try:
                ask(str(self.engine_socket(silo)), "ping")
                return process
            except EngineUnavailable:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"engine-{silo} did not come up:\n" + self.log(f"engine-{silo}")[-3000:])
                time.sleep(0.5)

    def start_supernode(self, silo: int, *, data: Path | None = None, with_ca: bool = True,
                        extra: str = "", max_retries: int | None = None, engine: bool = False,
                        stock: bool = False) -> subprocess.Popen:
        """A SuperNode; with ``engine``, its ClientApp forwards to the silo's engine, which holds
        every setting that binds the silo. ``stock``: Flower's ``flower-supernode`` as shipped,
        rather than ``seedtune silo supernode``."""
        state = self.root / f"silo-{silo}"
        state.mkdir(exist_ok=True)
        config = f'message-log="{state / "messages.jsonl"}" {extra} '
        if engine:
            config += f'engine="{self.engine_socket(silo)}"'
        else:
            config += self._silo_settings(silo, data)
        launcher = [str(BIN / "flower-supernode")] if stock else [str(BIN / "seedtune"), "silo", "supernode"]
        command = [*launcher, "--superlink", f"127.0.0.1:{self.port}",
                   "--auth-supernode-private-key", str(self.credentials / f"silo-{silo}"),
                   "--node-config", config, "--port", str(free_port())]
        if with_ca:
            command += ["--root-certificates", str(self.credentials / "ca.crt")]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries), "--max-wait-time", "20"]
        process = self._start(f"supernode-{silo}", command)
        self.supernodes[silo] = process
        return process

    def wait_online(self, count: int, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            listing = self.flwr("supernode", "list", "loopback").stdout
            if listing.count(" online ") >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {seconds} s:\n{listing}")

    def run(self, settings: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """``flwr run <this project> loopback --stream``, with run-config overrides."""
        return self.flwr("run", str(ROOT), "loopback", "--stream", "--run-config", settings, timeout=timeout)

    def start_run(self, settings: str) -> subprocess.Popen:
        """The same, in the background."""
        return subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream", "--run-config", settings],
                                env=self.env, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def close(self) -> list:
        return kill_marked(self.marker)
