/* calib.c: the activation-aware basis of stacked weight matrices.
 *
 * Dimension legend: n = stacked rows (e.g. k_proj and v_proj: 2 Dkv),
 * d = columns (hidden size), M = number of stacked matrices.
 *
 * With Σ = E[h h^T] over calibration inputs h, the rank-r reconstruction
 * Ŵ = U_r U_r^T W minimising E ||(W - Ŵ) h||^2 takes U_r = the r leading
 * eigenvectors of W Σ W^T (a PCA of the outputs W h), and the error is the
 * sum of the dropped eigenvalues.
 */
#include <limits.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "pcasurgery.h"

int pcs_weighted_gram(double *M, const PcsMatrix *mats, size_t n_mats, size_t d,
                      const double *sigma, PcsWhere *where)
{
    size_t n = 0;
    for (size_t m = 0; m < n_mats; m++)
        n += mats[m].rows;
    if (n == 0 || d == 0)
        return PCS_ERR_ARG;
    if (n > (size_t)INT_MAX || d > (size_t)INT_MAX || n > SIZE_MAX / d / sizeof(double))
        return PCS_ERR_TOO_LARGE;
    double *W = malloc(n * d * sizeof(double));  /* (n, d) */
    double *WS = malloc(n * d * sizeof(double)); /* (n, d) = W Σ */
    if (!W || !WS) {
        free(W);
        free(WS);
        return PCS_ERR_NOMEM;
    }
    size_t row = 0;
    for (size_t m = 0; m < n_mats; m++) {
        for (size_t i = 0; i < mats[m].rows; i++, row++) {
            const float *x = mats[m].data + i * mats[m].ld; /* (d) */
            for (size_t j = 0; j < d; j++) {
                if (!isfinite(x[j])) {
                    where->matrix = m;
                    where->row = i;
                    where->col = j;
                    free(W);
                    free(WS);
                    return PCS_ERR_NONFINITE;
                }
                W[row * d + j] = x[j];
            }
        }
    }
    pcs_cblas_dgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)n, (pcs_blasint)d,
                    (pcs_blasint)d, 1.0, W, (pcs_blasint)d, sigma, (pcs_blasint)d, 0.0, WS,
                    (pcs_blasint)d);
    pcs_cblas_dgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)n, (pcs_blasint)n,
                    (pcs_blasint)d, 1.0, WS, (pcs_blasint)d, W, (pcs_blasint)d, 0.0, M,
                    (pcs_blasint)n);
    for (size_t i = 0; i < n; i++) /* exactly symmetric */
        for (size_t j = i + 1; j < n; j++)
            M[i * n + j] = M[j * n + i] = 0.5 * (M[i * n + j] + M[j * n + i]);
    free(W);
    free(WS);
    return PCS_OK;
}

int pcs_sym_eig(double *vals, double *vecs, const double *A, size_t n)
{
    if (n == 0)
        return PCS_ERR_ARG;
    if (n > (size_t)INT_MAX || n > SIZE_MAX / n / sizeof(double))
        return PCS_ERR_TOO_LARGE;
    for (size_t i = 0; i < n * n; i++)
        if (!isfinite(A[i]))
            return PCS_ERR_NONFINITE;
    memcpy(vecs, A, n * n * sizeof(double));
    pcs_blasint info = pcs_LAPACKE_dsyevd(PcsRowMajor, 'V', 'U', (pcs_blasint)n, vecs,
                                          (pcs_blasint)n, vals);
    if (info > 0)
        return PCS_ERR_NO_CONVERGE;
    if (info < 0)
        return PCS_ERR_LAPACK_ARG;
    /* ascending -> descending: reverse the eigenvalues and the columns */
    for (size_t i = 0; i < n / 2; i++) {
        double t = vals[i];
        vals[i] = vals[n - 1 - i];
        vals[n - 1 - i] = t;
        for (size_t r = 0; r < n; r++) {
            double *row = vecs + r * n;
            t = row[i];
            row[i] = row[n - 1 - i];
            row[n - 1 - i] = t;
        }
    }
    for (size_t i = 0; i < n; i++) { /* deterministic signs */
        size_t best = 0;
        for (size_t r = 1; r < n; r++)
            if (fabs(vecs[r * n + i]) > fabs(vecs[best * n + i]))
                best = r;
        if (vecs[best * n + i] < 0)
            for (size_t r = 0; r < n; r++)
                vecs[r * n + i] = -vecs[r * n + i];
    }
    return PCS_OK;
}

void pcs_symmetrize_upper(double *S, size_t n, double scale)
{
    enum { TILE = 64 };
    for (size_t bi = 0; bi < n; bi += TILE) {
        const size_t ei = bi + TILE < n ? bi + TILE : n;
        for (size_t bj = bi; bj < n; bj += TILE) {
            const size_t ej = bj + TILE < n ? bj + TILE : n;
            for (size_t i = bi; i < ei; i++) {
                for (size_t j = (bj > i ? bj : i); j < ej; j++) {
                    const double v = S[i * n + j] * scale;
                    S[i * n + j] = v;
                    S[j * n + i] = v;
                }
            }
        }
    }
}
