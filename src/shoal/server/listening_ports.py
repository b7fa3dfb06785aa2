"""What listens in a sandbox (``shoal port ls``), as its agent reports it: hostile input, checked here.

The agent reads ``/proc/net/tcp{,6}`` inside the sandbox (``agent/ports.py``); sandbox root can replace
the agent and answer anything. So the reply is bounded (``MAX_PORTS`` entries), every entry must be a
port 1-65535 with an IP address of the stated family, and anything else is dropped or, for a reply that
is not even a list, refused as a malformed answer. Nothing from it is ever used as more than text.
"""

from __future__ import annotations

import ipaddress

from shoal.errors import RuntimeFailure
from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.runtime.agent_client import check

MAX_PORTS = 1024


def validated(reply: object) -> list[dict]:
    """The well-formed, distinct entries of a ``port.list`` reply, sorted by port."""
    msg = check(reply)
    ports = msg.get("ports")
    if not isinstance(ports, list):
        raise RuntimeFailure("malformed port list from the sandbox agent", "port list")
    out: dict[tuple[int, str], dict] = {}
    for entry in ports[: MAX_PORTS * 2]:
        if not isinstance(entry, dict):
            continue
        port, address, family = entry.get("port"), entry.get("address"), entry.get("family")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            continue
        if family not in (4, 6) or not isinstance(address, str) or len(address) > 64:
            continue
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip.version != family:
            continue
        out.setdefault((port, str(ip)), {"port": port, "address": str(ip), "family": family})
        if len(out) >= MAX_PORTS:
            break
    return sorted(out.values(), key=lambda e: (e["port"], e["family"], e["address"]))


async def listening(agent: AsyncAgentClient) -> list[dict]:
    """The TCP ports something listens on in the sandbox (within the agent call's timeout)."""
    return validated(await agent.call({"op": "port.list"}))
