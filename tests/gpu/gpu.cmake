# GPU weight path (kernels/cuda): the CUDA reshard executor against the CPU executor (one
# GPU; two GPUs through peer access and through the staged fallback), CUDA IPC memory
# references across processes (three-process reshard, handle leak), and the quantization
# kernels against the CPU reference. Each gpu test exits 77 (skip) where no GPU (or, for
# test_cuda_peer, no second GPU) is visible; test_cuda_stage replays the staged fallback's
# windows on the host and runs everywhere. Where nvcc is absent kernels/cuda is not built
# and these are not defined.
if(TARGET rlb_kernels_cuda)
  rlb_add_test(NAME test_cuda_plan_exec SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_plan_exec.c
               LIBS rlb_kernels_cuda LABELS gpu TIMEOUT 300)
  rlb_add_test(NAME test_cuda_peer SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_peer.c
               LIBS rlb_kernels_cuda LABELS gpu TIMEOUT 300)
  rlb_add_test(NAME test_cuda_stage SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_stage.c
               LIBS rlb_kernels_cuda LABELS unit TIMEOUT 120)
  rlb_add_test(NAME test_cuda_quant SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_quant.c
               LIBS rlb_kernels_cuda m LABELS gpu TIMEOUT 120)
  rlb_add_test(NAME test_cuda_ipc SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_ipc.c
               LIBS rlb_kernels_cuda LABELS gpu TIMEOUT 300)
  # librlb's device tensors (CUDA IPC, VMM fds, host staging, publish event, lifetime)
  # against a fake bridge process; the driver is dlopen'ed, only cuda.h is needed here.
  rlb_add_test(NAME test_client_cuda SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_client_cuda.c
               LIBS rlb_client_static Threads::Threads LABELS gpu TIMEOUT 300)
  target_include_directories(test_client_cuda PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
endif()
