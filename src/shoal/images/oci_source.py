"""Where an image comes from, and bringing it into the local blob cache with skopeo.

Why skopeo (Debian's package) rather than a Python registry client or hand-written HTTP: it is the
containers/image library the container tools themselves use, so one ``skopeo copy`` reads every source
a user has (a registry, an OCI layout directory, an OCI archive, a ``docker save`` archive), speaks the
registry protocol (anonymous and bearer-token auth, the system CA store, manifest lists resolved to
this host's platform, digest pinning, retries) and verifies every blob's digest as it arrives. Its
output is always an OCI layout, so the importer (``oci_image``) has one input format. With
``--dest-shared-blob-dir`` the blobs land in one directory named by digest shared by every template:
a layer some template already has is not downloaded again. (oras-py was the alternative: it pulls
artifacts, not images, and knows neither docker archives nor manifest lists.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import Forbidden, InvalidRequest, NotFound, RuntimeFailure

#: A registry reference: [host[:port]/]path[:tag][@sha256:<64 hex>]; never starts with '-' (an option).
_REGISTRY_REF = re.compile(r"[a-z0-9][a-z0-9._-]*(?::[0-9]{1,5})?(?:/[a-z0-9._-]+)*"
                           r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")
_TRANSPORTS = ("docker://", "oci:", "oci-archive:", "docker-archive:")
INSPECT_TIMEOUT = 120.0
COPY_TIMEOUT = 3600.0


@dataclass(frozen=True)
class ImageSource:
    """One image a user named: ``transport`` is skopeo's (``docker``, ``oci``, ``oci-archive``,
    ``docker-archive``), ``location`` its path or registry reference."""

    transport: str
    location: str
    insecure: bool = False

    @property
    def skopeo_name(self) -> str:
        if self.transport == "docker":
            return f"docker://{self.location}"
        return f"{self.transport}:{self.location}"

    @property
    def local(self) -> bool:
        return self.transport != "docker"

    def __str__(self) -> str:
        return self.skopeo_name


def _archive_kind(path: Path) -> str:
    """``oci-archive`` or ``docker-archive``, read from the tar's member names."""
    try:
        with tarfile.open(path, "r:") as tar:
            names = {m.name.lstrip("./") for m in tar.getmembers()}
    except (tarfile.TarError, OSError) as err:
        raise InvalidRequest(f"{path} is not an image archive (an OCI or docker save tar): {err}") from err
    if "oci-layout" in names and "index.json" in names:
        return "oci-archive"
    if "manifest.json" in names:
        return "docker-archive"
    raise InvalidRequest(f"{path} is a tar but neither an OCI archive (oci-layout, index.json) "
                         "nor a docker save archive (manifest.json)")


def parse_source(ref: str, insecure: bool = False) -> ImageSource:
    """Tell what ``ref`` names: an explicit ``transport:``, an existing path (layout dir or archive),
    else a registry reference. A path-looking ref that does not exist is NotFound."""
    if not isinstance(ref, str) or not ref or "\0" in ref or ref.startswith("-") or len(ref) > 4096:
        raise InvalidRequest(f"invalid image reference {ref!r}")
    for prefix in _TRANSPORTS:
        if ref.startswith(prefix):
            rest = ref[len(prefix):]
            if prefix == "docker://":
                return parse_source(rest, insecure) if _REGISTRY_REF.fullmatch(rest) else _bad_ref(ref)
            path = Path(rest.split(":", 1)[0] if prefix == "oci:" else rest)
            if not path.exists():
                raise NotFound(f"image {ref}: {path} does not exist")
            return ImageSource(prefix[:-1], str(Path(rest).resolve()) if prefix != "oci:" else rest)
    path = Path(ref)
    if path.exists():
        if path.is_dir():
            if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
                raise InvalidRequest(f"{ref} is a directory but not an OCI image layout (no oci-layout, index.json)")
            return ImageSource("oci", str(path.resolve()))
        return ImageSource(_archive_kind(path), str(path.resolve()))
    if ref.startswith(("/", "./", "../", "~")) or ref.endswith((".tar", ".tar.gz", ".tgz")):
        raise NotFound(f"image {ref}: no such file or directory")
    if not _REGISTRY_REF.fullmatch(ref):
        return _bad_ref(ref)
    return ImageSource("docker", ref, insecure=insecure)


def _bad_ref(ref: str) -> ImageSource:
    raise InvalidRequest(f"invalid image reference {ref!r}: expected registry/name[:tag][@sha256:digest], "
                         "an OCI layout directory or an image archive")


def _skopeo() -> str:
    path = shutil.which("skopeo")
    if not path:
        raise RuntimeFailure("skopeo not found on the host; install it with: apt-get install skopeo",
                             step="template build")
    return path


def _registry_host(location: str) -> str:
    first = location.split("/", 1)[0]
    return first if "/" in location and ("." in first or ":" in first or first == "localhost") else "docker.io"


class Skopeo:
    """Runs skopeo for one source, with its auth and TLS options; every run has a timeout."""

    def __init__(self, source: ImageSource, credentials: str | None = None) -> None:
        self.source = source
        self.credentials = credentials
        self._authdir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Skopeo:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._authdir is not None:
            self._authdir.cleanup()
            self._authdir = None

    def _source_options(self, prefix: str) -> list[str]:
        """TLS and auth options for the source (``prefix`` is ``--`` for inspect, ``--src-`` for copy).

        Credentials go in a private auth file, never on the command line (where ``ps`` shows them)."""
        if not self.source.transport == "docker":
            return []
        opts = [f"{prefix}tls-verify={'false' if self.source.insecure else 'true'}"]
        if self.credentials:
            if self._authdir is None:
                self._authdir = tempfile.TemporaryDirectory(prefix="shoal-auth-")
                auth = base64.b64encode(self.credentials.encode()).decode()
                path = Path(self._authdir.name) / "auth.json"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump({"auths": {_registry_host(self.source.location): {"auth": auth}}}, f)
            opts.append(f"{prefix}authfile={Path(self._authdir.name) / 'auth.json'}")
        return opts

    def manifest_digest(self) -> str:
        """The digest of the source's top manifest (an index for a multi-platform image): what a
        no-change rebuild compares. One request for a registry; a local read otherwise."""
        cmd = [_skopeo(), "--command-timeout", f"{int(INSPECT_TIMEOUT)}s", "inspect", "--raw",
               *self._source_options("--"), "--", self.source.skopeo_name]
        try:
            proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=INSPECT_TIMEOUT + 10)
        except subprocess.TimeoutExpired as err:
            raise RuntimeFailure(f"reading image {self.source} timed out", step="template build") from err
        if proc.returncode != 0:
            raise _translate(self.source, proc.stderr.decode(errors="replace"))
        return "sha256:" + hashlib.sha256(proc.stdout).hexdigest()

    def copy_to_layout(self, layout: Path, blobs: Path, log: Callable[[str], None]) -> None:
        """Copy the image into the OCI layout ``layout`` (index.json only) with its blobs in ``blobs``.

        A blob already in ``blobs`` is not fetched again (skopeo checks by digest)."""
        blobs.mkdir(parents=True, exist_ok=True)
        cmd = [_skopeo(), "--command-timeout", f"{int(COPY_TIMEOUT)}s", "copy", "--quiet=false",
               *self._source_options("--src-"), "--dest-shared-blob-dir", str(blobs),
               "--", self.source.skopeo_name, f"oci:{layout}:image"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, errors="replace")
        try:
            assert proc.stdout is not None and proc.stderr is not None
            for line in proc.stdout:
                log(line.rstrip())
            err = proc.stderr.read()
            code = proc.wait(timeout=60)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if code != 0:
            raise _translate(self.source, err)


def _translate(source: ImageSource, stderr: str) -> Exception:
    """skopeo's last error line as the matching ShoalError, with what to do about it."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "no output"
    m = re.search(r'msg="(.*)"', text)
    if m:
        text = m.group(1).replace('\\"', '"')
    low = text.lower()
    where = f"image {source.location if source.transport == 'docker' else source}"
    if "server gave http response to https client" in low:
        return InvalidRequest(f"{where}: the registry speaks plain HTTP; pass --insecure-registry if you trust "
                              "the network to it")
    if "manifest unknown" in low or "name unknown" in low or "no such file" in low or "not found" in low:
        return NotFound(f"{where} not found: {text[-300:]}")
    if "unauthorized" in low or "authentication required" in low or "denied" in low:
        return Forbidden(f"{where}: the registry refused access (give credentials with --creds): {text[-300:]}")
    if "digest did not match" in low or "digest mismatch" in low or "does not match" in low:
        return InvalidRequest(f"{where}: content does not match its digest: {text[-300:]}")
    if "x509" in low or "certificate" in low:
        return InvalidRequest(f"{where}: TLS verification failed: {text[-300:]}")
    if "invalid" in low or "parsing" in low or "unexpected" in low:
        return InvalidRequest(f"{where} is not a valid image: {text[-300:]}")
    return RuntimeFailure(f"fetching {where} failed: {text[-300:]}", step="template build")
