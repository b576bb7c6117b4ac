#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine (root) for xlat: apt packages,
# the kernel-header links bcc needs, and the venv. Used by `make setup`,
# .ci/run and vagrant/provision.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the router needs (the .deb depends on the same) and what builds the venv...
APT_PACKAGES=(
  nftables python3-nftables python3-bpfcc bpfcc-tools bpftool
  linux-headers-amd64 iproute2 ethtool python3-venv python3-dev gcc make
  python3-prometheus-client python3-uvloop
)
# ...and the test peers of `make test` / `make demo`, which the router does not need.
PEER_PACKAGES=(sip-tester kamailio rtpengine-daemon tshark tayga tcpdump dnsmasq sipvicious)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

missing=()
peers=()  # the test peers not installed yet
for p in "${APT_PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done
for p in "${PEER_PACKAGES[@]}"; do
  installed "$p" || peers+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ ${#peers[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} ${peers[*]}"
  # tshark asks whether non-root users may capture; answer for it.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -q
  [ ${#missing[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  # the peers without their recommends (rtpengine's would add a recording daemon)
  [ ${#peers[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${peers[@]}"
fi

# Debian starts the services of the test peers it installs (kamailio on :5060, rtpengine
# on :2223, ...): stop and disable those of the peers installed just now (ones that were
# there before are the operator's business).
bash scripts/quiet-peers.sh "${peers[@]}"

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. A Debian kernel has its
# own headers package, which makes both links: install it. A kernel without one (this
# CI machine's) gets Debian's newest header trees that are not newer than it, linked
# there (bcc accepts those for bpf/xlat.c; `xlat check` says what it found).
kver=$(uname -r)
if ! installed "linux-headers-$kver"; then
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    echo "setup: installing linux-headers-$kver (the running kernel's headers)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$kver"
  fi
fi
if ! installed "linux-headers-$kver"; then
  newest_fitting() {  # the last of the trees matching $1 whose version is <= $kver
    ls -d /usr/src/linux-headers-*-"$1" 2>/dev/null | while read -r d; do
      v=${d#/usr/src/linux-headers-}
      [ "$(printf '%s\n%s\n' "$v" "$kver" | sort -V | tail -n1)" = "$kver" ] && echo "$d"
    done | sort -V | tail -n1
  }
  hdr=$(newest_fitting amd64)
  common=$(newest_fitting common)
  if [ -z "$hdr" ] || [ -z "$common" ]; then
    echo "setup: no linux-headers-$kver package and no usable headers under /usr/src" >&2
    exit 1
  fi
  echo "setup: no linux-headers-$kver package; linking $hdr for bcc"
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$hdr" "/lib/modules/$kver/build"
  ln -sfn "$common" "/lib/modules/$kver/source"
fi

# Debian's bcc and nftables bindings are only visible to Debian's interpreter.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc, nftables' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
# pip builds the compiled cores (setup.py, mypyc) too: again when one's source changed
if [ ! -e "$stamp" ] || ! env -u XLAT_PURE_PYTHON .venv/bin/python -c \
    'import xlat.compiled as c; raise SystemExit(c.stale())'; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ok ($(.venv/bin/python -c 'import bcc, nftables, pyroute2, scapy; print("bcc", bcc.__version__ if hasattr(bcc, "__version__") else "?", "pyroute2", pyroute2.__version__)'); $(.venv/bin/xlat --version))"
