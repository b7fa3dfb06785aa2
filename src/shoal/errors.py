"""The one exception hierarchy of Shoal.

Every failure a user can see is one of these, each mapped to one HTTP status (``status``) and
one stable machine code (``code``)::

    ShoalError (500, "internal")
    ├── InvalidRequest (400, "invalid_request")   bad input: unknown template, missing command, bad path
    ├── Forbidden (403, "forbidden")              the caller may not do this (permission inside the sandbox)
    ├── NotFound (404, "not_found")               no such sandbox, template, process or file
    ├── Conflict (409, "conflict")                exists already, or not allowed in the current state
    │   └── InvalidTransition                     an action that the sandbox's state does not allow
    ├── Unauthorized (401, "unauthorized")        no API key, or an unknown or revoked one
    ├── QuotaExceeded (429, "quota_exceeded")     the API key's sandbox or memory limit is reached
    ├── CapacityExceeded (503, "capacity")        the host is out of memory, pids, fds or disk: retry later
    ├── RuntimeFailure (500, "runtime_failure")   a host step (mount, crun, cgroup) failed
    │   └── AgentUnavailable (503, "agent_unavailable")  the sandbox's agent does not answer in time
    └── DaemonUnreachable (503, "daemon_unreachable")  the SDK or CLI cannot reach the daemon at its URL

Lower layers (errno, crun, the agent's wire codes) are translated at one boundary each
(``from_errno`` here, ``from_agent_error`` for the agent) to the most specific class.
"""

from __future__ import annotations

import errno as _errno


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""

    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidRequest(ShoalError):
    """The request itself is wrong; retrying it unchanged fails again."""

    status = 400
    code = "invalid_request"


class Forbidden(ShoalError):
    """The caller is not allowed to do this (e.g. a permission denied inside the sandbox)."""

    status = 403
    code = "forbidden"


class NotFound(ShoalError):
    """The sandbox, template, process or file does not exist."""

    status = 404
    code = "not_found"


class Conflict(ShoalError):
    """The target exists already, or is busy."""

    status = 409
    code = "conflict"


class InvalidTransition(Conflict):
    """The sandbox's current state does not allow this action."""

    def __init__(self, state: str, action: str, sandbox_id: str = "") -> None:
        who = f"sandbox {sandbox_id} " if sandbox_id else ""
        super().__init__(f"cannot {action} {who}while it is {state}")
        self.state = state
        self.action = action


class Unauthorized(ShoalError):
    """The request has no valid API key."""

    status = 401
    code = "unauthorized"


class QuotaExceeded(ShoalError):
    """The API key's limit on concurrent sandboxes or total memory would be exceeded."""

    status = 429
    code = "quota_exceeded"


class NotSupported(ShoalError):
    """A well-formed request for something this server does not do (e.g. HTTPS header rules, which
    need TLS interception); retrying will not help."""

    status = 501
    code = "not_supported"


class CapacityExceeded(ShoalError):
    """The host (or a key's quota) has no room right now; retrying later may work."""

    status = 503
    code = "capacity"


class RuntimeFailure(ShoalError):
    """A host-side step of bringing up or tearing down a sandbox failed."""

    status = 500
    code = "runtime_failure"

    def __init__(self, message: str, step: str = "", sandbox_id: str = "") -> None:
        parts = [p for p in (sandbox_id and f"sandbox {sandbox_id}", step and f"step {step}") if p]
        super().__init__(f"{message} ({', '.join(parts)})" if parts else message)
        self.step = step
        self.sandbox_id = sandbox_id


class AgentUnavailable(RuntimeFailure):
    """The sandbox's agent did not answer in time: stopped, overloaded, or taken over by sandbox code.

    The agent is sandbox code as far as the host is concerned, so every wait on it is bounded; a
    caller gets this (HTTP 503, retry later) instead of a request that hangs and holds a daemon fd.
    """

    status = 503
    code = "agent_unavailable"


class DaemonUnreachable(ShoalError):
    """The client (SDK or CLI) cannot reach the Shoal daemon: it is not running, or not at that URL."""

    status = 503
    code = "daemon_unreachable"


_CAPACITY_ERRNOS = {_errno.EAGAIN, _errno.ENOMEM, _errno.EMFILE, _errno.ENFILE, _errno.ENOSPC, _errno.EDQUOT}

#: Wire codes of the in-sandbox agent (see ``shoal.agent.protocol``) → our classes.
_AGENT_CODES: dict[str, type[ShoalError]] = {
    "not_found": NotFound,
    "already_exists": Conflict,
    "invalid_argument": InvalidRequest,
    "permission_denied": Forbidden,
    "resource_exhausted": CapacityExceeded,
    "internal": RuntimeFailure,
}


def from_errno(err: OSError, what: str) -> ShoalError:
    """Translate a host OSError into the most specific Shoal error, naming ``what`` failed."""
    no = err.errno or 0
    text = f"{what}: {err.strerror or err}"
    if no == _errno.ENOENT:
        return NotFound(text)
    if no == _errno.EEXIST:
        return Conflict(text)
    if no in (_errno.EACCES, _errno.EPERM):
        return Forbidden(text)
    if no in _CAPACITY_ERRNOS:
        return CapacityExceeded(text)
    if no in (_errno.EINVAL, _errno.ENOTDIR, _errno.EISDIR, _errno.ENAMETOOLONG, _errno.ELOOP):
        return InvalidRequest(text)
    return RuntimeFailure(text)


def from_agent_error(code: str, message: str) -> ShoalError:
    """Translate an error frame from the in-sandbox agent."""
    return _AGENT_CODES.get(code, RuntimeFailure)(message)
