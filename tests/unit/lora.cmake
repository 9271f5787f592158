# LoRA adapters: PEFT names, the parameter list, and the merge against a naive reference.
rlb_add_test(NAME test_lora SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_lora.c
             LIBS rlb_kernels_cpu m LABELS "unit;tsan")
rlb_add_test(NAME test_lora_names SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_lora_names.c
             LIBS rlb_client_static LABELS unit)
# The Python side (peft_to_hf, rlbridge.torch's PEFT walk on a stand-in model): no torch.
# RLB_PY_ENV (librlb's path, ASan preloading) comes from tests/integration/client.cmake,
# included before this fragment (fragments go in sorted order).
if(Python3_Interpreter_FOUND AND RLB_PY_ENV)
  add_test(NAME test_lora_py
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_lora_py.py)
  set_tests_properties(test_lora_py PROPERTIES LABELS unit TIMEOUT 60
                       ENVIRONMENT "${RLB_PY_ENV}")
endif()
