# GPU weight path (kernels/cuda): the CUDA reshard executor against the CPU executor (one
# GPU; the executor seam over host and VMM memory, test_cuda_executor; two GPUs through peer access and through the staged fallback), CUDA IPC memory
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
  # The GPU digest of device byte ranges (kernels/cuda/digest.h) against its plain C
  # definition: every tail length at aligned and unaligned starts, changed and swapped bytes.
  rlb_add_test(NAME test_cuda_digest SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_digest.c
               LIBS rlb_kernels_cuda LABELS gpu TIMEOUT 120)
  rlb_add_test(NAME test_cuda_executor SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_executor.c
               LIBS rlb_kernels_cuda LABELS gpu TIMEOUT 300)
  # LoRA merges on the GPU against the CPU executor and a double-precision W + s * B * A.
  rlb_add_test(NAME test_cuda_lora SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_lora.c
               LIBS rlb_kernels_cuda m LABELS gpu TIMEOUT 600)
  rlb_add_test(NAME test_cuda_ipc SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_ipc.c
               LIBS rlb_kernels_cuda LABELS gpu TIMEOUT 300)
  # librlb's device tensors (CUDA IPC, VMM fds, host staging, publish event, lifetime)
  # against a fake bridge process; the driver is dlopen'ed, only cuda.h is needed here.
  rlb_add_test(NAME test_client_cuda SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_client_cuda.c
               LIBS rlb_client_static Threads::Threads LABELS gpu TIMEOUT 300)
  target_include_directories(test_client_cuda PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
endif()
# The CUDA engine's kernels (kernels/cuda/engine_ops.h) against the CPU ops and sampler.
if(TARGET rlb_kernels_cuda)
  rlb_add_test(NAME test_cuda_engine_ops SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_engine_ops.c
               LIBS rlb_kernels_cuda m LABELS gpu TIMEOUT 300)
endif()
# The CUDA engine backend against the CPU backend through the forward pass, and the whole
# model against the HF fixtures through the engine (rlb_test_engine_util is defined by
# tests/unit/engine.cmake, read after this file).
if(TARGET rlb_engine_cuda)
  rlb_add_test(NAME test_cuda_backend SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_backend.c
               LIBS rlb_engine_cuda rlb_test_engine_util m LABELS gpu TIMEOUT 300)
endif()

# The bridge writing a GPU worker's weights through the CUDA executor, against the CPU
# engine's greedy tokens (bridge_harness.c); exits 77 without a GPU.
if(TARGET rlb_engine_cuda)
  rlb_add_test(NAME test_gpu_bridge
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_gpu_bridge.c
                       ${PROJECT_SOURCE_DIR}/tests/integration/bridge_harness.c
               LIBS rlb_bridge_core rlb_client_static rlb_worker Threads::Threads
               LABELS gpu TIMEOUT 300)
  add_dependencies(test_gpu_bridge rlb)
  target_compile_definitions(test_gpu_bridge PRIVATE RLB_BIN="$<TARGET_FILE:rlb>")
endif()

# These tests check that device memory returns to its baseline, and cudaMemGetInfo counts
# every process on the GPU: they run alone, not beside other tests that hold device memory.
foreach(t test_client_cuda test_cuda_backend test_cuda_executor test_cuda_ipc)
  if(TEST ${t})
    set_tests_properties(${t} PROPERTIES RUN_SERIAL TRUE)
  endif()
endforeach()

# The NCCL transport between bridges (bridge/xport/xport_nccl.c): a buffer moved both ways
# between two endpoints, checked byte for byte: on GPUs 0 and 1, or with one GPU both on GPU
# 0, each endpoint a host of its own to NCCL (its own NCCL_HOSTID, NCCL_SOCKET_IFNAME=lo) so
# the bytes go through NCCL's socket transport over loopback; exits 77 without a GPU. Built
# where the CUDA build found NCCL.
if(TARGET rlb_xport_nccl)
  rlb_add_test(NAME test_xport_nccl SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_xport_nccl.c
               LIBS rlb_xport_nccl LABELS gpu TIMEOUT 180)
endif()

# Two bridges of a multi-node job on one GPU (bridge/xnode.h), trainers' tensors in GPU
# memory (the test's own cudaMalloc) moved between them through NCCL (each bridge its own
# NCCL_HOSTID, over loopback), GPU workers checked against the CPU engine's greedy tokens
# (bridge_harness.c), and a bridge killed while the other node's trainer waits in a
# version; exits 77 without a GPU. Needs UCX too (the bridges of a job start it).
if(TARGET rlb_engine_cuda AND TARGET rlb_xport_nccl AND TARGET rlb_xport)
  rlb_add_test(NAME test_xnode_gpu
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_xnode_gpu.c
                       ${PROJECT_SOURCE_DIR}/tests/integration/bridge_harness.c
               LIBS rlb_bridge_core rlb_client_static rlb_worker rlb_xport_nccl CUDA::cudart
                    Threads::Threads
               LABELS gpu TIMEOUT 300)
  add_dependencies(test_xnode_gpu rlb)
  target_compile_definitions(test_xnode_gpu PRIVATE RLB_BIN="$<TARGET_FILE:rlb>")
endif()
