# The knob table (common/env.h) against the README's "Knobs" table.
rlb_add_test(NAME test_knobs SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_knobs.c
             LIBS rlb_common LABELS unit TIMEOUT 30 ARGS ${PROJECT_SOURCE_DIR}/README.md)
