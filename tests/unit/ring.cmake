# Unit tests of the shared-memory ring, segments and connections (common/ring, shm, conn).
rlb_add_test(NAME test_ring SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_ring.c
             LIBS rlb_common LABELS unit TIMEOUT 60)
