"""The ``linux`` runtime: a sandbox is an OCI bundle run by crun, its root an overlay on EROFS.

Bringing a sandbox up is a straight list of named steps; if one fails, the steps already taken
are undone by ``destroy`` (which tolerates any of them being absent), so a failed create leaves
nothing behind. Every host resource is named after the sandbox id:

* ``<state>/layers/<id>.ext4``  the ``disk`` writable layer's image (``storage.layers``): it outlives the
  bundle, so a sandbox paused to its filesystem, or cut off by a host restart, starts again from it
* ``<run>/sandboxes/<id>/``  bundle: ``config.json``, ``upper`` (the writable layer's mount),
  ``rootfs`` (the overlay), ``agent.sock`` (host-only), ``init.pid``, ``upper/agent.log`` (PID 1's
  stdout/stderr: inside the writable layer's tmpfs, so what the sandbox writes there counts against its
  disk limit, yet outside ``upper/upper``, so the sandbox cannot see it)
* crun container and cgroup ``shoal-<instance>-<id>`` (crun's state under ``<run>/crun``)

The instance (``Settings.instance``) keeps two Shoal instances on one host apart: each names, finds
and reconciles only its own resources, and a run directory belongs to one instance (``<run>/instance``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from shoal.errors import CapacityExceeded, Conflict, RuntimeFailure, ShoalError, from_errno
from shoal.runtime import agent_runtime
from shoal.runtime.base import Capabilities, SandboxSpec
from shoal.runtime.linux import budgets, cgroups, mounts, oci, oom, userns_pool
from shoal.settings import Settings
from shoal.storage import ready_layers
from shoal.storage.layers import DiskUsage, WritableLayers
from shoal.storage.mount_points import symlink_on_path

INSTANCE_MARK = "instance"


log = logging.getLogger("shoal.runtime")


class LinuxRuntime:
    """Namespaces + cgroups + seccomp through crun. See ``oci.config`` for the isolation itself."""

    name = "linux"
    capabilities = Capabilities(freeze=True, memory_snapshot=False, filesystem_snapshot=True)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.crun = shutil.which("crun") or "/usr/bin/crun"
        if not os.path.exists(self.crun):
            raise RuntimeFailure("crun is not installed (apt install crun)", step="runtime")
        cgroups.prepare_host()
        budgets.prepare_host()
        self._claim_run_dir()
        self.userns_pool = userns_pool.UsernsPool(settings.run_dir / "userns", settings.uid_base, settings.uid_count)
        atexit.register(self.userns_pool.close)
        for d in (settings.sandboxes_dir, settings.crun_root):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o711)  # traversable by the sandbox uid while crun sets up, not listable
        self._runtime_dir: Path | None = None
        self.layers = WritableLayers(settings)
        atexit.register(self.layers.ready.close)

    def _claim_run_dir(self) -> None:
        """Refuse a run directory that another instance uses: its bundles would look like our leaks."""
        run_dir = self.settings.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        mark = run_dir / INSTANCE_MARK
        try:
            fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = mark.read_text().strip()
            if owner != self.settings.instance:
                raise Conflict(f"run directory {run_dir} belongs to Shoal instance '{owner}', not "
                               f"'{self.settings.instance}' (state {self.settings.state_dir}): give each "
                               "instance its own SHOAL_RUN_DIR") from None
            return
        with os.fdopen(fd, "w") as f:
            f.write(self.settings.instance + "\n")

    # paths ---------------------------------------------------------------------------------
    def bundle(self, sandbox_id: str) -> Path:
        return self.settings.sandboxes_dir / sandbox_id

    def agent_socket(self, sandbox_id: str) -> Path:
        return self.bundle(sandbox_id) / "agent.sock"

    def container(self, sandbox_id: str) -> str:
        """The crun container and cgroup name: ``shoal-<instance>-<id>``."""
        return self.settings.resource_name(sandbox_id)

    def runtime_dir(self) -> Path:
        if self._runtime_dir is None:
            self._runtime_dir = agent_runtime.mounted(self.settings)
        return self._runtime_dir

    # lifecycle -----------------------------------------------------------------------------
    def create(self, spec: SandboxSpec) -> Path:
        sid = spec.sandbox_id
        bundle = self.bundle(sid)
        try:
            bundle.mkdir(mode=0o711)
        except FileExistsError as exc:
            raise Conflict(f"sandbox {sid} already exists on this host") from exc
        step = "upper"
        try:
            self._make_upper(spec, bundle)
            step = "rootfs"
            (bundle / "rootfs").mkdir()
            mounts.mount_overlay(bundle / "rootfs", [*spec.lower_layers, spec.lower_dir], bundle / "upper/upper",
                                 bundle / "upper/work", cwd=bundle)
            step = "user namespace"
            os.symlink(self.userns_pool.claim(), bundle / "userns")  # see userns_pool: made ahead of time
            step = "config"
            # At the writable layer's own top level (the sandbox sees only its upper/): its mountinfo then
            # names the file by its path in the layer, "/boot_id", never a host path.
            boot_id = bundle / "upper" / "boot_id"
            boot_id.write_text((spec.boot_id or str(uuid.uuid4())) + "\n")
            cfg = oci.config(spec, str(self.runtime_dir()), self.settings.uid_base, self.settings.uid_count,
                             cgroup=self.container(sid), userns=str(bundle / "userns"), boot_id_file=str(boot_id))
            (bundle / "config.json").write_text(json.dumps(cfg))
            step = "crun run"
            self._run(sid, bundle)
            step = "oom score"
            oom.protect(self._started_pid(sid))
        except ShoalError:
            self.destroy(sid, keep_files=spec.keep_files)
            raise
        except OSError as exc:
            self.destroy(sid, keep_files=spec.keep_files)
            err = from_errno(exc, f"sandbox {sid}: {step}")
            raise (err if isinstance(err, CapacityExceeded) else RuntimeFailure(err.message, step, sid)) from exc
        return self.agent_socket(sid)

    def _make_upper(self, spec: SandboxSpec, bundle: Path) -> None:
        """The writable layer (``storage.layers``: an ext4 image on the host's disk, or a tmpfs), owned by
        sandbox root, with the hostname files. With ``spec.keep_files`` it is the sandbox's own layer again,
        and nothing inside the sandbox's tree is touched: sandbox code wrote it, so the host must not
        follow a path in it."""
        base = self.settings.uid_base
        upper = bundle / "upper"
        upper.mkdir()
        self.layers.mount(spec.layer, spec.sandbox_id, spec.disk_mb, upper, fresh=not spec.keep_files)
        if spec.keep_files:
            for d in ("upper", "work"):  # the layer's own top level: the sandbox never sees it
                if not (upper / d).is_dir() or (upper / d).is_symlink():
                    raise RuntimeFailure(f"the writable layer of {spec.sandbox_id} has no {d}/ directory",
                                         "writable layer", spec.sandbox_id)
            # The sandbox wrote this layer: a volume's mount point may now be a symlink (``/x -> /.shoal``),
            # which crun would follow. Nothing runs in the sandbox now, so the lstat walk cannot be raced.
            for _, dest, _ in spec.volumes:
                link = symlink_on_path([upper / "upper"], dest)
                if link is not None:
                    raise Conflict(f"sandbox {spec.sandbox_id}: volume mount point {dest} is under a symlink the "
                                   f"sandbox made ({link}); move it away inside the sandbox's files or drop the volume")
            return
        ready_layers.prepare(upper, base)  # done already if the layer was mounted ahead of time
        etc_lower = spec.lower_dir / "etc"
        if etc_lower.is_dir():  # keep /etc's own mode and owner in the merged view
            st = etc_lower.stat()
            os.chmod(upper / "upper/etc", st.st_mode & 0o7777)
            os.chown(upper / "upper/etc", st.st_uid, st.st_gid)
        hosts = (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                 f"127.0.1.1\t{spec.sandbox_id}\n")
        for name, text in (("hostname", spec.sandbox_id + "\n"), ("hosts", hosts), *spec.etc_files.items()):
            path = upper / "upper/etc" / name
            path.write_text(text)
            os.chown(path, base, base)

    def _run(self, sid: str, bundle: Path) -> None:
        """``crun run -d`` with the listening agent socket as fd 3 of the container's init."""
        sock_path = self.agent_socket(sid)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        log = os.open(self._log_path(bundle), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            listener.bind(str(sock_path))
            listener.listen(256)
            argv = [self.crun, "--root", str(self.settings.crun_root), "run", "-d", "--preserve-fds", "1",
                    "--pid-file", str(bundle / "init.pid"), "--bundle", str(bundle), self.container(sid)]
            pid = os.posix_spawn(self.crun, argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2),
                (os.POSIX_SPAWN_DUP2, listener.fileno(), 3)])
            _, status = os.waitpid(pid, 0)
        finally:
            listener.close()
            os.close(log)
            os.close(null)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeFailure(f"crun failed to start the sandbox: {self._log_tail(bundle)}", "crun run", sid)

    @staticmethod
    def _log_path(bundle: Path) -> Path:
        """PID 1's stdout/stderr (crun's start-up errors too): sandbox root can append to it through
        ``/proc/1/fd/2``, so it lives on the sandbox's own size-limited tmpfs, never on a host disk."""
        return bundle / "upper" / "agent.log"

    @classmethod
    def _log_tail(cls, bundle: Path) -> str:
        try:
            with open(cls._log_path(bundle), "rb") as f:  # the last lines; the file may be disk_mb large
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                text = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(text[-3:]) or "no output"

    def _started_pid(self, sandbox_id: str) -> int:
        """The init pid crun just wrote: our own file (the sandbox cannot reach the bundle)."""
        pid = self.init_pid(sandbox_id)
        if pid is None:
            raise RuntimeFailure("crun started the sandbox but wrote no pid file", "crun run", sandbox_id)
        return pid

    def init_pid(self, sandbox_id: str) -> int | None:
        try:
            return int((self.bundle(sandbox_id) / "init.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def is_alive(self, sandbox_id: str) -> bool:
        pid = self.init_pid(sandbox_id)
        return pid is not None and pid in cgroups.pids(self.container(sandbox_id))

    def destroy(self, sandbox_id: str, keep_files: bool = False) -> None:
        """Kill everything of the sandbox and free every host resource; safe to call twice.

        ``keep_files`` keeps its ``disk`` layer's image (pause to filesystem, a host restart): the layer
        is unmounted strictly and synced first, so the image is whole and mounted nowhere on return."""
        bundle = self.bundle(sandbox_id)
        name = self.container(sandbox_id)
        cgroups.thaw(name)
        if (self.settings.crun_root / name).exists():
            self._crun("delete", "-f", name)
        if cgroups.pids(name):  # crun's state was lost: kill through the cgroup
            cgroups.kill_all(name)
            deadline = time.monotonic() + 5
            while cgroups.pids(name) and time.monotonic() < deadline:
                time.sleep(0.01)
        cgroups.remove(name)
        shutil.rmtree(self.settings.crun_root / name, ignore_errors=True)
        if keep_files:
            mounts.umount(bundle / "rootfs", strict=True)
            self.layers.unmount(bundle / "upper")
        mounts.umount_tree(bundle)
        self._release_userns(bundle)
        shutil.rmtree(bundle, ignore_errors=True)
        if not keep_files:
            self.layers.remove(sandbox_id)

    def pools_full(self) -> bool:
        return self.userns_pool.full() and self.layers.ready.full()

    def close_pools(self) -> None:
        """Free the user namespaces and mounted layers this process keeps ready (also done at exit)."""
        self.userns_pool.close()
        self.layers.ready.close()

    def prune(self) -> None:
        """The agent runtimes of other versions (``agent_runtime.prune``)."""
        for path in agent_runtime.prune(self.settings):
            log.info("old agent runtime removed: %s", path)

    def has_leftovers(self, sandbox_id: str) -> bool:
        """Whether anything of the sandbox but its kept files is on the host (a bundle, crun's state, a
        cgroup): what a crashed pause or resume leaves, and ``destroy(keep_files=True)`` clears."""
        name = self.container(sandbox_id)
        return (self.bundle(sandbox_id).exists() or (self.settings.crun_root / name).exists()
                or cgroups.exists(name))

    def _release_userns(self, bundle: Path) -> None:
        """Free the sandbox's user namespace file (the bundle links to it in ``<run>/userns``)."""
        try:
            target = Path(os.readlink(bundle / "userns"))
        except OSError:
            return
        if target.parent == self.userns_pool.directory:  # never act on a link pointing elsewhere
            userns_pool.release(target)

    def _userns_in_use(self) -> set[Path]:
        in_use = set()
        try:
            for entry in os.scandir(self.settings.sandboxes_dir):
                try:
                    in_use.add(Path(os.readlink(Path(entry.path) / "userns")))
                except OSError:
                    pass
        except OSError:
            pass
        return in_use

    def has_files(self, sandbox_id: str) -> bool:
        """True if the sandbox's files are on the host without it (its ``disk`` layer's image)."""
        return self.layers.has_files(sandbox_id)

    def disk_usage(self, sandbox_id: str) -> DiskUsage | None:
        """Used/total bytes of the sandbox's mounted writable layer (``None`` while it is not mounted)."""
        return self.layers.usage(self.bundle(sandbox_id) / "upper")

    def pause(self, sandbox_id: str) -> None:
        """Freeze every process of the sandbox (cgroup freezer): memory stays, CPU drops to zero. Written
        to the freezer directly, as ``resume`` thaws; crun if that did not take."""
        if not cgroups.freeze(self.container(sandbox_id)):
            self._crun_checked("pause", sandbox_id)

    def stop(self, sandbox_id: str) -> None:
        """Stop every process and free the sandbox's memory, keeping its files (``create`` with
        ``keep_files`` starts it again from them)."""
        if not self.has_files(sandbox_id):
            raise Conflict(f"sandbox {sandbox_id} keeps its files in memory (layer ram): it cannot stop "
                           "without losing them")
        self.destroy(sandbox_id, keep_files=True)

    def resume(self, sandbox_id: str) -> None:
        """Thaw by writing the cgroup freezer directly, which is all ``crun resume`` does, without starting
        a crun process (~5 ms): waking from standby sits on a request's path. crun if that did not take."""
        name = self.container(sandbox_id)
        cgroups.thaw(name)
        if cgroups.frozen(name):
            self._crun_checked("resume", sandbox_id)

    def thaw(self, sandbox_id: str) -> None:
        """Unfreeze the sandbox if it is frozen (a snapshot whose daemon died mid-way); a no-op otherwise."""
        cgroups.thaw(self.container(sandbox_id))

    def upper_dir(self, sandbox_id: str) -> Path:
        """The overlay's upper directory (what the sandbox changed), for snapshots; host-made, never a link."""
        return self.bundle(sandbox_id) / "upper" / "upper"

    def _crun_checked(self, verb: str, sandbox_id: str) -> None:
        code, err = self._crun(verb, self.container(sandbox_id))
        if code != 0:
            raise RuntimeFailure(f"crun {verb} failed: {err.strip() or code}", f"crun {verb}", sandbox_id)

    def _crun(self, *args: str) -> tuple[int, str]:
        """Run crun with our state root; return its exit code and stderr."""
        import tempfile
        with tempfile.TemporaryFile() as err:
            pid = os.posix_spawn(self.crun, [self.crun, "--root", str(self.settings.crun_root), *args],
                                 {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                 file_actions=[(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                                               (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
            _, status = os.waitpid(pid, 0)
            err.seek(0)
            return os.waitstatus_to_exitcode(status), err.read().decode(errors="replace")

    def existing(self) -> set[str]:
        """Ids of this instance's sandboxes that hold anything on the host (never another instance's).

        Reconcile starts here, so user namespace files that no sandbox holds and whose maker died go now."""
        self.userns_pool.sweep(self._userns_in_use())
        self.layers.ready.sweep()
        prefix = self.settings.resource_prefix
        found = set(cgroups.existing(prefix))
        try:
            found.update(e.name[len(prefix):] for e in os.scandir(self.settings.crun_root)
                         if e.name.startswith(prefix))
        except OSError:
            pass
        try:  # the run directory is this instance's alone (``_claim_run_dir``)
            found.update(e.name for e in os.scandir(self.settings.sandboxes_dir))
        except OSError:
            pass
        found.update(self.layers.existing())  # so is the state directory
        return found

    def usage(self, sandbox_id: str) -> dict[str, int | None]:
        return cgroups.usage(self.container(sandbox_id))

    def oom_kills(self, sandbox_id: str) -> int | None:
        return cgroups.oom_kills(self.container(sandbox_id))
