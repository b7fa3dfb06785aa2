"""``shoal bench``: sandbox-to-sandbox TCP throughput in a private network, beside host loopback (issue 9:
≥ 50 % of loopback in the same run).

The same Python sender and receiver run on both paths (``base`` has python3), so the comparison is of the
paths, not of the tools: host loopback (one process each, no cgroup) against sandbox A → veth → host
forward (``peers`` rule, conntrack) → veth → sandbox B, each sandbox with its default 1 CPU.
"""

from __future__ import annotations

import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

TARGET_RATIO = 0.5
MIB = 1 << 20
TOTAL_MIB = 512
ROUNDS = 3
PORT = 5201
RECEIVER = """import socket, sys, time
s = socket.socket(socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
buf, n, t = bytearray(1 << 20), 0, None
while True:
    k = c.recv_into(buf)
    if not k:
        break
    if t is None:
        t = time.perf_counter()
    n += k
print(n / (time.perf_counter() - t), flush=True)
"""
SENDER = """import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
chunk = b"x" * (1 << 20)
for _ in range(int(sys.argv[3])):
    c.sendall(chunk)
c.close()
"""


def _host_round() -> float:
    recv = subprocess.Popen([sys.executable, "-c", RECEIVER, "127.0.0.1", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        recv.stdout.readline()
        port = _listening_port(recv.pid)
        subprocess.run([sys.executable, "-c", SENDER, "127.0.0.1", str(port), str(TOTAL_MIB)], check=True, timeout=120)
        return float(recv.stdout.readline())
    finally:
        recv.kill()
        recv.wait()


def _listening_port(pid: int) -> int:
    """The port the receiver bound (port 0: the kernel chose), from its socket's inode in /proc/net/tcp."""
    import os

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open("/proc/net/tcp") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    return int(fields[1].split(":")[1], 16)
        time.sleep(0.01)
    raise RuntimeError("the loopback receiver did not listen")


def _sandbox_round(engine, a: str, b: str, address: str) -> float:  # noqa: ANN001
    recv = engine.agent(b).start(["python3", "-c", RECEIVER, "0.0.0.0", str(PORT)])
    try:
        out = b""
        events = iter(recv)
        while b"ready" not in out:
            ev = next(events)
            out += ev.data if isinstance(getattr(ev, "data", None), bytes) else b""
        res = engine.agent(a).run(["python3", "-c", SENDER, address, str(PORT), str(TOTAL_MIB)], timeout=120)
        if res.exit_code != 0:
            raise RuntimeError(res.stderr_bytes.decode(errors="replace")[-300:])
        for ev in events:
            data = getattr(ev, "data", None)
            if isinstance(data, bytes):
                out += data
                lines = out.decode().split()
                if len(lines) >= 2:
                    return float(lines[1])
        raise RuntimeError("the sandbox receiver reported nothing")
    finally:
        recv.close()


def run_peer_throughput_benchmark(engine, percentiles: Callable[[list[float]], dict]) -> dict:  # noqa: ANN001
    """MiB/s over host loopback and between two ``base`` sandboxes of one private network, interleaved."""
    try:
        if not engine.templates.get("base").built:
            return {"skipped": "template base is not built"}
    except Exception:  # noqa: BLE001 - no base template on this host
        return {"skipped": "no template base"}
    name = "bench-" + secrets.token_hex(3)
    engine.private_networks.create(None, name)
    made: list[str] = []
    try:
        a, b = (engine.create("base", networks=[name], wait=True).id for _ in range(2))
        made += [a, b]
        address = engine.get(b).address
        host, peers = [], []
        for _ in range(ROUNDS):
            host.append(_host_round() / MIB)
            peers.append(_sandbox_round(engine, a, b, address) / MIB)
    finally:
        for sid in made:
            engine.destroy(sid)
        engine.delete_network(name)
    ratio = round(statistics.median(peers) / statistics.median(host), 3)
    return {"loopback_mib_s": round(statistics.median(host), 1), "sandbox_to_sandbox_mib_s":
            round(statistics.median(peers), 1), "ratio": ratio,
            "target": {"value": ratio, "target": TARGET_RATIO, "met": ratio >= TARGET_RATIO}}


def peer_throughput_report(r: dict) -> str:
    if "skipped" in r:
        return f"{'sandbox_to_sandbox_tcp':28} skipped ({r['skipped']})"
    return (f"{'sandbox_to_sandbox_tcp':28} {r['sandbox_to_sandbox_mib_s']:.0f} MiB/s   | host loopback "
            f"{r['loopback_mib_s']:.0f} MiB/s   ratio {r['ratio']}   target ≥ {r['target']['target']:g}: "
            f"{'met' if r['target']['met'] else 'NOT met'}")
