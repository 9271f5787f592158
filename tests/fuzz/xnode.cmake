# libFuzzer target for the registration blob the bridges of several nodes exchange
# (bridge/xnode_meta.c), over the seeds `test_xnode_meta --write-corpus` wrote to
# corpus/xnode_meta.
rlb_add_fuzzer(NAME fuzz_xnode_meta
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/fuzz_xnode_meta.c
                       ${PROJECT_SOURCE_DIR}/bridge/xnode_meta.c
               LIBS rlb_common m CORPUS ${CMAKE_CURRENT_LIST_DIR}/corpus/xnode_meta)
