#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages libmoecomm builds against, skipping what is present.
# Safe to run repeatedly; does nothing when everything is installed.
set -euo pipefail

packages=(cmake ninja-build g++ pkg-config libhwloc-dev libibverbs-dev nlohmann-json3-dev libgtest-dev
          clang-format clang-tidy)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
# Tools may come from elsewhere than Debian packages (a GPU image with its own CMake).
if command -v cmake >/dev/null 2>&1; then missing=("${missing[@]/cmake}"); fi
if command -v ninja >/dev/null 2>&1; then missing=("${missing[@]/ninja-build}"); fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: missing ${missing[*]} and no apt-get here; continuing with what is there" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "install-deps: installing ${missing[*]}"
# Machines without a package mirror (the GPU machines) may have the libraries installed some
# other way: warn and let the CMake configure step say what is really missing.
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null; }; then
  echo "install-deps: could not install ${missing[*]}; continuing with what is there" >&2
fi
