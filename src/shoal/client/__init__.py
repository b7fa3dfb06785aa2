"""The Python SDK: sandboxes through the Shoal daemon (REST + WebSocket), sync and async twins.

```python
from shoal import Sandbox

with Sandbox.create(template="base") as sb:
    print(sb.commands.run("python3 -c 'print(6 * 7)'").stdout)   # 42
    sb.files.write("/root/data.txt", "hello")
```

The daemon is found at ``url`` → ``SHOAL_URL`` → http://127.0.0.1:4040, with ``api_key`` →
``SHOAL_API_KEY`` → the local key the daemon writes (root, same machine). Every failure is a
``shoal.errors`` exception (``NotFound``, ``Conflict``, ``DaemonUnreachable``...).
"""

from shoal.client.aio import AsyncCommandHandle, AsyncPtyHandle, AsyncSandbox, AsyncWatchHandle
from shoal.client.models import CommandResult, EntryInfo, FilesystemEvent, Output, ProcessInfo, SandboxInfo
from shoal.client.sync import CommandHandle, PtyHandle, Sandbox, WatchHandle

__all__ = ["Sandbox", "AsyncSandbox", "CommandResult", "CommandHandle", "AsyncCommandHandle", "PtyHandle",
           "AsyncPtyHandle", "WatchHandle", "AsyncWatchHandle", "SandboxInfo", "EntryInfo", "FilesystemEvent",
           "ProcessInfo", "Output"]
