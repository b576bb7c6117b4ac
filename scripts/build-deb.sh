#!/usr/bin/env bash
# `make deb`: the Debian package of this checkout, built in a copy (build/deb/) so
# dpkg-buildpackage's output and debian/xlat/ never land in the tree; the .deb ends in
# dist/, and lintian must report no error. Installs its build tools on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
# dh-python builds with the interpreter it finds on PATH: Debian's own, not a pyenv or
# venv python3 that happens to come first (it lacks python3-build and the dist-packages).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

BUILD_PACKAGES=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
                python3-click python3-netaddr lintian)
missing=()
for p in "${BUILD_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deb: installing build tools ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${BUILD_PACKAGES[@]}"
fi

version=$(dpkg-parsechangelog -S Version)
work=build/deb
src=$work/xlat-$version
rm -rf "$work"
mkdir -p "$src" dist
# what the package is built from (symlinks kept: xlat/bpf and xlat/nft name bpf/, nft/)
cp -a pyproject.toml README.md xlat bpf nft systemd etc docs debian "$src"/
find "$src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
(cd "$src" && dpkg-buildpackage -us -uc -b)
deb=$work/xlat_${version}_all.deb
# lintian: errors fail the build; warnings are printed
lintian --fail-on error "$deb"
cp "$deb" dist/
echo "deb: dist/$(basename "$deb")"
