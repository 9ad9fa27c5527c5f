#!/usr/bin/env bash
# Makes Triton's perf_analyzer (PyPI perf-analyzer 2.60.0, a manylinux_2_38 C++ binary) runnable on this
# Debian 12 machine (glibc 2.36), without touching the system: `pip install perf-analyzer` here resolves
# to the 0.1.0 placeholder because the real wheel needs glibc 2.38 / GLIBCXX_3.4.32. This downloads the
# wheel with an explicit platform tag, and Debian 13's libc6/libstdc++6 with apt into /tmp, then writes a
# wrapper that runs the binary under trixie's dynamic loader.
# usage: perf_analyzer_setup.sh [DIR]   (default /tmp/pa; then: DIR/perf_analyzer -m MODEL -u HOST:PORT -i grpc ...)
# `make perf_analyzer` runs it into .venv/perf_analyzer with the venv's pip (PYTHON).
set -eu
dir=${1:-/tmp/pa}
python=${PYTHON:-python3}
mkdir -p "$dir"/{whl,debs,root,lists/partial,cache/archives/partial}
"$python" -m pip download --no-deps perf-analyzer==2.60.0 --platform manylinux_2_38_x86_64 --only-binary=:all: \
  --python-version 3.11 -d "$dir/whl" -q
"$python" -m zipfile -e "$dir"/whl/perf_analyzer-2.60.0-*.whl "$dir/wheel"
chmod +x "$dir/wheel/perf_analyzer/bin/perf_analyzer"
# the machine's own Debian mirror (its configured apt sources), with the next release's suite
mirror=$(grep -h -m1 -oE '^URIs: *[^ ]+/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | head -1)
[ -n "$mirror" ] || mirror=$(grep -h -m1 -oE '^deb +[^ ]+/debian ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1)
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$dir/sources.list"
apto=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache")
apt-get "${apto[@]}" update -qq
(cd "$dir/debs" && apt-get "${apto[@]}" download libc6 libstdc++6 libgcc-s1 libssl3t64 zlib1g -qq)
for d in "$dir"/debs/*.deb; do dpkg-deb -x "$d" "$dir/root"; done
lib="$dir/root/usr/lib/x86_64-linux-gnu"
cat > "$dir/perf_analyzer" <<EOF
#!/bin/sh
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$dir/wheel/perf_analyzer/bin/perf_analyzer" "\$@"
EOF
chmod +x "$dir/perf_analyzer"
"$dir/perf_analyzer" --version
