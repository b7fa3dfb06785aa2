"""E2B's network options on Shoal's egress policy (shoal.net.policy): create's ``network`` object and
``allow_internet_access``, and ``PUT /sandboxes/{id}/network`` (which replaces the whole policy, as E2B).

``egressProxy`` (tunnelling through the user's SOCKS5 proxy) is answered 501: a clear "not here" beats
silently sending the traffic out directly.
"""

from __future__ import annotations

from shoal.errors import InvalidRequest, NotSupported
from shoal.net.policy import from_e2b


def _internet(value: object) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidRequest("allow_internet_access must be a boolean")
    return value


def create_args(body: dict) -> dict:
    """``Engine.create`` keywords (``internet``, ``egress``) from an E2B create body."""
    network = body.get("network")
    internet = _internet(body.get("allow_internet_access", body.get("allowInternetAccess")))
    out: dict = {"internet": False if internet is False else None}
    if network is not None:
        if not isinstance(network, dict):
            raise InvalidRequest("network must be an object")
        if network.get("egressProxy") or network.get("egress_proxy"):
            raise NotSupported("not supported by this server: network.egressProxy (tunnelling egress through a "
                               "SOCKS5 proxy)")
        egress = from_e2b(network)
        if egress:
            out["egress"] = egress
    return out


def update_args(body: object) -> tuple[dict, bool | None]:
    """(policy, internet) for ``Engine.update_network`` from E2B's update body."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    if body.get("egressProxy") or body.get("egress_proxy"):
        raise NotSupported("not supported by this server: egressProxy (tunnelling egress through a SOCKS5 proxy)")
    internet = _internet(body.get("allow_internet_access", body.get("allowInternetAccess")))
    return from_e2b(body) or {}, internet
