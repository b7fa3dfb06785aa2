"""nftables through libnftables (ctypes): one JSON batch per call, applied atomically by the kernel.

``nft -j -f -`` would fork a process per change; the library call costs a fraction of a millisecond.
Debian's python3-nftables wraps this same library but is not in our venv, so this is its 40-line core.
"""

from __future__ import annotations

import ctypes
import json
import threading

from shoal.errors import RuntimeFailure

_NFT_CTX_OUTPUT_JSON = 1 << 4
_lock = threading.Lock()
_ctx: tuple[ctypes.CDLL, int] | None = None


def _context() -> tuple[ctypes.CDLL, int]:
    global _ctx
    if _ctx is None:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError as exc:
            raise RuntimeFailure("libnftables is missing (apt install libnftables1 nftables)", "network") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        _ctx = (lib, ctx)
    return _ctx


def run(commands: list[dict], what: str = "nftables") -> dict:
    """Apply ``commands`` (``{"add": {...}}`` and the like) as one transaction; return nft's JSON output."""
    with _lock:
        lib, ctx = _context()
        rc = lib.nft_run_cmd_from_buffer(ctx, json.dumps({"nftables": commands}).encode())
        out = lib.nft_ctx_get_output_buffer(ctx) or b""
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
    if rc != 0:
        raise RuntimeFailure(f"{what}: {err.decode(errors='replace').strip()[:500]}", "network")
    return json.loads(out) if out.strip() else {}


def list_table(family: str, name: str) -> dict | None:
    """The table's ruleset as nft's JSON, or None if it does not exist."""
    try:
        return run([{"list": {"table": {"family": family, "name": name}}}], "list table")
    except RuntimeFailure:
        return None


# --- expression helpers: nft's JSON grammar, spelled once -------------------------------------------
def meta(key: str) -> dict:
    return {"meta": {"key": key}}


def field(protocol: str, name: str) -> dict:
    return {"payload": {"protocol": protocol, "field": name}}


def prefix(net: object) -> dict:
    addr, _, length = str(net).partition("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def match(left: object, right: object, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def concat(*items: object) -> dict:
    return {"concat": list(items)}


ACCEPT: dict = {"accept": None}
DROP: dict = {"drop": None}
RETURN: dict = {"return": None}


def jump(chain: str) -> dict:
    return {"jump": {"target": chain}}
