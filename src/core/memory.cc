#include "core/memory.h"

#include "core/error.h"
#include "transport/host_shm.h"

namespace moecomm {

MemoryRegistry::MemoryRegistry() = default;
MemoryRegistry::~MemoryRegistry() = default;

void MemoryRegistry::addSymmetric(std::unique_ptr<ShmSymmetric> memory) {
  std::lock_guard<std::mutex> lock(mutex_);
  void* key = memory->local();
  symmetric_[key] = std::move(memory);
}

std::unique_ptr<ShmSymmetric> MemoryRegistry::takeSymmetric(void* ptr) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = symmetric_.find(ptr);
  if (it == symmetric_.end()) return nullptr;
  std::unique_ptr<ShmSymmetric> memory = std::move(it->second);
  symmetric_.erase(it);
  return memory;
}

size_t MemoryRegistry::symmetricCount() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return symmetric_.size();
}

moecommResult_t MemoryRegistry::registerRange(void* ptr, size_t bytes) {
  MC_REQUIRE(ptr != nullptr, moecommInvalidArgument, "ptr is NULL");
  MC_REQUIRE(bytes > 0, moecommInvalidArgument, "bytes is 0");
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
  MC_REQUIRE(start + bytes > start, moecommInvalidArgument, "range %p + %zu bytes wraps around the address space", ptr,
             bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  // The first registration starting at or after `start`, and the one before it, are the only
  // ones that can overlap.
  auto next = registered_.lower_bound(start);
  if (next != registered_.end()) {
    MC_REQUIRE(next->first >= start + bytes, moecommInvalidArgument,
               "range %p + %zu bytes overlaps the registered range at %p", ptr, bytes,
               reinterpret_cast<void*>(next->first));
  }
  if (next != registered_.begin()) {
    auto prev = std::prev(next);
    MC_REQUIRE(prev->first + prev->second <= start, moecommInvalidArgument,
               "range %p + %zu bytes overlaps the registered range at %p", ptr, bytes,
               reinterpret_cast<void*>(prev->first));
  }
  registered_[start] = bytes;
  return moecommSuccess;
}

moecommResult_t MemoryRegistry::deregisterRange(void* ptr) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = registered_.find(reinterpret_cast<uintptr_t>(ptr));
  MC_REQUIRE(it != registered_.end(), moecommInvalidArgument,
             "%p is not the start of a range registered with moecommMemRegister", ptr);
  registered_.erase(it);
  return moecommSuccess;
}

bool MemoryRegistry::isRegistered(const void* ptr, size_t bytes) const {
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = registered_.upper_bound(start);
  if (it == registered_.begin()) return false;
  --it;
  return start >= it->first && start + bytes <= it->first + it->second;
}

}  // namespace moecomm
