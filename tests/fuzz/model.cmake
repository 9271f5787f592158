# libFuzzer targets for the model readers: the safetensors header parser and the HF
# config.json parser, over the seed corpora in corpus/<name>/.
foreach(name safetensors config)
  rlb_add_fuzzer(NAME fuzz_${name} SECONDS 30
                 SOURCES ${CMAKE_CURRENT_LIST_DIR}/fuzz_${name}.c
                         ${PROJECT_SOURCE_DIR}/model/config.c ${PROJECT_SOURCE_DIR}/model/safetensors.c
                 LIBS rlb_common PkgConfig::JANSSON m
                 CORPUS ${CMAKE_CURRENT_LIST_DIR}/corpus/${name})
endforeach()
