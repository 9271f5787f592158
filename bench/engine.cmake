# rlb-bench-engine: CPU engine decode (batch 1, 8, 32) and prefill tokens/s on a ~50M
# parameter model, weight-read bandwidth against memcpy, int8 against fp32. In CUDA builds,
# `--device cuda` runs the CUDA backend's benchmark (bench_engine_cuda.c) instead.
if(TARGET rlb_worker)
  add_executable(rlb-bench-engine ${CMAKE_CURRENT_LIST_DIR}/bench_engine.c)
  rlb_target_defaults(rlb-bench-engine)
  target_link_libraries(rlb-bench-engine PRIVATE rlb_worker m)
  if(TARGET rlb_engine_cuda)
    target_sources(rlb-bench-engine PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bench_engine_cuda.c)
    target_compile_definitions(rlb-bench-engine PRIVATE RLB_BENCH_CUDA=1)
    target_link_libraries(rlb-bench-engine PRIVATE rlb_engine_cuda)
  endif()
endif()
