# Unit tests of the multi-node pieces: the rendezvous store over loopback TCP, the transport
# between bridges.
rlb_add_test(NAME test_store SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_store.c
             LIBS rlb_common Threads::Threads LABELS unit tsan TIMEOUT 60)
# The cross-node transport between bridges, where this build has UCX.
if(TARGET rlb_xport)
  rlb_add_test(NAME test_xport SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_xport.c
               LIBS rlb_xport rlb_common LABELS unit TIMEOUT 120)
endif()
