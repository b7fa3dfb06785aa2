"""E2B compatibility: the official ``e2b`` SDKs work against the Shoal daemon unchanged.

Everything E2B-shaped lives in this package, behind ONE object, ``wing.E2B``, made once per daemon
by ``app.create_app`` (``app.state.e2b``):

* ``control``: the control plane (``/sandboxes``, ``/v2/sandboxes``), a FastAPI router on the daemon's app
* ``envd``: envd (port 49983): Connect process/filesystem services, ``/files``, ``/health``;
  ``SignedFiles``, the daemon's ``/files`` route for signed URLs that name no sandbox
* ``interpreter``: the code interpreter (port 49999), relaying to ``shoal/inside/kernel_server.py``
* ``security``: the per-sandbox access tokens; ``signing``: signed file URLs
* ``autopause``: E2B's ``autoPause``
* ``wing``: the ``E2B`` object, and its routing by the ``E2b-Sandbox-Id``/``E2b-Sandbox-Port`` headers

What E2B shares with native sandboxes stays outside: ``server/sandbox_routing.py`` (Host-based
routing, which the wing plugs into), ``server/portproxy.py`` and ``server/port_access.py`` (any
other sandbox port; the wing's tokens reach it through ``port_access.SandboxTokens``) and
``server/sandbox_options.py`` (the one per-sandbox options store). None of those imports this package.
"""

from __future__ import annotations

ENVD_VERSION = "0.6.4"
ENVD_PORT = 49983
