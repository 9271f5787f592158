# libFuzzer targets for the model readers: the safetensors header parser and the HF
# config.json parser. Built only with RLB_FUZZ=ON and clang. The reader sources are
# compiled into each fuzzer (not linked from rlb_model) so they carry the fuzzer's coverage
# instrumentation and sanitizers. Each ctest entry runs ~30 s from the seed corpus in
# corpus/<name>/; new inputs go to a scratch corpus in the build tree, never the sources.
if(RLB_FUZZ AND CMAKE_C_COMPILER_ID MATCHES "Clang")
  set(RLB_FUZZ_FLAGS -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
  foreach(name safetensors config)
    add_executable(fuzz_${name} ${CMAKE_CURRENT_LIST_DIR}/fuzz_${name}.c
                   ${PROJECT_SOURCE_DIR}/model/config.c ${PROJECT_SOURCE_DIR}/model/safetensors.c)
    rlb_target_defaults(fuzz_${name})
    target_compile_options(fuzz_${name} PRIVATE ${RLB_FUZZ_FLAGS})
    target_link_options(fuzz_${name} PRIVATE ${RLB_FUZZ_FLAGS})
    target_link_libraries(fuzz_${name} PRIVATE rlb_common PkgConfig::JANSSON m)
    set(scratch ${CMAKE_CURRENT_BINARY_DIR}/fuzz-corpus-${name})
    file(MAKE_DIRECTORY ${scratch})
    add_test(NAME fuzz_${name}
             COMMAND fuzz_${name} -max_total_time=30 -timeout=10 -rss_limit_mb=2048
                     ${scratch} ${CMAKE_CURRENT_LIST_DIR}/corpus/${name})
    set_tests_properties(fuzz_${name} PROPERTIES LABELS fuzz TIMEOUT 120)
  endforeach()
elseif(RLB_FUZZ)
  message(WARNING "RLB_FUZZ=ON needs clang (CC=clang); the model fuzzers are not built")
endif()
