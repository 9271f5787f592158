# Fault tests (issue: "rlb stress, and the holes it must prove closed"): real bridge,
# workers and trainer ranks through bridge_harness.c, each program one kind of fault.
function(rlb_fault_test name)
  rlb_add_test(NAME ${name}
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/${name}.c ${CMAKE_CURRENT_LIST_DIR}/bridge_harness.c
               LIBS rlb_bridge_core rlb_client_static rlb_worker Threads::Threads
               LABELS integration TIMEOUT 300)
  add_dependencies(${name} rlb)
  target_compile_definitions(${name} PRIVATE RLB_BIN="$<TARGET_FILE:rlb>")
endfunction()

rlb_fault_test(test_poison)
rlb_fault_test(test_retry)
rlb_fault_test(test_heal)
rlb_fault_test(test_hung)
rlb_fault_test(test_requests)
rlb_fault_test(test_hostile)
rlb_fault_test(test_noblock)
