#include "core/memory.h"

#include "core/error.h"
#include "transport/symmetric.h"

namespace moecomm {

MemoryRegistry::MemoryRegistry() = default;
MemoryRegistry::~MemoryRegistry() = default;

void MemoryRegistry::addSymmetric(std::unique_ptr<SymmetricMemory> memory) {
  std::lock_guard<std::mutex> lock(mutex_);
  const uintptr_t key = reinterpret_cast<uintptr_t>(memory->local());
  memory->setId(++symmetricAdded_);
  symmetric_[key] = std::move(memory);
}

std::unique_ptr<SymmetricMemory> MemoryRegistry::takeSymmetric(void* ptr) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = symmetric_.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == symmetric_.end()) return nullptr;
  std::unique_ptr<SymmetricMemory> memory = std::move(it->second);
  symmetric_.erase(it);
  return memory;
}

SymmetricMemory* MemoryRegistry::findSymmetric(const void* ptr, size_t bytes, size_t* offset) const {
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(mutex_);
  // The allocation with the greatest base not above ptr is the only candidate.
  auto it = symmetric_.upper_bound(start);
  if (it == symmetric_.begin()) return nullptr;
  --it;
  const size_t into = start - it->first;
  const size_t size = it->second->bytes();
  if (into >= size || bytes > size - into) return nullptr;
  if (offset != nullptr) *offset = into;
  return it->second.get();
}

void* MemoryRegistry::peerAddress(const void* localPtr, int peer) const {
  size_t offset = 0;
  SymmetricMemory* memory = findSymmetric(localPtr, 1, &offset);
  // peer() of an out-of-range rank is not defined by the implementations: bound it here.
  if (memory == nullptr || peer < 0 || peer >= memory->nranks()) return nullptr;
  void* base = memory->peer(peer);
  return base == nullptr ? nullptr : static_cast<char*>(base) + offset;
}

moecommResult_t MemoryRegistry::detachAllPeers() {
  std::lock_guard<std::mutex> lock(mutex_);
  moecommResult_t first = moecommSuccess;
  for (auto& entry : symmetric_) {
    moecommResult_t result = entry.second->detachPeers();
    if (first == moecommSuccess) first = result;
  }
  return first;
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
