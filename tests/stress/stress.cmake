# `rlb stress` for 60 s with every fault kind (DESIGN §11): exit 0, zero violations in its
# JSON line, and at least a few faults of each kind actually injected.
if(TARGET rlb AND TARGET rlb_bridge_core)
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_Interpreter_FOUND)
    add_test(NAME test_stress
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/check_stress.py
                     $<TARGET_FILE:rlb> --duration 60 --seed 20261205)
    set_tests_properties(test_stress PROPERTIES LABELS stress TIMEOUT 300)
  endif()
endif()
