#!/bin/sh
# Install the Debian/Ubuntu packages named in the given list files (default: deploy/packages.txt),
# skipping those already installed or provided by an installed one (NodeSource's nodejs provides npm).
set -eu
[ $# -gt 0 ] || set -- "$(dirname "$0")/packages.txt"
wanted=$(grep -hv '^\s*#' "$@" | tr -s ' \n' ' ')
provided=$(dpkg-query -W -f='${db:Status-Abbrev} ${Provides}\n' 2>/dev/null |
           sed -n 's/^ii  *//p' | tr ',' '\n' | sed 's/^ *//; s/[ :(].*//')
missing=""
for package in $wanted; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
        printf '%s\n' "$provided" | grep -qx "$package" || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "Installing system packages:$missing"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
