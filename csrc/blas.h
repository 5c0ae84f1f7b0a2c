/* blas.h: the few BLAS / LAPACKE / OpenBLAS entry points pcasurgery uses.
 *
 * We declare our own prototypes instead of including cblas.h / lapacke.h:
 * the scipy-openblas32 wheel exports every symbol with a `scipy_` prefix,
 * and some of its versions ship an unprefixed lapacke.h (OpenBLAS issue
 * 5493), so its headers cannot be trusted to match its library.
 *
 * PCS_BLAS_PREFIX is set by setup.py: `scipy_` for the wheel (default),
 * empty for a system OpenBLAS + LAPACKE found with pkg-config.
 * All integers here are 32-bit (`lapack_int` = int): callers check sizes
 * against INT_MAX before calling.
 */
#ifndef PCS_BLAS_H
#define PCS_BLAS_H

#ifndef PCS_BLAS_PREFIX
#define PCS_BLAS_PREFIX scipy_
#endif

#define PCS_CAT_(a, b) a##b
#define PCS_CAT(a, b) PCS_CAT_(a, b)
#define PCS_SYM(name) PCS_CAT(PCS_BLAS_PREFIX, name)

typedef int pcs_blasint;

/* CBLAS enums, values fixed by the CBLAS standard. */
enum { PcsRowMajor = 101, PcsColMajor = 102 };
enum { PcsNoTrans = 111, PcsTrans = 112 };
enum { PcsUpper = 121, PcsLower = 122 };
#define PCS_LAPACK_COL_MAJOR 102

#define pcs_cblas_sgemm PCS_SYM(cblas_sgemm)
#define pcs_cblas_sgemv PCS_SYM(cblas_sgemv)
#define pcs_cblas_dgemm PCS_SYM(cblas_dgemm)
#define pcs_cblas_dsyrk PCS_SYM(cblas_dsyrk)
#define pcs_cblas_ssyrk PCS_SYM(cblas_ssyrk)
#define pcs_LAPACKE_dsyevd PCS_SYM(LAPACKE_dsyevd)
#define pcs_LAPACKE_ssyevd PCS_SYM(LAPACKE_ssyevd)
#define pcs_LAPACKE_dsytrd PCS_SYM(LAPACKE_dsytrd)
#define pcs_LAPACKE_dsterf PCS_SYM(LAPACKE_dsterf)
#define pcs_LAPACKE_dstedc PCS_SYM(LAPACKE_dstedc)
#define pcs_LAPACKE_dstemr PCS_SYM(LAPACKE_dstemr)
#define pcs_LAPACKE_sormtr PCS_SYM(LAPACKE_sormtr)
#define pcs_openblas_set_num_threads PCS_SYM(openblas_set_num_threads)
#define pcs_openblas_get_num_threads PCS_SYM(openblas_get_num_threads)
#define pcs_openblas_get_config PCS_SYM(openblas_get_config)

void pcs_cblas_sgemm(int order, int transa, int transb, pcs_blasint m,
                     pcs_blasint n, pcs_blasint k, float alpha, const float *a,
                     pcs_blasint lda, const float *b, pcs_blasint ldb,
                     float beta, float *c, pcs_blasint ldc);
void pcs_cblas_sgemv(int order, int trans, pcs_blasint m, pcs_blasint n, float alpha,
                     const float *a, pcs_blasint lda, const float *x, pcs_blasint incx,
                     float beta, float *y, pcs_blasint incy);
void pcs_cblas_dgemm(int order, int transa, int transb, pcs_blasint m,
                     pcs_blasint n, pcs_blasint k, double alpha,
                     const double *a, pcs_blasint lda, const double *b,
                     pcs_blasint ldb, double beta, double *c, pcs_blasint ldc);
void pcs_cblas_dsyrk(int order, int uplo, int trans, pcs_blasint n,
                     pcs_blasint k, double alpha, const double *a,
                     pcs_blasint lda, double beta, double *c, pcs_blasint ldc);
void pcs_cblas_ssyrk(int order, int uplo, int trans, pcs_blasint n,
                     pcs_blasint k, float alpha, const float *a,
                     pcs_blasint lda, float beta, float *c, pcs_blasint ldc);
pcs_blasint pcs_LAPACKE_dsyevd(int layout, char jobz, char uplo, pcs_blasint n,
                               double *a, pcs_blasint lda, double *w);
pcs_blasint pcs_LAPACKE_ssyevd(int layout, char jobz, char uplo, pcs_blasint n,
                               float *a, pcs_blasint lda, float *w);
pcs_blasint pcs_LAPACKE_dsytrd(int layout, char uplo, pcs_blasint n, double *a,
                               pcs_blasint lda, double *d, double *e, double *tau);
pcs_blasint pcs_LAPACKE_dsterf(pcs_blasint n, double *d, double *e);
pcs_blasint pcs_LAPACKE_dstedc(int layout, char compz, pcs_blasint n, double *d,
                               double *e, double *z, pcs_blasint ldz);
pcs_blasint pcs_LAPACKE_dstemr(int layout, char jobz, char range, pcs_blasint n,
                               double *d, double *e, double vl, double vu,
                               pcs_blasint il, pcs_blasint iu, pcs_blasint *m,
                               double *w, double *z, pcs_blasint ldz,
                               pcs_blasint nzc, pcs_blasint *isuppz,
                               pcs_blasint *tryrac);
pcs_blasint pcs_LAPACKE_sormtr(int layout, char side, char uplo, char trans,
                               pcs_blasint m, pcs_blasint n, const float *a,
                               pcs_blasint lda, const float *tau, float *c,
                               pcs_blasint ldc);
void pcs_openblas_set_num_threads(int num_threads);
int pcs_openblas_get_num_threads(void);
char *pcs_openblas_get_config(void);

#endif /* PCS_BLAS_H */
