# Unit tests of the multi-node pieces: the rendezvous store over loopback TCP, the transport
# between bridges.
rlb_add_test(NAME test_store SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_store.c
             LIBS rlb_common Threads::Threads LABELS unit tsan TIMEOUT 60)
# The cross-node transport between bridges, where this build has UCX.
if(TARGET rlb_xport)
  rlb_add_test(NAME test_xport SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_xport.c
               LIBS rlb_xport rlb_common LABELS unit TIMEOUT 240)
endif()
# The fault schedule of `rlb stress` (launch/stress_sched.c): one seed, one schedule.
rlb_add_test(NAME test_stress_sched
             SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_stress_sched.c
                     ${PROJECT_SOURCE_DIR}/launch/stress_sched.c
             LIBS m LABELS unit TIMEOUT 30)
# Whole option values of the rlb subcommands (common/cli_args.c), and `rlb stress`, `rlb
# bridge`, `rlb worker`, `rlb demo` and rlb-toy-trainer refusing bad ones.
rlb_add_test(NAME test_cli_args SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cli_args.c
             LIBS rlb_common LABELS unit TIMEOUT 60)
target_compile_definitions(test_cli_args PRIVATE RLB_BIN="$<TARGET_FILE:rlb>"
                           TOY_BIN="$<TARGET_FILE:rlb-toy-trainer>")
add_dependencies(test_cli_args rlb rlb-toy-trainer)
