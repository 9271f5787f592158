# Unit tests of the launcher's pieces: the rendezvous store over loopback TCP.
rlb_add_test(NAME test_store SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_store.c
             LIBS rlb_common Threads::Threads LABELS unit tsan TIMEOUT 60)
