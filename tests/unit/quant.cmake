# Post-load quantization, CPU reference (kernels/cpu/quant.c) against brute force and
# hand-worked values.
rlb_add_test(NAME test_quant SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_quant.c
             LIBS rlb_kernels_cpu m LABELS unit TIMEOUT 60)
