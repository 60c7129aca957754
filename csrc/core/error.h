// Coded errors. Native code throws sqz::Error; the binding turns it into a JS SqueezeError
// with the same `code`, so callers can branch on codes rather than message text.
#pragma once
#include <exception>
#include <string>

namespace sqz {

struct Error : std::exception {
  std::string code;
  std::string message;
  Error(std::string c, std::string m) : code(std::move(c)), message(std::move(m)) {}
  const char* what() const noexcept override { return message.c_str(); }
};

[[noreturn]] inline void fail(const char* code, const std::string& message) { throw Error(code, message); }

}  // namespace sqz

#define SQZ_REQUIRE(cond, code, msg)                 \
  do {                                               \
    if (!(cond)) ::sqz::fail((code), (msg));         \
  } while (0)
