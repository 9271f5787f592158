# rlb-bench-lora: LoRA sync (the bridge's merge) vs a full sync and vs merging on the trainer.
add_executable(rlb-bench-lora ${CMAKE_CURRENT_LIST_DIR}/bench_lora.c)
rlb_target_defaults(rlb-bench-lora)
target_include_directories(rlb-bench-lora SYSTEM PRIVATE ${RLB_CBLAS_INCLUDE})
target_link_libraries(rlb-bench-lora PRIVATE rlb_kernels_cpu)
