#!/bin/sh
# wrk, the load generator of the ingress figures, from the distribution's packages.
set -e
command -v wrk >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq wrk
wrk --version 2>&1 | head -1 || true
