"""Template images, built and mounted for real (root, erofs-utils, busybox-static; no mocks)."""

from __future__ import annotations

import os
import stat
import struct
import threading
from pathlib import Path

import pytest

from shoal.errors import Conflict, NotFound
from shoal.images import RECIPES, Recipe, TemplateStore
from shoal.runtime.linux import mounts
from shoal.settings import Settings

EROFS_MAGIC = 0xE0F5E1E2  # little-endian u32 at byte 1024 of the image

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="template builds and mounts need root")


def mountinfo_count(point: Path) -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == str(point))


@pytest.fixture
def settings(tmp_path: Path):
    s = Settings(state_dir=tmp_path / "state", run_dir=tmp_path / "run")
    yield s
    mounts.umount_tree(tmp_path)


@pytest.fixture
def store(settings: Settings) -> TemplateStore:
    return TemplateStore(settings)


@pytest.fixture
def built(store: TemplateStore):
    return store.build("minimal")


def test_build_minimal_is_cached(store: TemplateStore):
    phases: list[tuple[str, float | None]] = []
    first = store.build("minimal", progress=lambda m, f: phases.append((m, f)))
    assert first.built and first.size_bytes and first.size_bytes > 100_000
    assert first.image_path.is_file() and first.built_at
    assert [m for m, f in phases if f is not None][-3:][0] == "shifting ownership"
    assert phases[-1][1] == 1.0

    inode = first.image_path.stat().st_ino
    phases.clear()
    again = store.build("minimal", progress=lambda m, f: phases.append((m, f)))
    # cached: no build phase ran, and the very same image file is in place (how fast: ``shoal bench``)
    assert not [m for m, _ in phases if m == "shifting ownership"], phases
    assert again.built_at == first.built_at and again.image_path.stat().st_ino == inode

    forced = store.build("minimal", force=True)
    assert forced.built_at != first.built_at


def test_image_is_erofs(built):
    with open(built.image_path, "rb") as f:
        f.seek(1024)
        assert struct.unpack("<I", f.read(4))[0] == EROFS_MAGIC


def test_mount_once_and_ownership_shifted(store: TemplateStore, settings: Settings, built):
    point = store.mount("minimal")
    assert store.mount("minimal") == point
    assert point == settings.template_mounts_dir / f"minimal-{built.digest}"
    assert mountinfo_count(point) == 1
    assert store.is_mounted("minimal") and store.get("minimal").mounted

    assert os.stat(point / "bin/busybox").st_uid == settings.uid_base
    assert os.lstat(point / "bin/sh").st_uid == settings.uid_base  # symlinks shifted too
    assert os.readlink(point / "bin/sh") == "/bin/busybox"
    assert os.stat(point / "home/user").st_uid == settings.uid_base + 1000
    assert stat.S_IMODE(os.stat(point / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(point / "root").st_mode) == 0o700
    assert (point / ".shoal").is_dir() and (point / "proc").is_dir()
    assert "user:x:1000:1000" in (point / "etc/passwd").read_text()
    with pytest.raises(OSError):
        (point / "newfile").write_text("read-only")


def test_concurrent_mounts_mount_once(store: TemplateStore, built):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(store.mount("minimal"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert mountinfo_count(results[0]) == 1


def test_concurrent_builds_build_once(store: TemplateStore):
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.build("minimal"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.built_at for r in results}) == 1


def test_list_shows_built_and_unbuilt(store: TemplateStore):
    before = {t.name: t for t in store.list()}
    assert set(before) == set(store.known()) >= {"minimal", "base"}
    assert not before["minimal"].built and before["minimal"].size_bytes is None
    store.build("minimal")
    after = {t.name: t for t in store.list()}
    assert after["minimal"].built and not after["minimal"].mounted


def test_remove_unmounts_and_deletes(store: TemplateStore, built):
    point = store.mount("minimal")
    store.remove("minimal")
    assert mountinfo_count(point) == 0 and not point.exists()
    assert not built.image_path.exists()
    assert not store.get("minimal").built
    with pytest.raises(NotFound):
        store.remove("minimal")
    with pytest.raises(NotFound, match="shoal template build minimal"):
        store.mount("minimal")


def test_remove_refuses_while_in_use(store: TemplateStore, tmp_path: Path, built):
    """An overlay on top of the template (what a sandbox does) makes it busy: Conflict, nothing deleted."""
    lower = store.mount("minimal")
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    mounts.mount("overlay", merged, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")
    try:
        assert (merged / "bin/busybox").exists()
        with pytest.raises(Conflict, match="in use"):
            store.remove("minimal")
        assert store.get("minimal").mounted and built.image_path.exists()
    finally:
        mounts.umount(merged)
    store.remove("minimal")
    assert not store.get("minimal").built


def test_unknown_template(store: TemplateStore):
    with pytest.raises(NotFound, match=r"unknown template 'nope' \(known: minimal, base"):
        store.get("nope")
    for call in (store.build, store.mount, store.remove):
        with pytest.raises(NotFound):
            call("nope")


def test_child_recipe_starts_from_parent(settings: Settings):
    def populate(tree: Path, log, cache_dir: Path) -> None:
        assert (tree / "bin/busybox").is_file() and os.stat(tree / "bin/busybox").st_uid == 0
        (tree / "etc/child").write_text("hello\n")

    recipes = dict(RECIPES, child=Recipe("child", "minimal + a file", "7", populate, parent="minimal"))
    store = TemplateStore(settings, recipes)
    info = store.build("child")
    assert info.version == "1+7" and info.parent == "minimal"
    assert store.get("minimal").built  # the parent was built on the way
    point = store.mount("child")
    assert (point / "etc/child").read_text() == "hello\n"
    assert os.stat(point / "bin/busybox").st_uid == settings.uid_base  # shifted once, not twice
    assert os.stat(point / "home/user").st_uid == settings.uid_base + 1000


@pytest.mark.slow
def test_build_base():
    """Builds into the real state dir on purpose: the image is cached there for every later run."""
    store = TemplateStore(Settings())
    info = store.build("base")
    assert info.built and info.size_bytes
    point = store.mount("base")
    assert os.path.lexists(point / "usr/bin/python3") and (point / "usr/bin/git").is_file()
    assert os.stat(point / "home/user").st_uid == 101000
    assert os.stat(point / "usr/bin/python3").st_uid == 100000
    sudo = os.stat(point / "usr/bin/sudo")
    assert sudo.st_mode & stat.S_ISUID, "set-uid bit lost by the ownership shift"
    assert stat.S_IMODE(os.stat(point / "etc/sudoers.d/user").st_mode) == 0o440
    assert not any((point / "usr/share/doc").iterdir())
    assert "user:x:1000:1000:user:/home/user:/bin/bash" in (point / "etc/passwd").read_text()


def test_failed_build_cleans_up_even_with_mounts_left_in_the_tree(settings: Settings):
    """Like a debootstrap that dies with /proc still mounted in the target: nothing is left behind."""
    def populate(tree: Path, log, cache_dir: Path) -> None:
        (tree / "proc").mkdir()
        mounts.mount("proc", tree / "proc", "proc")
        log("about to fail")
        raise RuntimeError("boom")

    store = TemplateStore(settings, {"broken": Recipe("broken", "fails", "1", populate)})
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        store.build("broken", progress=lambda m, f: lines.append(m))
    tdir = settings.templates_dir / "broken"
    assert not (tdir / ".build-tmp").exists()
    assert not mounts.mounts_under(tdir)
    assert "about to fail" in (tdir / "build.log").read_text()
    assert not store.get("broken").built
    assert Path("/proc/self").exists()  # rmtree did not walk into the mounted /proc
