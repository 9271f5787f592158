# `rlb stress` with every fault kind (DESIGN §11), 35 s in each sync mode, one run after
# the other: pause mode (2 replicas of TP 1) and staged mode (2 replicas of TP 2). Each
# must exit 0 with zero violations in its JSON line and at least a few faults of each kind
# actually injected (the seeds' schedules hold them).
if(TARGET rlb AND TARGET rlb_bridge_core)
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_Interpreter_FOUND)
    add_test(NAME test_stress
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/check_stress.py
                     $<TARGET_FILE:rlb> "--duration 35 --seed 20261218"
                     "--duration 35 --seed 20261204 --mode staged --tp 2")
    set_tests_properties(test_stress PROPERTIES LABELS stress TIMEOUT 300)
  endif()
endif()
