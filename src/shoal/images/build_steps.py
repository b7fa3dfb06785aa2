"""A template build as data: a base, a list of steps, the build context; and what COPY reads from it.

Both front ends produce a ``BuildPlan``: ``dockerfile.py`` (``shoal template build -f``) and E2B's
template API (``server/e2b/templates.py``); ``build_runner.py`` executes it. Keeping the plan plain
data is what lets one cache key (parent key + step + content hash of the files it copies) serve both.

The build context belongs to the user, but a Dockerfile may come from anywhere, so every COPY source
is confined to the context: no absolute names, no ``..``, and a source whose real path (symlinks
resolved) leaves the context is refused. Symlinks met while walking a copied directory are copied as
symlinks, never followed, so they cannot pull host files in. ``.dockerignore`` is honoured (Docker's
rules: ``*``, ``?``, ``**``, ``!`` exceptions, the last matching line wins).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shoal.errors import InvalidRequest

#: Step kinds that change the filesystem (a snapshot follows them); the others change only the config.
FS_KINDS = ("RUN", "COPY")
MAX_CONTEXT_BYTES = 4 * 1024 ** 3
MAX_CONTEXT_ENTRIES = 200_000


@dataclass(frozen=True)
class Step:
    """One instruction. ``args`` by kind: RUN {argv | shell, user?}; COPY {sources, dest, chown?, mode?,
    archive (ADD of a local tar)}; ENV/ARG {pairs}; WORKDIR {path}; USER {user}; EXPOSE {ports};
    CMD/ENTRYPOINT {argv | shell}."""

    kind: str
    args: dict[str, Any]
    text: str  #: as the user wrote it, for progress lines and errors

    def key_material(self) -> str:
        return json.dumps([self.kind, self.args], sort_keys=True)


@dataclass
class BuildPlan:
    """Everything a build needs: where it starts (a Shoal template or an image ref), its steps, its context."""

    base_template: str | None = None
    base_image: str | None = None
    steps: list[Step] = field(default_factory=list)
    context: Path | None = None
    start_cmd: str | None = None
    ready: dict[str, object] | None = None
    source: str = ""      #: what the template says it was built from ("dockerfile:/path", "e2b")
    force: bool = False   #: ignore the step cache (Docker's --no-cache, E2B's skip_cache)
    owner: str | None = None  #: the API key that built it (E2B's template API); None: the host's operator


@dataclass
class BuildConfig:
    """The state the config-only steps change (Docker's image config), carried from step to step."""

    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None
    exposed: list[str] = field(default_factory=list)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"env": self.env, "args": self.args, "workdir": self.workdir, "user": self.user,
                "exposed": self.exposed, "cmd": self.cmd, "entrypoint": self.entrypoint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildConfig:
        return cls(env=dict(d.get("env") or {}), args=dict(d.get("args") or {}), workdir=d.get("workdir") or "/",
                   user=d.get("user"), exposed=list(d.get("exposed") or []), cmd=d.get("cmd"),
                   entrypoint=d.get("entrypoint"))

    def copy(self) -> BuildConfig:
        return BuildConfig.from_dict(json.loads(json.dumps(self.to_dict())))

    @classmethod
    def inherit(cls, defaults: object) -> BuildConfig:
        """The config a base hands down: its ``defaults`` (an image's config, or a build's)."""
        d = defaults if isinstance(defaults, dict) else {}
        env = d.get("env")
        return cls(env={str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
                   workdir=str(d.get("working_dir") or "/"), user=d.get("user") or None,
                   exposed=list(d.get("exposed_ports") or []), cmd=d.get("cmd"), entrypoint=d.get("entrypoint"))

    def defaults(self) -> dict[str, Any]:
        """What the agent applies to every process (``/etc/shoal/template.json``, as for image templates)."""
        return {"env": self.env, "working_dir": self.workdir, "user": self.user, "entrypoint": self.entrypoint,
                "cmd": self.cmd, "exposed_ports": self.exposed}

    def apply(self, step: Step) -> None:
        """Config-only effect of ``step`` (RUN and COPY leave it unchanged)."""
        a = step.args
        if step.kind == "ENV":
            self.env.update(a["pairs"])
        elif step.kind == "ARG":
            for k, v in a["pairs"].items():
                self.args.setdefault(k, v)
        elif step.kind == "WORKDIR":
            self.workdir = os.path.normpath(os.path.join(self.workdir, a["path"]))
        elif step.kind == "USER":
            self.user = a["user"] or None
        elif step.kind == "EXPOSE":
            self.exposed = sorted(set(self.exposed) | set(a["ports"]))
        elif step.kind in ("CMD", "ENTRYPOINT"):
            argv = a["argv"] if "argv" in a else ["/bin/sh", "-c", a["shell"]]
            if step.kind == "CMD":
                self.cmd = argv
            else:
                self.entrypoint = argv


def substitute(text: str, variables: dict[str, str]) -> str:
    """``$VAR``, ``${VAR}``, ``${VAR:-default}`` as Docker expands them in ENV/WORKDIR/COPY/USER."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        default = m.group(3)
        value = variables.get(name)
        return value if value else (default or "")
    return re.sub(r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})", one, text)


# --- the context -----------------------------------------------------------------------------------

class Ignore:
    """``.dockerignore`` patterns: the last matching line decides; ``!`` lines re-include."""

    def __init__(self, lines: list[str]) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
            self.rules.append((negate, re.compile(_glob_regex(pattern))))

    @classmethod
    def of(cls, context: Path, extra: list[str] | None = None) -> Ignore:
        try:
            lines = (context / ".dockerignore").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return cls([*lines, *(extra or [])])

    def ignored(self, rel: str) -> bool:
        """``rel`` (or a directory above it) matches an ignoring rule more recently than a re-including one."""
        verdict = False
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for negate, rx in self.rules:
            if any(rx.fullmatch(p) for p in prefixes):
                verdict = not negate
        return verdict


def _glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return out


@dataclass(frozen=True)
class ContextEntry:
    """One file, directory or symlink to copy: where it lands (relative to the destination) and its source."""

    rel: str
    path: Path
    kind: str  #: "file", "dir" or "symlink"


def _confined_source(context: Path, name: str) -> Path:
    if not name or name.startswith("/") or "\0" in name:
        raise InvalidRequest(f"COPY source {name!r} must be a path relative to the build context")
    if ".." in Path(name).parts:
        raise InvalidRequest(f"COPY source {name!r} leaves the build context ('..' is not allowed)")
    root = context.resolve()
    path = root / name
    if path == root:
        return path
    # The directories on the way must stay inside; a source that is itself a symlink is copied as the
    # link (Docker's and E2B's rule: never followed, its target is the sandbox's business).
    parent = Path(os.path.realpath(path.parent))
    as_link = os.path.islink(path) and not name.endswith("/")  # "link/" asks for what it points to
    real = parent if as_link else Path(os.path.realpath(path))
    for resolved in (parent, real):
        if resolved != root and root not in resolved.parents:
            raise InvalidRequest(f"COPY source {name!r} leaves the build context (a symlink points outside it)")
    return path


def select(context: Path | None, sources: list[str], ignore: Ignore) -> list[tuple[str, list[ContextEntry]]]:
    """For each source (globs allowed): the entries it copies, relative to what lands at the destination.

    A directory source copies its contents (Docker's rule); a file lands under its own name."""
    if context is None:
        raise InvalidRequest("COPY needs a build context")
    root = context.resolve()
    out: list[tuple[str, list[ContextEntry]]] = []
    count = 0
    for source in sources:
        _confined_source(root, source)  # refuse before globbing
        matches = sorted(root.glob(source)) if any(c in source for c in "*?[") else [root / source]
        matches = [m for m in matches if m == root or not ignore.ignored(m.relative_to(root).as_posix())]
        if not matches or not all(os.path.lexists(m) for m in matches):
            raise InvalidRequest(f"COPY source {source!r} does not exist in the build context (or is ignored)")
        for match in matches:
            src = _confined_source(root, match.relative_to(root).as_posix() if match != root else ".")
            entries: list[ContextEntry] = []
            if src.is_dir() and not src.is_symlink():
                for dirpath, dirnames, filenames in os.walk(src):  # never follows directory symlinks
                    dirnames.sort()
                    for name in sorted(dirnames) + sorted(filenames):
                        full = Path(dirpath) / name
                        if ignore.ignored(full.relative_to(root).as_posix()):
                            if name in dirnames:
                                dirnames.remove(name)
                            continue
                        entries.append(_entry(full, full.relative_to(src).as_posix()))
                        count += 1
            else:
                entries.append(_entry(src, src.name))
                count += 1
            if count > MAX_CONTEXT_ENTRIES:
                raise InvalidRequest(f"COPY would copy more than {MAX_CONTEXT_ENTRIES} entries")
            out.append((match.name if not src.is_dir() or src.is_symlink() else "", entries))
    return out


def _entry(path: Path, rel: str) -> ContextEntry:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ContextEntry(rel, path, "symlink")
    if stat.S_ISDIR(st.st_mode):
        return ContextEntry(rel, path, "dir")
    if stat.S_ISREG(st.st_mode):
        return ContextEntry(rel, path, "file")
    raise InvalidRequest(f"{path.name!r} in the build context is neither a file, a directory nor a symlink")


def content_hash(groups: list[tuple[str, list[ContextEntry]]]) -> str:
    """Hash of what a COPY copies: names, kinds, modes, link targets and bytes (not mtimes: like Docker)."""
    h = hashlib.sha256()
    for name, entries in groups:
        h.update(f"G\0{name}\0".encode())
        for e in entries:
            st = os.lstat(e.path)
            h.update(f"{e.kind}\0{e.rel}\0{stat.S_IMODE(st.st_mode):o}\0".encode())
            if e.kind == "symlink":
                h.update(os.readlink(e.path).encode(errors="surrogateescape"))
            elif e.kind == "file":
                with open(e.path, "rb") as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def copy_tar(groups: list[tuple[str, list[ContextEntry]]], dest: str, many: bool, uid: int, gid: int,
             mode: int | None) -> IO[bytes]:
    """A tar (in a temp file) of the selected entries named under ``dest``, owned by ``uid:gid`` (ids
    inside the sandbox: the layer applier shifts them), for ``oci_layers.LayerApplier``. Docker's rule
    for the destination: a file copied to a name without a trailing '/' (and alone) takes that name."""
    out = tempfile.TemporaryFile()
    total = 0
    dest_dir = dest.endswith("/") or many
    base = dest.strip("/")
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, entries in groups:
            for e in entries:
                if name and not dest_dir:
                    target = base  # a single file to a file name
                else:
                    target = f"{base}/{e.rel}" if base else e.rel
                if any(part.startswith(".wh.") for part in target.split("/")):
                    raise InvalidRequest(f"{e.rel!r}: names starting with '.wh.' cannot be copied (OCI whiteouts)")
                st = os.lstat(e.path)
                info = tarfile.TarInfo(target)
                info.uid, info.gid, info.mtime = uid, gid, int(st.st_mtime)
                info.mode = mode if mode is not None and e.kind == "file" else stat.S_IMODE(st.st_mode)
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, os.readlink(e.path)
                    tar.addfile(info)
                else:
                    info.size = st.st_size
                    total += st.st_size
                    if total > MAX_CONTEXT_BYTES:
                        raise InvalidRequest(f"COPY would copy more than {MAX_CONTEXT_BYTES} bytes")
                    with open(e.path, "rb") as f:
                        tar.addfile(info, f)
    out.seek(0)
    return out


def archive_tar(archive: Path, dest: str, uid: int, gid: int) -> IO[bytes]:
    """ADD of a local tar: its members re-rooted under ``dest`` (names are checked again by the layer
    applier, which refuses ``..``, absolute names and device nodes, and confines links to the tree)."""
    out = tempfile.TemporaryFile()
    base = dest.strip("/")
    try:
        with tarfile.open(archive, mode="r:*") as src, tarfile.open(fileobj=out, mode="w",
                                                                   format=tarfile.PAX_FORMAT) as tar:
            for m in src:
                name = m.name.lstrip("./") if m.name.startswith("./") else m.name
                if name.startswith("/") or ".." in name.split("/"):
                    raise InvalidRequest(f"ADD {archive.name}: entry {m.name!r} leaves the destination")
                m.name = f"{base}/{name}" if base else name
                if m.islnk():
                    m.linkname = f"{base}/{m.linkname}" if base else m.linkname
                m.uid, m.gid, m.uname, m.gname = uid, gid, "", ""
                tar.addfile(m, src.extractfile(m) if m.isreg() else None)
    except (tarfile.TarError, EOFError) as err:
        raise InvalidRequest(f"ADD {archive.name}: not a valid tar archive: {err}") from err
    out.seek(0)
    return out


def is_archive(path: Path) -> bool:
    """ADD extracts a local tar (plain or compressed), as Docker does; anything else is copied."""
    return path.is_file() and not path.is_symlink() and tarfile.is_tarfile(path)

