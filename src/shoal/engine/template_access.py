"""Who may start from a template: the one check between an API key and a template's files.

A template built through E2B's template API belongs to the key that built it (``owner`` in its meta):
its files are that key's (a build may bake in anything), so another key may neither boot it nor build
FROM it; for them it does not exist (404, like another key's sandbox). Hidden templates (a build's
stages, an imported image's base) are internal to the host and never an API key's to name. The host's
own templates (no owner) are everyone's; admin keys (the operator's) and the host itself (no key) may
use any.
"""

from __future__ import annotations

from shoal.engine.keys import ApiKey
from shoal.errors import NotFound


def check_usable(meta: dict | None, name: str, api_key: ApiKey | str | None) -> None:
    """``NotFound`` unless the caller (an ``ApiKey``, a key id, or None for the host) may use template
    ``name`` whose meta is ``meta``."""
    if api_key is None or meta is None or (isinstance(api_key, ApiKey) and api_key.admin):
        return
    key_id = api_key.id if isinstance(api_key, ApiKey) else api_key
    owner = meta.get("owner")
    if meta.get("hidden") or (owner is not None and owner != key_id):
        raise NotFound(f"template '{name}' does not exist")
