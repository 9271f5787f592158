# Integration tests of rlb-bridge + rlb-worker + trainer ranks as processes on the tiny
# model (bridge/, worker/daemon*.c); the reference for generation is `rlb generate`.
# test_lora_bridge: the same with LoRA adapters, against checkpoints of merged weights.
foreach(t test_bridge test_lora_bridge)
  rlb_add_test(NAME ${t}
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/${t}.c ${CMAKE_CURRENT_LIST_DIR}/bridge_harness.c
               LIBS rlb_bridge_core rlb_client_static rlb_worker Threads::Threads
               LABELS integration TIMEOUT 300)
  add_dependencies(${t} rlb)
  target_compile_definitions(${t} PRIVATE RLB_BIN="$<TARGET_FILE:rlb>")
endforeach()
