#!/bin/sh
# Install the Debian/Ubuntu packages named in the given list files (default: deploy/packages.txt),
# skipping those already installed.
set -eu
[ $# -gt 0 ] || set -- "$(dirname "$0")/packages.txt"
wanted=$(grep -hv '^\s*#' "$@" | tr -s ' \n' ' ')
missing=""
for package in $wanted; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "Installing system packages:$missing"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
