# Unit tests of the model readers: HF config.json and safetensors checkpoints.
rlb_add_test(NAME test_config SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_config.c
             LIBS rlb_model LABELS unit TIMEOUT 60)
rlb_add_test(NAME test_safetensors SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_safetensors.c
             LIBS rlb_model LABELS unit TIMEOUT 60)
