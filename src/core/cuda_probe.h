// The few CUDA runtime queries the core needs, safe on machines without a driver: any CUDA
// error there means "no GPU". Built to stubs when the library is built without CUDA.
#pragma once

#include <string>

#include "moecomm.h"

namespace moecomm {

// Number of visible CUDA devices; 0 when CUDA is absent or fails. *why gets the reason for 0.
int cudaVisibleDeviceCount(std::string* why);
// The calling thread's current device, or -1.
int cudaCurrentDevice();
moecommResult_t cudaUseDevice(int device);

}  // namespace moecomm
