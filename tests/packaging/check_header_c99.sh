#!/usr/bin/env bash
# The public header compiles as strict C99 and as C++ on its own.
set -euo pipefail
include=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/c99.c" <<'C'
#include "moecomm.h"
int main(void) {
  moecommConfig_t config = MOECOMM_CONFIG_INIT;
  moecommEpConfig_t ep = MOECOMM_EP_CONFIG_INIT;
  moecommEpDispatchArgs_t dispatch = MOECOMM_EP_DISPATCH_ARGS_INIT;
  moecommEpCombineArgs_t combine = MOECOMM_EP_COMBINE_ARGS_INIT;
  moecommEpLayoutArgs_t layout = MOECOMM_EP_LAYOUT_ARGS_INIT;
  moecommEpLowLatencyDispatchArgs_t lld = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
  moecommEpLowLatencyCombineArgs_t llc = MOECOMM_EP_LL_COMBINE_ARGS_INIT;
  moecommExternalBootstrap_t external = MOECOMM_EXTERNAL_BOOTSTRAP_INIT;
  return (int)(config.size + ep.size + dispatch.size + combine.size + layout.size + lld.size + llc.size +
               external.size) == 0;
}
C
cc -std=c99 -Wall -Wextra -Werror -pedantic -I"$include" -c "$work/c99.c" -o "$work/c99.o"
cp "$work/c99.c" "$work/cxx.cc"
c++ -std=c++11 -Wall -Wextra -Werror -pedantic -I"$include" -c "$work/cxx.cc" -o "$work/cxx.o"
echo "check_header_c99: moecomm.h compiles as C99 and C++11"
