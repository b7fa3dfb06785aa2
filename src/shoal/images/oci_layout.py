"""Write an OCI image layout from layer tars: what the image tests and ``shoal bench --images`` build
their own images with (no outside registry is needed to exercise the importer end to end)."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any


def _put(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def write_layout(path: Path, layers: list[bytes], config: dict[str, Any] | None = None, tag: str = "latest",
                 compress: bool = True) -> str:
    """Write an OCI layout at ``path`` with ``layers`` (uncompressed tars, bottom first) and the image
    config's ``config`` section; return the manifest digest."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    descs, diff_ids = [], []
    for layer in layers:
        diff_ids.append("sha256:" + hashlib.sha256(layer).hexdigest())
        data = gzip.compress(layer, compresslevel=1, mtime=0) if compress else layer
        digest, size = _put(blobs, data)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else ""),
                      "digest": digest, "size": size})
    cfg = {"architecture": "amd64", "os": "linux", "config": config or {},
           "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cdigest, csize = _put(blobs, json.dumps(cfg).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
                "layers": descs}
    mdigest, msize = _put(blobs, json.dumps(manifest).encode())
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return mdigest


def write_archive(layout: Path, archive: Path) -> None:
    """Pack a layout directory as an OCI archive (a plain tar of it)."""
    with tarfile.open(archive, "w") as tar:
        for item in sorted(layout.iterdir()):
            tar.add(item, arcname=item.name)
