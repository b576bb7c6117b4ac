#!/usr/bin/env bash
# Vagrant provisioning: exactly what `make setup` does on any Debian machine, after a
# check that the guest's kernel still has a headers package (bcc compiles against the
# running kernel's headers; setup.sh installs linux-headers-$(uname -r)).
set -euo pipefail
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q make
kver=$(uname -r)
if ! apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
  # a box older than the mirror: its kernel's headers are gone; boot the current kernel
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-image-amd64
  echo "provision: the mirror has no linux-headers-$kver for this box's kernel; a current" \
       "kernel is installed now: run 'vagrant reload --provision'" >&2
  exit 1
fi
cd /xlat
bash scripts/setup.sh
