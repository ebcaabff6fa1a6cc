// The check macro of the host-only test programs in this folder: counts failures, prints the first 20.
#pragma once
#include <cstdio>

namespace segclip_test {
inline int g_failures = 0;
}

#define EXPECT(cond, ...)                                                 \
  do {                                                                    \
    if (!(cond)) {                                                        \
      if (++segclip_test::g_failures <= 20) {                             \
        std::fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__, #cond);   \
        std::fprintf(stderr, __VA_ARGS__);                                \
        std::fprintf(stderr, "\n");                                       \
      }                                                                   \
    }                                                                     \
  } while (0)
