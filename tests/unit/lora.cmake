# LoRA adapters: PEFT names, the parameter list, and the merge against a naive reference.
rlb_add_test(NAME test_lora SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_lora.c
             LIBS rlb_kernels_cpu m LABELS unit)
rlb_add_test(NAME test_lora_names SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_lora_names.c
             LIBS rlb_client_static LABELS unit)
