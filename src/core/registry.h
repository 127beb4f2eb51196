// Tracks which objects handed out through the C API are alive, so that a destroyed or
// foreign handle is reported as InvalidUsage instead of being dereferenced.
#pragma once

#include <mutex>
#include <unordered_set>

namespace moecomm {

template <class T>
class LiveSet {
 public:
  void add(T* object) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_.insert(object);
  }
  void remove(T* object) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_.erase(object);
  }
  bool contains(const T* object) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return live_.count(const_cast<T*>(object)) != 0;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_set<T*> live_;
};

}  // namespace moecomm
