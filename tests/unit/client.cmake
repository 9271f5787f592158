# Unit tests of librlb that need no real bridge: argument and struct-version checks, and the
# whole client against a scripted in-process bridge (threads: also run under TSan).
rlb_add_test(NAME test_client_args SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_client_args.c
             LIBS rlb_client_static LABELS unit TIMEOUT 60)
rlb_add_test(NAME test_client_fake SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_client_fake.c
             LIBS rlb_client_static Threads::Threads LABELS unit tsan TIMEOUT 120)
