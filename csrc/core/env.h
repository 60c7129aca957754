// Integer settings from the environment (tuning knobs and limits).
#pragma once
#include <cstdlib>

namespace sqz {

// The value of `name` when it is set to an integer, else `fallback` (unset, empty or not a number:
// a typo keeps the default instead of reading as 0). Read where it is used: knobs meant for sweeps
// are read per call, so a benchmark can change them in one process.
inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (*end != 0 || n < -(1L << 30) || n > (1L << 30)) return fallback;
  return (int)n;
}

}  // namespace sqz
