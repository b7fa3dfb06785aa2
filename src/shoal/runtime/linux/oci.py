"""The OCI ``config.json`` of a sandbox: every isolation promise of the ``linux`` runtime in one dict.

Read top to bottom, this is the security model: a user namespace mapping sandbox root to an
unprivileged host range; its own pid, mount, uts, ipc, net and cgroup namespaces; cgroup limits;
the default seccomp profile; a reduced capability set; masked and read-only ``/proc`` and ``/sys``;
the agent runtime bind-mounted read-only.

No ``no_new_privs``: setuid programs inside (``sudo`` in ``base``, as E2B sandboxes have) must work.
What setuid can reach is sandbox root, already an unprivileged host uid whose capabilities are
bounded by ``CAPABILITIES`` (the bounding set caps every exec, setuid or not) and whose system
calls the seccomp filter still screens (a filter, once set, holds for every descendant).
"""

from __future__ import annotations

import resource

from shoal.agent import protocol
from shoal.runtime.agent_runtime import MOUNT_POINT, agent_command
from shoal.runtime.base import SandboxSpec
from shoal.runtime.linux import cgroups, seccomp

#: Docker's default set minus NET_RAW and MKNOD: what package managers and servers need.
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
    "CAP_SETPCAP", "CAP_SETFCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE",
]

MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
    "/proc/interrupts", "/proc/kallsyms", "/proc/cmdline",  # the host's boot line: paths, sometimes secrets
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
CPU_PERIOD_US = 100_000


def config(spec: SandboxSpec, runtime_dir: str, uid_base: int, uid_count: int, cgroup: str,
           userns: str | None = None, boot_id_file: str | None = None) -> dict:
    """The bundle's ``config.json``; ``cgroup`` names the sandbox's group (``shoal-<instance>-<id>``).

    ``userns``: a user namespace to join (``budgets.make_userns``: it maps sandbox root to ``uid_base``
    and carries the sandbox's share of the kernel's per-user budgets) instead of crun making one."""
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           f"SHOAL_SANDBOX_ID={spec.sandbox_id}", "HOME=/root"]
    if spec.env:
        env.append("SHOAL_ENV=" + protocol.dumps(spec.env).decode())
    memory = spec.memory_mb * 1024 * 1024
    nofile = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    bpf = seccomp.compiled_bpf()
    linux_seccomp = {} if bpf else {"seccomp": seccomp.profile()}
    return {
        "ociVersion": "1.0.2",
        "annotations": {"run.oci.seccomp_bpf_data": bpf} if bpf else {},
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": agent_command(),
            "env": env,
            "cwd": "/",
            "capabilities": {k: CAPABILITIES for k in ("bounding", "effective", "permitted")},
            # Raising a hard limit needs CAP_SYS_RESOURCE on the host, which sandbox root lacks.
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": False,  # see the module docstring: sudo inside must work
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": spec.sandbox_id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            # A joined network namespace is the host's (shoal.net.slotns): its own sysfs comes pre-mounted.
            {"destination": "/sys", "type": "bind", "source": spec.sysfs,
             "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]} if spec.sysfs else
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": MOUNT_POINT, "type": "bind", "source": runtime_dir,
             "options": ["rbind", "ro", "nosuid", "nodev"]},
            # Named volumes: the host's one mount of each, bound in (crun resolves the destination inside
            # the rootfs); read-only ones stay so (sandbox root has no CAP_SYS_ADMIN to remount).
            *({"destination": dest, "type": "bind", "source": source,
               "options": ["rbind", "nosuid", "nodev", "ro" if read_only else "rw"]}
              for source, dest, read_only in spec.volumes),
            # The sandbox's own boot id (``SandboxSpec.boot_id``) over the host's.
            *([{"destination": "/proc/sys/kernel/random/boot_id", "type": "bind", "source": boot_id_file,
                "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}] if boot_id_file else []),
        ],
        "linux": {
            **({} if userns else {
                "uidMappings": [{"containerID": 0, "hostID": uid_base, "size": uid_count}],
                "gidMappings": [{"containerID": 0, "hostID": uid_base, "size": uid_count}]}),
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
            + [{"type": "network", "path": spec.netns} if spec.netns else {"type": "network"}]
            + [{"type": "user", "path": userns} if userns else {"type": "user"}],
            "cgroupsPath": cgroups.cgroups_path(cgroup),
            "resources": {
                "memory": {"limit": memory, "swap": memory},
                "cpu": {"quota": max(1000, int(spec.cpu * CPU_PERIOD_US)), "period": CPU_PERIOD_US},
                "pids": {"limit": spec.pids_limit},
                "devices": [{"allow": False, "access": "rwm"}],
            },
            **linux_seccomp,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }
