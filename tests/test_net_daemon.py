"""Networking through the daemon: REST ``internet: false``, the daemon-wide switch ``SHOAL_INTERNET=0``,
and recovery after a daemon SIGKILL (orphaned slots freed, the rules of running sandboxes restored).

Reuses test_net_isolation's test host (a namespace made by the test) as "the internet".
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import start_daemon, stop_daemon
from shoal.engine.engine import Engine
from shoal.net import names
from test_net_isolation import HOST_SIDE4, TEST_HOST4, reach, test_host  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("test_host")


def _create(d, **body: object) -> dict:  # noqa: ANN001
    r = httpx.post(d.url + "/v1/sandboxes", json={"template": "minimal", **body}, headers=d.headers, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def _delete(d, sid: str) -> None:  # noqa: ANN001
    httpx.delete(f"{d.url}/v1/sandboxes/{sid}", headers=d.headers, timeout=60)


@pytest.fixture
def own_daemon() -> Iterator[list]:
    started: list = []
    yield started
    for d in started:
        stop_daemon(d)


def _start(started: list, **env: str):  # noqa: ANN202
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        d = start_daemon()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    started.append(d)
    return d


def test_rest_internet_false_and_daemon_switch(engine: Engine, own_daemon: list) -> None:
    d = _start(own_daemon)
    on, off = _create(d), _create(d, internet=False)
    try:
        assert on["internet"] is True and on["address"] and off["internet"] is False
        assert reach(engine, on["id"], TEST_HOST4) == HOST_SIDE4
        assert reach(engine, off["id"], TEST_HOST4) is None
        r = httpx.post(d.url + "/v1/sandboxes", json={"template": "minimal", "internet": "maybe"},
                       headers=d.headers, timeout=30)
        assert r.status_code == 400 and r.json()["code"]
    finally:
        _delete(d, on["id"])
        _delete(d, off["id"])
    stop_daemon(own_daemon.pop())
    d = _start(own_daemon, SHOAL_INTERNET="0")
    sb = _create(d, internet=True)  # the daemon's switch is a ceiling a client cannot lift
    try:
        assert sb["internet"] is False
        assert reach(engine, sb["id"], TEST_HOST4) is None
    finally:
        _delete(d, sb["id"])


def _nft_table(instance: str) -> str:
    return subprocess.run(["nft", "list", "table", "inet", names.table(instance)], capture_output=True,
                          text=True).stdout


def test_sigkill_then_restart_frees_orphans_and_restores_rules(engine: Engine, own_daemon: list) -> None:
    d = _start(own_daemon, SHOAL_NET_POOL="3")
    sb = _create(d)
    instance = engine.settings.instance

    def ours() -> set[str]:
        return {n for n in os.listdir("/sys/class/net") if n.startswith(names.veth_prefix(instance))}
    deadline = time.monotonic() + 20
    while len(ours()) < 4 and time.monotonic() < deadline:  # the pool refills after the create
        time.sleep(0.05)
    before = ours()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    own_daemon.pop()
    mine = {n for n in before if n.startswith(names.veth_prefix(instance))}
    assert len(mine) >= 4  # the sandbox's veth and the dead daemon's pool (3)
    # A crash may also lose rules: drop the table; the restarted daemon must rebuild it.
    subprocess.run(["nft", "delete", "table", "inet", names.table(instance)], check=True)
    d = _start(own_daemon, SHOAL_NET_POOL="0")
    try:
        assert reach(engine, sb["id"], TEST_HOST4) == HOST_SIDE4  # rules and NAT restored
        slot = engine.network.slot_of(sb["id"])
        table = _nft_table(instance)
        assert f'"{names.veth(instance, slot)}"' in table
        dead_pool = {n for n in mine if names.slot_of(instance, n) != slot
                     and not engine.network._paths(names.slot_of(instance, n))[0].exists()}
        assert dead_pool and not dead_pool & set(os.listdir("/sys/class/net"))
    finally:
        _delete(d, sb["id"])
    assert names.veth(instance, slot) not in os.listdir("/sys/class/net")
    assert f'"{names.veth(instance, slot)}"' not in _nft_table(instance)
