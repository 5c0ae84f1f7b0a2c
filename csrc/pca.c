/* pca.c: PCA of row-stacked float32 matrices: fit, project, reconstruct.
 *
 * Dimension legend (as in pcasurgery.h):
 *   M = number of stacked matrices, n = total rows (samples),
 *   d = columns (features), r = min(n, d) components, k <= r used,
 *   m = order of the symmetric eigenproblem (n on the Gram route, d on the
 *       covariance route), B = rows per block (ROW_BLOCK).
 *
 * Numerics. The data are float32, but everything the spectrum depends on is
 * accumulated in double: the column mean, the centering, the Gram (X X^T) or
 * covariance (X^T X) matrix and the eigendecomposition. Forming X^T X squares
 * the condition number, so a float32 eigensolve loses every eigenvalue below
 * ~1e-7 of the largest (measured: 4e-3 relative error at 1e-6 of the total),
 * while the double route keeps ~1e-12. Components are returned as float32.
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "pcasurgery.h"

#define ROW_BLOCK 256

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
const char *pcs_blas_config(void) { return pcs_openblas_get_config(); }

static int fits_blas(size_t x) { return x <= (size_t)INT_MAX; }

/* Locate the first non-finite value of a row already known to hold one. */
static size_t first_nonfinite(const float *x, size_t d)
{
    for (size_t j = 0; j < d; j++)
        if (!isfinite(x[j]))
            return j;
    return d;
}

/* mean (d) = column means of the stack, in double; checks finiteness. */
static int stack_mean(double *mean, const PcsMatrix *mats, size_t n_mats,
                      size_t d, size_t n, PcsWhere *where)
{
    memset(mean, 0, d * sizeof(double));
    for (size_t m = 0; m < n_mats; m++) {
        for (size_t i = 0; i < mats[m].rows; i++) {
            const float *x = mats[m].data + i * mats[m].ld; /* (d) */
            float poison = 0.0f; /* stays 0 unless some x[j] is NaN/Inf */
            for (size_t j = 0; j < d; j++) {
                mean[j] += x[j];
                poison += x[j] * 0.0f;
            }
            if (poison != 0.0f || !isfinite(poison)) {
                where->matrix = m;
                where->row = i;
                where->col = first_nonfinite(x, d);
                return PCS_ERR_NONFINITE;
            }
        }
    }
    for (size_t j = 0; j < d; j++)
        mean[j] /= (double)n;
    return PCS_OK;
}

/* Rows [row0, row0 + nb) of the stack, centered, as double:
 * out (nb, d) = X[row0:row0+nb] - mean; returns the sum of squares. */
static double gather_centered(double *out, const PcsMatrix *mats,
                              size_t n_mats, size_t d, const double *mean,
                              size_t row0, size_t nb)
{
    double ss = 0.0;
    size_t m = 0, base = 0; /* base = first stacked row of matrix m */
    while (m < n_mats && base + mats[m].rows <= row0) {
        base += mats[m].rows;
        m++;
    }
    for (size_t i = 0; i < nb; i++) {
        while (row0 + i >= base + mats[m].rows) {
            base += mats[m].rows;
            m++;
        }
        const float *x = mats[m].data + (row0 + i - base) * mats[m].ld; /* (d) */
        double *o = out + i * d;                                        /* (d) */
        for (size_t j = 0; j < d; j++) {
            double v = (double)x[j] - mean[j];
            o[j] = v;
            ss += v * v;
        }
    }
    return ss;
}

static int lapack_status(pcs_blasint info)
{
    if (info == -1010) /* LAPACK_WORK_MEMORY_ERROR */
        return PCS_ERR_NOMEM;
    if (info < 0)
        return PCS_ERR_LAPACK_ARG;
    if (info > 0)
        return PCS_ERR_NO_CONVERGE;
    return PCS_OK;
}

/* Symmetric eigendecomposition of G (m, m), lower triangle in row-major
 * (= upper triangle in column-major). On return row j of G is the
 * eigenvector of w[j], w ascending. */
static int eigh(double *G, double *w, size_t m, int precision)
{
    if (!fits_blas(m) || m > 40000) /* dsyevd's workspace is 1+6m+2m^2 ints */
        return PCS_ERR_TOO_LARGE;
    pcs_blasint info;
    if (precision == PCS_PRECISION_SINGLE) {
        float *Gs = malloc(m * m * sizeof(float)); /* (m, m) */
        float *ws = malloc(m * sizeof(float));     /* (m) */
        if (!Gs || !ws) {
            free(Gs);
            free(ws);
            return PCS_ERR_NOMEM;
        }
        for (size_t i = 0; i < m * m; i++)
            Gs[i] = (float)G[i];
        info = pcs_LAPACKE_ssyevd(PCS_LAPACK_COL_MAJOR, 'V', 'U', (pcs_blasint)m,
                                  Gs, (pcs_blasint)m, ws);
        for (size_t i = 0; i < m * m; i++)
            G[i] = Gs[i];
        for (size_t i = 0; i < m; i++)
            w[i] = ws[i];
        free(Gs);
        free(ws);
    } else {
        info = pcs_LAPACKE_dsyevd(PCS_LAPACK_COL_MAJOR, 'V', 'U', (pcs_blasint)m,
                                  G, (pcs_blasint)m, w);
    }
    return lapack_status(info);
}

/* Covariance route, double precision: the r leading eigenvectors of G (m, m)
 * (lower triangle in row-major, i.e. upper in column-major) as float32 rows
 * of comps (r, m), descending, and every eigenvalue in w (m), ascending.
 * The Householder tridiagonalisation (dsytrd) and the tridiagonal
 * eigenproblem (dstedc) run in double, so the eigenvalues are exactly as
 * accurate as dsyevd's. Only the back-transformation Q Z runs in float32
 * (sormtr, half the cost of dormtr): it is a product with an orthogonal
 * matrix, whose rounding (~eps32 per entry) does not grow with small
 * eigenvalue gaps, and the components are stored in float32 anyway. */
static int eigh_tridiagonal(float *comps, double *w, double *G, size_t m, size_t r)
{
    if (!fits_blas(m) || m > 40000)
        return PCS_ERR_TOO_LARGE;
    int status = PCS_OK;
    double *e = malloc((m + 1) * sizeof(double));   /* (m-1) off-diagonal */
    double *tau = malloc((m + 1) * sizeof(double)); /* (m-1) reflectors */
    double *Zd = malloc(m * m * sizeof(double));    /* (m, m) eigvecs of T */
    float *A32 = malloc(m * m * sizeof(float));     /* (m, m) reflectors */
    float *tau32 = malloc((m + 1) * sizeof(float)); /* (m-1) */
    if (!e || !tau || !Zd || !A32 || !tau32) {
        status = PCS_ERR_NOMEM;
        goto done;
    }
    const pcs_blasint mi = (pcs_blasint)m;
    status = lapack_status(pcs_LAPACKE_dsytrd(PCS_LAPACK_COL_MAJOR, 'U', mi, G, mi, w, e, tau));
    if (status)
        goto done;
    status = lapack_status(pcs_LAPACKE_dstedc(PCS_LAPACK_COL_MAJOR, 'I', mi, w, e, Zd, mi));
    if (status)
        goto done;
    for (size_t i = 0; i < m * m; i++)
        A32[i] = (float)G[i];
    for (size_t i = 0; i + 1 < m; i++)
        tau32[i] = (float)tau[i];
    /* comps column-major (m, r): column i = eigenvector of T for the i-th
     * largest eigenvalue; = row-major (r, m) rows. */
    for (size_t i = 0; i < r; i++) {
        const double *z = Zd + (m - 1 - i) * m; /* (m) */
        float *c = comps + i * m;
        for (size_t t = 0; t < m; t++)
            c[t] = (float)z[t];
    }
    if (m > 1)
        status = lapack_status(pcs_LAPACKE_sormtr(PCS_LAPACK_COL_MAJOR, 'L', 'U', 'N',
                                                  mi, (pcs_blasint)r, A32, mi, tau32,
                                                  comps, mi));
done:
    free(e);
    free(tau);
    free(Zd);
    free(A32);
    free(tau32);
    return status;
}

/* Fill rows [first, r) of V (r, d) with an orthonormal completion of rows
 * [0, first): each new row starts from the unit vector e_j least covered by
 * the rows so far (its residual norm^2 is >= (d - i) / d > 0 since r <= d),
 * orthogonalised twice (classical Gram-Schmidt, "twice is enough").
 * colsq (d) is workspace. Deterministic. */
static void complete_basis(double *V, double *colsq, size_t first, size_t r,
                           size_t d)
{
    memset(colsq, 0, d * sizeof(double));
    for (size_t i = 0; i < first; i++)
        for (size_t j = 0; j < d; j++)
            colsq[j] += V[i * d + j] * V[i * d + j];
    for (size_t i = first; i < r; i++) {
        size_t best = 0;
        for (size_t j = 1; j < d; j++)
            if (colsq[j] < colsq[best])
                best = j;
        double *v = V + i * d; /* (d) */
        memset(v, 0, d * sizeof(double));
        v[best] = 1.0;
        for (int pass = 0; pass < 2; pass++) {
            for (size_t p = 0; p < i; p++) {
                const double *u = V + p * d;
                double dot = 0.0;
                for (size_t j = 0; j < d; j++)
                    dot += u[j] * v[j];
                for (size_t j = 0; j < d; j++)
                    v[j] -= dot * u[j];
            }
        }
        double nrm = 0.0;
        for (size_t j = 0; j < d; j++)
            nrm += v[j] * v[j];
        nrm = sqrt(nrm);
        for (size_t j = 0; j < d; j++) {
            v[j] /= nrm;
            colsq[j] += v[j] * v[j];
        }
    }
}

/* components (r, d) = V (r, d) rounded to float32. */
static void store_f32(float *components, const double *V, size_t r, size_t d)
{
    for (size_t i = 0; i < r * d; i++)
        components[i] = (float)V[i];
}

/* scikit-learn's svd_flip(u_based_decision=False), on what we return: the
 * entry of largest magnitude (the first, on ties) of each row is made
 * positive. */
static void svd_flip_rows(float *components, size_t r, size_t d)
{
    for (size_t i = 0; i < r; i++) {
        float *c = components + i * d; /* (d) */
        size_t jmax = 0;
        for (size_t j = 1; j < d; j++)
            if (fabsf(c[j]) > fabsf(c[jmax]))
                jmax = j;
        if (c[jmax] < 0.0f)
            for (size_t j = 0; j < d; j++)
                c[j] = -c[j];
    }
}

int pcs_pca_fit(float *components, double *eigvals, float *mean, double *total,
                const PcsMatrix *mats, size_t n_mats, size_t d, int center,
                int precision, int solver, PcsWhere *where)
{
    int status = PCS_OK;
    size_t n = 0;
    for (size_t m = 0; m < n_mats; m++)
        n += mats[m].rows;
    if (n_mats == 0 || n == 0 || d == 0)
        return PCS_ERR_ARG;
    /* eigenproblem of X X^T (n, n) instead of X^T X (d, d)? */
    const int gram = solver == PCS_SOLVER_GRAM || (solver == PCS_SOLVER_AUTO && n < d);
    const size_t m_eig = gram ? n : d;
    const size_t r = n < d ? n : d;
    if (!fits_blas(n) || !fits_blas(d) || !fits_blas(n * d))
        return PCS_ERR_TOO_LARGE;

    double *mu = NULL;    /* (d) column mean, double */
    double *G = NULL;     /* (m, m) Gram or covariance; then eigenvectors */
    double *w = NULL;     /* (m) eigenvalues, ascending */
    double *Xc = NULL;    /* Gram: (n, d) centered stack; covariance: (B, d) */
    double *T = NULL;     /* Gram: (n, d) eigenvectors^T @ Xc */
    double *colsq = NULL; /* (d) workspace of complete_basis */
    const size_t xrows = gram ? n : (n < ROW_BLOCK ? n : ROW_BLOCK);

    mu = calloc(d, sizeof(double));
    G = malloc(m_eig * m_eig * sizeof(double));
    w = malloc(m_eig * sizeof(double));
    Xc = malloc(xrows * d * sizeof(double));
    if (gram) {
        T = malloc(n * d * sizeof(double));
        colsq = malloc(d * sizeof(double));
    }
    if (!mu || !G || !w || !Xc || (gram && (!T || !colsq))) {
        status = PCS_ERR_NOMEM;
        goto done;
    }

    status = stack_mean(mu, mats, n_mats, d, n, where);
    if (status)
        goto done;
    if (!center)
        memset(mu, 0, d * sizeof(double));

    double ss = 0.0;
    if (gram) {
        /* G (n, n) = Xc Xc^T */
        ss = gather_centered(Xc, mats, n_mats, d, mu, 0, n);
        pcs_cblas_dsyrk(PcsRowMajor, PcsLower, PcsNoTrans, (pcs_blasint)n,
                        (pcs_blasint)d, 1.0, Xc, (pcs_blasint)d, 0.0, G,
                        (pcs_blasint)n);
    } else {
        /* G (d, d) = sum over row blocks of Xb^T Xb, Xb (B, d) */
        for (size_t row0 = 0; row0 < n; row0 += ROW_BLOCK) {
            size_t nb = n - row0 < ROW_BLOCK ? n - row0 : ROW_BLOCK;
            ss += gather_centered(Xc, mats, n_mats, d, mu, row0, nb);
            pcs_cblas_dsyrk(PcsRowMajor, PcsLower, PcsTrans, (pcs_blasint)d,
                            (pcs_blasint)nb, 1.0, Xc, (pcs_blasint)d,
                            row0 == 0 ? 0.0 : 1.0, G, (pcs_blasint)d);
        }
    }
    *total = ss;
    if (!(ss > 0.0)) {
        status = PCS_ERR_ZERO_VARIANCE;
        goto done;
    }

    /* Covariance route in double: tridiagonal path, components straight
     * into the output. Otherwise a dense eigensolve into G's rows. */
    const int tridiag = !gram && precision == PCS_PRECISION_DOUBLE;
    if (tridiag)
        status = eigh_tridiagonal(components, w, G, m_eig, r);
    else
        status = eigh(G, w, m_eig, precision);
    if (status)
        goto done;

    for (size_t i = 0; i < r; i++) { /* the r largest of the m_eig */
        double lam = w[m_eig - 1 - i];
        eigvals[i] = lam > 0.0 ? lam : 0.0;
    }

    if (gram) {
        /* Right singular vectors from left ones: v_i = Xc^T u_i / sigma_i.
         * T (n, d) = U^T (n, n) @ Xc (n, d), rows of U^T in ascending order. */
        pcs_cblas_dgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)n,
                        (pcs_blasint)d, (pcs_blasint)n, 1.0, G, (pcs_blasint)n,
                        Xc, (pcs_blasint)d, 0.0, T, (pcs_blasint)d);
        /* Below this the direction of Xc^T u_i is rounding noise. */
        const double eps = precision == PCS_PRECISION_SINGLE ? FLT_EPSILON : DBL_EPSILON;
        const double cutoff = eigvals[0] * eps * (double)(n > d ? n : d) * 4.0;
        double *V = Xc; /* (r, d); Xc is no longer needed */
        size_t first_null = r;
        for (size_t i = 0; i < r; i++) {
            if (eigvals[i] <= cutoff) {
                first_null = i;
                break;
            }
            const double *t = T + (m_eig - 1 - i) * d; /* (d) */
            double inv = 1.0 / sqrt(eigvals[i]);
            for (size_t j = 0; j < d; j++)
                V[i * d + j] = t[j] * inv;
        }
        if (first_null < r)
            complete_basis(V, colsq, first_null, r, d);
        store_f32(components, V, r, d);
    } else if (!tridiag) {
        /* Eigenvectors of the covariance are the axes; reverse the order. */
        for (size_t i = 0; i < r; i++) {
            const double *g = G + (m_eig - 1 - i) * m_eig; /* (d) */
            for (size_t j = 0; j < d; j++)
                components[i * d + j] = (float)g[j];
        }
    }
    svd_flip_rows(components, r, d);
    for (size_t j = 0; j < d; j++)
        mean[j] = (float)mu[j];

done:
    free(mu);
    free(G);
    free(w);
    free(Xc);
    free(T);
    free(colsq);
    return status;
}

int pcs_pca_project(float *Z, size_t ldz, const float *X, size_t ldx,
                    const float *mean, const float *C, size_t n, size_t d,
                    size_t k)
{
    if (!fits_blas(n) || !fits_blas(d) || !fits_blas(k) || !fits_blas(ldz) ||
        !fits_blas(ldx))
        return PCS_ERR_TOO_LARGE;
    if (n == 0 || k == 0)
        return PCS_OK;
    size_t B = n < ROW_BLOCK ? n : ROW_BLOCK;
    float *Xb = malloc(B * d * sizeof(float)); /* (B, d) centered block */
    if (!Xb)
        return PCS_ERR_NOMEM;
    for (size_t row0 = 0; row0 < n; row0 += B) {
        size_t nb = n - row0 < B ? n - row0 : B;
        for (size_t i = 0; i < nb; i++) {
            const float *x = X + (row0 + i) * ldx; /* (d) */
            float *o = Xb + i * d;
            for (size_t j = 0; j < d; j++)
                o[j] = x[j] - mean[j];
        }
        /* Z[row0:row0+nb] (nb, k) = Xb (nb, d) @ C_k^T (d, k) */
        pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)nb,
                        (pcs_blasint)k, (pcs_blasint)d, 1.0f, Xb, (pcs_blasint)d,
                        C, (pcs_blasint)d, 0.0f, Z + row0 * ldz, (pcs_blasint)ldz);
    }
    free(Xb);
    return PCS_OK;
}

int pcs_pca_reconstruct(float *Xhat, size_t ldxhat, const float *Z, size_t ldz,
                        const float *C, const float *mean, size_t n, size_t d,
                        size_t k)
{
    if (!fits_blas(n) || !fits_blas(d) || !fits_blas(k) || !fits_blas(ldz) ||
        !fits_blas(ldxhat))
        return PCS_ERR_TOO_LARGE;
    if (mean)
        for (size_t i = 0; i < n; i++)
            memcpy(Xhat + i * ldxhat, mean, d * sizeof(float));
    if (n == 0 || k == 0)
        return PCS_OK;
    /* Xhat (n, d) += Z (n, k) @ C_k (k, d) */
    pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)n,
                    (pcs_blasint)d, (pcs_blasint)k, 1.0f, Z, (pcs_blasint)ldz, C,
                    (pcs_blasint)d, 1.0f, Xhat, (pcs_blasint)ldxhat);
    return PCS_OK;
}
