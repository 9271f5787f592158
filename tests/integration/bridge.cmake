# Integration tests of rlb-bridge + rlb-worker + trainer ranks as processes on the tiny
# model (bridge/, worker/daemon*.c); the reference for generation is `rlb generate`.
# test_lora_bridge: the same with LoRA adapters, against checkpoints of merged weights.
# test_staged_loads: the load protocol of staged syncs, each side under a scripted peer.
foreach(t test_bridge test_lora_bridge test_staged_loads)
  rlb_add_test(NAME ${t}
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/${t}.c ${CMAKE_CURRENT_LIST_DIR}/bridge_harness.c
               LIBS rlb_bridge_core rlb_client_static rlb_worker Threads::Threads
               LABELS integration TIMEOUT 300)
  add_dependencies(${t} rlb)
  target_compile_definitions(${t} PRIVATE RLB_BIN="$<TARGET_FILE:rlb>")
endforeach()

# test_peft_fixture: the merge against PEFT's own merge_and_unload() (tests/fixtures/peft_lora,
# written by scripts/make_peft_fixture.py); skips (77) until that fixture exists.
rlb_add_test(NAME test_peft_fixture
             SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_peft_fixture.c
                     ${CMAKE_CURRENT_LIST_DIR}/bridge_harness.c
             LIBS rlb_bridge_core rlb_client_static rlb_worker Threads::Threads m
             LABELS integration TIMEOUT 300)
add_dependencies(test_peft_fixture rlb)
target_compile_definitions(test_peft_fixture PRIVATE RLB_BIN="$<TARGET_FILE:rlb>"
                           RLB_FIXTURES_DIR="${PROJECT_SOURCE_DIR}/tests/fixtures")
