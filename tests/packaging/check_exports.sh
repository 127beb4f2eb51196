#!/usr/bin/env bash
# Every dynamic symbol the library defines must start with "moecomm".
set -euo pipefail
lib=$1
symbols=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -v '^$')
count=$(printf '%s\n' "$symbols" | grep -c . || true)
bad=$(printf '%s\n' "$symbols" | grep -v '^moecomm' || true)
if [ -n "$bad" ]; then
  echo "check_exports: symbols outside the moecomm prefix:"; printf '%s\n' "$bad"; exit 1
fi
if [ "$count" -lt 30 ]; then
  echo "check_exports: only $count exported symbols; the API has more"; exit 1
fi
echo "check_exports: $count symbols, all moecomm*"
