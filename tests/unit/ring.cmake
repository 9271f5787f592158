# Unit tests of the shared-memory ring, segments and connections (common/ring, shm, conn).
# test_ring also writes the ring fuzzer's seeds and checks the committed ones are current:
#   test_ring --write-corpus tests/fuzz/corpus/ring
rlb_add_test(NAME test_ring SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_ring.c
             LIBS rlb_common LABELS unit TIMEOUT 60)
target_compile_definitions(test_ring PRIVATE
                           RLB_RING_CORPUS="${PROJECT_SOURCE_DIR}/tests/fuzz/corpus/ring")
rlb_add_test(NAME test_ring_threads
             SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_ring_threads.c ${CMAKE_CURRENT_LIST_DIR}/ring_traffic.c
             LIBS rlb_common LABELS unit tsan TIMEOUT 120)
rlb_add_test(NAME test_ring_procs
             SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_ring_procs.c ${CMAKE_CURRENT_LIST_DIR}/ring_traffic.c
             LIBS rlb_common LABELS unit tsan TIMEOUT 120)
rlb_add_test(NAME test_ring_stream
             SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_ring_stream.c ${CMAKE_CURRENT_LIST_DIR}/ring_traffic.c
             LIBS rlb_common Threads::Threads LABELS unit tsan TIMEOUT 300)
rlb_add_test(NAME test_conn SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_conn.c
             LIBS rlb_common Threads::Threads LABELS unit tsan TIMEOUT 60)
# Every close() of the program and of rlb_common goes through the test's __wrap_close, which
# counts closes of fds that are not open (double closes).
target_link_options(test_conn PRIVATE -Wl,--wrap=close)
# The same program checks peers of another uid: as root only, else it exits 77 (skip).
add_test(NAME test_conn_uid COMMAND test_conn uid)
set_tests_properties(test_conn_uid PROPERTIES LABELS "unit;tsan" TIMEOUT 60 SKIP_RETURN_CODE 77)
