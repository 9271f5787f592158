/* version.c: what a program that loads librlb at run time asks before it trusts the
 * library: the ABI version it was built with and the release it comes from (RLB_VERSION,
 * the project version, set by client/CMakeLists.txt).
 */
#include "rlb/rlb.h"

RLB_API uint32_t rlb_abi_version(void)
{
    return RLB_ABI_VERSION;
}

RLB_API const char *rlb_version(void)
{
    return RLB_VERSION;
}
