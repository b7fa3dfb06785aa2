"""The daemon dies or restarts; the sandboxes live on.

Each test runs its own ``shoal serve`` (own port, default state dirs) and kills or stops it while
work is in flight: running sandboxes with files and a background process, creates half-way,
streams open. After a restart everything that was running is still listed and ``running``, its
files and background processes are intact, and nothing half-made is left on the host: every
bundle, crun state dir and ``shoal-*`` cgroup has a record in the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from shoal.settings import Settings

PREFIX = Settings().resource_prefix  # this run's instance: shoal-<instance>-<sandbox>

SHOAL = "/opt/shoal/venv/bin/shoal"
LOCAL_KEY = Settings().state_dir / "local.key"
RUN_DIR = Settings().run_dir
CGROUP_ROOT = Path("/sys/fs/cgroup")
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


# --- a daemon of our own ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 30.0) -> None:
        """Start ``shoal serve`` and wait until /health answers (how fast is ``shoal bench``'s business)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        began = time.monotonic()
        with open(self.log, "ab") as out:
            out.write(f"\n--- start at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([SHOAL, "serve", "--port", str(self.port)], stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"shoal serve exited with {self.proc.returncode} at start:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - began > wait:
                raise AssertionError(f"shoal serve did not answer within {wait} s:\n{self.tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM; returns the exit status (a daemon that ignores SIGTERM for ``timeout`` s fails the test)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"shoal serve ignored SIGTERM for {timeout} s:\n{self.tail()}") from None
        return code

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Key:
    name: str
    secret: str
    id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def _create_key() -> Key:
    name = f"test-restart-{secrets.token_hex(4)}"
    secret = subprocess.run([SHOAL, "keys", "create", "--name", name], capture_output=True, text=True,
                            timeout=60, check=True).stdout.strip().splitlines()[-1]
    listed = json.loads(subprocess.run([SHOAL, "keys", "ls", "--json"], capture_output=True, text=True,
                                       timeout=60, check=True).stdout)
    (key_id,) = [k["id"] for k in listed if k["name"] == name]
    return Key(name, secret, key_id)


def _records() -> list:
    from shoal.engine.store import Store
    from shoal.settings import Settings

    store = Store(Settings().db_path)
    try:
        return store.all()
    finally:
        store.close()


def _host_ids() -> set[str]:
    """Sandbox ids that hold anything on the host: bundle dirs, crun state, cgroups."""
    ids: set[str] = set()
    for entry in (RUN_DIR / "sandboxes").iterdir():
        ids.add(entry.name)
    for entry in (RUN_DIR / "crun").iterdir():
        if entry.name.startswith(PREFIX):
            ids.add(entry.name[len(PREFIX):])
    for hierarchy in CGROUP_ROOT.iterdir():
        if hierarchy.is_dir():
            ids.update(g.name[len(PREFIX):] for g in hierarchy.glob(f"{PREFIX}*") if g.is_dir())
    return ids


def _host_traces(sid: str) -> list[str]:
    found = [str(p) for p in (RUN_DIR / "sandboxes" / sid, RUN_DIR / "crun" / f"{PREFIX}{sid}") if p.exists()]
    found += [str(g) for g in CGROUP_ROOT.glob(f"*/{PREFIX}{sid}")]
    with open("/proc/self/mountinfo") as f:
        found += [line.split()[4] for line in f if f"/sandboxes/{sid}" in line.split()[4]]
    return found


def assert_no_orphans(settle: float = 5.0) -> None:
    """Every host resource belongs to a sandbox the store knows (other processes on this host may be
    creating or deleting sandboxes right now, so an orphan must persist to count)."""
    deadline = time.monotonic() + settle
    while True:
        orphans = _host_ids() - {r.id for r in _records()}  # host first: a record is written before the host
        if not orphans:
            return
        if time.monotonic() > deadline:
            detail = {sid: _host_traces(sid) for sid in orphans}
            raise AssertionError(f"host resources without a sandbox record: {detail}")
        time.sleep(0.2)


@pytest.fixture
def own_daemon() -> Iterator[Daemon]:
    port = _free_port()
    d = Daemon(port, Path(f"/tmp/shoal-restart-{port}-{secrets.token_hex(3)}.log"))
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def key() -> Iterator[Key]:
    k = _create_key()
    try:
        yield k
    finally:
        # whatever the test left: delete the key's sandboxes at the engine level, then revoke it
        from shoal.engine import Engine
        from shoal.errors import NotFound
        engine = Engine()
        for rec in engine.list():
            if rec.api_key == k.id:
                try:
                    engine.destroy(rec.id)
                except NotFound:
                    pass
        subprocess.run([SHOAL, "keys", "revoke", k.name], capture_output=True, timeout=60)


# --- the scenario ---------------------------------------------------------------------------------

COUNTER = 'i=0; while true; do i=$((i+1)); echo $i > /root/counter; sleep 0.05; done'


@dataclass
class World:
    """Two running sandboxes with files and a background process, as the client knows them."""
    s1: str
    s2: str
    blob_md5: str
    bg_pid: int


def _build_world(c: httpx.Client) -> World:
    s1 = c.post("/v1/sandboxes", json={"metadata": {"role": "keep-1"}})
    s2 = c.post("/v1/sandboxes", json={"metadata": {"role": "keep-2"}, "memory_mb": 256})
    assert s1.status_code == 201 and s2.status_code == 201, (s1.text, s2.text)
    s1, s2 = s1.json()["id"], s2.json()["id"]
    blob = os.urandom(1024 * 1024 + 7)
    r = c.put(f"/v1/sandboxes/{s1}/files", params={"path": "/root/blob.bin"}, content=blob)
    assert r.status_code == 200, r.text
    r = c.post(f"/v1/sandboxes/{s2}/exec", json={"cmd": "echo persisted > /root/note; mkdir -p /srv/d"})
    assert r.status_code == 200 and r.json()["exit_code"] == 0
    r = c.post(f"/v1/sandboxes/{s1}/exec", json={"cmd": COUNTER, "background": True, "tag": "counter"})
    assert r.status_code == 200, r.text
    return World(s1, s2, hashlib.md5(blob).hexdigest(), r.json()["pid"])


def _counter(c: httpx.Client, sid: str) -> int:
    r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["cat", "/root/counter"]})
    assert r.status_code == 200, r.text
    return int(r.json()["stdout"])


def _check_world(c: httpx.Client, w: World, key: Key) -> None:
    listed = c.get("/v1/sandboxes")
    assert listed.status_code == 200, listed.text
    states = {s["id"]: s["state"] for s in listed.json()}
    assert states.get(w.s1) == "running" and states.get(w.s2) == "running", states
    assert set(states.values()) == {"running"}, f"a sandbox of this key is not running after the restart: {states}"
    mine = {r.id: r.state.value for r in _records() if r.api_key == key.id}
    assert mine == states, f"store {mine} and list {states} disagree"
    for sid in states:
        assert (RUN_DIR / "sandboxes" / sid).is_dir(), sid
    # files
    r = c.get(f"/v1/sandboxes/{w.s1}/files", params={"path": "/root/blob.bin"})
    assert r.status_code == 200 and hashlib.md5(r.content).hexdigest() == w.blob_md5
    r = c.post(f"/v1/sandboxes/{w.s2}/exec", json={"cmd": "cat /root/note; test -d /srv/d && echo dir"})
    assert r.status_code == 200 and r.json()["stdout"] == "persisted\ndir\n", r.text
    # the background process: still listed, still working
    procs = c.get(f"/v1/sandboxes/{w.s1}/processes")
    assert procs.status_code == 200, procs.text
    by_pid = {p["pid"]: p for p in procs.json()}
    assert w.bg_pid in by_pid and by_pid[w.bg_pid]["tag"] == "counter", by_pid
    first = _counter(c, w.s1)
    assert wait_until(lambda: _counter(c, w.s1) > first, 10), "the background process stopped counting"
    # and new work is fine
    r = c.post(f"/v1/sandboxes/{w.s2}/exec", json={"cmd": ["echo", "after restart"]})
    assert r.status_code == 200 and r.json()["stdout"] == "after restart\n"


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:  # noqa: ANN001
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _creating_ids(key: Key) -> list[str]:
    """Ids of ``key``'s sandboxes in state ``creating``, read-only straight from SQLite: this must work
    while the daemon is stopped (SIGSTOP) in the middle of a write transaction."""
    import sqlite3

    db = sqlite3.connect(f"file:{Settings().db_path}?mode=ro", uri=True, timeout=30)
    try:
        return [row[0] for row in db.execute("SELECT id FROM sandboxes WHERE api_key = ? AND state = 'creating'",
                                               (key.id,))]
    finally:
        db.close()


def _wait_for_creating(key: Key, timeout: float = 10.0) -> bool:
    """Until a sandbox of ``key`` is in the store in state ``creating`` (a create half-way)."""
    return wait_until(lambda: bool(_creating_ids(key)), timeout, 0.002)


def _freeze_mid_create(d: Daemon, key: Key, timeout: float = 30.0) -> list[str]:
    """SIGSTOP the daemon at a moment when a create of ``key`` is half-way; returns those ids.

    Seeing ``creating`` and then killing is a race (the create may finish in between, and the
    crash-recovery check would hold vacuously). A stopped daemon cannot finish anything: what is
    ``creating`` while it is stopped is still ``creating`` when the SIGKILL lands.
    """
    assert d.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _wait_for_creating(key, max(0.1, deadline - time.monotonic())):
            break
        os.kill(d.proc.pid, signal.SIGSTOP)
        assert wait_until(lambda: _proc_state(d.proc.pid) == "T", 10), "the daemon did not stop"
        half = _creating_ids(key)
        if half:
            return half
        os.kill(d.proc.pid, signal.SIGCONT)  # the create finished just before the stop: try again
    raise AssertionError(f"no create of the key was caught half-way within {timeout} s:\n{d.tail()}")


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


# --- tests ----------------------------------------------------------------------------------------

def test_sigkill_with_work_in_flight_then_restart(own_daemon: Daemon, key: Key):
    own_daemon.start()
    with httpx.Client(base_url=own_daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
        world = _build_world(c)
        _check_world(c, world, key)

    # work in flight: creates (one of them caught half-way), a streamed exec, a follow stream
    outcomes: list[str] = []
    go = threading.Event()

    def creator() -> None:
        with httpx.Client(base_url=own_daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
            go.wait(10)
            while True:
                try:
                    r = c.post("/v1/sandboxes", json={"metadata": {"role": "in-flight"}})
                    outcomes.append(str(r.status_code))
                except httpx.HTTPError as exc:
                    outcomes.append(type(exc).__name__)
                    return

    def streamer(path: str, body: dict | None) -> None:
        with httpx.Client(base_url=own_daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
            try:
                method = "POST" if body is not None else "GET"
                with c.stream(method, path, json=body) as r:
                    for _ in r.iter_lines():
                        pass
            except httpx.HTTPError:
                pass

    threads = [threading.Thread(target=creator) for _ in range(4)]
    threads.append(threading.Thread(target=streamer, args=(f"/v1/sandboxes/{world.s2}/exec",
                                                           {"cmd": "sleep 30", "stream": True})))
    threads.append(threading.Thread(target=streamer, args=(f"/v1/sandboxes/{world.s1}/processes/{world.bg_pid}/stream",
                                                           None)))
    for t in threads:
        t.start()
    go.set()
    half = _freeze_mid_create(own_daemon, key)  # stopped with these creates half-way
    own_daemon.kill()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert not [o for o in outcomes if o.startswith("5")], outcomes

    # the dead daemon's records: one at least is a create that never finished
    assert half and set(half) <= set(_creating_ids(key)), (half, _creating_ids(key))
    print(f"in flight at the kill: {outcomes}; half-created records: {half}")
    own_daemon.start()
    with httpx.Client(base_url=own_daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
        _check_world(c, world, key)
        listed = {s["id"] for s in c.get("/v1/sandboxes").json()}
    for sid in half:
        assert sid not in listed
        assert _host_traces(sid) == [], f"half-created sandbox {sid} left {_host_traces(sid)}"
    assert_no_orphans()


def test_graceful_restart_keeps_sandboxes(own_daemon: Daemon, key: Key):
    own_daemon.start()
    with httpx.Client(base_url=own_daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
        world = _build_world(c)

    stream_done, stream_open = threading.Event(), threading.Event()

    def follow() -> None:  # an open stream while the daemon stops: it must not hold shutdown forever
        with httpx.Client(base_url=own_daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
            try:
                with c.stream("GET", f"/v1/sandboxes/{world.s1}/processes/{world.bg_pid}/stream") as r:
                    if r.status_code == 200:
                        stream_open.set()
                    for _ in r.iter_lines():
                        pass
            except httpx.HTTPError:
                pass
            finally:
                stream_done.set()

    t = threading.Thread(target=follow)
    t.start()
    assert stream_open.wait(30), "the follow stream never opened"
    code = own_daemon.terminate()  # fails the test if the open stream holds shutdown for 15 s
    assert code in (0, -signal.SIGTERM), own_daemon.tail()
    assert stream_done.wait(10)
    t.join(10)

    own_daemon.start()
    with httpx.Client(base_url=own_daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
        _check_world(c, world, key)
    assert_no_orphans()

    # and once more, by SIGTERM while a create is half-way (it finishes or is undone, nothing leaks)
    def create() -> None:
        try:
            httpx.post(own_daemon.url + "/v1/sandboxes", json={}, headers=key.headers, timeout=TIMEOUT)
        except httpx.HTTPError:
            pass

    creators = [threading.Thread(target=create) for _ in range(3)]
    for t in creators:
        t.start()
    assert _wait_for_creating(key), "no create was caught half-way before the SIGTERM"
    code = own_daemon.terminate()
    assert code in (0, -signal.SIGTERM), own_daemon.tail()
    for t in creators:
        t.join(30)
    own_daemon.start()
    with httpx.Client(base_url=own_daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
        _check_world(c, world, key)
    assert_no_orphans()


def test_restarting_a_daemon_does_not_disturb_another_daemons_work(daemon, own_daemon: Daemon, key: Key):
    """Two daemons on one host: one starting (its reconcile) while the other creates, uses and
    deletes sandboxes must not destroy any of them. Bounded: up to 6 restarts, ~1 s apart."""
    stop = threading.Event()
    problems: list[str] = []
    cycles = [0]

    def worker() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - a worker that dies must fail the test, not vanish
            problems.append(f"worker died: {exc!r}")

    def work() -> None:
        with httpx.Client(base_url=daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
            while not stop.is_set():
                r = c.post("/v1/sandboxes", json={"metadata": {"role": "busy"}})
                if r.status_code != 201:
                    problems.append(f"create {r.status_code} {r.text[:200]}")
                    continue
                sid = r.json()["id"]
                r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["echo", sid]})
                if r.status_code != 200 or r.json()["stdout"] != sid + "\n":
                    problems.append(f"exec in {sid}: {r.status_code} {r.text[:200]}")
                r = c.delete(f"/v1/sandboxes/{sid}")
                if r.status_code != 204:
                    problems.append(f"delete {sid}: {r.status_code} {r.text[:200]}")
                cycles[0] += 1

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for t in workers:
        t.start()
    restarts = 0
    cycles_before: list[int] = []
    try:
        assert wait_until(lambda: cycles[0] > 0 or bool(problems), 60), "the workers never completed a cycle"
        for _ in range(6):
            cycles_before.append(cycles[0])
            own_daemon.start()
            restarts += 1
            code = own_daemon.terminate()
            assert code in (0, -signal.SIGTERM), own_daemon.tail()
            if problems or not all(t.is_alive() for t in workers):
                break
    finally:
        stop.set()
        for t in workers:
            t.join(60)
    assert not any(t.is_alive() for t in workers), "a worker hangs"
    assert cycles[0] > 0
    # the other daemon really worked while this one restarted (not before, not after)
    assert cycles_before and cycles[0] > cycles_before[0], (cycles_before, cycles[0])
    assert problems == [], (f"{len(problems)} failures in {cycles[0]} create/exec/delete cycles of one daemon "
                            f"while another started {restarts} times: {problems[:5]}")
    assert_no_orphans()


def _pool_entries(pid: int) -> list[str]:
    """What process ``pid`` keeps ready on the host: mounted layers, user namespaces, network slots."""
    found = []
    for sub in ("layers-ready", "userns"):
        try:
            found += [f"{sub}/{e.name}" for e in os.scandir(RUN_DIR / sub) if e.name.startswith(f"{pid}-")]
        except OSError:
            pass
    try:
        for e in os.scandir(RUN_DIR / "net" / "slots"):
            try:
                owner = json.loads(Path(e.path).read_text() or "null")
            except (OSError, ValueError):
                continue
            if isinstance(owner, dict) and owner.get("pool", [None])[0] == pid:
                found.append(f"net/slots/{e.name}")
    except OSError:
        pass
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mounts.splitlines() if f"/{pid}-" in line.split()[4]]
    return found


def test_sigterm_frees_the_daemons_pools(own_daemon: Daemon, key: Key):
    """uvicorn ends a SIGTERMed server by raising the signal again, so atexit never runs: the daemon
    frees what it keeps ready (mounted layers, user namespaces, network slots) when serving ends."""
    own_daemon.start()
    with httpx.Client(base_url=own_daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
        sid = c.post("/v1/sandboxes", json={"template": "minimal"}).json()["id"]
        assert c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]}).json()["exit_code"] == 0
        c.delete(f"/v1/sandboxes/{sid}")
    pid = own_daemon.proc.pid
    deadline = time.monotonic() + 30
    while not any(e.startswith("layers-ready/") for e in _pool_entries(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    held = _pool_entries(pid)
    assert any(e.startswith("layers-ready/") for e in held) and any(e.startswith("userns/") for e in held), held
    code = own_daemon.terminate()
    assert code in (0, -signal.SIGTERM), own_daemon.tail()
    assert _pool_entries(pid) == []
