"""The default seccomp profile of a sandbox: allow by default, refuse what no sandbox needs.

A deny-list (like Docker's intent, far shorter than its allow-list) keeps every ordinary program
working while closing the kernel surfaces that matter for escapes: module loading, kexec, BPF,
perf, keyrings, new user namespaces (the root of many kernel bugs), mounting, clock and swap
changes, io_uring, and ptrace-like cross-process access outside the sandbox's own processes is
already impossible through the pid namespace. ``clone3`` answers ENOSYS so that libc falls back to
``clone``, whose flags seccomp can inspect.
"""

from __future__ import annotations

EPERM = 1
ENOSYS = 38
EAFNOSUPPORT = 97

DENIED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "finit_module", "fsconfig", "fsmount", "fsopen", "fspick", "get_kernel_syms", "init_module",
    "io_uring_enter", "io_uring_register", "io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load",
    "kexec_load", "keyctl", "lookup_dcookie", "mount", "mount_setattr", "move_mount", "name_to_handle_at",
    "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open", "pivot_root", "quotactl",
    "quotactl_fd", "reboot", "request_key", "setns", "settimeofday", "stime", "swapoff", "swapon",
    "syslog", "umount", "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vhangup", "_sysctl",
    "sysfs", "adjtimex",
)

#: Address families a sandbox may open sockets in: local IPC, IP, and netlink (``ip``, ``ss``). Every other
#: family is kernel surface with no use inside a sandbox's loopback-only network namespace, and some are
#: shared by the whole host: AF_VSOCK's port space is host-wide (two sandboxes would collide, and one
#: could talk to a hypervisor or another VM), AF_KEY and AF_ALG reach host-wide crypto state, AF_PACKET
#: needs CAP_NET_RAW (not granted) and has a history of kernel bugs. They fail with EAFNOSUPPORT, the
#: errno a kernel without that family gives, so programs take their "not available" path.
ALLOWED_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
#: The kernel refuses families at or above AF_MAX (46 in 6.x) itself; 64 leaves room for new ones.
FAMILY_LIMIT = 64
#: socketcall(2) call numbers that create sockets: SYS_SOCKET, SYS_SOCKETPAIR.
SOCKETCALL_CREATE = (1, 8)

#: Namespace flags a sandboxed process may not pass to clone().
CLONE_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080,
}


def profile() -> dict:
    """The OCI ``linux.seccomp`` object."""
    syscalls: list[dict] = [
        {"names": list(DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    for flag in CLONE_NAMESPACE_FLAGS.values():
        syscalls.append({
            "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        })
    allowed = set(ALLOWED_FAMILIES.values())
    for family in range(FAMILY_LIMIT):
        if family in allowed:
            continue
        syscalls.append({
            "names": ["socket", "socketpair"], "action": "SCMP_ACT_ERRNO", "errnoRet": EAFNOSUPPORT,
            "args": [{"index": 0, "value": 0xFFFFFFFF, "valueTwo": family, "op": "SCMP_CMP_MASKED_EQ"}],
        })
    # 32-bit x86 programs may create sockets through socketcall(), whose family sits in memory where
    # seccomp cannot read it: creating sockets that way is refused outright.
    for call in SOCKETCALL_CREATE:
        syscalls.append({
            "names": ["socketcall"], "action": "SCMP_ACT_ERRNO", "errnoRet": EAFNOSUPPORT,
            "args": [{"index": 0, "value": 0xFFFFFFFF, "valueTwo": call, "op": "SCMP_CMP_MASKED_EQ"}],
        })
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
        "syscalls": syscalls,
    }


# --- precompiled filter ---------------------------------------------------------------------
# crun compiles the profile with libseccomp on every start (about 4 ms here, a tenth of a create).
# The same library, called once per process, produces the identical BPF program, which crun
# accepts ready-made through the ``run.oci.seccomp_bpf_data`` annotation.

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7
_ARCH_TOKENS = {"SCMP_ARCH_X86": 0x40000003, "SCMP_ARCH_X32": 0x4000003E}
_compiled: list[str | None] = []


def _act_errno(value: int) -> int:
    return 0x00050000 | (value & 0xFFFF)


def compiled_bpf() -> str | None:
    """The profile as base64 BPF (compiled once per process), or None where libseccomp is missing
    or the host is not x86_64 (crun then compiles ``profile()`` itself)."""
    if _compiled:
        return _compiled[0]
    _compiled.append(_compile())
    return _compiled[0]


def _compile() -> str | None:
    import base64
    import ctypes
    import os
    import platform
    import tempfile

    if platform.machine() != "x86_64":
        return None
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return None

    class ArgCmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                    ("datum_b", ctypes.c_uint64)]

    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        return None
    try:
        for token in _ARCH_TOKENS.values():
            if lib.seccomp_arch_add(ctx, token) != 0:
                return None
        for rule in profile()["syscalls"]:
            action = _act_errno(rule["errnoRet"])
            args = rule.get("args", [])
            array = (ArgCmp * max(1, len(args)))(*[ArgCmp(a["index"], _SCMP_CMP_MASKED_EQ, a["value"], a["valueTwo"])
                                                  for a in args])
            for name in rule["names"]:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr == -1:  # unknown on every arch we filter: nothing to deny
                    continue
                if lib.seccomp_rule_add_array(ctx, action, nr, len(args), array) != 0:
                    return None
        with tempfile.TemporaryFile() as f:
            if lib.seccomp_export_bpf(ctx, f.fileno()) != 0:
                return None
            f.seek(0)
            data = f.read()
        return base64.b64encode(data).decode() if data and os.environ.get("SHOAL_SECCOMP_BPF", "1") != "0" else None
    finally:
        lib.seccomp_release(ctx)
