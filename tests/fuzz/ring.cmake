# libFuzzer target for the ring reader over a corrupted segment (RLB_FUZZ=ON with clang).
# ring.c is compiled into it with the fuzzer's coverage and ASan/UBSan; the rest of
# rlb_common (logging, knobs, error names) links as usual. `ctest -L fuzz` runs it for a
# minute over the committed seeds (tests/fuzz/corpus/ring, written by
# `test_ring --write-corpus DIR`); inputs it finds go to the build tree.
if(RLB_FUZZ AND CMAKE_C_COMPILER_ID MATCHES "Clang")
  set(RLB_FUZZ_RING_FLAGS -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
      -fno-omit-frame-pointer)
  add_executable(fuzz_ring ${CMAKE_CURRENT_LIST_DIR}/fuzz_ring.c
                 ${PROJECT_SOURCE_DIR}/common/ring.c)
  rlb_target_defaults(fuzz_ring)
  target_compile_options(fuzz_ring PRIVATE ${RLB_FUZZ_RING_FLAGS})
  target_link_options(fuzz_ring PRIVATE ${RLB_FUZZ_RING_FLAGS})
  target_link_libraries(fuzz_ring PRIVATE rlb_common)
  set(RLB_FUZZ_RING_WORK ${CMAKE_CURRENT_BINARY_DIR}/fuzz_ring_corpus)
  file(MAKE_DIRECTORY ${RLB_FUZZ_RING_WORK})
  add_test(NAME fuzz_ring
           COMMAND fuzz_ring -max_total_time=60 -timeout=10 -rss_limit_mb=2048
                   ${RLB_FUZZ_RING_WORK} ${PROJECT_SOURCE_DIR}/tests/fuzz/corpus/ring)
  set_tests_properties(fuzz_ring PROPERTIES LABELS fuzz TIMEOUT 180)
elseif(RLB_FUZZ)
  message(WARNING "RLB_FUZZ needs clang (CC=clang); fuzz_ring is not built")
endif()
