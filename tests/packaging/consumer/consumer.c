/* Links against an installed libmoecomm and checks it answers. */
#include <stdio.h>
#include <string.h>

#include "moecomm.h"

int main(void) {
  int version = 0;
  if (moecommGetVersion(&version) != moecommSuccess || version != MOECOMM_VERSION_CODE) {
    fprintf(stderr, "consumer: version %d, expected %d\n", version, MOECOMM_VERSION_CODE);
    return 1;
  }
  if (moecommGetVersion(NULL) != moecommInvalidArgument || strlen(moecommGetLastError(NULL)) == 0) {
    fprintf(stderr, "consumer: a NULL argument was not reported\n");
    return 1;
  }
  printf("consumer: libmoecomm %d\n", version);
  return 0;
}
