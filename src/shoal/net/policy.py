"""A sandbox's egress policy and network limits: parsed, validated and normalised in one place.

API clients are trusted only as far as their key, so every field is checked here and bounded (list
lengths, name lengths, header sizes) before it reaches nftables or the egress proxy. The semantics are
E2B's, so its SDK's calls mean the same here:

* ``allow_out``: CIDRs, bare IPs (v4 or v6) and domain names (``example.com``, ``*.example.com``);
  ``deny_out``: CIDRs and IPs only. An allow always beats a deny; what no list names is allowed.
* ``0.0.0.0/0`` (E2B's ``ALL_TRAFFIC``) means all traffic, IPv6 too: E2B sandboxes have no IPv6, and
  a deny-all that left IPv6 open would be a hole here.
* ``internet: false`` is ``deny_out: [all traffic]`` (E2B's ``allow_internet_access=False``): allows
  still apply. The daemon-wide ``SHOAL_INTERNET=0`` is a ceiling no policy lifts.
* Domains are enforced twice: the resolver admits the addresses it answered for an allowed name into the
  sandbox's set (any port), and on 80/443 the egress proxy requires the Host header / TLS SNI to be an
  allowed name (a shared CDN address does not open the other sites behind it).
* ``rules``: ``{domain: [{"transform": {"headers": {...}}}]}``: headers the egress proxy sets on plain
  HTTP requests to that domain (the secret never enters the sandbox). HTTPS would need TLS
  interception: the proxy refuses TLS to such a domain rather than send the request without them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from shoal.errors import InvalidRequest

ALL4, ALL6 = "0.0.0.0/0", "::/0"
MAX_ENTRIES = 256  # per list: each is a set element, each domain a string compare per proxied request
MAX_RULE_HEADERS = 32
MAX_HEADER_BYTES = 4096
MAX_MBIT = 10_000  # tbf keeps the rate in 32 bits of bytes per second
MAX_CONNECTIONS = 65_536
#: A sandbox may have this many outbound connections at once unless its create says otherwise (the
#: host's conntrack table is shared by every sandbox: one must not fill it).
DEFAULT_MAX_CONNECTIONS = 1024
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
#: Destinations never reachable through a policy or the proxy: loopback, link-local/metadata,
#: multicast, unspecified, and (added by the caller) the sandbox subnets and the host's own addresses.
FORBIDDEN = [ipaddress.ip_network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4",
                                                "255.255.255.255/32", "::/128", "::1/128", "fe80::/10", "ff00::/8",
                                                "::ffff:0:0/96")]


def _domain(value: str, where: str) -> str:
    """A lower-case domain name or ``*.`` wildcard, or InvalidRequest."""
    name = value.strip().lower().rstrip(".")
    bare = name[2:] if name.startswith("*.") else name
    labels = bare.split(".")
    if len(name) > 253 or len(labels) < 1 or not all(_LABEL.match(lab) for lab in labels) or bare.isdigit():
        raise InvalidRequest(f"{where}: {value!r} is not a CIDR, an IP address or a domain name")
    return name


def _entries(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{where} must be a list of strings")
    if len(value) > MAX_ENTRIES:
        raise InvalidRequest(f"{where} may hold at most {MAX_ENTRIES} entries")
    return value


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        return None


def name_matches(name: str, pattern: str) -> bool:
    """``*.example.com`` matches any name below example.com (not example.com itself, as E2B)."""
    name = name.lower().rstrip(".")
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


@dataclass(frozen=True)
class EgressPolicy:
    """Normalised: CIDR strings per family (collapsed), domain patterns, header rules."""

    allow4: tuple[str, ...] = ()
    allow6: tuple[str, ...] = ()
    deny4: tuple[str, ...] = ()
    deny6: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    rules: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    mask_request_host: str | None = None

    @classmethod
    def parse(cls, body: dict | None, internet: bool = True) -> EgressPolicy:
        """From the API's shape (``allow_out``, ``deny_out``, ``rules``, ``mask_request_host``)."""
        body = body or {}
        if not isinstance(body, dict):
            raise InvalidRequest("the network policy must be an object")
        unknown = set(body) - {"allow_out", "deny_out", "rules", "mask_request_host"}
        if unknown:
            raise InvalidRequest(f"unknown network policy field(s): {', '.join(sorted(unknown))}")
        nets: dict[str, list] = {"allow": [], "deny": []}
        domains: list[str] = []
        for kind in ("allow", "deny"):
            for entry in _entries(body.get(f"{kind}_out"), f"{kind}_out"):
                net = _network(entry)
                if net is None:
                    if kind == "deny":
                        raise InvalidRequest(f"deny_out: {entry!r} is not a CIDR or an IP address (domain names "
                                             "can only be allowed)")
                    domains.append(_domain(entry, "allow_out"))
                elif str(net) == ALL4:  # E2B's all_traffic: both families
                    nets[kind] += [ipaddress.ip_network(ALL4), ipaddress.ip_network(ALL6)]
                else:
                    nets[kind].append(net)
        if not internet:
            nets["deny"] += [ipaddress.ip_network(ALL4), ipaddress.ip_network(ALL6)]
        rules = cls._rules(body.get("rules"))
        mask = body.get("mask_request_host")
        if mask is not None and (not isinstance(mask, str) or not 0 < len(mask) <= 255 or not mask.isprintable()):
            raise InvalidRequest("mask_request_host must be a printable string of at most 255 characters")

        def fam(kind: str, version: int) -> tuple[str, ...]:
            return tuple(str(n) for n in ipaddress.collapse_addresses(n for n in nets[kind] if n.version == version))
        return cls(fam("allow", 4), fam("allow", 6), fam("deny", 4), fam("deny", 6), tuple(dict.fromkeys(domains)),
                   rules, mask)

    @staticmethod
    def _rules(value: object) -> tuple:
        if value is None:
            return ()
        if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
            raise InvalidRequest(f"rules must be an object of at most {MAX_ENTRIES} domains")
        out = []
        for host, rules in value.items():
            name = _domain(str(host), "rules")
            if not isinstance(rules, list) or len(rules) > MAX_ENTRIES:
                raise InvalidRequest(f"rules[{host!r}] must be a list of rules")
            headers: dict[str, str] = {}
            for rule in rules:
                if not isinstance(rule, dict) or set(rule) - {"transform"}:
                    raise InvalidRequest(f"rules[{host!r}]: a rule is an object with a 'transform'")
                transform = rule.get("transform") or {}
                if not isinstance(transform, dict) or set(transform) - {"headers"}:
                    raise InvalidRequest(f"rules[{host!r}]: a transform has only 'headers'")
                for k, v in (transform.get("headers") or {}).items():
                    if not isinstance(v, str) or not _HEADER_NAME.match(str(k)) or len(v) > MAX_HEADER_BYTES \
                            or any(c in v for c in "\r\n\0"):
                        raise InvalidRequest(f"rules[{host!r}]: invalid header {k!r}")
                    headers[str(k)] = v
            if len(headers) > MAX_RULE_HEADERS:
                raise InvalidRequest(f"rules[{host!r}]: at most {MAX_RULE_HEADERS} headers")
            out.append((name, tuple(headers.items())))
        return tuple(out)

    # --- questions the firewall, the resolver and the proxy ask ----------------------------------------
    @property
    def default(self) -> bool:
        """True when this is the allow-everything policy (no per-sandbox rules needed)."""
        return not (self.allow4 or self.allow6 or self.deny4 or self.deny6 or self.domains or self.rules)

    @property
    def proxied(self) -> bool:
        """Whether 80/443 go through the egress proxy: domains to check, or headers to add."""
        return bool(self.domains or self.rules)

    def allows_name(self, name: str) -> bool:
        return any(name_matches(name, p) for p in self.domains)

    def headers_for(self, name: str) -> tuple[tuple[str, str], ...] | None:
        """The headers to set for requests to ``name`` (None: no rule names it)."""
        for pattern, headers in self.rules:
            if name_matches(name, pattern):
                return headers
        return None

    def verdict(self, address: str) -> str:
        """``allow``, ``deny`` or ``domain`` (denied unless an allowed name's answer admitted it) for one
        destination, by the CIDR lists alone; allow beats deny."""
        addr = ipaddress.ip_address(address)
        allow, deny = (self.allow4, self.deny4) if addr.version == 4 else (self.allow6, self.deny6)
        if any(addr in ipaddress.ip_network(n) for n in allow):
            return "allow"
        if any(addr in ipaddress.ip_network(n) for n in deny):
            return "domain" if self.domains else "deny"
        return "allow"

    def to_dict(self) -> dict:
        """The API's shape back (what GET shows and what is stored)."""
        out: dict = {"allow_out": [*self.allow4, *self.allow6, *self.domains], "deny_out": [*self.deny4, *self.deny6]}
        if self.rules:
            out["rules"] = {d: [{"transform": {"headers": dict(h)}}] for d, h in self.rules}
        if self.mask_request_host:
            out["mask_request_host"] = self.mask_request_host
        return out


@dataclass(frozen=True)
class NetLimits:
    """Per-sandbox bandwidth (Mbit/s each way, None: unlimited) and concurrent outbound connections."""

    egress_mbit: float | None = None
    ingress_mbit: float | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @classmethod
    def parse(cls, body: dict | None) -> NetLimits:
        body = body or {}
        if not isinstance(body, dict):
            raise InvalidRequest("network limits must be an object")
        unknown = set(body) - {"egress_mbit", "ingress_mbit", "max_connections"}
        if unknown:
            raise InvalidRequest(f"unknown network limit(s): {', '.join(sorted(unknown))}")
        rates = {}
        for k in ("egress_mbit", "ingress_mbit"):
            v = body.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0.1 <= v <= MAX_MBIT):
                raise InvalidRequest(f"{k} must be a number of Mbit/s between 0.1 and {MAX_MBIT}")
            rates[k] = None if v is None else float(v)
        conns = body.get("max_connections", DEFAULT_MAX_CONNECTIONS)
        if isinstance(conns, bool) or not isinstance(conns, int) or not 1 <= conns <= MAX_CONNECTIONS:
            raise InvalidRequest(f"max_connections must be an integer between 1 and {MAX_CONNECTIONS}")
        return cls(rates["egress_mbit"], rates["ingress_mbit"], conns)

    def to_dict(self) -> dict:
        return {"egress_mbit": self.egress_mbit, "ingress_mbit": self.ingress_mbit,
                "max_connections": self.max_connections}


def forbidden(address: str, extra: list) -> bool:
    """Whether ``address`` is never a valid egress destination (see FORBIDDEN; ``extra``: the sandbox
    subnets and the host's own addresses)."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return True
    return any(addr in n for n in FORBIDDEN if n.version == addr.version) or \
        any(addr in n for n in extra if n.version == addr.version)


def from_e2b(body: dict | None) -> dict | None:
    """E2B's camelCase network object (create ``network``, ``PUT /sandboxes/{id}/network``) → ours.

    ``allowPublicTraffic`` is ingress (handled by the E2B wing), ``allow_internet_access`` is read by the
    caller; ``egressProxy`` (SOCKS tunnelling) is refused by the caller (501)."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise InvalidRequest("network must be an object")
    out = {}
    for camel, snake in (("allowOut", "allow_out"), ("denyOut", "deny_out"), ("rules", "rules"),
                         ("maskRequestHost", "mask_request_host")):
        for key in (camel, snake):
            if body.get(key) is not None:
                out[snake] = body[key]
    return out


def egress_rules(egress: dict | None, limits: dict | None, internet: bool | None) -> dict:
    """``Network.claim``'s ``policy``/``limits`` arguments from a create's ``egress``/``net_limits``
    (validated: InvalidRequest before anything is made); empty when both are absent."""
    out: dict = {}
    if egress is not None:
        out["policy"] = EgressPolicy.parse(egress, internet=internet is not False)
    if limits is not None:
        out["limits"] = NetLimits.parse(limits)
    return out
