// EXPECT(cond, printf-style message) for the ctest programs: prints the failed condition
// with the message and counts it in `failures` (the program's exit status); stops the
// program after 20 failures.
#pragma once

#include <cstdio>
#include <cstdlib>

inline int failures = 0;

#define EXPECT(cond, ...)                                             \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                              \
      std::fprintf(stderr, "\n");                                     \
      if (++failures > 20) std::exit(1);                              \
    }                                                                 \
  } while (0)
