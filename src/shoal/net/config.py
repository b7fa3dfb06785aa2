"""The daemon's network settings for its sandboxes, read once from the environment.

Every value has a safe default, so a host needs no configuration: networking on, the internet on
(as E2B and Blaxel), DNS forwarded to the host's own resolvers. The operator is trusted, so these are
plain environment variables of ``shoal serve``; API clients can only narrow them (``internet: false``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import InvalidRequest
from shoal.settings import MAIN_INSTANCE

#: The main instance's subnet: chosen because nothing on a usual host (Docker: 172.17/16, libvirt:
#: 192.168.122/24, Podman: 10.88/16 only when Podman's CNI runs) routes it; check with ``ip route``.
MAIN_SUBNET4 = "10.88.0.0/16"
#: Other instances (test runs, a second daemon) get a /22 of this /16, picked by a hash of the instance
#: name and probed against the host's routes so that two instances never share one.
OTHER_SUBNETS4 = "10.89.0.0/16"
HOST_RESOLV = Path("/etc/resolv.conf")
MAX_CA_BYTES = 1 << 20


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidRequest(f"{name} must be 0 or 1, not {value!r}")


def host_resolvers(path: Path = HOST_RESOLV) -> list[str]:
    """The ``nameserver`` lines of the host's resolv.conf (a loopback one is fine: the resolver runs on
    the host); Google's would be a guess the operator did not make, so none means DNS answers SERVFAIL."""
    out = []
    try:
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                try:
                    out.append(str(ipaddress.ip_address(words[1].split("%")[0])))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def ula_prefix(instance: str) -> ipaddress.IPv6Network:
    """A /64 in fd00::/8 whose 40-bit global id is a hash of the instance (RFC 4193: random enough that
    two hosts, or two instances, do not collide), so it is stable across restarts with nothing stored."""
    digest = hashlib.sha256(b"shoal-ula:" + instance.encode()).digest()
    gid = digest[:5]
    return ipaddress.IPv6Network((int.from_bytes(b"\xfd" + gid + b"\x00\x00", "big") << 64, 64))


@dataclass(frozen=True)
class NetConfig:
    """What ``shoal serve`` (or any process that creates sandboxes) gives its sandboxes' network."""

    #: ``SHOAL_NET=0``: sandboxes get no interface at all (only loopback), as before networking existed.
    enabled: bool = True
    #: ``SHOAL_INTERNET=0``: no sandbox of this daemon reaches past the host; a create cannot override it.
    internet: bool = True
    #: ``SHOAL_NET_SUBNET``: the IPv4 subnet sandboxes take their addresses from (None: see MAIN_SUBNET4).
    subnet4: str | None = None
    #: ``SHOAL_NET_SUBNET6``: the IPv6 /64 (None: a ULA derived from the instance).
    subnet6: str | None = None
    #: ``SHOAL_DNS_UPSTREAM``: comma-separated resolvers Shoal's resolver forwards to (default: resolv.conf's).
    dns_upstream: tuple[str, ...] = ()
    #: ``SHOAL_SANDBOX_PROXY``: handed to sandboxes as HTTP(S)_PROXY (lower and upper case).
    proxy: str | None = None
    #: ``SHOAL_SANDBOX_NO_PROXY``: handed to sandboxes as NO_PROXY.
    no_proxy: str | None = None
    #: ``SHOAL_SANDBOX_CA_FILE``: PEM certificates appended to the sandbox's CA bundle (a TLS-intercepting proxy's).
    ca_file: str | None = None
    #: ``SHOAL_NET_POOL``: how many ready network namespaces to keep, so create does no netlink work.
    pool_size: int = 8

    @classmethod
    def from_env(cls) -> NetConfig:
        upstream = tuple(u.strip() for u in os.environ.get("SHOAL_DNS_UPSTREAM", "").split(",") if u.strip())
        for u in upstream:
            try:
                ipaddress.ip_address(u)
            except ValueError as exc:
                raise InvalidRequest(f"SHOAL_DNS_UPSTREAM: {u!r} is not an IP address") from exc
        try:
            pool = int(os.environ.get("SHOAL_NET_POOL") or 8)
        except ValueError as exc:
            raise InvalidRequest("SHOAL_NET_POOL must be a number") from exc
        return cls(enabled=_flag("SHOAL_NET", True), internet=_flag("SHOAL_INTERNET", True),
                   subnet4=os.environ.get("SHOAL_NET_SUBNET") or None,
                   subnet6=os.environ.get("SHOAL_NET_SUBNET6") or None, dns_upstream=upstream,
                   proxy=os.environ.get("SHOAL_SANDBOX_PROXY") or None,
                   no_proxy=os.environ.get("SHOAL_SANDBOX_NO_PROXY") or None,
                   ca_file=os.environ.get("SHOAL_SANDBOX_CA_FILE") or None, pool_size=max(0, min(pool, 64)))

    def upstreams(self) -> list[str]:
        return list(self.dns_upstream) or host_resolvers()

    def default_subnet4(self, instance: str) -> list[ipaddress.IPv4Network]:
        """Candidate subnets in order of preference (the first that no host route overlaps wins)."""
        if self.subnet4:
            return [ipaddress.IPv4Network(self.subnet4)]
        if instance == MAIN_INSTANCE:
            return [ipaddress.IPv4Network(MAIN_SUBNET4)]
        blocks = list(ipaddress.IPv4Network(OTHER_SUBNETS4).subnets(new_prefix=22))
        start = int.from_bytes(hashlib.sha256(instance.encode()).digest()[:4], "big") % len(blocks)
        return blocks[start:] + blocks[:start]

    def prefix6(self, instance: str) -> ipaddress.IPv6Network:
        return ipaddress.IPv6Network(self.subnet6) if self.subnet6 else ula_prefix(instance)

    def sandbox_env(self) -> dict[str, str]:
        """Environment every sandbox of this daemon starts with (a create's own ``env`` wins)."""
        env: dict[str, str] = {}
        if self.proxy:
            for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                env[k] = self.proxy
        if self.no_proxy:
            env["NO_PROXY"] = env["no_proxy"] = self.no_proxy
        if self.ca_file:
            for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
                env[k] = "/etc/shoal-ca-certificates.crt"
        return env

    def extra_ca(self) -> bytes:
        if not self.ca_file:
            return b""
        try:
            data = Path(self.ca_file).read_bytes()[:MAX_CA_BYTES + 1]
        except OSError as exc:
            raise InvalidRequest(f"SHOAL_SANDBOX_CA_FILE {self.ca_file}: {exc.strerror}") from exc
        if len(data) > MAX_CA_BYTES or b"-----BEGIN CERTIFICATE-----" not in data:
            raise InvalidRequest(f"SHOAL_SANDBOX_CA_FILE {self.ca_file} is not a PEM bundle under 1 MiB")
        return data
