/* core.c: what every part of the C core shares: status strings and the
 * thread count of pcasurgery's own OpenBLAS. */
#define _GNU_SOURCE /* dladdr */
#include <dlfcn.h>

#include "blas.h"
#include "pcasurgery.h"

const char *pcs_status_str(int status)
{
    switch (status) {
    case PCS_OK: return "ok";
    case PCS_ERR_NOMEM: return "out of memory";
    case PCS_ERR_NONFINITE: return "input contains NaN or Inf";
    case PCS_ERR_TOO_LARGE: return "matrix too large for 32-bit LAPACK/BLAS indices";
    case PCS_ERR_NO_CONVERGE: return "the eigensolver did not converge";
    case PCS_ERR_LAPACK_ARG: return "LAPACK rejected an argument (internal error)";
    case PCS_ERR_ZERO_VARIANCE: return "the stacked matrix has zero total variance";
    case PCS_ERR_ARG: return "invalid size or pointer argument";
    default: return "unknown status";
    }
}

void pcs_set_num_threads(int n) { pcs_openblas_set_num_threads(n); }
int pcs_get_num_threads(void) { return pcs_openblas_get_num_threads(); }

int pcs_blas_threads_off(void)
{
    const int n = pcs_openblas_get_num_threads();
    if (n != 1)
        pcs_openblas_set_num_threads(1);
    return n;
}

void pcs_blas_threads_on(int n)
{
    if (n != 1)
        pcs_openblas_set_num_threads(n);
}
const char *pcs_blas_config(void) { return pcs_openblas_get_config(); }

const char *pcs_blas_library(void)
{
    Dl_info info;
    if (dladdr((void *)&pcs_openblas_get_num_threads, &info) && info.dli_fname)
        return info.dli_fname;
    return NULL;
}
