# Unit tests of the model readers: HF config.json and safetensors checkpoints. Their
# argument is the fuzz seed corpus, which also holds files written by transformers and the
# reference safetensors library.
rlb_add_test(NAME test_config SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_config.c
             LIBS rlb_model LABELS unit TIMEOUT 60
             ARGS ${CMAKE_CURRENT_LIST_DIR}/../fuzz/corpus/config)
rlb_add_test(NAME test_safetensors SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_safetensors.c
             LIBS rlb_model LABELS unit TIMEOUT 60
             ARGS ${CMAKE_CURRENT_LIST_DIR}/../fuzz/corpus/safetensors)
