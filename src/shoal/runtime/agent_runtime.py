"""The agent runtime: a self-contained Python + the agent, mounted read-only at ``/.shoal``.

Templates need not contain Python (``minimal`` is busybox only), so every sandbox gets a host
interpreter of the version that runs Shoal itself, with exactly the shared libraries it links
against (its own dynamic loader included, started as ``/.shoal/lib/ld.so --library-path
/.shoal/lib ...``, so the image's libc never matters) and only the stdlib modules the agent imports.
The tree is built once per (interpreter, agent source) pair and shared by every sandbox on the host.

Which interpreter: the agent's start is on every create's path (PID 1 must be listening before the
first call), so ``agent_python`` prefers one that links libpython statically. A pyenv or
``--enable-shared`` build (a 23 MiB ``libpython3.X.so`` to relocate, and ``_socket``, ``select``,
``_json``, ``_struct`` as separate ``.so`` files to load) starts the agent ~4 ms slower on this
host than the distribution's ``/usr/bin/python3.X``, which has them built in.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from shoal.errors import RuntimeFailure
from shoal.runtime.linux import mounts
from shoal.settings import Settings

log = logging.getLogger("shoal.agent_runtime")
#: One build at a time in this process (``ensure``; the flock covers other processes).
_build_lock = threading.Lock()
#: Where the runtime appears inside every sandbox.
MOUNT_POINT = "/.shoal"
_AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
#: Modules the agent may import lazily (PTY, watch); imported at build time to find their files.
_LAZY_IMPORTS = "import ctypes, fcntl, termios, binascii, base64, struct, select, _posixsubprocess, _json, _socket"


def _links_libpython(binary: Path) -> bool:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return "libpython" in out


@functools.cache
def agent_python() -> Path:
    """The interpreter the agent runs on: ``SHOAL_AGENT_PYTHON`` if set; else the daemon's own if it
    links libpython statically; else the first of ``/usr/bin/python3.X``, ``/usr/local/bin/python3.X``
    (the daemon's major.minor, so the agent runs on the version it is tested with) that does; else the
    daemon's own."""
    override = os.environ.get("SHOAL_AGENT_PYTHON")
    if override:
        return Path(os.path.realpath(override))
    own = Path(os.path.realpath(sys.executable))
    if not _links_libpython(own):
        return own
    version = python_version_dir()
    for candidate in (Path("/usr/bin") / version, Path("/usr/local/bin") / version):
        real = Path(os.path.realpath(candidate))
        if real.is_file() and os.access(real, os.X_OK) and real.name == version and not _links_libpython(real):
            return real
    return own


def _digest() -> str:
    h = hashlib.sha256()
    py = agent_python()
    h.update(str(py).encode())
    h.update(str(py.stat().st_mtime_ns).encode())
    for f in sorted(_AGENT_DIR.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def python_version_dir() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def agent_command() -> list[str]:
    """argv of PID 1 in every sandbox."""
    return [f"{MOUNT_POINT}/lib/ld.so", "--library-path", f"{MOUNT_POINT}/lib",
            f"{MOUNT_POINT}/python/bin/{python_version_dir()}", "-S", "-I", "-c",
            "from shoal.agent.main import main; main()"]


def _complete(root: Path) -> bool:
    """Whether a built runtime has what PID 1 needs: its marker (written last), loader and interpreter."""
    return all((root / part).exists() for part in
               ("READY", "lib/ld.so", f"python/bin/{python_version_dir()}", "python/lib"))


def ensure(settings: Settings) -> Path:
    """The runtime directory for this interpreter and agent, built on first use.

    One builder at a time, across threads (the daemon creates sandboxes concurrently) and processes (a
    flock): two builders once shared a temporary directory within one process, and one's clean-up left
    the other's rename a runtime marked ready without its ``lib/``. A tree found incomplete is rebuilt."""
    target = settings.agent_runtime_dir / _digest()
    if _complete(target):
        return target
    settings.agent_runtime_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock:
        fd = os.open(settings.agent_runtime_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _complete(target):  # built by another thread or process meanwhile
                return target
            shutil.rmtree(target, ignore_errors=True)  # an incomplete tree (see above)
            tmp = settings.agent_runtime_dir / f".build-{os.getpid()}-{target.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _build(tmp)
                (tmp / "READY").write_text(target.name + "\n")  # the digest, as named above
                os.rename(tmp, target)
            except (OSError, subprocess.CalledProcessError) as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeFailure(f"cannot build the agent runtime: {exc}", step="agent-runtime") from exc
        finally:
            os.close(fd)
    return target


def mounted(settings: Settings) -> Path:
    """The runtime on a filesystem of its own (a read-only tmpfs under the run directory), made once.

    Sandboxes bind-mount this at ``/.shoal``. A bind of a directory on the host's disk would show that
    directory's host path in every sandbox's ``/proc/self/mountinfo`` (the mount's root field); a bind of
    a whole tmpfs shows ``/`` and the source name ``shoal-agent-runtime``, so sandbox code learns nothing
    of where the host keeps its state. The copy costs about 30 MiB of RAM per instance, once.
    """
    source = ensure(settings)
    base = settings.run_dir / "agent-runtime"
    point = base / source.name
    if _complete(point):
        return point
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o711)
    fd = os.open(base / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _complete(point):  # another process mounted it meanwhile
            return point
        point.mkdir(exist_ok=True)
        if mounts.is_mounted(point):  # an incomplete copy (of an incomplete build): made again
            mounts.umount(point)
        if not mounts.is_mounted(point):
            size = sum(f.stat().st_size for f in source.rglob("*") if f.is_file() and not f.is_symlink())
            mounts.mount("shoal-agent-runtime", point, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV,
                         f"mode=0755,size={size + size // 4 + (4 << 20)}")
        try:
            shutil.copytree(source, point, symlinks=True, dirs_exist_ok=True,
                            ignore=lambda d, names: ["READY"] if Path(d) == source else [])
            shutil.copy2(source / "READY", point / "READY")  # last: READY means complete
            mounts.mount("none", point, "", mounts.MS_REMOUNT | mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV)
        except OSError as exc:
            mounts.umount(point)
            raise RuntimeFailure(f"cannot mount the agent runtime: {exc}", step="agent-runtime") from exc
    finally:
        os.close(fd)
    return point


def prune(settings: Settings) -> list[str]:
    """Remove the runtimes of other interpreter or agent versions (each upgrade leaves the old one: ~30 MiB
    on disk and, mounted, as much RAM). Sandboxes still running on an old one lose nothing: each has its
    own bind of the tmpfs in its mount namespace, which outlives the host's mount. Returns what went."""
    current = _digest()
    removed = []
    base = settings.run_dir / "agent-runtime"
    for root, mounted_copy in ((base, True), (settings.agent_runtime_dir, False)):
        try:
            entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for e in entries:
            if e.name == current or e.name.startswith("."):  # ours, or a build in progress
                continue
            try:
                if mounted_copy:
                    mounts.umount(e.path)  # lazily if busy (a host process inside it)
                    os.rmdir(e.path)
                else:
                    shutil.rmtree(e.path)
            except OSError as exc:
                log.warning("cannot remove an old agent runtime %s: %s", e.path, exc)
                continue
            removed.append(e.path)
    return removed


def _module_files() -> tuple[Path, list[Path]]:
    """The agent interpreter's stdlib directory, and every stdlib file the agent imports (eagerly or
    lazily), found by importing it for real on that interpreter."""
    src = str(_AGENT_DIR.parent.parent)
    code = (f"import sys, os; sys.path.insert(0, {src!r}); import shoal.agent.main; {_LAZY_IMPORTS}; "
            "print(os.path.dirname(os.__file__)); "
            "print('\\n'.join(sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})))")
    out = subprocess.run([str(agent_python()), "-S", "-I", "-c", code], check=True, capture_output=True,
                         text=True).stdout
    stdlib, *files = out.splitlines()
    return Path(stdlib), [Path(line) for line in files if line and not line.startswith(src)]


def _libraries(binaries: list[Path]) -> tuple[set[Path], Path]:
    """Shared libraries (resolved) needed by ``binaries``, and the dynamic loader."""
    libs: set[Path] = set()
    loader: Path | None = None
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"=>\s*(/\S+)", line)
            if m:
                libs.add(Path(m.group(1)))
            elif line.strip().startswith("/"):
                loader = Path(line.split()[0])
    if loader is None:
        raise RuntimeFailure(f"cannot find the dynamic loader of {binaries[0]}", step="agent-runtime")
    return libs, loader


def _build(root: Path) -> None:
    stdlib, imported = _module_files()
    pylib = root / "python" / "lib" / python_version_dir()
    (root / "python" / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    pylib.mkdir(parents=True)
    shutil.copy2(agent_python(), root / "python" / "bin" / python_version_dir())
    files = set(imported) | {stdlib / "os.py"}  # os.py is the landmark that locates the stdlib
    files |= set((stdlib / "encodings").glob("*.py"))
    extensions: list[Path] = []
    for f in files:
        try:
            rel = f.relative_to(stdlib)
        except ValueError:
            continue  # not from the stdlib (site-packages are never needed)
        dest = pylib / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
        if f.suffix == ".so":
            extensions.append(f)
    agent_pkg = pylib / "shoal" / "agent"
    agent_pkg.mkdir(parents=True)
    (pylib / "shoal" / "__init__.py").write_text('"""Only the agent lives in the sandbox runtime."""\n')
    for f in _AGENT_DIR.glob("*.py"):
        shutil.copy2(f, agent_pkg / f.name)
    libs, loader = _libraries([agent_python(), *extensions])
    for lib in libs:
        shutil.copy2(os.path.realpath(lib), root / "lib" / lib.name)
    shutil.copy2(os.path.realpath(loader), root / "lib" / "ld.so")
    subprocess.run([str(agent_python()), "-m", "compileall", "-q", "-j", "0", "-d",
                    f"{MOUNT_POINT}/python/lib/{python_version_dir()}", str(pylib)],
                   check=True, capture_output=True)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644, follow_symlinks=False)
