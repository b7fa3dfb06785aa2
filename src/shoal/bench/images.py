"""``shoal bench --images``: importing an OCI image beside ``tar -x`` + ``mkfs.erofs`` of the same layers.

The image is made here from the host's own files (``/usr/lib``, ``/usr/share``: real data, real
compression ratios), about ``size_mb`` MiB in three gzip layers, packed as an OCI archive. The
baseline is what a careless importer would do: ``tar -xzf`` every layer into one directory and
``mkfs.erofs`` it, no whiteouts, no confinement, no ownership shift. Targets: import ≤ 2× the
baseline, a no-change rebuild ≤ 1 s (from the archive, and from an OCI layout directory, which
asks skopeo for the manifest digest).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.errors import NotFound
from shoal.images.oci_layout import write_archive, write_layout
from shoal.images.store import TemplateStore

if TYPE_CHECKING:
    from shoal.engine import Engine

TARGETS = {"import_vs_baseline_ratio": 2.0, "no_change_rebuild_s": 1.0}
NAME = "bench-oci-import"
SOURCES = ("/usr/lib", "/usr/share")


def _layers(size_mb: int, count: int = 3) -> list[bytes]:
    """``count`` tar layers of host files, ``size_mb`` MiB of file data in all."""
    budget, per = size_mb * 2**20, size_mb * 2**20 // count
    layers, buf, used, tar = [], io.BytesIO(), 0, None
    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
    for top in SOURCES:
        for root, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                    if not (os.path.isfile(path) and not os.path.islink(path)) or st.st_size > 16 * 2**20:
                        continue
                    tar.add(path, arcname=path.lstrip("/"), recursive=False)
                except OSError:
                    continue
                used += st.st_size
                if used >= per * (len(layers) + 1):
                    tar.close()
                    layers.append(buf.getvalue())
                    if len(layers) == count or used >= budget:
                        return layers
                    buf = io.BytesIO()
                    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
    tar.close()
    layers.append(buf.getvalue())
    return layers


def _remove(store: TemplateStore) -> None:
    try:
        store.remove(NAME)
    except NotFound:
        pass


def run_image_benchmarks(store: TemplateStore, size_mb: int = 100) -> dict:
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-images-", dir="/var/tmp"))
    try:
        layers = _layers(size_mb)
        layout = work / "layout"
        write_layout(layout, layers, {"Env": ["BENCH=1"]})
        archive = work / "image.tar"
        write_archive(layout, archive)
        blobs = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)[-len(layers):]

        out = work / "baseline"
        out.mkdir()
        started = time.perf_counter()
        for blob in blobs:  # layer blobs are the largest ones; order does not matter for timing
            subprocess.run(["tar", "-xzf", str(blob), "-C", str(out)], check=True, capture_output=True)
        subprocess.run(["mkfs.erofs", "-zlz4", str(work / "baseline.erofs"), str(out)], check=True,
                       capture_output=True)
        baseline = time.perf_counter() - started
        shutil.rmtree(out)

        _remove(store)
        started = time.perf_counter()
        info = store.build_image(NAME, str(archive))
        imported = time.perf_counter() - started
        started = time.perf_counter()
        store.build_image(NAME, str(archive))
        rebuild_archive = time.perf_counter() - started
        _remove(store)
        store.build_image(NAME, str(layout))
        started = time.perf_counter()
        store.build_image(NAME, str(layout))
        rebuild_layout = time.perf_counter() - started
        _remove(store)
        return {
            "image_mib": round(sum(len(layer) for layer in layers) / 2**20, 1),
            "archive_mib": round(archive.stat().st_size / 2**20, 1),
            "template_mib": round((info.size_bytes or 0) / 2**20, 1),
            "baseline_tar_x_mkfs_s": round(baseline, 3),
            "import_s": round(imported, 3),
            "import_vs_baseline_ratio": round(imported / baseline, 2),
            "no_change_rebuild_s": round(max(rebuild_archive, rebuild_layout), 3),
            "no_change_rebuild_archive_s": round(rebuild_archive, 3),
            "no_change_rebuild_layout_s": round(rebuild_layout, 3),
            "targets": TARGETS,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(result: dict) -> str:
    lines = [f"image import ({result['image_mib']} MiB in layers, {result['archive_mib']} MiB archive, "
             f"{result['template_mib']} MiB template)"]
    ratio, rebuild = result["import_vs_baseline_ratio"], result["no_change_rebuild_s"]
    goal = TARGETS["import_vs_baseline_ratio"]
    lines.append(f"  import from OCI archive   {result['import_s']:.2f} s   baseline tar -x + mkfs.erofs "
                 f"{result['baseline_tar_x_mkfs_s']:.2f} s   ratio {ratio:.2f} (target ≤ {goal})"
                 f"  {'ok' if ratio <= goal else 'MISSED'}")
    lines.append(f"  no-change rebuild         {rebuild:.3f} s (archive {result['no_change_rebuild_archive_s']:.3f}, "
                 f"layout dir {result['no_change_rebuild_layout_s']:.3f}; target ≤ {TARGETS['no_change_rebuild_s']} s)"
                 f"  {'ok' if rebuild <= TARGETS['no_change_rebuild_s'] else 'MISSED'}")
    df = result.get("dockerfile")
    if df:
        again = df["dockerfile_no_change_rebuild_s"]
        lines.append(f"  Dockerfile no-change      {again:.3f} s (first build {df['dockerfile_first_build_s']:.3f} s; "
                     f"target ≤ {TARGETS['no_change_rebuild_s']} s)  "
                     f"{'ok' if again <= TARGETS['no_change_rebuild_s'] else 'MISSED'}")
    return "\n".join(lines)


DOCKERFILE_BENCH = "FROM minimal\nENV BENCH=1\nRUN echo built > /bench\nCOPY data.txt /data.txt\nCMD [\"sh\"]\n"


def run_dockerfile_benchmark(engine: Engine) -> dict:
    """A Dockerfile build (FROM minimal, a RUN, a COPY), then the same build again with nothing changed:
    the second must be a cache hit answered without a sandbox (target ≤ 1 s, ``no_change_rebuild_s``)."""
    import secrets

    from shoal.images.dockerfile import build_dockerfile
    name = f"bench-df-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="shoal-bench-df-") as tmp:
        ctx = Path(tmp)
        (ctx / "Dockerfile").write_text(DOCKERFILE_BENCH)
        (ctx / "data.txt").write_text(secrets.token_hex(16))  # a new context each run: the first build is real
        try:
            started = time.perf_counter()
            build_dockerfile(engine, name, ctx / "Dockerfile", ctx)
            first = time.perf_counter() - started
            started = time.perf_counter()
            build_dockerfile(engine, name, ctx / "Dockerfile", ctx)
            again = time.perf_counter() - started
        finally:
            engine.templates.remove(name)
    return {"dockerfile_first_build_s": round(first, 3), "dockerfile_no_change_rebuild_s": round(again, 3),
            "target_no_change_rebuild_s": TARGETS["no_change_rebuild_s"]}
