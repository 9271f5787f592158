# rlb-bench-lora-gemm: the LoRA merge (base + s*B*A) as cuBLASLt products with the base as C,
# at Llama-3-8B shapes, against a device memcpy of the same bytes (run on the GPU machine).
# Built only with CUDA (cuBLASLt comes with it).
if(TARGET rlb_kernels_cuda)
  add_executable(rlb-bench-lora-gemm ${CMAKE_CURRENT_LIST_DIR}/bench_lora_gemm.c)
  rlb_target_defaults(rlb-bench-lora-gemm)
  target_link_libraries(rlb-bench-lora-gemm PRIVATE rlb_common CUDA::cublasLt CUDA::cudart m)
endif()
