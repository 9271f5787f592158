# libFuzzer target for the protocol decoder (RLB_FUZZ=ON with clang). The protocol sources
# are compiled into it with the fuzzer's coverage and ASan/UBSan; the rest of rlb_common
# (logging, error names) links as usual. `ctest -L fuzz` runs it for a minute over the
# committed corpus (tests/fuzz/corpus/proto, written by `test_proto --write-corpus DIR`);
# inputs it finds go to the build tree, never into the source tree.
if(RLB_FUZZ AND CMAKE_C_COMPILER_ID MATCHES "Clang")
  file(GLOB RLB_PROTO_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/common/proto*.c)
  set(RLB_FUZZ_PROTO_FLAGS -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
      -fno-omit-frame-pointer)
  add_executable(fuzz_proto ${CMAKE_CURRENT_LIST_DIR}/fuzz_proto.c ${RLB_PROTO_SOURCES})
  rlb_target_defaults(fuzz_proto)
  target_compile_options(fuzz_proto PRIVATE ${RLB_FUZZ_PROTO_FLAGS})
  target_link_options(fuzz_proto PRIVATE ${RLB_FUZZ_PROTO_FLAGS})
  target_link_libraries(fuzz_proto PRIVATE rlb_common)
  set(RLB_FUZZ_PROTO_WORK ${CMAKE_CURRENT_BINARY_DIR}/fuzz_proto_corpus)
  file(MAKE_DIRECTORY ${RLB_FUZZ_PROTO_WORK})
  add_test(NAME fuzz_proto
           COMMAND fuzz_proto -max_total_time=60 -timeout=10 -rss_limit_mb=2048
                   ${RLB_FUZZ_PROTO_WORK} ${PROJECT_SOURCE_DIR}/tests/fuzz/corpus/proto)
  set_tests_properties(fuzz_proto PROPERTIES LABELS fuzz TIMEOUT 180)
elseif(RLB_FUZZ)
  message(WARNING "RLB_FUZZ needs clang (CC=clang); fuzz_proto is not built")
endif()
