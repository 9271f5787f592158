# libFuzzer target for the ring reader over a corrupted segment. The seeds in corpus/ring
# are written by `test_ring --write-corpus DIR` (test_corpus_current checks they are current).
rlb_add_fuzzer(NAME fuzz_ring
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/fuzz_ring.c ${PROJECT_SOURCE_DIR}/common/ring.c
               LIBS rlb_common CORPUS ${CMAKE_CURRENT_LIST_DIR}/corpus/ring)
