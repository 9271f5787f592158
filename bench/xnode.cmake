# rlb-bench-xnode: the cross-node transport between two processes (node 0 -> node 1, 1 GB)
# against a plain loopback TCP stream of the same bytes in the same run, and (--commit) the
# commit's latency on two nodes against one; needs UCX.
if(TARGET rlb_xport)
  add_executable(rlb-bench-xnode ${CMAKE_CURRENT_LIST_DIR}/bench_xnode.c
                 ${CMAKE_CURRENT_LIST_DIR}/bench_xnode_commit.c)
  rlb_target_defaults(rlb-bench-xnode)
  target_link_libraries(rlb-bench-xnode PRIVATE rlb_bridge_core rlb_client_static rlb_worker
                        rlb_xport rlb_common)
endif()
# --nccl: GPU memory over the NCCL transport against an NCCL all-gather (CUDA with NCCL).
if(TARGET rlb-bench-xnode AND TARGET rlb_xport_nccl)
  target_sources(rlb-bench-xnode PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bench_xnode_nccl.c)
  target_include_directories(rlb-bench-xnode SYSTEM PRIVATE ${RLB_NCCL_INCLUDE})
  target_link_libraries(rlb-bench-xnode PRIVATE rlb_xport_nccl)
endif()
