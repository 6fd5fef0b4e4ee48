// The ctest programs' one assertion: LS_CHECK counts a failure and goes on, so
// one run reports every failed check; main returns report(...).
#pragma once
#include <cstdio>

static int failures = 0;
#define LS_CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                                    \
    }                                                                                \
  } while (0)

// The exit status: 1 (and the count on stderr) when a check failed.
static int report(const char* what) {
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", what);
  return 0;
}
