# Integration tests of librlb, the Python client, the toy trainer, `rlb demo`, `rlb
# launch` and `rlb doctor` against real `rlb bridge` / `rlb worker` processes the tests
# start themselves. test_client_bridge's 1000 lifetime rounds take 12 s plain and about
# 75 s alone under ThreadSanitizer on a 2-core machine: its bound leaves room for a
# parallel run.
if(TARGET rlb AND TARGET rlb_bridge_core)
  rlb_add_test(NAME test_client_bridge
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_client_bridge.c
               LIBS rlb_client_static Threads::Threads m LABELS integration tsan TIMEOUT 300
               ARGS $<TARGET_FILE:rlb>)
  add_dependencies(test_client_bridge rlb)

  # The Python tests run with the plain python3 of the machine (no third-party packages).
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_Interpreter_FOUND)
    set(RLB_PY_ENV "RLBRIDGE_LIB=$<TARGET_FILE:rlb_shared>")
    if(RLB_ASAN)
      # An instrumented librlb.so inside an uninstrumented python3 needs the ASan runtime
      # loaded first; CPython's own allocations at exit are not ours to leak-check.
      execute_process(COMMAND ${CMAKE_C_COMPILER} -print-file-name=libasan.so
                      OUTPUT_VARIABLE RLB_LIBASAN OUTPUT_STRIP_TRAILING_WHITESPACE)
      list(APPEND RLB_PY_ENV "LD_PRELOAD=${RLB_LIBASAN}" "ASAN_OPTIONS=detect_leaks=0")
    endif()
    add_test(NAME test_client_py
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_client_py.py
                     $<TARGET_FILE:rlb>)
    set_tests_properties(test_client_py PROPERTIES LABELS integration TIMEOUT 120
                         ENVIRONMENT "${RLB_PY_ENV}")
    # rlbridge.torch's name mapping and layouts, from fake torch objects (no torch needed).
    add_test(NAME test_torch_py
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_torch_py.py)
    set_tests_properties(test_torch_py PROPERTIES LABELS integration TIMEOUT 60
                         ENVIRONMENT "${RLB_PY_ENV}")
    add_test(NAME test_demo
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_demo.py
                     $<TARGET_FILE:rlb>)
    set_tests_properties(test_demo PROPERTIES LABELS integration TIMEOUT 300)
    add_test(NAME test_launch
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_launch.py
                     $<TARGET_FILE:rlb>)
    set_tests_properties(test_launch PROPERTIES LABELS integration TIMEOUT 300)
  endif()
endif()
