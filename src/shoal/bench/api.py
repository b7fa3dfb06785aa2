"""``shoal bench --api``: the same figures through the daemon's REST API, plus exec throughput.

The daemon is started as a subprocess on a free loopback port (its own process, as users run it).
Throughput is driven by a deliberately thin HTTP/1.1 keep-alive client (pre-built requests, no
parsing beyond Content-Length) so that the load generator, which shares the 2 cores, costs as
little as possible; its baseline is the same load against ``/health`` in the same run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import httpx

from shoal.bench.run import SETTLE_S, _met, _percentiles, verdict
from shoal.settings import Settings

TARGETS = {"api_create_to_first_result_ms": 50.0, "api_exec_round_trip_ms": 3.0, "api_exec_per_second": 500.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(settings: Settings) -> tuple[subprocess.Popen, str, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "serve", "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("the daemon did not come up for the benchmark")
    key = (settings.state_dir / "local.key").read_text().strip()
    return proc, url, key


async def _load(port: int, request: bytes, connections: int, seconds: float) -> float:
    """Requests per second completed by ``connections`` keep-alive clients in ``seconds``."""
    done = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.split(b"\r\n")[0].decode())
                done += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    return done / (time.monotonic() - started)


def _raw_request(method: str, path: str, key: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def run_api_benchmarks(settings: Settings, iterations: int = 30, template: str = "minimal",
                       seconds: float = 5.0, connections: int = 8) -> dict:
    proc, url, key = start_daemon(settings)
    headers = {"Authorization": f"Bearer {key}"}
    results: dict = {"url": url, "template": template, "iterations": iterations}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            def create_and_run() -> str:
                sid = http.post("/v1/sandboxes", json={"template": template, "timeout": 120}).json()["id"]
                r = http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]})
                assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
                return sid

            create_and_run_sid = create_and_run()  # warm-up (template mount, imports)
            http.delete(f"/v1/sandboxes/{create_and_run_sid}")
            time.sleep(3 * SETTLE_S)  # the daemon fills its pools after its first create (~1 s of work)
            samples = []
            for _ in range(iterations):
                t = time.perf_counter()
                sid = create_and_run()
                samples.append((time.perf_counter() - t) * 1000)
                http.delete(f"/v1/sandboxes/{sid}")
            time.sleep(SETTLE_S)  # the baseline too: not beside the refills the deletes started
            health = []
            for _ in range(max(iterations, 200)):
                t = time.perf_counter()
                http.get("/health")
                health.append((time.perf_counter() - t) * 1000)
            results["api_create_to_first_result_ms"] = _percentiles(samples)

            sid = http.post("/v1/sandboxes", json={"template": template, "timeout": 600}).json()["id"]
            try:
                http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]})
                time.sleep(SETTLE_S)  # the daemon's pools refill after a create: measure the steady state
                execs = []
                for _ in range(max(iterations, 200)):
                    t = time.perf_counter()
                    http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]})
                    execs.append((time.perf_counter() - t) * 1000)
                h = _percentiles(health)
                e = _percentiles(execs)
                results["api_exec_round_trip_ms"] = {**e, "baseline": "GET /health round trip (same client)",
                                                     "baseline_ms": h, "ratio_p50": round(e["p50"] / h["p50"], 2)}
                port = int(url.rsplit(":", 1)[1])
                health_rps = asyncio.run(_load(port, _raw_request("GET", "/health", key), connections, seconds / 2))
                body = json.dumps({"cmd": ["true"]}).encode()
                exec_rps = asyncio.run(_load(port, _raw_request("POST", f"/v1/sandboxes/{sid}/exec", key, body),
                                             connections, seconds))
                results["api_exec_per_second"] = {"value": round(exec_rps, 1), "connections": connections,
                                                  "seconds": seconds, "baseline": "GET /health req/s (same client)",
                                                  "baseline_value": round(health_rps, 1),
                                                  "ratio": round(exec_rps / health_rps, 3)}
            finally:
                http.delete(f"/v1/sandboxes/{sid}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    results["targets"] = {
        "api_create_to_first_result_ms": verdict(results["api_create_to_first_result_ms"]["p50"],
                                                 TARGETS["api_create_to_first_result_ms"]),
        "api_exec_round_trip_ms": verdict(results["api_exec_round_trip_ms"]["p50"], TARGETS["api_exec_round_trip_ms"]),
        "api_exec_per_second": verdict(results["api_exec_per_second"]["value"], TARGETS["api_exec_per_second"],
                                       at_most=False),
    }
    return results


def report(results: dict) -> str:
    t = results["targets"]
    c, e, r = (results[k] for k in ("api_create_to_first_result_ms", "api_exec_round_trip_ms", "api_exec_per_second"))
    return "\n".join([
        f"{'api create → first result':28} p50 {c['p50']:8.2f}  p95 {c['p95']:8.2f}   "
        f"{_met(t['api_create_to_first_result_ms'])}",
        f"{'api exec round trip':28} p50 {e['p50']:8.2f}  p95 {e['p95']:8.2f}   | {e['baseline']}: "
        f"p50 {e['baseline_ms']['p50']:.2f}   ratio {e['ratio_p50']}x   {_met(t['api_exec_round_trip_ms'])}",
        f"{'api exec throughput':28} {r['value']:8.1f} req/s ({r['connections']} connections)   | "
        f"{r['baseline']}: {r['baseline_value']}   {_met(t['api_exec_per_second'])}",
    ])


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_api_benchmarks(Settings()), indent=2))
