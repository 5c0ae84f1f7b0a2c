/* core.c: what every part of the C core shares: status strings and the
 * thread count of pcasurgery's own OpenBLAS (and its decode steps with
 * OpenBLAS's threads off). */
#define _GNU_SOURCE /* dladdr */
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

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

/* Decode steps that turned OpenBLAS's threads off (pcs_blas_threads_off),
 * possibly several at once in different threads: the first saves the
 * count, the last puts it back; meanwhile the saved count is the one that
 * get/set see. */
static pthread_mutex_t threads_mu = PTHREAD_MUTEX_INITIALIZER;
static int threads_off;   /* steps running with OpenBLAS at 1 thread */
static int threads_saved; /* OpenBLAS's count to put back */

void pcs_set_num_threads(int n)
{
    pthread_mutex_lock(&threads_mu);
    if (threads_off)
        threads_saved = n; /* taken when the last step ends */
    else
        pcs_openblas_set_num_threads(n);
    pthread_mutex_unlock(&threads_mu);
}

int pcs_get_num_threads(void)
{
    pthread_mutex_lock(&threads_mu);
    const int n = threads_off ? threads_saved : pcs_openblas_get_num_threads();
    pthread_mutex_unlock(&threads_mu);
    return n;
}

int pcs_blas_threads_off(void)
{
    pthread_mutex_lock(&threads_mu);
    if (threads_off++ == 0) {
        threads_saved = pcs_openblas_get_num_threads();
        if (threads_saved != 1)
            pcs_openblas_set_num_threads(1);
    }
    const int n = threads_saved;
    pthread_mutex_unlock(&threads_mu);
    return n;
}

void pcs_blas_threads_on(void)
{
    pthread_mutex_lock(&threads_mu);
    if (--threads_off == 0 && threads_saved != 1)
        pcs_openblas_set_num_threads(threads_saved);
    pthread_mutex_unlock(&threads_mu);
}

int pcs_switch_set(int *slot, const char *name, const char *off, int (*cpu)(void))
{
    int v;
    if (name && strcmp(name, off) == 0)
        v = 0;
    else if (!name || strcmp(name, "auto") == 0)
        v = cpu();
    else
        return PCS_ERR_ARG;
    __atomic_store_n(slot, v, __ATOMIC_RELAXED);
    return PCS_OK;
}

int pcs_switch_get(int *slot, const char *env, const char *off, int (*set)(const char *))
{
    if (__atomic_load_n(slot, __ATOMIC_RELAXED) < 0) {
        const char *e = getenv(env);
        set(e && strcmp(e, off) == 0 ? off : "auto");
    }
    return __atomic_load_n(slot, __ATOMIC_RELAXED);
}

const char *pcs_blas_config(void) { return pcs_openblas_get_config(); }

const char *pcs_blas_library(void)
{
    Dl_info info;
    if (dladdr((void *)&pcs_openblas_get_num_threads, &info) && info.dli_fname)
        return info.dli_fname;
    return NULL;
}
