# rlb-bench-engine: CPU engine decode (batch 1, 8, 32) and prefill tokens/s on a ~50M
# parameter model, weight-read bandwidth against memcpy, int8 against fp32.
if(TARGET rlb_worker)
  add_executable(rlb-bench-engine ${CMAKE_CURRENT_LIST_DIR}/bench_engine.c)
  rlb_target_defaults(rlb-bench-engine)
  target_link_libraries(rlb-bench-engine PRIVATE rlb_worker m)
endif()
