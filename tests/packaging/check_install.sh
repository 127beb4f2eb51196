#!/usr/bin/env bash
# Installs the build into a temporary prefix and builds a consumer project against it twice:
# through find_package(moecomm) and through pkg-config. Both consumers must run.
set -euo pipefail
build=$1
source_dir=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" >/dev/null
cmake -S "$source_dir/tests/packaging/consumer" -B "$work/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/consumer" >/dev/null
LD_LIBRARY_PATH="$work/prefix/lib" "$work/consumer/consumer"
libdir=$(ls -d "$work"/prefix/lib*/pkgconfig | head -1)
flags=$(PKG_CONFIG_PATH="$libdir" pkg-config --cflags --libs moecomm)
cc -std=c99 "$source_dir/tests/packaging/consumer/consumer.c" $flags -o "$work/consumer_pc"
LD_LIBRARY_PATH="$(dirname "$libdir")" "$work/consumer_pc"
echo "check_install: find_package and pkg-config consumers both built and ran"
