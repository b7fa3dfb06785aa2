"""The daemon: one ASGI app on one port (native REST under /v1, MCP, metrics)."""
