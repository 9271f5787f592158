# rlb-bench-sync: end-to-end weight sync on the CPU backend (bridge + workers as processes,
# a librlb trainer) against memcpy, and the bridge's control CPU time per sync.
add_executable(rlb-bench-sync ${CMAKE_CURRENT_LIST_DIR}/bench_sync.c)
rlb_target_defaults(rlb-bench-sync)
target_link_libraries(rlb-bench-sync PRIVATE rlb_bridge_core rlb_client_static rlb_worker)
set_target_properties(rlb-bench-sync PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR})
# In CUDA builds `--device cuda` runs the GPU sync benchmark (bench_sync_cuda.c) instead;
# `--device cuda --lora` its LoRA sync against a full one (peer: bench/peft_merge_peer.py).
if(TARGET rlb_kernels_cuda)
  target_sources(rlb-bench-sync PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bench_sync_cuda.c
                                        ${CMAKE_CURRENT_LIST_DIR}/bench_vmm.c)
  target_compile_definitions(rlb-bench-sync PRIVATE RLB_BENCH_CUDA=1)
  target_link_libraries(rlb-bench-sync PRIVATE CUDA::cudart)
  add_dependencies(rlb-bench-sync rlb)
endif()
