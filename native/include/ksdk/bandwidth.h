// A multi-threaded host-memory read-bandwidth probe: the floor the expert kernels are judged by.
#pragma once

#include <cstddef>

namespace ksdk {

// Best of `repeats` timed passes reading `bytes` (split across num_threads threads), in GB/s (1e9 B/s).
double read_bandwidth_gbs(size_t bytes, int num_threads, int repeats);

}  // namespace ksdk
