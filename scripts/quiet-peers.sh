#!/usr/bin/env bash
# Stop and disable the systemd services that the given Debian packages brought: the test
# peers (kamailio on :5060, rtpengine on :2223, dnsmasq on :53 - Debian enables and
# starts each on install, on every address) are programs `make test` and `make demo`
# start themselves, in namespaces, not services of the router. Used by setup.sh for the
# peers it has just installed. Without systemd as init there is nothing to stop.
set -euo pipefail
[ -d /run/systemd/system ] || exit 0
for pkg in "$@"; do
  for path in $(dpkg-query -L "$pkg" | grep -E '^(/usr)?/lib/systemd/system/[^@/]+\.service$'); do
    unit=$(basename "$path")
    # (is-enabled says "alias" for a second name, which follows its unit)
    if [ "$(systemctl is-enabled "$unit" 2>/dev/null)" = enabled ] \
        || systemctl is-active -q "$unit"; then
      echo "setup: stopping and disabling $unit (a test peer, not a router service)"
      systemctl disable --now -q "$unit"
    fi
  done
done
