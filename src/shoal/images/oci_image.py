"""Turn an image (fetched into an OCI layout by ``oci_source``) into a template's root tree.

The layout's manifest and config are read with size caps and type checks (they come from whoever
published the image), every layer blob is checked against its digest before it is unpacked, and the
layers are applied in order by ``oci_layers.LayerApplier`` (whiteouts, hostile names, ownership shift).
The config's defaults (``Env``, ``WorkingDir``, ``User``, ``Entrypoint``, ``Cmd``, ``ExposedPorts``) are
returned for the store's metadata and written to ``/etc/shoal/template.json`` in the tree, where the
agent reads them at start: every process of a sandbox gets the image's environment, working directory
and user unless its request names its own (``docker run`` semantics).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from shoal.errors import InvalidRequest, RuntimeFailure
from shoal.images.oci_layers import ImportLimits, LayerApplier, split_name

MAX_JSON = 4 * 1024 * 1024
DEFAULTS_PATH = "etc/shoal/template.json"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json")
#: Directories every sandbox root needs (mount points of the runtime, the agent's /.shoal).
_NEEDED_DIRS = (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777), (".shoal", 0o755))


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class ImageDefaults:
    """What the image's config says a process should get when its request does not say."""

    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    user: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    exposed_ports: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageManifest:
    manifest_digest: str
    config_digest: str
    layers: list[Layer]
    defaults: ImageDefaults
    architecture: str | None = None


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise InvalidRequest(f"image config: {what} must be text")
    return value


def _blob(blobs: Path, digest: object, what: str) -> Path:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidRequest(f"image {what} has an invalid digest {digest!r}")
    return blobs / "sha256" / digest.split(":", 1)[1]


def _read_json(path: Path, digest: str | None, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON + 1)
    except FileNotFoundError as err:
        raise InvalidRequest(f"image {what} is missing from the layout") from err
    if len(data) > MAX_JSON:
        raise InvalidRequest(f"image {what} is larger than {MAX_JSON} bytes")
    if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise InvalidRequest(f"image {what} does not match its digest {digest}")
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise InvalidRequest(f"image {what} is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise InvalidRequest(f"image {what} is not a JSON object")
    return doc


def _defaults(config: dict[str, Any]) -> ImageDefaults:
    c = config.get("config") or {}
    if not isinstance(c, dict):
        raise InvalidRequest("image config: 'config' must be an object")
    env: dict[str, str] = {}
    for item in c.get("Env") or []:
        key, sep, value = _text(item, "Env").partition("=")
        if not key or not sep:
            raise InvalidRequest(f"image config: invalid Env entry {item!r}")
        env[key] = value
    wd = c.get("WorkingDir") or None
    if wd is not None and not _text(wd, "WorkingDir").startswith("/"):
        raise InvalidRequest(f"image config: WorkingDir {wd!r} is not absolute")
    user = c.get("User") or None
    if user is not None:
        _text(user, "User")

    def argv(name: str) -> list[str] | None:
        value = c.get(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise InvalidRequest(f"image config: {name} must be a list")
        return [_text(v, name) for v in value]

    ports = c.get("ExposedPorts") or {}
    if not isinstance(ports, dict):
        raise InvalidRequest("image config: ExposedPorts must be an object")
    return ImageDefaults(env=env, working_dir=wd, user=user, entrypoint=argv("Entrypoint"), cmd=argv("Cmd"),
                         exposed_ports=sorted(_text(p, "ExposedPorts") for p in ports))


def read_layout(layout: Path, blobs: Path) -> ImageManifest:
    """The one image skopeo wrote into ``layout`` (its blobs in ``blobs``): manifest, layers, defaults."""
    index = _read_json(layout / "index.json", None, "index")
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or len(manifests) != 1 or not isinstance(manifests[0], dict):
        raise InvalidRequest("image layout: expected exactly one manifest in index.json")
    mdigest = manifests[0].get("digest")
    manifest = _read_json(_blob(blobs, mdigest, "manifest"), str(mdigest), "manifest")
    if manifest.get("mediaType", _MANIFEST_TYPES[0]) not in _MANIFEST_TYPES:
        raise InvalidRequest(f"image manifest has an unsupported media type {manifest.get('mediaType')!r}")
    cdesc = manifest.get("config")
    if not isinstance(cdesc, dict):
        raise InvalidRequest("image manifest has no config")
    config = _read_json(_blob(blobs, cdesc.get("digest"), "config"), str(cdesc.get("digest")), "config")
    layers = []
    for desc in manifest.get("layers") or []:
        if not isinstance(desc, dict) or not isinstance(desc.get("size"), int):
            raise InvalidRequest("image manifest has an invalid layer descriptor")
        _blob(blobs, desc.get("digest"), "layer")
        layers.append(Layer(str(desc["digest"]), int(desc["size"]), str(desc.get("mediaType", ""))))
    arch = config.get("architecture")
    return ImageManifest(str(mdigest), str(cdesc["digest"]), layers, _defaults(config),
                         arch if isinstance(arch, str) else None)


def _verify(path: Path, layer: Layer) -> None:
    try:
        with open(path, "rb") as f:
            got = hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError as err:
        raise InvalidRequest(f"image layer {layer.digest} is missing from the cache") from err
    if got != layer.hex:
        path.unlink(missing_ok=True)  # a bad blob must not satisfy the next pull either
        raise InvalidRequest(f"image layer {layer.digest} does not match its digest (got sha256:{got})")


def _decompressor(path: Path) -> list[str] | None:
    """The command that decompresses ``path``, told by its magic bytes (not the media type it claims)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return ["gzip", "-dc"]
    if head == b"\x28\xb5\x2f\xfd":
        if not shutil.which("zstd"):
            raise RuntimeFailure("image has zstd layers and zstd is not installed (apt-get install zstd)",
                                 step="template build")
        return ["zstd", "-dcq"]
    return None


def _apply_blob(applier: LayerApplier, path: Path, label: str) -> None:
    """Unpack one layer: a decompressor runs beside us in its own process (two cores: it keeps pace)."""
    command = _decompressor(path)
    with open(path, "rb") as raw:
        if command is None:
            applier.apply(raw, label)
            return
        proc = subprocess.Popen(command, stdin=raw, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stderr is not None
            stream: IO[bytes] = proc.stdout
            applier.apply(stream, label)
            while stream.read(1 << 20):  # trailing zero blocks after the tar's end
                pass
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait(timeout=60) != 0:
                raise InvalidRequest(f"image layer {label} is corrupt: {err.splitlines()[-1] if err else 'bad data'}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def unpack(image: ImageManifest, blobs: Path, tree: Path, uid_base: int, uid_count: int,
           report: Callable[[str, float | None], None], start: float = 0.0, end: float = 1.0,
           limits: ImportLimits | None = None) -> None:
    """Apply every layer of ``image`` to the empty directory ``tree``, then the defaults file."""
    total = sum(layer.size for layer in image.layers) or 1
    done = 0
    with LayerApplier(tree, uid_base, uid_count, limits, log=lambda line: report(line, None)) as applier:
        for n, layer in enumerate(image.layers, 1):
            label = f"{n}/{len(image.layers)} {layer.digest[:19]}"
            report(f"layer {label} ({layer.size / 2**20:.1f} MiB)", start + (end - start) * done / total)
            path = blobs / "sha256" / layer.hex
            _verify(path, layer)
            _apply_blob(applier, path, label)
            done += layer.size
        for name, mode in _NEEDED_DIRS:
            applier.ensure_dir([name], mode)
        if image.defaults.working_dir:
            applier.ensure_dir(split_name(image.defaults.working_dir.lstrip("/")), 0o755)
        applier.write_file(split_name(DEFAULTS_PATH), json.dumps(image.defaults.to_dict()).encode() + b"\n")
        applier.finish()
        if applier.skipped_xattrs:
            report(f"skipped {applier.skipped_xattrs} xattr(s) other than user.* and security.capability", None)
    report("layers applied", end)

