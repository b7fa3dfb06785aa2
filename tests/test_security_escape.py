"""What sandbox code cannot reach: address families, host paths in /proc, and sudo's limits.

``noNewPrivileges`` is off so that setuid programs (sudo) work inside: these tests show that
becoming sandbox root that way gains nothing on the host."""

from __future__ import annotations

import os
import stat

import pytest

from shoal.runtime.agent_client import AgentClient

SOCKET_PROBE = """
import socket, sys
fam = int(sys.argv[1])
kind = socket.SOCK_RAW if fam in (16, 17) else socket.SOCK_DGRAM
try:
    socket.socket(fam, kind).close()
    print("ok")
except OSError as exc:
    print(exc.errno)
"""


REFUSED = {"AF_VSOCK": 40, "AF_PACKET": 17, "AF_ALG": 38, "AF_KEY": 15, "AF_TIPC": 30, "AF_RDS": 21, "AF_CAN": 29,
           "AF_BLUETOOTH": 31, "AF_XDP": 44}
NEEDED = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}


@pytest.mark.parametrize("family", REFUSED)
def test_unneeded_address_families_are_refused(base_agent: AgentClient, family: str):
    r = base_agent.run(["python3", "-c", SOCKET_PROBE, str(REFUSED[family])])
    assert r.stdout.strip() == "97", (family, r.stdout, r.stderr)  # EAFNOSUPPORT


@pytest.mark.parametrize("family", NEEDED)
def test_needed_address_families_work(base_agent: AgentClient, family: str):
    r = base_agent.run(["python3", "-c", SOCKET_PROBE, str(NEEDED[family])])
    assert r.stdout.strip() == "ok", (family, r.stdout, r.stderr)


def test_proc_cmdline_is_masked(agent: AgentClient):
    r = agent.run(["cat", "/proc/cmdline"])
    assert r.stdout == "" and r.exit_code == 0, r.stdout


def test_mountinfo_names_no_host_state_path(engine, agent: AgentClient):
    info = agent.read_file("/proc/self/mountinfo").decode()
    roots = {str(engine.settings.run_dir), str(engine.settings.sandboxes_dir), str(engine.settings.template_mounts_dir)}
    overlay = [line for line in info.splitlines() if " - overlay " in line]
    assert overlay and not any(r in line for line in overlay for r in roots), overlay
    # No mount at all names a host state path (the agent runtime is a tmpfs of its own, bound whole).
    state = (str(engine.settings.state_dir), str(engine.settings.run_dir))
    assert not [line for line in info.splitlines() if any(r in line for r in state)], info


def test_database_is_private(engine):
    mode = stat.S_IMODE(os.stat(engine.settings.db_path).st_mode)
    assert mode == 0o600, oct(mode)


# --- sudo works, and gains nothing --------------------------------------------------------------

def test_sudo_works_for_user(base_agent: AgentClient):
    r = base_agent.run(["sudo", "-n", "id", "-u"], user="user")
    assert (r.exit_code, r.stdout) == (0, "0\n"), r.stderr


def test_template_images_are_nosuid_on_the_host(engine, base_sandbox):
    points = [line.split() for line in open("/proc/self/mountinfo")
              if f" {engine.settings.template_mounts_dir}/" in line and " - erofs " in line]
    assert points and all("nosuid" in fields[5].split(",") for fields in points), points


SUDO_ESCAPES = {
    "mount": "mount -t tmpfs none /mnt",
    "unshare": "unshare -U true",
    "modules": "python3 -c \"import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).syscall(175, 0, 0, b'') == 0 else 1)\"",
    "raw socket": "python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)\"",
    "vsock": "python3 -c \"import socket; socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\"",
}


def test_sudo_root_gains_nothing(base_agent: AgentClient, host_marker):
    status = base_agent.run(["sudo", "-n", "cat", "/proc/self/status"], user="user").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Seccomp"].strip() == "2"  # the filter holds across the setuid exec
    own = dict(line.split(":\t", 1) for line in base_agent.read_file("/proc/1/status").decode().splitlines()
               if ":\t" in line)
    assert int(fields["CapEff"], 16) & ~int(own["CapBnd"], 16) == 0
    assert fields["CapBnd"] == own["CapBnd"]
    for what, script in SUDO_ESCAPES.items():
        r = base_agent.run(["sudo", "-n", "sh", "-c", script], user="user")
        assert r.exit_code != 0, f"sudo {what} succeeded: {r.stdout} {r.stderr}"
    r = base_agent.run(["sudo", "-n", "sh", "-c", f"cat {host_marker}; ls /proc | grep -c '^[0-9]'"], user="user")
    assert host_marker.read_text() not in r.stdout
    assert int(r.stdout.split()[-1]) < 50  # the sandbox's own processes only
