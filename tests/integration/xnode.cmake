# Bridges across nodes (bridge/xnode.h): 2 and 3 nodes on this machine, each its own `rlb
# launch` with its own socket directory and loopback address; xnode_trainer is the trainer
# script every node runs, test_xnode.py the driver (versions, checks, kill -9 faults).
# test_xnode_netns.py: the same with each node in its own network namespace, joined by veths
# (skipped where `ip netns add` cannot run: not root, or no iproute2).
# test_xnode_gate: two bridges forked by the test, which reads their store to act at exact
# points of the protocol (the gate under a trainer restart's timings).
if(TARGET rlb AND TARGET rlb_xport)
  rlb_add_test(NAME test_xnode_gate
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_xnode_gate.c
                       ${CMAKE_CURRENT_LIST_DIR}/bridge_harness.c
               LIBS rlb_bridge_core rlb_client_static rlb_worker Threads::Threads
               LABELS integration TIMEOUT 180)
  target_compile_definitions(test_xnode_gate PRIVATE RLB_BIN="$<TARGET_FILE:rlb>")
  add_executable(xnode_trainer ${CMAKE_CURRENT_LIST_DIR}/xnode_trainer.c
                 ${CMAKE_CURRENT_LIST_DIR}/bridge_harness.c)
  rlb_target_defaults(xnode_trainer)
  target_link_libraries(xnode_trainer PRIVATE rlb_bridge_core rlb_client_static rlb_worker
                        Threads::Threads m)
  target_compile_definitions(xnode_trainer PRIVATE RLB_BIN="$<TARGET_FILE:rlb>")
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_Interpreter_FOUND)
    add_test(NAME test_xnode
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_xnode.py
                     $<TARGET_FILE:rlb> $<TARGET_FILE:xnode_trainer>)
    set_tests_properties(test_xnode PROPERTIES LABELS integration TIMEOUT 300
                         SKIP_RETURN_CODE 77)
    add_test(NAME test_xnode_netns
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_xnode_netns.py
                     $<TARGET_FILE:rlb> $<TARGET_FILE:xnode_trainer>)
    set_tests_properties(test_xnode_netns PROPERTIES LABELS integration TIMEOUT 180
                         SKIP_RETURN_CODE 77)
  endif()
endif()
