# rlb-bench-ring: the shared-memory ring between two processes (64 B latency spinning and
# woken, 64 B messages/s, 4 MiB GB/s) against an AF_UNIX socketpair in the same run.
add_executable(rlb-bench-ring ${CMAKE_CURRENT_LIST_DIR}/bench_ring.c)
rlb_target_defaults(rlb-bench-ring)
target_link_libraries(rlb-bench-ring PRIVATE rlb_common m)
