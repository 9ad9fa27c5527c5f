#!/usr/bin/env bash
# The servers the tests start for themselves on free ports: PostgreSQL (the job store) and
# redis-server (the shared response cache), from Debian's packages. As root (CI) they are
# installed with apt-get when missing, and a failed install fails `make test`; elsewhere this
# only says what to install, and their tests skip saying why.
set -euo pipefail

missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "not installed: ${missing[*]} (sudo apt-get install ${missing[*]}): their tests skip"
    exit 0
fi
command -v apt-get >/dev/null || { echo "cannot install ${missing[*]}: no apt-get" >&2; exit 1; }
echo "installing ${missing[*]} (apt-get) for the tests"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
