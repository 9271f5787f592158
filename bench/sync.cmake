# rlb-bench-sync: end-to-end weight sync on the CPU backend (bridge + workers as processes,
# a librlb trainer) against memcpy, and the bridge's control CPU time per sync.
add_executable(rlb-bench-sync ${CMAKE_CURRENT_LIST_DIR}/bench_sync.c)
rlb_target_defaults(rlb-bench-sync)
target_link_libraries(rlb-bench-sync PRIVATE rlb_bridge_core rlb_client_static rlb_worker)
set_target_properties(rlb-bench-sync PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR})
