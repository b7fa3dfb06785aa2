"""Template recipes: how to fill a root tree that becomes a template image.

A recipe only writes files into an empty directory as host root; the store does the rest
(ownership shift, EROFS image, cache, mounts). So a recipe stays a plain function that is easy to
read and to test on its own.

Parents: a recipe may name a ``parent``. The store then starts the child's tree from a copy of the
parent's *built image* (mounted read-only, copied, ownership shifted back) instead of re-running the
parent's ``populate``. The parent's image is the cache, so ``code-interpreter-v1`` on top of ``base``
costs a copy (seconds) plus its own step, not another debootstrap. A child's effective version
includes its parent's, so bumping ``base`` rebuilds its children too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import RuntimeFailure

#: Receives one line of human-readable build output at a time.
Log = Callable[[str], None]
#: ``populate(tree, log, cache_dir)``: fill the empty directory ``tree``. ``cache_dir`` is a
#: persistent directory the recipe may reuse between builds (downloads); it may ignore it.
Populate = Callable[[Path, Log, Path], None]

USER_UID = 1000
USER_GID = 1000

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"


@dataclass(frozen=True)
class Recipe:
    """A named way to build a template. Bump ``version`` to invalidate cached images."""

    name: str
    description: str
    version: str
    populate: Populate
    parent: str | None = None


# --- shared helpers -----------------------------------------------------------------------------

_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def _mkdir(path: Path, mode: int = 0o755, owner: tuple[int, int] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)  # chmod after mkdir: mkdir's mode is filtered by the umask (1777 would not stick)
    if owner:
        os.chown(path, *owner)


def _need_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise RuntimeFailure(f"{name} not found on the host; install it with: apt-get install {package}",
                             step="template build")
    return found


# --- minimal: busybox ---------------------------------------------------------------------------

#: Applets that make no sense in a sandbox root (we are never PID 1 of a machine).
_SKIP_APPLETS = {"linuxrc", "sbin/init"}


def _populate_minimal(tree: Path, log: Log, cache_dir: Path) -> None:
    """A busybox root: a shell and ~270 applets, no package manager, no Python. Builds in a second."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise RuntimeFailure("/bin/busybox not found on the host; install it with: apt-get install busybox-static",
                             step="template build")
    listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True)
    if listing.returncode != 0 or not listing.stdout.strip():
        raise RuntimeFailure("/bin/busybox cannot list its applets (--list-full); install busybox-static",
                             step="template build")

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "var/tmp", ".shoal"):
        _mkdir(tree / d)
    _mkdir(tree / "tmp", 0o1777)
    _mkdir(tree / "var/tmp", 0o1777)
    _mkdir(tree / "root", 0o700)
    _mkdir(tree / "home", 0o755)
    _mkdir(tree / "home/user", 0o755, owner=(USER_UID, USER_GID))

    shutil.copyfile(busybox, tree / "bin/busybox")
    os.chmod(tree / "bin/busybox", 0o755)
    count = 0
    for rel in listing.stdout.split():
        rel = rel.strip("/")
        if not rel or rel in _SKIP_APPLETS or rel == "bin/busybox" or "/" not in rel:
            continue
        link = tree / rel
        if not link.parent.is_dir() or os.path.lexists(link):
            continue
        os.symlink("/bin/busybox", link)
        count += 1
    log(f"busybox: {count} applet links")

    _write(tree / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                                f"user:x:{USER_UID}:{USER_GID}:user:/home/user:/bin/sh\n")
    _write(tree / "etc/group", f"root:x:0:\nuser:x:{USER_GID}:\n")
    _write(tree / "etc/hosts", _HOSTS)
    _write(tree / "etc/resolv.conf", "")
    _write(tree / "etc/hostname", "sandbox\n")


# --- base: Debian bookworm ----------------------------------------------------------------------

_BASE_PACKAGES = ["bash", "coreutils", "python3", "python3-pip", "python3-venv", "git", "curl",
                  "ca-certificates", "procps", "sudo"]

#: Removed after debootstrap: nothing in a sandbox reads them, and they are ~25% of the tree.
#: ``dev`` too: the runtime mounts its own /dev, so the image carries no device nodes.
_TRIM = ["var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
         "usr/share/locale", "usr/share/info", "dev"]


def debian_mirror() -> str:
    """The host's Debian mirror for ``bookworm`` (so builds work behind a local mirror), else deb.debian.org.

    ``SHOAL_DEBIAN_MIRROR`` overrides. Only entries for the bookworm suite itself count, so an
    Ubuntu host (or a -security entry) falls back to the default.
    """
    override = os.environ.get("SHOAL_DEBIAN_MIRROR")
    if override:
        return override
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        try:
            text = sources.read_text()
        except OSError:
            continue
        for stanza in text.split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.lstrip().startswith("#") and not line.startswith((" ", "\t")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if ("deb" in fields.get("types", "").split() and DEBIAN_SUITE in fields.get("suites", "").split()
                    and fields.get("uris") and fields.get("enabled", "yes").lower() != "no"):
                return fields["uris"].split()[0]
    try:
        lines = Path("/etc/apt/sources.list").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        words = [w for w in line.split("#", 1)[0].split() if not (w.startswith("[") or w.endswith("]"))]
        if len(words) >= 3 and words[0] == "deb" and words[2] == DEBIAN_SUITE:
            return words[1]
    return DEFAULT_MIRROR


def _run_streaming(cmd: list[str], log: Log, what: str) -> None:
    """Run ``cmd``, handing each output line to ``log`` as it comes (debootstrap takes a minute)."""
    tail: deque[str] = deque(maxlen=5)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail.append(line)
            log(line)
    rc = proc.wait()
    if rc != 0:
        last = tail[-1] if tail else "no output"
        raise RuntimeFailure(f"{what} failed with exit code {rc}: {last}", step="template build")


def _add_user(tree: Path) -> None:
    """Add ``user`` (1000:1000, bash, passwordless sudo) by editing the files, without chroot."""
    etc = tree / "etc"

    def append(name: str, line: str) -> None:
        path = etc / name
        text = path.read_text() if path.exists() else ""
        if not any(entry.split(":", 1)[0] == "user" for entry in text.splitlines()):
            mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
            path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")
            os.chmod(path, mode)

    append("passwd", f"user:x:{USER_UID}:{USER_GID}:user:/home/user:/bin/bash")
    append("group", f"user:x:{USER_GID}:")
    append("shadow", "user:*:19000:0:99999:7:::")
    append("gshadow", "user:!::")
    home = tree / "home/user"
    _mkdir(home, 0o755)
    skel = etc / "skel"
    if skel.is_dir():
        shutil.copytree(skel, home, symlinks=True, dirs_exist_ok=True)
    for root, dirs, files in os.walk(home):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.lchown(name, USER_UID, USER_GID)
    _write(etc / "sudoers.d/user", "user ALL=(ALL) NOPASSWD:ALL\n", 0o440)


def _populate_base(tree: Path, log: Log, cache_dir: Path) -> None:
    """Debian bookworm minbase + Python, git, curl, sudo: the everyday agent sandbox."""
    debootstrap = _need_tool("debootstrap", "debootstrap")
    mirror = debian_mirror()
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap {DEBIAN_SUITE} from {mirror}")
    _run_streaming([debootstrap, "--variant=minbase", f"--include={','.join(_BASE_PACKAGES)}",
                    f"--cache-dir={cache_dir}", DEBIAN_SUITE, str(tree), mirror], log, "debootstrap")

    log("trimming apt cache, docs, man pages, locales")
    for rel in _TRIM:
        path = tree / rel
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    for leftover in [*(tree / "var/cache/apt").glob("*.bin"), *(tree / "var/cache/debconf").glob("*-old")]:
        leftover.unlink()
    for root, _dirs, files in os.walk(tree / "var/log"):  # keep the directories: apt and dpkg expect them
        for name in files:
            os.unlink(os.path.join(root, name))
    shutil.rmtree(tree / "debootstrap", ignore_errors=True)  # left behind only by a failed run

    _add_user(tree)
    if not os.path.lexists(tree / "usr/bin/python"):  # E2B's base has `python` (Debian ships python3 only)
        (tree / "usr/bin/python").symlink_to("python3")
    _write(tree / "etc/hosts", _HOSTS)
    _write(tree / "etc/resolv.conf", "")
    _write(tree / "etc/hostname", "sandbox\n")
    _write(tree / "etc/machine-id", "", 0o444)
    # PEP 668: without this, `pip install` refuses to run; a sandbox is the place to let agents do it.
    for marker in (tree / "usr/lib").glob("python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    _mkdir(tree / ".shoal")
    _mkdir(tree / "tmp", 0o1777)


# --- code-interpreter-v1: base + Jupyter kernel and the data stack ---------------------------------

#: What E2B's ``code-interpreter-v1`` promises, pinned (matplotlib 3.10: E2B's own chart tests still call
#: ``boxplot(labels=...)``, which 3.11 removed). Installed into the sandbox's system Python
#: (/usr/local/lib/python3.11/dist-packages) so that ``python3`` in a terminal sees them too.
#: ``jupyter_client`` is all the kernel server (shoal/inside/kernel_server.py) needs; ``e2b-charts``
#: is E2B's own chart extractor (``result.chart``, wired in by shoal/inside/python_startup.py, +7 MB
#: with pydantic); ``bash_kernel`` is the Bash kernel (+1 MB); ``jjava`` the Java kernel (+5 MB).
INTERPRETER_PACKAGES = ["ipykernel==7.4.0", "jupyter_client==8.10.0", "numpy==2.4.6", "pandas==3.1.1",
                        "matplotlib==3.10.9", "e2b-charts==1.0.0", "bash_kernel==0.10.0", "jjava==1.0a8"]
#: E2B's other languages, from Debian (installed size): Node.js for JavaScript contexts (+88 MB; its
#: Jupyter kernels need zeromq binaries from outside the registries, so shoal/inside/js_kernel.js
#: drives node instead) and TypeScript's compiler for it (+67 MB), R with IRkernel (+134 MB), a JDK
#: for jjava (JShell is JDK-only, +280 MB).
#: The bound: E2B's five languages cost about 500 MB of image, read-only and shared by every
#: sandbox of the template (nothing per sandbox); drop a language here to save its share (asking
#: for it then answers 400 naming these packages).
INTERPRETER_DEBIAN = ["nodejs", "node-typescript", "r-base-core", "r-cran-irkernel", "openjdk-17-jdk-headless"]
#: Test suites shipped inside wheels: never imported by user code, a fifth of the installed size.
_INTERPRETER_TRIM = ["numpy/_core/tests", "numpy/*/tests", "numpy/*/*/tests", "pandas/tests",
                     "matplotlib/tests", "mpl_toolkits/*/tests"]
_CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Host settings a build inside the chroot must share to reach the package index from here.
_PASS_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT", "http_proxy",
             "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
_HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
_BUILD_CA = "tmp/shoal-build-ca.pem"


@contextmanager
def _chroot(tree: Path) -> Iterator[list[str]]:
    """Make ``tree`` usable for ``chroot`` with network access, and undo it all afterwards.

    Mounts /proc and a bind of the host's /dev, copies the host's resolv.conf (DNS) and CA bundle
    (a TLS-intercepting proxy's CA is in the host's bundle, not in the tree's). Yields the
    environment (``KEY=value`` words) for ``env -i``. A crash leaves mounts that the store's cleanup
    (``umount_tree``) removes; this removes them itself on any normal or failed exit.
    """
    from shoal.runtime.linux import mounts

    mounted: list[Path] = []
    resolv = tree / "etc/resolv.conf"
    saved_resolv = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else b""
    try:
        for source, rel, fstype, flags in (("proc", "proc", "proc", mounts.MS_NOSUID | mounts.MS_NODEV),
                                           ("/dev", "dev", "", mounts.MS_BIND)):
            target = tree / rel
            target.mkdir(exist_ok=True)
            mounts.mount(source, target, fstype, flags)
            mounted.append(target)
        if os.path.lexists(resolv):
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        env = [f"PATH={_CHROOT_PATH}", "HOME=/root", "LANG=C.UTF-8"]
        env += [f"{k}={os.environ[k]}" for k in _PASS_ENV if k in os.environ]
        if _HOST_CA.is_file():
            shutil.copyfile(_HOST_CA, tree / _BUILD_CA)
            env.append(f"PIP_CERT=/{_BUILD_CA}")
        yield env
    finally:
        for target in reversed(mounted):
            mounts.umount(target)
        if os.path.lexists(resolv):
            resolv.unlink()
        _write(resolv, saved_resolv.decode())
        (tree / _BUILD_CA).unlink(missing_ok=True)


def _trim_apt(tree: Path) -> None:
    """What ``apt-get install`` left that no sandbox reads (lists, downloaded .debs, docs), as ``base`` trims."""
    for rel in _TRIM:
        path = tree / rel
        if rel != "dev" and path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    for leftover in (tree / "var/cache/apt").glob("*.bin"):
        leftover.unlink()


def _populate_code_interpreter(tree: Path, log: Log, cache_dir: Path) -> None:
    """On top of ``base``: Jupyter kernels for Python, Bash and R, Node.js for JavaScript, numpy, pandas,
    matplotlib and E2B's chart extractor (apt and pip, in a chroot)."""
    chroot = _need_tool("chroot", "coreutils")
    if not (tree / "usr/bin/python3").exists():
        raise RuntimeFailure("the parent template has no /usr/bin/python3", step="template build")
    with _chroot(tree) as env:
        apt = [chroot, str(tree), "/usr/bin/env", "-i", *env, "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q"]
        log(f"apt-get install {' '.join(INTERPRETER_DEBIAN)}")
        _run_streaming([*apt, "update"], log, "apt-get update")
        _run_streaming([*apt, "install", "-y", "--no-install-recommends", *INTERPRETER_DEBIAN], log,
                       "apt-get install")
        log(f"pip install {' '.join(INTERPRETER_PACKAGES)}")
        _run_streaming([chroot, str(tree), "/usr/bin/env", "-i", *env, "python3", "-m", "pip", "install",
                        "--no-cache-dir", "--break-system-packages", "--root-user-action=ignore",
                        "--disable-pip-version-check", "--no-warn-script-location", "--progress-bar=off",
                        *INTERPRETER_PACKAGES], log, "pip install")
        _run_streaming([chroot, str(tree), "/usr/bin/env", "-i", *env, "python3", "-m", "bash_kernel.install",
                        "--sys-prefix"], log, "bash kernel spec")
        # matplotlib builds its font cache on first import (seconds): do it now, as root (whom the
        # kernels run as) and as the user (python3 in a terminal).
        log("building matplotlib's font cache for root and user")
        for userspec, home in (("0:0", "/root"), (f"{USER_UID}:{USER_GID}", "/home/user")):
            _run_streaming([chroot, f"--userspec={userspec}", str(tree), "/usr/bin/env", "-i",
                            f"PATH={_CHROOT_PATH}", f"HOME={home}", "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1",
                            "python3", "-c", "import matplotlib.font_manager"], log, "matplotlib font cache")
    _trim_apt(tree)

    site = next((tree / "usr/local/lib").glob("python3*/dist-packages"), None)
    if site is None:
        raise RuntimeFailure("pip installed nothing into /usr/local/lib/python3*/dist-packages",
                             step="template build")
    for pattern in _INTERPRETER_TRIM:
        for path in site.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
    # The user's site directory must exist when a kernel starts, or a `pip install` made from a
    # notebook (a --user install: the system site is root's) is not importable until a restart.
    user_site = Path("home/user/.local/lib") / site.parent.name / "site-packages"
    for part in range(3, len(user_site.parts) + 1):  # from home/user/.local down
        _mkdir(tree / Path(*user_site.parts[:part]), 0o755, owner=(USER_UID, USER_GID))


#: Every recipe by name. To add one (e.g. ``code-interpreter-v1`` = base + pip packages), write a
#: populate function and register ``Recipe(..., parent="base")`` here.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("minimal", "busybox shell and applets, no Python (builds in seconds)", "1", _populate_minimal),
        Recipe("base", "Debian 12 (bookworm) minbase with bash, python3, pip, venv, git, curl, sudo",
               "2", _populate_base),
        Recipe("code-interpreter-v1", "base + Python, JavaScript, TypeScript, R, Bash and Java contexts, numpy, "
               "pandas, matplotlib, e2b-charts: E2B's code interpreter", "4", _populate_code_interpreter,
               parent="base"),
    )
}
