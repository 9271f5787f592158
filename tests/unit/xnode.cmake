# Which chunks a node need not send again to another node's whole staging (bridge/xnode_delta.h).
rlb_add_test(NAME test_xnode_delta SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_xnode_delta.c
             LIBS rlb_bridge_core LABELS unit)
# The registration blob the bridges of several nodes exchange (bridge/xnode_meta.h).
rlb_add_test(NAME test_xnode_meta SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_xnode_meta.c
             LIBS rlb_bridge_core m LABELS unit)
