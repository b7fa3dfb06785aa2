"""The writable layer and pause modes through the daemon: REST bodies, honest fields, clear errors,
and the CLI's flags (issue 10)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from conftest import DAEMON_BIN, RunningDaemon


@pytest.fixture
def api(daemon: RunningDaemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=60) as client:
        made: list[str] = []
        client.made = made  # type: ignore[attr-defined]
        yield client
        for sid in made:
            client.delete(f"/v1/sandboxes/{sid}")


def _create(api: httpx.Client, **body: object) -> dict:
    r = api.post("/v1/sandboxes", json={"template": "minimal", **body})
    assert r.status_code == 201, r.text
    api.made.append(r.json()["id"])  # type: ignore[attr-defined]
    return r.json()


def _exec(api: httpx.Client, sid: str, cmd: str) -> dict:
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd})
    assert r.status_code == 200, r.text
    return r.json()


def test_layer_usage_and_filesystem_pause_over_rest(api: httpx.Client) -> None:
    sb = _create(api, disk_mb=64)
    sid = sb["id"]
    assert sb["layer"] == "disk" and sb["boot_id"] and sb["started_at"]
    _exec(api, sid, "dd if=/dev/zero of=/f bs=1M count=20 && sync")
    got = api.get(f"/v1/sandboxes/{sid}").json()
    assert 20 * 2**20 <= got["disk_used_bytes"] < got["disk_total_bytes"] <= 64 * 2**20

    paused = api.post(f"/v1/sandboxes/{sid}/pause", json={"mode": "filesystem"})
    assert paused.status_code == 200, paused.text
    assert paused.json()["state"] == "paused" and paused.json()["pause_mode"] == "filesystem"
    assert api.get(f"/v1/sandboxes/{sid}").json()["disk_used_bytes"] is None  # not mounted: nothing running
    refused = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"})
    assert refused.status_code == 409 and refused.json()["code"]

    resumed = api.post(f"/v1/sandboxes/{sid}/resume").json()
    assert resumed["state"] == "running" and resumed["pause_mode"] is None
    assert resumed["boot_id"] != sb["boot_id"]
    assert _exec(api, sid, "wc -c < /f")["stdout"].strip() == str(20 * 2**20)

    frozen = api.post(f"/v1/sandboxes/{sid}/pause").json()  # no body: today's freeze
    assert frozen["pause_mode"] == "memory"
    assert api.post(f"/v1/sandboxes/{sid}/resume").json()["boot_id"] == resumed["boot_id"]


def test_bad_layer_and_mode_are_clear_errors(api: httpx.Client) -> None:
    bad = api.post("/v1/sandboxes", json={"template": "minimal", "layer": "floppy"})
    assert 400 <= bad.status_code < 500 and {"code", "message"} <= bad.json().keys()
    ram = _create(api, layer="ram")
    assert ram["layer"] == "ram"
    r = api.post(f"/v1/sandboxes/{ram['id']}/pause", json={"mode": "filesystem"})
    assert r.status_code == 409 and "memory" in r.json()["message"]
    r = api.post(f"/v1/sandboxes/{ram['id']}/pause", json={"mode": "hibernate"})
    assert 400 <= r.status_code < 500 and {"code", "message"} <= r.json().keys()
    assert api.get(f"/v1/sandboxes/{ram['id']}").json()["state"] == "running"


def test_cli_layer_and_filesystem_only(daemon: RunningDaemon, api: httpx.Client) -> None:
    env = {**os.environ, "SHOAL_URL": daemon.url, "SHOAL_API_KEY": daemon.key}

    def shoal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DAEMON_BIN, *args], env=env, capture_output=True, text=True, timeout=120)

    made = shoal("create", "--layer", "ram")
    assert made.returncode == 0, made.stderr
    ram = made.stdout.strip()
    api.made.append(ram)  # type: ignore[attr-defined]
    assert api.get(f"/v1/sandboxes/{ram}").json()["layer"] == "ram"
    refused = shoal("pause", "--filesystem-only", ram)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1

    disk = shoal("create").stdout.strip()
    api.made.append(disk)  # type: ignore[attr-defined]
    assert shoal("pause", "--filesystem-only", disk).returncode == 0
    assert api.get(f"/v1/sandboxes/{disk}").json()["pause_mode"] == "filesystem"
    assert shoal("resume", disk).returncode == 0
    assert api.get(f"/v1/sandboxes/{disk}").json()["state"] == "running"


def test_exec_result_says_the_oom_killer_took_it(api: httpx.Client) -> None:
    """Issue 10: the OOM victim is the command, the sandbox lives, and the command's result says why it died;
    a SIGKILL from anyone else is not called an OOM."""
    sid = _create(api, memory_mb=64)["id"]
    hog = "x=0123456789; while :; do x=$x$x; done"
    r = _exec(api, sid, hog)
    assert r["signal"] == 9 and r["oom_killed"] is True, r
    assert _exec(api, sid, "echo alive")["stdout"] == "alive\n"
    killed = _exec(api, sid, "sh -c 'kill -9 $$'")
    assert killed["signal"] == 9 and killed["oom_killed"] is False
