"""Shared fixtures for the sandbox tests: real sandboxes on this host (root, crun), no mocks.

* ``engine``        one Engine for the whole run (default Settings: /var/lib/shoal, /run/shoal)
* ``sandbox``       a module-scoped ``minimal`` sandbox id; ``agent`` its AgentClient
* ``base_sandbox``  a module-scoped ``base`` sandbox id (Debian, python3, bash); ``base_agent``
* ``new_sandbox``   a factory for sandboxes a single test owns (destroyed when the test ends)
* ``host_marker``   a file that exists only on the host, with unique contents
* ``leftovers``     what a sandbox id still holds on the host (empty once it is fully gone)

Every sandbox a fixture creates is destroyed by a finalizer, whatever the test did to it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# --- this run's own Shoal instance -----------------------------------------------------------------
# The suite never touches a user's daemon, sandboxes, keys or templates: before anything reads the
# settings, it moves into its own state and run directories (hence its own instance name, which every
# host resource carries), seeded with hard links to the template images the default state directory
# already has (test.sh builds them there, as a user's first `shoal run` would). The CLI and SDK must not
# find a user's daemon either: the tests always pass their own daemon's URL and key.
TEST_ROOT = Path(os.environ.get("SHOAL_TEST_ROOT") or tempfile.mkdtemp(prefix="shoal-test-", dir="/var/tmp"))
_OWN_ROOT = "SHOAL_TEST_ROOT" not in os.environ
USER_STATE_DIR = Path(os.environ.get("SHOAL_STATE_DIR") or "/var/lib/shoal")
for _name in ("SHOAL_INSTANCE", "SHOAL_URL", "SHOAL_API_KEY"):
    os.environ.pop(_name, None)
os.environ["SHOAL_STATE_DIR"] = str(TEST_ROOT / "state")
os.environ["SHOAL_RUN_DIR"] = str(TEST_ROOT / "run")


def _seed_templates(source: Path, target: Path) -> None:
    """Hard-link built template images (immutable: a rebuild renames a new file in) into ``target``."""
    if not source.is_dir():
        return
    for tdir in source.iterdir():
        image, meta = tdir / "image.erofs", tdir / "meta.json"
        dest = target / tdir.name
        if not (image.is_file() and meta.is_file()) or (dest / "meta.json").exists():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        try:
            os.link(image, dest / "image.erofs")
        except OSError:
            shutil.copy2(image, dest / "image.erofs")
        shutil.copy2(meta, dest / "meta.json")


for _d in (TEST_ROOT, TEST_ROOT / "state", TEST_ROOT / "run"):
    _d.mkdir(exist_ok=True)
    os.chmod(_d, 0o711)  # crun, as the sandbox's root, must traverse them (like /var/lib and /run)
_seed_templates(USER_STATE_DIR / "templates", TEST_ROOT / "state" / "templates")

from shoal.errors import NotFound  # noqa: E402  (after the environment above is set)
from shoal.runtime.agent_client import AgentClient  # noqa: E402
from shoal.settings import Settings  # noqa: E402

PREFIX = Settings().resource_prefix  # this run's instance: shoal-<instance>-<sandbox>

if os.geteuid() != 0:  # pragma: no cover - every test here needs namespaces, mounts and cgroups
    pytest.skip("sandbox tests need root", allow_module_level=True)

from shoal.engine.engine import Engine  # noqa: E402  (Engine() refuses to start without root)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _destroy_quietly(engine: Engine, sandbox_id: str) -> None:
    try:
        engine.destroy(sandbox_id)
    except NotFound:
        pass  # the test destroyed it already
    finally:
        # Whatever destroy did, make sure nothing of it outlives the test run.
        engine.runtime.destroy(sandbox_id)


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine()


@pytest.fixture(scope="session")
def base_template(engine: Engine) -> str:
    """The ``base`` template, built once per run (cached in /var/lib/shoal after the first)."""
    engine.templates.build("base")
    return "base"


@pytest.fixture(scope="session")
def minimal_template(engine: Engine) -> str:
    engine.templates.build("minimal")
    return "minimal"


@pytest.fixture(scope="module")
def sandbox(engine: Engine, minimal_template: str) -> Iterator[str]:
    rec = engine.create(minimal_template, wait=True)
    try:
        yield rec.id
    finally:
        _destroy_quietly(engine, rec.id)


@pytest.fixture(scope="module")
def agent(engine: Engine, sandbox: str) -> AgentClient:
    return engine.agent(sandbox)


@pytest.fixture(scope="module")
def base_sandbox(engine: Engine, base_template: str) -> Iterator[str]:
    rec = engine.create(base_template, wait=True)
    try:
        yield rec.id
    finally:
        _destroy_quietly(engine, rec.id)


@pytest.fixture(scope="module")
def base_agent(engine: Engine, base_sandbox: str) -> AgentClient:
    return engine.agent(base_sandbox)


@pytest.fixture
def new_sandbox(engine: Engine, minimal_template: str) -> Iterator[Callable[..., str]]:
    """``new_sandbox(template="minimal", **create_kwargs) -> id``; all destroyed after the test."""
    created: list[str] = []

    def make(template: str = minimal_template, **kwargs: object) -> str:
        kwargs.setdefault("wait", True)
        rec = engine.create(template, **kwargs)  # type: ignore[arg-type]
        created.append(rec.id)
        return rec.id

    yield make
    for sid in created:
        _destroy_quietly(engine, sid)


@pytest.fixture(scope="session")
def host_marker() -> Iterator[Path]:
    """A host-only file with unique contents; no sandbox may ever see it."""
    path = Path(f"/tmp/shoal-host-marker-{secrets.token_hex(8)}")
    path.write_text(f"host secret {secrets.token_hex(16)}\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def host_leftovers(engine: Engine, sandbox_id: str, pids: list[int] = ()) -> list[str]:  # type: ignore[assignment]
    """Everything of ``sandbox_id`` still on the host, as readable strings (empty: fully gone).

    ``pids`` are host pids that belonged to the sandbox (e.g. its init) and must be dead now.
    """
    found: list[str] = []
    bundle = engine.runtime.bundle(sandbox_id)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point == str(bundle) or point.startswith(str(bundle) + "/"):
                found.append(f"mount {point}")
    for d in CGROUP_ROOT.glob(f"*/{PREFIX}{sandbox_id}"):
        found.append(f"cgroup {d}")
    if (CGROUP_ROOT / f"{PREFIX}{sandbox_id}").exists():
        found.append(f"cgroup {CGROUP_ROOT / f'{PREFIX}{sandbox_id}'}")
    if bundle.exists():
        found.append(f"bundle {bundle}")
    crun_state = engine.settings.crun_root / f"{PREFIX}{sandbox_id}"
    if crun_state.exists():
        found.append(f"crun state {crun_state}")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state != "Z":  # a zombie waiting for its (host) parent is no longer running
                found.append(f"process {pid}")
        except FileNotFoundError:
            pass
    try:
        engine.get(sandbox_id)
        found.append("store record")
    except NotFound:
        pass
    return found


@pytest.fixture(scope="session")
def leftovers(engine: Engine) -> Callable[..., list[str]]:
    """``leftovers(sandbox_id, pids=[...]) -> list[str]``: see ``host_leftovers``."""
    return lambda sandbox_id, pids=(): host_leftovers(engine, sandbox_id, list(pids))


# --- the daemon ------------------------------------------------------------------------------------

import subprocess  # noqa: E402  (the daemon fixture's own imports)

DAEMON_BIN = "/opt/shoal/venv/bin/shoal"
LOCAL_KEY = Settings().state_dir / "local.key"


class RunningDaemon:
    """A ``shoal serve`` subprocess on loopback: ``url``, ``key`` (the local key), ``proc``, ``log``."""

    def __init__(self, url: str, key: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.key, self.proc, self.log = url, key, proc, log

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(port: int | None = None, log: Path | None = None, wait: float = 30.0) -> RunningDaemon:
    """Start ``shoal serve --port <port>`` (default state dirs) and wait until /health answers."""
    import time

    import httpx

    port = port or free_port()
    log = log or Path(f"/tmp/shoal-daemon-{port}-{secrets.token_hex(3)}.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen([DAEMON_BIN, "serve", "--port", str(port)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"shoal serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"shoal serve did not answer /health within {wait} s: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return RunningDaemon(url, LOCAL_KEY.read_text().strip(), proc, log)


def stop_daemon(d: RunningDaemon, timeout: float = 15.0) -> int | None:
    """SIGTERM, wait, SIGKILL if it does not go; returns the exit status."""
    import signal

    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
    return d.proc.returncode


@pytest.fixture(scope="session")
def daemon() -> Iterator[RunningDaemon]:
    """One ``shoal serve`` for the session on a free loopback port; SIGTERM at the end."""
    d = start_daemon()
    try:
        yield d
    finally:
        stop_daemon(d)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Leave nothing of this run's instance on the host: its sandboxes, mounts and directories."""
    from shoal.net.network import Network
    from shoal.runtime.linux import mounts, userns_pool
    from shoal.storage import ready_layers

    try:
        engine = Engine()
        for rec in engine.store.all():
            _destroy_quietly(engine, rec.id)
        engine.reconcile()
        for sid in engine.runtime.existing():
            engine.runtime.destroy(sid)
    except Exception as exc:  # noqa: BLE001 - report, then still unmount what we can
        print(f"\nshoal test cleanup: {exc}")
    # the pools' threads must stop before the directories go, or they make new entries in them
    userns_pool.close_all()
    ready_layers.close_all()
    for net in list(Network._instances.values()):
        net.close()
    mounts.umount_tree(TEST_ROOT)
    if _OWN_ROOT:
        shutil.rmtree(TEST_ROOT, ignore_errors=True)
