#!/usr/bin/env bash
# Install Shoal on a Debian/Ubuntu host: system packages, a virtualenv at /opt/shoal/venv,
# and `shoal` on PATH (/usr/local/bin/shoal). Idempotent. `--test` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "shoal install: needs root (namespaces, cgroups, mounts): sudo $0 $*" >&2
  exit 1
fi

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# skopeo: copies OCI images (registry, OCI layout/archive, docker save archive) for `template build --from-image`
APT_PACKAGES="crun erofs-utils debootstrap busybox-static nftables iproute2 python3-venv ca-certificates skopeo"
# docker-registry: the tests' local registry (started by the test fixture on loopback, never as a service)
[ -n "$extras" ] && APT_PACKAGES="$APT_PACKAGES docker-registry"
APT_PACKAGES="$APT_PACKAGES zstd"  # zstd-compressed image layers
missing=""
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "shoal install: apt packages:$missing" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $missing >/dev/null
  # the package enables a registry service on :5000; the tests start their own on loopback
  case "$missing" in *docker-registry*)
    [ -d /run/systemd/system ] && systemctl disable --now docker-registry >/dev/null 2>&1 || true ;;
  esac
fi

PY="${SHOAL_PYTHON:-$(command -v python3)}"
VENV=/opt/shoal/venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".$extras"
ln -sf "$VENV/bin/shoal" /usr/local/bin/shoal
echo "shoal install: ready ($("$VENV/bin/python" --version), $(crun --version | head -1))" >&2
