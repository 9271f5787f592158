# The CPU rollout engine (worker/, kernels/cpu/ops*, sample): against HF transformers'
# fixtures (tests/fixtures), brute-force sampling references, batch / TP / cache-pressure
# invariance, and the `rlb generate` command. Tests that fork TP ranks over shared memory
# also run under TSan.
add_library(rlb_test_engine_util STATIC ${CMAKE_CURRENT_LIST_DIR}/engine_util.c)
rlb_target_defaults(rlb_test_engine_util)
target_compile_definitions(rlb_test_engine_util PRIVATE
                           RLB_FIXTURES_DIR="${PROJECT_SOURCE_DIR}/tests/fixtures")
target_link_libraries(rlb_test_engine_util PUBLIC rlb_worker PkgConfig::JANSSON m)

rlb_add_test(NAME test_engine_hf SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_hf.c
             LIBS rlb_test_engine_util LABELS "unit;tsan" TIMEOUT 180)
rlb_add_test(NAME test_engine_sample SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_sample.c
             LIBS rlb_kernels_cpu m LABELS unit TIMEOUT 60)
rlb_add_test(NAME test_engine_batch SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_batch.c
             LIBS rlb_test_engine_util LABELS "unit;tsan" TIMEOUT 180)
if(TARGET rlb)
  rlb_add_test(NAME test_engine_generate
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_generate.c
               LIBS rlb_test_engine_util LABELS unit TIMEOUT 180)
  target_compile_definitions(test_engine_generate PRIVATE RLB_BIN="$<TARGET_FILE:rlb>")
  if(RLB_HAVE_CUDA) # its test_cuda_tp runs rlb generate on GPUs where there are some
    target_compile_definitions(test_engine_generate PRIVATE RLB_TEST_CUDA=1)
  endif()
  add_dependencies(test_engine_generate rlb)
endif()
rlb_add_test(NAME test_engine_kv SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_kv.c
             LIBS rlb_worker LABELS unit TIMEOUT 60)
rlb_add_test(NAME test_engine_ops SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_engine_ops.c
             LIBS rlb_kernels_cpu m LABELS unit TIMEOUT 60)
# The tensor-core decode attention's register layout (kernels/cuda/engine_ops.cu), its warp
# simulated lane by lane in plain Python: where no GPU is, the index algebra is still checked.
if(Python3_Interpreter_FOUND)
  add_test(NAME test_mma_layout
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_mma_layout.py)
  set_tests_properties(test_mma_layout PROPERTIES LABELS unit TIMEOUT 60)
endif()
