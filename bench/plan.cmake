# rlb-bench-plan: reshard plan build time (8B shapes) and CPU executor against memcpy.
add_executable(rlb-bench-plan ${CMAKE_CURRENT_LIST_DIR}/bench_plan.c)
rlb_target_defaults(rlb-bench-plan)
target_link_libraries(rlb-bench-plan PRIVATE rlb_kernels_cpu)
