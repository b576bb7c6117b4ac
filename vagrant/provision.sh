#!/usr/bin/env bash
# Vagrant provisioning: exactly what `make setup` does on any Debian machine.
set -euo pipefail
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q make
cd /xlat
bash scripts/setup.sh
