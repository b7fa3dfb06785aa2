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

Egress policy (policy.py) and limits, per sandbox, only for sandboxes that have them:

* ``count`` (prerouting, -150: after conntrack, before NAT) jumps through the ``caps`` map to the
  sandbox's ``cap_<n>`` chain: ``ct count over N drop`` counts its outbound connections (DNS excepted),
  proxied ones included (they are counted before their DNAT).
* ``through``/``egress`` jumps through the ``policy`` map to ``eg_<n>``: its allow sets ``a4_<n>``/
  ``a6_<n>`` and the resolver-admitted ``n4_<n>``/``n6_<n>`` (elements time out with the DNS TTL)
  accept, its deny sets ``d4_<n>``/``d6_<n>`` drop (so an allow beats a deny); the rest returns to the
  ``online`` switch.
* ``redirect`` (prerouting, nat) jumps through ``proxied`` to ``px_<n>``: 80/443 to a denied address
  (domains to check) and 80/443 everywhere (headers to add) are DNAT'ed to the egress proxy on the gateway
  address, which checks the Host header / TLS SNI (egress_proxy.py).

A policy change is one batch: flush and refill the sets and chains of that sandbox, nothing else.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shoal.net import names
from shoal.net.nft import ACCEPT, DROP, RETURN, concat, field, jump, match, meta, prefix
from shoal.net.policy import DEFAULT_MAX_CONNECTIONS, EgressPolicy

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
    #: The slot's number (names its per-sandbox chains and sets).
    slot: int = 0
    #: A non-default egress policy (None: the ``online`` switch alone decides).
    policy: EgressPolicy | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS


class Firewall:
    def __init__(self, instance: str, subnet4: ipaddress.IPv4Network, subnet6: ipaddress.IPv6Network,
                 gateway4: str, proxy_port: int = 0) -> None:
        self.table = names.table(instance)
        self.ours = names.veth_prefix(instance) + "*"
        self.subnet4, self.subnet6, self.gateway4 = subnet4, subnet6, gateway4
        self.gateway6 = str(subnet6.network_address + 1)
        self.proxy_port = proxy_port

    def _t(self, **kw: object) -> dict:
        return {"family": FAMILY, "table": self.table, **kw}

    def _rule(self, chain: str, *expr: dict) -> dict:
        return {"add": {"rule": self._t(chain=chain, expr=list(expr))}}

    def rebuild(self, slots: list[SlotRules]) -> list[dict]:
        """The whole table from scratch, replacing any old one in the same transaction."""
        tbl = {"family": FAMILY, "name": self.table}
        cmds: list[dict] = [{"add": {"table": tbl}}, {"delete": {"table": tbl}}, {"add": {"table": tbl}}]
        for name, typ in (("src4", ["ifname", "ipv4_addr"]), ("src6", ["ifname", "ipv6_addr"]),
                          ("online", "ifname"), ("hdr_on", "ifname"), ("dom_on", "ifname")):
            cmds.append({"add": {"set": self._t(name=name, type=typ)}})
        for name in ("policy", "proxied", "caps"):
            cmds.append({"add": {"map": self._t(name=name, type="ifname", map="verdict")}})
        for name, hook, prio, ctype in (("guard", "prerouting", -300, "filter"), ("host", "input", 0, "filter"),
                                        ("through", "forward", 0, "filter"), ("nat", "postrouting", 100, "nat"),
                                        ("count", "prerouting", -150, "filter"),
                                        ("redirect", "prerouting", -100, "nat")):
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
            self._rule("to_host", match({"ct": {"key": "status"}}, "dnat", "in"), match(meta("l4proto"), "tcp"),
                       match(field("th", "dport"), self.proxy_port), ACCEPT),  # the egress proxy
            self._rule("to_host", DROP),
            self._rule("count", ours, match({"ct": {"key": "state"}}, "new", "in"), match(meta("nfproto"), "ipv4"),
                       match(field("ip", "daddr"), self.gateway4, "!="), {"vmap": {"key": meta("iifname"),
                                                                                  "data": "@caps"}}),
            self._rule("count", ours, match({"ct": {"key": "state"}}, "new", "in"), match(meta("nfproto"), "ipv6"),
                       match(field("ip6", "daddr"), self.gateway6, "!="), {"vmap": {"key": meta("iifname"),
                                                                                   "data": "@caps"}}),
            self._rule("redirect", ours, {"vmap": {"key": meta("iifname"), "data": "@proxied"}}),
            self._rule("through", ours, jump("egress")),
            self._rule("through", match(meta("oifname"), self.ours), jump("ingress")),
            self._rule("egress", established, ACCEPT),
            self._rule("egress", match(meta("oifname"), names.VETH_FAMILY + "*"), DROP),
            self._rule("egress", match(field("ip", "daddr"), {"set": [prefix(n) for n in
                                                                        [*BLOCKED4, str(self.subnet4)]]}), DROP),
            self._rule("egress", match(field("ip6", "daddr"), {"set": [prefix(n) for n in
                                                                         [*BLOCKED6, str(self.subnet6)]]}), DROP),
            self._rule("egress", {"vmap": {"key": meta("iifname"), "data": "@policy"}}),
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
        cmds = self._elements("add", slot, slot.online) + self.set_cap(slot.slot, slot.veth, slot.max_connections)
        if slot.policy is not None and not slot.policy.default:
            cmds += self.set_policy(slot.slot, slot.veth, slot.policy, flush_names=True, fresh=True)
        return cmds

    def remove_slot(self, slot: SlotRules) -> list[dict]:
        """Deleting an absent element fails the whole batch (nft 1.0.6 has no ``destroy``), so each element is
        added first: the pair always succeeds and leaves it absent."""
        return (self._elements("add", slot, True) + self._elements("delete", slot, True)
                + self.clear_policy(slot.slot, slot.veth) + self._drop_cap(slot.slot, slot.veth))

    # --- per-sandbox limits and policy -----------------------------------------------------------
    def set_cap(self, n: int, veth: str, max_connections: int) -> list[dict]:
        """The sandbox's ``cap_<n>`` chain: at most ``max_connections`` outbound connections at once."""
        chain = f"cap_{n}"
        return [{"add": {"chain": self._t(name=chain)}}, {"flush": {"chain": self._t(name=chain)}},
                self._rule(chain, {"ct count": {"val": int(max_connections), "inv": True}}, DROP),
                {"add": {"element": self._t(name="caps", elem=[[veth, jump(chain)]])}}]

    def _drop_cap(self, n: int, veth: str) -> list[dict]:
        chain = f"cap_{n}"
        return [{"add": {"chain": self._t(name=chain)}},
                {"add": {"element": self._t(name="caps", elem=[[veth, jump(chain)]])}},
                {"delete": {"element": self._t(name="caps", elem=[veth])}},
                {"flush": {"chain": self._t(name=chain)}}, {"delete": {"chain": self._t(name=chain)}}]

    def _policy_objects(self, n: int) -> list[dict]:
        cmds = []
        for name, typ in (("a4", "ipv4_addr"), ("a6", "ipv6_addr"), ("d4", "ipv4_addr"), ("d6", "ipv6_addr")):
            cmds.append({"add": {"set": self._t(name=f"{name}_{n}", type=typ, flags=["interval"])}})
        for name, typ in (("n4", "ipv4_addr"), ("n6", "ipv6_addr")):
            cmds.append({"add": {"set": self._t(name=f"{name}_{n}", type=typ, flags=["timeout"], size=4096)}})
        return cmds + [{"add": {"chain": self._t(name=f"eg_{n}")}}, {"add": {"chain": self._t(name=f"px_{n}")}}]

    def set_policy(self, n: int, veth: str, policy: EgressPolicy, flush_names: bool, fresh: bool = True) -> list[dict]:
        """Replace the sandbox's policy in one batch. The chains are the same for every policy (what differs
        is set contents, and the veth in ``hdr_on``/``dom_on``), so an update of a sandbox that has a policy
        (``fresh=False``) only touches sets: nft then needs no rule cache, which keeps it ~1 ms.
        ``flush_names``: forget the addresses admitted for names (the domain list changed)."""
        cmds = self._policy_objects(n) + self._policy_chains(n, veth) if fresh else []
        sets = ["a4", "a6", "d4", "d6"] + (["n4", "n6"] if flush_names else [])
        cmds += [{"flush": {"set": self._t(name=f"{s}_{n}")}} for s in sets]
        for s, nets in (("a4", policy.allow4), ("a6", policy.allow6), ("d4", policy.deny4), ("d6", policy.deny6)):
            if nets:
                cmds.append({"add": {"element": self._t(name=f"{s}_{n}", elem=[prefix(x) for x in nets])}})
        for flag, on in (("hdr_on", bool(policy.rules)), ("dom_on", bool(policy.domains))):
            cmds.append({"add": {"element": self._t(name=flag, elem=[veth])}})
            if not on:
                cmds.append({"delete": {"element": self._t(name=flag, elem=[veth])}})
        return cmds

    def _policy_chains(self, n: int, veth: str) -> list[dict]:
        """``eg_<n>`` and ``px_<n>`` (see the module's docstring) and the map entries that jump to them."""
        eg, px = f"eg_{n}", f"px_{n}"
        cmds = [{"flush": {"chain": self._t(name=eg)}}, {"flush": {"chain": self._t(name=px)}}]
        for fam, s, verdict in (("ip", "a4", ACCEPT), ("ip6", "a6", ACCEPT), ("ip", "n4", ACCEPT),
                                ("ip6", "n6", ACCEPT), ("ip", "d4", DROP), ("ip6", "d6", DROP)):
            cmds.append(self._rule(eg, match(field(fam, "daddr"), f"@{s}_{n}"), verdict))
        to4 = {"dnat": {"family": "ip", "addr": self.gateway4, "port": self.proxy_port}}
        to6 = {"dnat": {"family": "ip6", "addr": self.gateway6, "port": self.proxy_port}}
        web = match(field("tcp", "dport"), {"set": [80, 443]})
        cmds += [  # headers to add: all of 80/443 (HTTPS to a rule's domain is refused: no TLS interception)
            self._rule(px, match(meta("iifname"), "@hdr_on"), match(meta("nfproto"), "ipv4"), web, to4),
            self._rule(px, match(meta("iifname"), "@hdr_on"), match(meta("nfproto"), "ipv6"), web, to6),
            self._rule(px, match(field("ip", "daddr"), f"@a4_{n}"), RETURN),
            self._rule(px, match(field("ip6", "daddr"), f"@a6_{n}"), RETURN),
            # domains: a denied address is reached on 80/443 only with an allowed Host/SNI
            self._rule(px, match(meta("iifname"), "@dom_on"), match(field("ip", "daddr"), f"@d4_{n}"), web, to4),
            self._rule(px, match(meta("iifname"), "@dom_on"), match(field("ip6", "daddr"), f"@d6_{n}"), web, to6)]
        cmds.append({"add": {"element": self._t(name="policy", elem=[[veth, jump(eg)]])}})
        cmds.append({"add": {"element": self._t(name="proxied", elem=[[veth, jump(px)]])}})
        return cmds

    def clear_policy(self, n: int, veth: str) -> list[dict]:
        """Back to the ``online`` switch alone: the map entries, chains and sets of the sandbox go."""
        cmds = self._policy_objects(n)
        for flag in ("hdr_on", "dom_on"):
            cmds += [{"add": {"element": self._t(name=flag, elem=[veth])}},
                     {"delete": {"element": self._t(name=flag, elem=[veth])}}]
        for m, chain in (("policy", f"eg_{n}"), ("proxied", f"px_{n}")):
            cmds += [{"add": {"element": self._t(name=m, elem=[[veth, jump(chain)]])}},
                     {"delete": {"element": self._t(name=m, elem=[veth])}}]
        for chain in (f"eg_{n}", f"px_{n}"):
            cmds += [{"flush": {"chain": self._t(name=chain)}}, {"delete": {"chain": self._t(name=chain)}}]
        for s in ("a4", "a6", "d4", "d6", "n4", "n6"):
            cmds.append({"delete": {"set": self._t(name=f"{s}_{n}")}})
        return cmds

    def admit(self, n: int, addresses: list[tuple[str, int]]) -> list[dict]:
        """Addresses the resolver answered for an allowed name, each for ``ttl`` seconds (re-added, so a
        later answer extends an element's life: nft's ``add`` alone would keep the old timeout)."""
        cmds: list[dict] = []
        for addr, ttl in addresses:
            s = f"n6_{n}" if ":" in addr else f"n4_{n}"
            cmds += [{"add": {"element": self._t(name=s, elem=[addr])}},
                     {"delete": {"element": self._t(name=s, elem=[addr])}},
                     {"add": {"element": self._t(name=s, elem=[{"elem": {"val": addr, "timeout": int(ttl)}}])}}]
        return cmds

    def admitted(self, n: int, address: str) -> list[dict]:
        """A batch that FAILS if ``address`` is in the sandbox's admitted set and changes nothing either way
        (libnftables' JSON has no ``get``; ``create`` refuses an existing element, the ``delete`` undoes it)."""
        s = f"n6_{n}" if ":" in address else f"n4_{n}"
        return [{"create": {"element": self._t(name=s, elem=[address])}},
                {"delete": {"element": self._t(name=s, elem=[address])}}]

    def set_online(self, veth: str, online: bool) -> list[dict]:
        cmds = [{"add": {"element": self._t(name="online", elem=[veth])}}]
        return cmds if online else cmds + [{"delete": {"element": self._t(name="online", elem=[veth])}}]

    def drop_table(self) -> list[dict]:
        tbl = {"family": FAMILY, "name": self.table}
        return [{"add": {"table": tbl}}, {"delete": {"table": tbl}}]
