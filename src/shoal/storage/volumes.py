"""Named volumes on the host: one ext4 image each, mounted ONCE on the host, bind-mounted into sandboxes.

Why an ext4 image on a loop device (the same reasons as ``storage.layers``' ``disk`` layer, whose loop
helpers this reuses): the kernel enforces the size (a full volume is ENOSPC for the writer and nothing
else), the volume is one file that outlives every sandbox, the daemon and a reboot, and no host-side
code ever has to walk what sandboxes wrote.

Why mounted once: two ext4 mounts of one image corrupt it. The image is mounted at
``<run>/volumes/shoal-<instance>-vol-<id>`` by the first sandbox that needs it; every sandbox gets a
bind mount of that one mount (crun makes it inside the sandbox's mount namespace), and the host
unmounts it when no sandbox uses it any more. A mount is refused while a loop device still backs the
image (a sandbox being torn down still holds it).

Ownership: ``mkfs.ext4 -E root_owner`` makes the volume's root directory belong to sandbox root (uid
``uid_base`` on the host) when the image is made; the host never chowns anything inside it.

The host side never looks inside a volume: it makes the image, mounts, unmounts (after ``syncfs``)
and asks ``statvfs`` of the mount point, which is the root of the filesystem itself, never a name a
sandbox made. So a symlink a sandbox leaves in a volume is never followed by the host.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from shoal.errors import Conflict, RuntimeFailure
from shoal.runtime.linux import mounts
from shoal.settings import Settings
from shoal.storage.layers import DiskUsage, WritableLayers, loop_backing, loop_released

log = logging.getLogger("shoal.volumes")

#: How long a mount waits for a loop device still held by a sandbox being torn down to go away.
RELEASE_WAIT = 5.0
#: Seconds ``remove`` waits for the loop device of a volume it just unmounted to be detached (then it
#: removes the image anyway: see ``remove``).
DETACH_WAIT = 2.0


class VolumeImages:
    """Where volume images and their host mounts live, and how one is made, mounted and removed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.state_dir / "volumes"
        self.mount_dir = settings.run_dir / "volumes"

    def resource(self, volume_id: str) -> str:
        """The host name of a volume: ``shoal-<instance>-vol-<id>`` (image file and mount point)."""
        return self.settings.resource_name(f"vol-{volume_id}")

    def image(self, volume_id: str) -> Path:
        return self.dir / f"{self.resource(volume_id)}.ext4"

    def mount_point(self, volume_id: str) -> Path:
        return self.mount_dir / self.resource(volume_id)

    # --- making ------------------------------------------------------------------------------
    def create(self, volume_id: str, size_mb: int) -> Path:
        """A new empty volume image: sparse, ext4, its root owned by sandbox root. Made under a temporary
        name and renamed in, so a crash never leaves a half-made image under the volume's name."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        target = self.image(volume_id)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.truncate(size_mb * 1024 * 1024)
            base = self.settings.uid_base
            proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                                   f"lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner={base}:{base}",
                                   str(tmp)], capture_output=True, text=True, timeout=120,
                                  env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            if proc.returncode != 0:
                raise RuntimeFailure(f"mkfs.ext4 failed: {proc.stderr.strip()[-300:]}", "volume")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def remove(self, volume_id: str) -> None:
        """Unmount the host mount (strictly) and delete the image.

        The image goes even if a loop device still holds it after ``DETACH_WAIT`` seconds. Only a volume
        no record lists any more is removed (the caller deleted it, under the volumes lock, after checking
        that no sandbox uses it), so the holder is on its way out: a sandbox being torn down, or the
        kernel, which detaches an auto-clearing loop device on a work queue after the last unmount, and
        under heavy I/O takes seconds to. Unlinked, the image can never be mounted again; the kernel frees
        its blocks when that device lets go. Refusing instead left an image no record explained (the
        record was gone already) until a later reconcile, and told the API caller to try again a removal
        that had happened."""
        self.unmount(volume_id)
        image = self.image(volume_id)
        if not loop_released(image, DETACH_WAIT):
            log.info("volume %s: image removed while a loop device still holds it (%s)", volume_id,
                     ", ".join(loop_backing(image)))
        image.unlink(missing_ok=True)

    # --- mounting ----------------------------------------------------------------------------
    def is_mounted(self, volume_id: str) -> bool:
        return mounts.is_mounted(self.mount_point(volume_id))

    def mount(self, volume_id: str, wait: float = RELEASE_WAIT) -> Path:
        """The volume's one host mount (made now if needed), waiting up to ``wait`` seconds for a loop device
        still held by a sandbox being torn down. The caller holds the volumes lock."""
        target = self.mount_point(volume_id)
        if mounts.is_mounted(target):
            return target
        image = self.image(volume_id)
        if not image.is_file():
            raise RuntimeFailure(f"the image of volume {volume_id} is gone from the host", "volume")
        if not loop_released(image, wait):  # a sandbox being torn down still holds the last mount: never mount twice
            raise Conflict(f"volume {volume_id} is still mounted by a sandbox being torn down; try again")
        self.mount_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.mount_dir, 0o711)  # crun, inside the sandbox's user namespace, must reach the source
        target.mkdir(exist_ok=True)
        WritableLayers.mount_image(image, target)  # loop (auto-clear) + ext4, as a sandbox's disk layer
        return target

    def unmount(self, volume_id: str) -> None:
        """Sync and unmount the host mount (no-op if not mounted); the mount point goes too."""
        target = self.mount_point(volume_id)
        WritableLayers.unmount(target)
        try:
            target.rmdir()
        except OSError:
            pass

    def usage(self, volume_id: str) -> DiskUsage | None:
        """Used/total bytes while mounted (``statvfs`` of the filesystem's root: nothing a sandbox named)."""
        return WritableLayers.usage(self.mount_point(volume_id))

    # --- recovery ----------------------------------------------------------------------------
    def existing(self) -> set[str]:
        """Ids of volumes with an image or a mount point on the host (this instance's only)."""
        prefix = self.resource("")
        found: set[str] = set()
        for d, suffix in ((self.dir, ".ext4"), (self.mount_dir, "")):
            try:
                for e in os.scandir(d):
                    if e.name.startswith(prefix) and e.name.endswith(suffix):
                        found.add(e.name[len(prefix):len(e.name) - len(suffix)])
            except OSError:
                pass
        return found

    def sweep_temporaries(self) -> None:
        """Half-made images whose maker died (a SIGKILL during ``mkfs``)."""
        try:
            for e in os.scandir(self.dir):
                if e.name.startswith(f".{self.resource('')}") and e.name.endswith(".tmp"):
                    pid = e.name.rsplit(".", 2)[-2]
                    if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
                        os.unlink(e.path)
        except OSError:
            pass
