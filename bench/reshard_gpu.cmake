# rlb-bench-reshard-gpu: the CUDA reshard executor and fp8 post-processing at Llama-3-8B size
# against a device memcpy and the PyTorch baseline, or (--lora) with the LoRA merges (run on
# the GPU machine). Built only with the CUDA kernels.
if(TARGET rlb_kernels_cuda)
  add_executable(rlb-bench-reshard-gpu ${CMAKE_CURRENT_LIST_DIR}/bench_reshard_gpu.c
                                       ${CMAKE_CURRENT_LIST_DIR}/bench_vmm.c)
  rlb_target_defaults(rlb-bench-reshard-gpu)
  target_link_libraries(rlb-bench-reshard-gpu PRIVATE rlb_kernels_cuda m)
endif()
