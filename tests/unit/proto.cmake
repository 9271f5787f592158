# The msgpack protocol (common/proto*.c): round trips of every message type, the bounded
# writer, malformed and invalid input. The same program writes the fuzz corpus:
#   test_proto --write-corpus tests/fuzz/corpus/proto
rlb_add_test(NAME test_proto SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_proto.c
             LIBS rlb_common m LABELS unit TIMEOUT 120)
target_compile_definitions(test_proto PRIVATE
                           RLB_PROTO_CORPUS="${PROJECT_SOURCE_DIR}/tests/fuzz/corpus/proto")
