# install.cmake: what `cmake --install <build> --prefix P` puts under P, so that rlbridge is
# used like any C library and runs from the prefix alone (README, "Install"):
#   bin/rlb, bin/rlb-toy-trainer        the command, and the trainer `rlb demo` runs from
#                                       the directory of `rlb`
#   include/rlb/rlb.h                   the public API, the only installed header
#   lib/librlb.so.<release>, .so.<ABI>, .so, and librlb.a (RLB_STATIC)
#   lib/pkgconfig/rlbridge.pc           pkg-config --cflags --libs rlbridge
#   lib/cmake/rlbridge/                 find_package(rlbridge): rlbridge::rlb (shared) and
#                                       rlbridge::rlb_static
# Everything is relocatable: the .pc file and the CMake package find the prefix from their
# own location, and the installed programs find librlb.so through $ORIGIN.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(RLB_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/rlbridge)
set(RLB_PC_DIR ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

file(RELATIVE_PATH RLB_BIN_TO_LIB /${CMAKE_INSTALL_BINDIR} /${CMAKE_INSTALL_LIBDIR})
set_target_properties(rlb-toy-trainer PROPERTIES INSTALL_RPATH "$ORIGIN/${RLB_BIN_TO_LIB}")
install(TARGETS rlb rlb-toy-trainer RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(FILES ${PROJECT_SOURCE_DIR}/include/rlb/rlb.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/rlb)

set(RLB_INSTALL_LIBS rlb_shared)
if(TARGET rlb_static)
  list(APPEND RLB_INSTALL_LIBS rlb_static)
endif()
install(TARGETS ${RLB_INSTALL_LIBS} EXPORT rlbridgeTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT rlbridgeTargets NAMESPACE rlbridge:: DESTINATION ${RLB_CMAKE_DIR})
configure_file(${CMAKE_CURRENT_LIST_DIR}/rlbridgeConfig.cmake.in
               ${PROJECT_BINARY_DIR}/rlbridgeConfig.cmake @ONLY)
# Releases 0.x may change the API in any minor release; the soname guards the ABI itself.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/rlbridgeConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/rlbridgeConfig.cmake
              ${PROJECT_BINARY_DIR}/rlbridgeConfigVersion.cmake
        DESTINATION ${RLB_CMAKE_DIR})

file(RELATIVE_PATH RLB_PC_TO_PREFIX /${RLB_PC_DIR} /)
string(REGEX REPLACE "/$" "" RLB_PC_TO_PREFIX "${RLB_PC_TO_PREFIX}")
configure_file(${CMAKE_CURRENT_LIST_DIR}/rlbridge.pc.in ${PROJECT_BINARY_DIR}/rlbridge.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/rlbridge.pc DESTINATION ${RLB_PC_DIR})
