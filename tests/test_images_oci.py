"""Templates from OCI images: layers applied as the image spec says, hostile layers refused, config
defaults reaching sandbox processes, a local registry (started here, on loopback) with a blob cache
shared between templates, instant no-change rebuilds, and the CLI.

Every image is built here from tar members (``oci_layout.write_layout``); the registry is Debian's
``docker-registry`` with its own config and storage in a temporary directory, stopped by its pid.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shoal.engine.engine import Engine
from shoal.errors import Conflict, Forbidden, InvalidRequest, NotFound
from shoal.images import TemplateStore
from shoal.images.image_templates import blobs_dir
from shoal.images.oci_layout import write_archive, write_layout

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "ls", "stat", "id", "pwd", "env", "echo", "readlink", "test")
USER_UID = 1000
CAP_NET_RAW_V2 = struct.pack("<IIIII", 0x02000000 | 1, 1 << 13, 0, 0, 0)  # effective, permitted: net_raw

pytestmark = pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo not installed (scripts/install.sh)")


# --- building layers ----------------------------------------------------------------------------
class Layer:
    """A layer tar built member by member."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0, **pax: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, 1_700_000_000
        info.pax_headers = dict(pax)
        return info

    def dir(self, name: str, mode: int = 0o755, uid: int = 0) -> Layer:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, uid))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, **pax: str) -> Layer:
        info = self._info(name, tarfile.REGTYPE, mode, uid, uid, **pax)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> Layer:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)
        return self

    def hardlink(self, name: str, target: str) -> Layer:
        info = self._info(name, tarfile.LNKTYPE, 0o644)
        info.linkname = target
        self.tar.addfile(info)
        return self

    def device(self, name: str) -> Layer:
        info = self._info(name, tarfile.CHRTYPE, 0o666)
        info.devmajor, info.devminor = 1, 3
        self.tar.addfile(info)
        return self

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def busybox_layer() -> Layer:
    layer = Layer().dir("bin").dir("etc").dir("root", 0o700).dir("home").dir("home/user", uid=USER_UID)
    layer.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in APPLETS:
        layer.hardlink(f"bin/{applet}", "bin/busybox")
    layer.file("etc/passwd", f"root:x:0:0:root:/root:/bin/sh\nuser:x:{USER_UID}:{USER_UID}::/home/user:/bin/sh\n"
               .encode())
    layer.file("etc/group", f"root:x:0:\nuser:x:{USER_UID}:\n".encode())
    return layer


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def store(engine: Engine) -> Iterator[TemplateStore]:
    yield engine.templates


@pytest.fixture
def template_name(store: TemplateStore) -> Iterator[Callable[[], str]]:
    """Fresh template names, each removed (with its blobs) after the test."""
    names: list[str] = []

    def make() -> str:
        names.append(f"t-oci-{secrets.token_hex(4)}")
        return names[-1]

    yield make
    for name in names:
        try:
            store.remove(name)
        except NotFound:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = root / "registry.log"
        (root / "storage").mkdir(parents=True)
        (root / "config.yml").write_text(
            f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {root}/storage\n"
            f"  delete:\n    enabled: true\nhttp:\n  addr: {self.host}\n")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-500:]}") from None
                time.sleep(0.05)

    def push(self, layout: Path, repo: str) -> str:
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}",
                        f"docker://{self.host}/{repo}"], check=True, capture_output=True)
        return f"{self.host}/{repo}"

    def blob_gets(self, digest: str) -> int:
        return sum(1 for line in self.log.read_text().splitlines()
                   if '"GET ' in line and f"/blobs/{digest} " in line)

    def blob_gets_all(self) -> int:
        return sum(1 for line in self.log.read_text().splitlines() if '"GET ' in line and "/blobs/sha256:" in line)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not shutil.which("docker-registry"):
        pytest.skip("docker-registry not installed (scripts/install.sh --test)")
    reg = Registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


def _layout(tmp_path: Path, layers: list[bytes], config: dict | None = None, name: str = "layout") -> Path:
    path = tmp_path / name
    write_layout(path, layers, config)
    return path


def _leaves_nothing(store: TemplateStore, name: str) -> None:
    with pytest.raises(NotFound):
        store.get(name)
    assert name not in [i.name for i in store.list()]
    tdir = store.settings.templates_dir / name
    left = sorted(p.name for p in tdir.iterdir()) if tdir.exists() else []
    assert set(left) <= {".lock", "build.log"}, left
    assert not list(store.settings.template_mounts_dir.glob(f"{name}-*"))
    referenced: set[str] = set()
    for other in store.list():
        meta = store._read_meta(other.name) or {}
        referenced.update(d.split(":")[1] for d in meta.get("blobs") or [])
    cached = {p.name for p in (blobs_dir(store) / "sha256").glob("*")}
    assert cached <= referenced, "unreferenced blobs left in the cache"


def _run(engine: Engine, sandbox_id: str, script: str, **kwargs: object) -> str:
    result = engine.agent(sandbox_id).run(["/bin/sh", "-c", script], **kwargs)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.stderr_bytes
    return result.stdout_bytes.decode()


# --- layers as the image spec says ----------------------------------------------------------------
def test_layers_whiteouts_opaque_links_setuid_xattrs(tmp_path: Path, engine: Engine, store: TemplateStore,
                                                    template_name: Callable[[], str],
                                                    new_sandbox: Callable[..., str]) -> None:
    lower = (busybox_layer().dir("a").file("a/keep", b"k").file("a/gone", b"g").dir("a/gonedir").file("a/gonedir/x")
             .dir("opq").file("opq/old1").dir("opq/sub").file("opq/sub/old2")
             .dir("data").file("data/orig", b"original\n", 0o4755, **{"SCHILY.xattr.user.shoal": "hello",
                               "SCHILY.xattr.security.capability": CAP_NET_RAW_V2.decode("utf-8", "surrogateescape"),
                               "SCHILY.xattr.trusted.overlay.opaque": "y"})
             .hardlink("data/hl1", "data/orig").symlink("lnk", "data/orig")
             .dir("usr").dir("usr/lib").symlink("lib", "usr/lib")
             .file("bin/sgid", b"#!/bin/sh\n", 0o2755))
    upper = (Layer().file("a/.wh.gone").file("a/.wh.gonedir")
             .file("opq/new", b"n").file("opq/.wh..wh..opq")  # opaque after a sibling of its own layer
             .hardlink("data/hl2", "data/orig")              # a hard link to a file of the layer below
             .file("lib/fromlink", b"through the in-tree symlink\n")
             .symlink("lnk2", "/data/orig")
             .file("home/user/mine", b"u", 0o600, uid=USER_UID))
    name = template_name()
    info = store.build_image(name, str(_layout(tmp_path, [lower.bytes(), upper.bytes()])))
    assert info.built and info.source.startswith("oci:")
    root = store.mount(name)
    base = store.settings.uid_base
    assert (root / "a/keep").exists() and not (root / "a/gone").exists() and not (root / "a/gonedir").exists()
    assert sorted(os.listdir(root / "opq")) == ["new"]
    orig = os.lstat(root / "data/orig")
    assert os.lstat(root / "data/hl1").st_ino == orig.st_ino == os.lstat(root / "data/hl2").st_ino
    assert orig.st_nlink == 3
    assert os.readlink(root / "lnk") == "data/orig" and os.readlink(root / "lnk2") == "/data/orig"
    assert (root / "usr/lib/fromlink").read_bytes() == b"through the in-tree symlink\n"
    assert os.path.islink(root / "lib")
    assert stat.S_IMODE(orig.st_mode) == 0o4755 and (orig.st_uid, orig.st_gid) == (base, base)
    assert stat.S_IMODE(os.lstat(root / "bin/sgid").st_mode) == 0o2755
    assert os.lstat(root / "home/user/mine").st_uid == base + USER_UID
    assert os.getxattr(root / "data/orig", "user.shoal") == b"hello"
    caps = os.getxattr(root / "data/orig", "security.capability")
    assert struct.unpack_from("<I", caps)[0] >> 24 == 3 and struct.unpack_from("<I", caps, 20)[0] == base
    assert "trusted.overlay.opaque" not in os.listxattr(root / "data/orig")

    sid = new_sandbox(name)
    out = _run(engine, sid, "stat -c '%a %u %h' /data/orig; cat /lib/fromlink /data/hl2; ls /opq; id -u")
    assert out.split("\n") == ["4755 0 3", "through the in-tree symlink", "original", "new", "0", ""]
    assert _run(engine, sid, "stat -c %u /home/user/mine") == f"{USER_UID}\n"


def test_image_config_defaults_reach_processes(tmp_path: Path, engine: Engine, store: TemplateStore,
                                               template_name: Callable[[], str],
                                               new_sandbox: Callable[..., str]) -> None:
    config = {"Env": ["FOO=from-image", "PATH=/opt/tool/bin:/bin"], "WorkingDir": "/srv/app", "User": "user",
              "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "ExposedPorts": {"8080/tcp": {}}}
    name = template_name()
    info = store.build_image(name, str(_layout(tmp_path, [busybox_layer().bytes()], config)))
    assert info.defaults == {"env": {"FOO": "from-image", "PATH": "/opt/tool/bin:/bin"}, "working_dir": "/srv/app",
                             "user": "user", "entrypoint": ["/bin/sh", "-c"], "cmd": ["echo hi"],
                             "exposed_ports": ["8080/tcp"]}
    sid = new_sandbox(name)
    out = _run(engine, sid, "echo $FOO; echo $PATH; pwd; id -u")
    assert out == f"from-image\n/opt/tool/bin:/bin\n/srv/app\n{USER_UID}\n"
    # the request's own user, cwd and env win over the image's
    assert _run(engine, sid, "id -u; pwd; echo $FOO", user="root", cwd="/", env={"FOO": "mine"}) == "0\n/\nmine\n"
    sid2 = new_sandbox(name, env={"FOO": "from-create"})
    assert _run(engine, sid2, "echo $FOO") == "from-create\n"


# --- sources, the registry, the blob cache ------------------------------------------------------
def test_archives_and_registry_with_shared_layer_cache(tmp_path: Path, store: TemplateStore, registry: Registry,
                                                       template_name: Callable[[], str]) -> None:
    shared = busybox_layer().bytes()
    one = _layout(tmp_path, [shared, Layer().file("etc/which", b"one\n").bytes()], name="one")
    two = _layout(tmp_path, [shared, Layer().file("etc/which", b"two\n").bytes()], name="two")
    ref_one, ref_two = registry.push(one, "shoal/one:v1"), registry.push(two, "shoal/two:v1")
    shared_digest = json.loads((tmp_path / "one/index.json").read_text())  # the manifest → first layer
    manifest = json.loads((one / "blobs/sha256" / shared_digest["manifests"][0]["digest"][7:]).read_bytes())
    layer_digest = manifest["layers"][0]["digest"]

    # plain HTTP only when asked
    with pytest.raises(InvalidRequest, match="--insecure-registry"):
        store.build_image(template_name(), ref_one)
    a, b = template_name(), template_name()
    assert store.build_image(a, ref_one, insecure=True).built
    assert registry.blob_gets(layer_digest) == 1
    assert (store.mount(a) / "etc/which").read_text() == "one\n"
    store.build_image(b, ref_two, insecure=True)
    assert registry.blob_gets(layer_digest) == 1, "the shared layer was downloaded again"
    assert (store.mount(b) / "etc/which").read_text() == "two\n"

    # a rebuild with nothing changed fetches no blob and keeps the image
    before, gets = store.get(a), registry.blob_gets_all()
    assert store.build_image(a, ref_one, insecure=True).built_at == before.built_at
    assert registry.blob_gets_all() == gets

    # digest pinning: the right digest builds, a wrong one is refused
    pinned = f"{registry.host}/shoal/one@{shared_digest['manifests'][0]['digest']}"
    assert (store.mount(store.build_image(template_name(), pinned, insecure=True).name) / "etc/which").exists()
    wrong = template_name()
    with pytest.raises(NotFound):
        store.build_image(wrong, f"{registry.host}/shoal/one@sha256:{'0' * 64}", insecure=True)
    _leaves_nothing(store, wrong)
    missing = template_name()
    with pytest.raises(NotFound):
        store.build_image(missing, f"{registry.host}/shoal/nothing:v1", insecure=True)
    _leaves_nothing(store, missing)

    # OCI archive and docker save archive of the same image
    write_archive(one, tmp_path / "one.tar")
    c = template_name()
    assert store.build_image(c, str(tmp_path / "one.tar")).source.startswith("oci-archive:")
    assert (store.mount(c) / "etc/which").read_text() == "one\n"
    built_at = store.get(c).built_at
    assert store.build_image(c, str(tmp_path / "one.tar")).built_at == built_at  # unchanged archive: instant
    subprocess.run(["skopeo", "copy", f"oci:{one}", f"docker-archive:{tmp_path}/one-docker.tar:shoal/one:v1"],
                   check=True, capture_output=True)
    d = template_name()
    assert store.build_image(d, str(tmp_path / "one-docker.tar")).source.startswith("docker-archive:")
    assert (store.mount(d) / "etc/which").read_text() == "one\n"


def test_registry_credentials_are_refused_or_used(tmp_path: Path, store: TemplateStore, registry: Registry,
                                                  template_name: Callable[[], str]) -> None:
    """A registry asking for credentials: none → Forbidden with the hint; wrong ones → Forbidden."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # glibc's libxcrypt makes the bcrypt hashes the registry's htpasswd wants
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("shoal:" + crypt.crypt("secret", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)) + "\n")
    root = tmp_path / "authreg"
    root.mkdir()
    reg = Registry.__new__(Registry)
    reg.root, reg.port = root, _free_port()
    reg.host, reg.log = f"127.0.0.1:{reg.port}", root / "registry.log"
    (root / "storage").mkdir()
    (root / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}/storage\nhttp:\n  addr: {reg.host}\n"
        f"auth:\n  htpasswd:\n    realm: shoal\n    path: {htpasswd}\n")
    with open(reg.log, "wb") as out:
        reg.proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=out,
                                    stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", reg.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and reg.proc.poll() is None
                time.sleep(0.05)
        layout = _layout(tmp_path, [busybox_layer().bytes()])
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", "shoal:secret",
                        f"oci:{layout}", f"docker://{reg.host}/private/img:v1"], check=True, capture_output=True)
        ref = f"{reg.host}/private/img:v1"
        for creds in (None, "shoal:wrong"):
            name = template_name()
            with pytest.raises(Forbidden):
                store.build_image(name, ref, insecure=True, credentials=creds)
            _leaves_nothing(store, name)
        assert store.build_image(template_name(), ref, insecure=True, credentials="shoal:secret").built
    finally:
        reg.stop()


# --- bad input: a clear error and nothing left ----------------------------------------------------
def _corrupt_digest(layout: Path) -> None:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    blob = layout / "blobs/sha256" / manifest["layers"][-1]["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["traversal", "absolute", "symlink-escape-hardlink", "device", "corrupt-tar",
                                  "bad-digest", "uid-range", "missing"])
def test_bad_images_give_one_clear_error_and_leave_nothing(case: str, tmp_path: Path, store: TemplateStore,
                                                           template_name: Callable[[], str]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    base = busybox_layer()
    layers: list[bytes]
    expected: type[Exception] = InvalidRequest
    if case == "traversal":
        layers = [base.file("../../../../escaped", b"x").bytes()]
    elif case == "absolute":
        layers = [base.file(str(outside / "escaped"), b"x").bytes()]
    elif case == "symlink-escape-hardlink":
        # a symlink planted by a lower layer, then a hard link through it to a host file: the link
        # resolves inside the tree, where the target does not exist
        layers = [base.symlink("esc", str(outside)).bytes(),
                  Layer().hardlink("stolen", f"esc/{'x' * 3}").bytes()]
        (outside / "xxx").write_text("host secret")
    elif case == "device":
        layers = [base.device("dev/mem").bytes()]
    elif case == "corrupt-tar":
        layers = [base.bytes(), b"this is not a tar archive at all" * 100]
    elif case == "uid-range":
        layers = [base.file("big-uid", b"x", uid=70000).bytes()]
    else:
        layers = [base.bytes()]
    name = template_name()
    if case == "missing":
        expected, ref = NotFound, str(tmp_path / "no-such-layout")
    else:
        layout = _layout(tmp_path, layers)
        if case == "bad-digest":
            _corrupt_digest(layout)
        ref = str(layout)
    with pytest.raises(expected) as err:
        store.build_image(name, ref)
    assert "\n" not in str(err.value) and len(str(err.value)) < 600
    assert sorted(os.listdir(outside)) == (["xxx"] if case == "symlink-escape-hardlink" else [])
    _leaves_nothing(store, name)


def test_entries_through_a_planted_symlink_stay_in_the_tree(tmp_path: Path, store: TemplateStore,
                                                            template_name: Callable[[], str]) -> None:
    """A lower layer's ``esc -> /abs/host/dir`` and ``up -> ../../..``, then files written through them:
    resolved inside the tree as a chroot would, never on the host."""
    outside = tmp_path / "outside"
    outside.mkdir()
    lower = busybox_layer().symlink("esc", str(outside)).symlink("up", "../../../..").bytes()
    upper = Layer().file("esc/planted", b"p").file("up/tmp/planted2", b"q").file("esc/.wh.nothing").bytes()
    name = template_name()
    store.build_image(name, str(_layout(tmp_path, [lower, upper])))
    root = store.mount(name)
    assert os.listdir(outside) == [] and not Path("/tmp/planted2").exists()
    assert (root / str(outside).lstrip("/") / "planted").read_bytes() == b"p"
    assert (root / "tmp/planted2").read_bytes() == b"q"


def test_names_and_refs_are_checked(store: TemplateStore, tmp_path: Path) -> None:
    layout = str(_layout(tmp_path, [busybox_layer().bytes()]))
    with pytest.raises(Conflict):
        store.build_image("minimal", layout)
    for bad in ("../x", "UPPER", "", "a/b"):
        with pytest.raises(InvalidRequest):
            store.build_image(bad, layout)
    for ref in ("-v", "--help", "a b", "x\0y"):
        with pytest.raises(InvalidRequest):
            store.build_image("t-oci-ref", ref)


# --- CLI ------------------------------------------------------------------------------------------
def _shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli.main", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_cli_build_ls_rm(tmp_path: Path, engine: Engine, store: TemplateStore, template_name: Callable[[], str],
                         new_sandbox: Callable[..., str]) -> None:
    name = template_name()
    layout = _layout(tmp_path, [busybox_layer().bytes(), Layer().file("etc/x", b"x").bytes()])
    proc = _shoal("template", "build", name, "--from-image", str(layout))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any("layer 1/2" in line for line in lines) and any("layer 2/2" in line for line in lines), lines
    sid = new_sandbox(name)
    listed = {t["name"]: t for t in json.loads(_shoal("template", "ls", "--json").stdout)}
    assert listed[name]["source"] == f"oci:{layout}" and listed[name]["used_by"] == [sid]
    assert listed[name]["size_bytes"] > 0 and listed[name]["built_at"]
    table = _shoal("template", "ls").stdout
    assert name in table and sid in table
    refused = _shoal("template", "rm", name)
    assert refused.returncode != 0 and "in use" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    engine.destroy(sid)
    assert _shoal("template", "rm", name).returncode == 0
    _leaves_nothing(store, name)
    bad = _shoal("template", "build", template_name(), "--from-image", str(tmp_path / "nope"))
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
