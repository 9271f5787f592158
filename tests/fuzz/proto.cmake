# libFuzzer target for the protocol decoder. The seeds in corpus/proto are written by
# `test_proto --write-corpus DIR`.
file(GLOB RLB_PROTO_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/common/proto*.c)
rlb_add_fuzzer(NAME fuzz_proto
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/fuzz_proto.c ${RLB_PROTO_SOURCES}
               LIBS rlb_common CORPUS ${CMAKE_CURRENT_LIST_DIR}/corpus/proto)
