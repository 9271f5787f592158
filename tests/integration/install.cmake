# Installed rlbridge (cmake/install.cmake) used as a user would: test_install installs into a
# temporary prefix, builds the toy trainer out of tree with pkg-config and with
# find_package(rlbridge), trains against `rlb bridge`/`rlb worker` from the prefix, and
# pip-installs the Python package into a fresh virtual environment. test_abi checks that a
# librlb of another ABI is refused: by the bridge's hello here, by the Python package in
# test_install.
if(TARGET rlb AND TARGET rlb_bridge_core)
  # librlb of the next ABI: the sources of librlb.so built with another RLB_ABI_VERSION.
  math(EXPR RLB_ABI_OTHER "${RLB_ABI_VERSION} + 1")
  get_target_property(RLB_ABI_OTHER_SOURCES rlb_client_obj SOURCES)
  get_target_property(RLB_ABI_OTHER_COMMON rlb_common SOURCES)
  add_library(rlb_abi_other SHARED ${RLB_ABI_OTHER_SOURCES} ${RLB_ABI_OTHER_COMMON})
  rlb_target_defaults(rlb_abi_other)
  target_compile_definitions(rlb_abi_other PRIVATE RLB_ABI_VERSION=${RLB_ABI_OTHER}u
                             RLB_VERSION="${PROJECT_VERSION}")
  target_link_libraries(rlb_abi_other PRIVATE msgpackc Threads::Threads rt m)
  set_target_properties(rlb_abi_other PROPERTIES OUTPUT_NAME rlb SOVERSION ${RLB_ABI_OTHER}
                        LIBRARY_OUTPUT_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}/abi-other)

  rlb_add_test(NAME test_abi SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_abi.c
               LIBS rlb_abi_other LABELS integration TIMEOUT 60 ARGS $<TARGET_FILE:rlb>)
  target_compile_definitions(test_abi PRIVATE RLB_ABI_OTHER=${RLB_ABI_OTHER}u)
  add_dependencies(test_abi rlb)

  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_Interpreter_FOUND)
    # Sanitizer builds: the out-of-tree trainers are built with the same flags, and the
    # virtual environment's python preloads the ASan runtime (as RLB_PY_ENV does).
    string(JOIN " " RLB_INSTALL_CFLAGS ${RLB_SAN_FLAGS})
    add_test(NAME test_install
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_install.py
                     --build ${PROJECT_BINARY_DIR} --source ${PROJECT_SOURCE_DIR}
                     --cmake ${CMAKE_COMMAND} --cc ${CMAKE_C_COMPILER}
                     --version ${PROJECT_VERSION} --abi ${RLB_ABI_VERSION}
                     --abi-other $<TARGET_FILE:rlb_abi_other>
                     --abi-other-version ${RLB_ABI_OTHER}
                     --cflags "${RLB_INSTALL_CFLAGS}" --preload "${RLB_LIBASAN}")
    set_tests_properties(test_install PROPERTIES LABELS integration TIMEOUT 300)
  endif()
endif()
