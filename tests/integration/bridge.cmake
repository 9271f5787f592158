# Integration tests of rlb-bridge + rlb-worker + trainer ranks as processes on the tiny
# model (bridge/, worker/daemon*.c); the reference for generation is `rlb generate`.
rlb_add_test(NAME test_bridge
             SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_bridge.c ${CMAKE_CURRENT_LIST_DIR}/bridge_harness.c
             LIBS rlb_bridge_core rlb_client_static rlb_worker Threads::Threads
             LABELS integration TIMEOUT 300)
add_dependencies(test_bridge rlb)
target_compile_definitions(test_bridge PRIVATE RLB_BIN="$<TARGET_FILE:rlb>")
