# Reshard planner, source layouts, parameter list, plan executor and dtype conversion.
rlb_add_test(NAME test_convert SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_convert.c
             LIBS rlb_kernels_cpu m LABELS unit)
rlb_add_test(NAME test_plan SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_plan.c
             LIBS rlb_kernels_cpu m LABELS unit)
# The executor runs threads: its large, split ops also run under TSan.
rlb_add_test(NAME test_plan_misuse SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_plan_misuse.c
             LIBS rlb_kernels_cpu m LABELS "unit;tsan")
# The FSDP1 flat layout of the tests and of `rlb stress` (model/params.h).
rlb_add_test(NAME test_fsdp1_layout SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_fsdp1_layout.c
             LIBS rlb_model LABELS unit TIMEOUT 30)
