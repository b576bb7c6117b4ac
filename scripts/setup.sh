#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine (root) for xlat: apt packages,
# the kernel-header links bcc needs, and the venv. Used by `make setup`,
# .ci/run and vagrant/provision.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  nftables python3-nftables python3-bpfcc bpfcc-tools bpftool
  linux-headers-amd64 iproute2 ethtool python3-venv python3-dev gcc make
  python3-prometheus-client python3-uvloop
  sip-tester kamailio rtpengine-daemon tshark tayga tcpdump dnsmasq sipvicious
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  # tshark asks whether non-root users may capture; answer for it.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${APT_PACKAGES[@]}"
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}; this kernel ships
# neither, so point them at Debian's header trees (BCC_KERNEL_SOURCE is not enough).
kver=$(uname -r)
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
if [ -z "$hdr" ] || [ -z "$common" ]; then
  echo "setup: linux headers not found under /usr/src" >&2; exit 1
fi
mkdir -p "/lib/modules/$kver"
ln -sfn "$hdr" "/lib/modules/$kver/build"
ln -sfn "$common" "/lib/modules/$kver/source"

# Debian's bcc and nftables bindings are only visible to Debian's interpreter.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc, nftables' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ok ($(.venv/bin/python -c 'import bcc, nftables, pyroute2, scapy; print("bcc", bcc.__version__ if hasattr(bcc, "__version__") else "?", "pyroute2", pyroute2.__version__)'))"
