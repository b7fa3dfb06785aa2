"""Host names of a sandbox's network pieces: every one carries a hash of the instance.

Interface names are at most 15 bytes, too short for ``shoal-<instance>-<id>``; so they are
``shv`` + 5 hex digits of the instance's hash + the slot number in hex. Each instance can then find
(and reconcile) exactly its own veths by prefix, and all of Shoal's by ``shv``, without a lookup table.
A slot is a pool entry (netns + veth + addresses) that a sandbox claims; its number gives its addresses.
"""

from __future__ import annotations

import hashlib

#: Every Shoal host-side veth, of any instance, starts with this (the firewall blocks them all).
VETH_FAMILY = "shv"
MAX_SLOT = 0xFFFFFF  # 6 hex digits: 3 + 5 + 6 = 14 bytes


def instance_tag(instance: str) -> str:
    return hashlib.sha256(b"shoal-net:" + instance.encode()).hexdigest()[:5]


def veth_prefix(instance: str) -> str:
    return VETH_FAMILY + instance_tag(instance)


def veth(instance: str, slot: int) -> str:
    """Host side of a slot's veth pair; the sandbox side is always ``eth0``."""
    return f"{veth_prefix(instance)}{slot:x}"


def slot_of(instance: str, ifname: str) -> int | None:
    """The slot number of one of this instance's veths, or None for any other interface."""
    prefix = veth_prefix(instance)
    if not ifname.startswith(prefix) or len(ifname) == len(prefix):
        return None
    try:
        return int(ifname[len(prefix):], 16)
    except ValueError:
        return None


def gateway_device(instance: str) -> str:
    """The port-less bridge holding the instance's gateway (and DNS) addresses."""
    return f"shg{instance_tag(instance)}"


def table(instance: str) -> str:
    """The instance's nftables table (family ``inet``)."""
    return f"shoal-{instance}"
