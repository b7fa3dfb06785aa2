"""The instance's nftables table: the safe defaults of every sandbox, in one ``inet`` table.

Stateful rules must live in ``inet`` (this kernel has no bridge conntrack), and sandboxes are routed,
not bridged: each veth is a point-to-point link to the host, so every packet a sandbox sends crosses
the host's IP stack with ``iifname`` naming exactly which sandbox sent it. Per-sandbox facts are
set elements keyed by that name, so a create, a delete or a policy change is one small batch, never a
rule edit. The chains, read top to bottom:

* ``guard`` (prerouting, raw): anti-spoofing; a sandbox may send only from its own addresses (and
  IPv6 link-local for neighbour discovery). Before conntrack, so a spoofed packet leaves no state.
* ``host`` (input): a sandbox reaches nothing of the host but DNS on the gateway address, and the
  neighbour discovery IPv6 needs. The daemon's port, every host address: dropped.
* ``through`` (forward): replies flow; a new connection to another sandbox (any Shoal instance's
  ``shv*`` veth), link-local/metadata (169.254/16, fe80::/10), multicast or the sandbox subnets is
  dropped; the rest is allowed only for sandboxes in the ``online`` set (the internet switch).
  Nothing starts a connection *into* a sandbox (the port proxy goes through the agent, not the network).
* ``nat`` (postrouting): masquerade on the host's outgoing interface, IPv4 and IPv6.

Next wave (egress policy, private networks): an ``egress`` verdict map from veth name to a per-sandbox
chain with its own address sets takes the place of the ``online`` lookup.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shoal.net import names
from shoal.net.nft import ACCEPT, DROP, RETURN, concat, field, jump, match, meta, prefix

FAMILY = "inet"
NDP_TYPES = ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]
BLOCKED4 = ["169.254.0.0/16", "224.0.0.0/4", "0.0.0.0/8", "127.0.0.0/8", "255.255.255.255/32"]
BLOCKED6 = ["fe80::/10", "ff00::/8", "::1/128"]


@dataclass(frozen=True)
class SlotRules:
    """What the table knows of one slot: its veth, its addresses, whether it may reach the internet."""

    veth: str
    ipv4: str
    ipv6: str
    online: bool


class Firewall:
    def __init__(self, instance: str, subnet4: ipaddress.IPv4Network, subnet6: ipaddress.IPv6Network,
                 gateway4: str) -> None:
        self.table = names.table(instance)
        self.ours = names.veth_prefix(instance) + "*"
        self.subnet4, self.subnet6, self.gateway4 = subnet4, subnet6, gateway4

    def _t(self, **kw: object) -> dict:
        return {"family": FAMILY, "table": self.table, **kw}

    def _rule(self, chain: str, *expr: dict) -> dict:
        return {"add": {"rule": self._t(chain=chain, expr=list(expr))}}

    def rebuild(self, slots: list[SlotRules]) -> list[dict]:
        """The whole table from scratch, replacing any old one in the same transaction."""
        tbl = {"family": FAMILY, "name": self.table}
        cmds: list[dict] = [{"add": {"table": tbl}}, {"delete": {"table": tbl}}, {"add": {"table": tbl}}]
        for name, typ in (("src4", ["ifname", "ipv4_addr"]), ("src6", ["ifname", "ipv6_addr"]),
                          ("online", "ifname")):
            cmds.append({"add": {"set": self._t(name=name, type=typ)}})
        for name, hook, prio, ctype in (("guard", "prerouting", -300, "filter"), ("host", "input", 0, "filter"),
                                        ("through", "forward", 0, "filter"), ("nat", "postrouting", 100, "nat")):
            cmds.append({"add": {"chain": self._t(name=name, type=ctype, hook=hook, prio=prio, policy="accept")}})
        for name in ("spoof", "to_host", "egress", "ingress"):
            cmds.append({"add": {"chain": self._t(name=name)}})
        ours = match(meta("iifname"), self.ours)
        established = match({"ct": {"key": "state"}}, ["established", "related"], "in")
        icmp6 = match(meta("l4proto"), "icmpv6")
        cmds += [
            self._rule("guard", ours, jump("spoof")),
            self._rule("spoof", match(meta("nfproto"), "ipv4"),
                       match(concat(meta("iifname"), field("ip", "saddr")), "@src4"), RETURN),
            self._rule("spoof", match(meta("nfproto"), "ipv6"),
                       match(concat(meta("iifname"), field("ip6", "saddr")), "@src6"), RETURN),
            self._rule("spoof", match(field("ip6", "saddr"), prefix("fe80::/10")), icmp6, RETURN),
            self._rule("spoof", match(field("ip6", "saddr"), "::"), icmp6, RETURN),
            self._rule("spoof", DROP),
            self._rule("host", ours, jump("to_host")),
            self._rule("to_host", established, ACCEPT),
            self._rule("to_host", match(field("ip", "daddr"), self.gateway4),
                       match(meta("l4proto"), {"set": ["udp", "tcp"]}), match(field("th", "dport"), 53), ACCEPT),
            self._rule("to_host", icmp6, match(field("icmpv6", "type"), {"set": NDP_TYPES}), ACCEPT),
            self._rule("to_host", DROP),
            self._rule("through", ours, jump("egress")),
            self._rule("through", match(meta("oifname"), self.ours), jump("ingress")),
            self._rule("egress", established, ACCEPT),
            self._rule("egress", match(meta("oifname"), names.VETH_FAMILY + "*"), DROP),
            self._rule("egress", match(field("ip", "daddr"), {"set": [prefix(n) for n in
                                                                        [*BLOCKED4, str(self.subnet4)]]}), DROP),
            self._rule("egress", match(field("ip6", "daddr"), {"set": [prefix(n) for n in
                                                                         [*BLOCKED6, str(self.subnet6)]]}), DROP),
            self._rule("egress", match(meta("iifname"), "@online"), ACCEPT),
            self._rule("egress", DROP),
            self._rule("ingress", established, ACCEPT),
            self._rule("ingress", DROP),
            self._rule("nat", match(field("ip", "saddr"), prefix(self.subnet4)),
                       match(field("ip", "daddr"), prefix(self.subnet4), "!="), {"masquerade": None}),
            self._rule("nat", match(field("ip6", "saddr"), prefix(self.subnet6)),
                       match(field("ip6", "daddr"), prefix(self.subnet6), "!="), {"masquerade": None}),
        ]
        for s in slots:
            cmds += self.add_slot(s)
        return cmds

    def _elements(self, verb: str, slot: SlotRules, online: bool) -> list[dict]:
        cmds = [{verb: {"element": self._t(name="src4", elem=[concat(slot.veth, slot.ipv4)])}},
                {verb: {"element": self._t(name="src6", elem=[concat(slot.veth, slot.ipv6)])}}]
        if online:
            cmds.append({verb: {"element": self._t(name="online", elem=[slot.veth])}})
        return cmds

    def add_slot(self, slot: SlotRules) -> list[dict]:
        return self._elements("add", slot, slot.online)

    def remove_slot(self, slot: SlotRules) -> list[dict]:
        """Deleting an absent element fails the whole batch (nft 1.0.6 has no ``destroy``), so each element is
        added first: the pair always succeeds and leaves it absent."""
        return self._elements("add", slot, True) + self._elements("delete", slot, True)

    def set_online(self, veth: str, online: bool) -> list[dict]:
        cmds = [{"add": {"element": self._t(name="online", elem=[veth])}}]
        return cmds if online else cmds + [{"delete": {"element": self._t(name="online", elem=[veth])}}]

    def drop_table(self) -> list[dict]:
        tbl = {"family": FAMILY, "name": self.table}
        return [{"add": {"table": tbl}}, {"delete": {"table": tbl}}]
