#pragma once

#include <cstring>
#include <type_traits>

namespace moecomm {

// The integer a caller stored in an enum field, read without loading the enum itself: a value
// outside the enumerators (a caller's bug we must report) is undefined behaviour to load.
template <class Enum>
int enumValue(const Enum& field) {
  std::underlying_type_t<Enum> value;
  std::memcpy(&value, &field, sizeof(value));
  return static_cast<int>(value);
}

}  // namespace moecomm
