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
            if (poison != 0.0f) { /* NaN != 0 too */
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

/* Covariance route, double precision, in two halves around the choice of k.
 * The Householder tridiagonalisation (dsytrd) and every eigenvalue (dsterf)
 * are double, exactly as accurate as dsyevd's. The k leading eigenvectors
 * of the tridiagonal matrix T are double too: MRRR (dstemr, O(m k) work but
 * single-threaded, ~0.4 ms a vector at m = 2048) for a few, divide and
 * conquer (dstedc, all m at BLAS-3 speed, ~0.17 s at m = 2048) past m / 5;
 * only the back-transformation Q Z runs in float32 (sormtr, half the cost of
 * dormtr): it is a product with an orthogonal matrix, whose rounding
 * (~eps32 per entry) does not grow with small eigenvalue gaps, and the
 * components are stored in float32 anyway. */
typedef struct {
    size_t m;
    double *G;     /* (m, m) borrowed: Householder reflectors after dsytrd */
    double *diag;  /* (m) diagonal of T */
    double *off;   /* (m) off-diagonal of T (m-1 used) */
    double *tau;   /* (m) reflector scalars (m-1 used) */
} Tridiag;

static void tridiag_free(Tridiag *t)
{
    free(t->diag);
    free(t->off);
    free(t->tau);
}

/* T = Q^T G Q (dsytrd); G keeps the Householder reflectors. */
static int tridiag_reduce(Tridiag *t, double *G, size_t m)
{
    if (!fits_blas(m))
        return PCS_ERR_TOO_LARGE;
    t->m = m;
    t->G = G;
    t->diag = malloc(m * sizeof(double));
    t->off = malloc(m * sizeof(double));
    t->tau = malloc(m * sizeof(double));
    if (!t->diag || !t->off || !t->tau)
        return PCS_ERR_NOMEM;
    const pcs_blasint mi = (pcs_blasint)m;
    return lapack_status(
        pcs_LAPACKE_dsytrd(PCS_LAPACK_COL_MAJOR, 'U', mi, G, mi, t->diag, t->off, t->tau));
}

/* w (m) = eigenvalues of T (= of G), ascending, without eigenvectors. */
static int tridiag_eigvals(const Tridiag *t, double *w)
{
    const size_t m = t->m;
    /* dsterf destroys its inputs: work on copies (T is needed again) */
    double *off = malloc(m * sizeof(double)); /* (m) */
    if (!off)
        return PCS_ERR_NOMEM;
    memcpy(w, t->diag, m * sizeof(double));
    memcpy(off, t->off, m * sizeof(double));
    int status = lapack_status(pcs_LAPACKE_dsterf((pcs_blasint)m, w, off));
    free(off);
    return status;
}

/* comps (k, m) float32 = the eigenvectors of G for its k largest
 * eigenvalues, descending. When w_all is not NULL and the divide and conquer
 * path runs, it also receives every eigenvalue (m), ascending; the function
 * returns 1 in *got_w then. */
static int tridiag_eigvecs(float *comps, double *w_all, int *got_w, const Tridiag *t,
                           size_t k)
{
    const size_t m = t->m;
    const pcs_blasint mi = (pcs_blasint)m, ki = (pcs_blasint)k;
    int status = PCS_OK;
    double *d = malloc(m * sizeof(double));       /* (m) copy of diag */
    double *e = malloc(m * sizeof(double));       /* (m) copy of off */
    double *w = malloc(m * sizeof(double));       /* (m) */
    const int all = k * 5 >= m; /* dstedc for all m, else dstemr for k */
    double *Z = malloc(m * (all ? m : k) * sizeof(double)); /* (m, k|m) col-major */
    pcs_blasint *isuppz = malloc(2 * k * sizeof(pcs_blasint));
    float *A32 = malloc(m * m * sizeof(float));   /* (m, m) reflectors */
    float *tau32 = malloc(m * sizeof(float));     /* (m) */
    if (!d || !e || !w || !Z || !isuppz || !A32 || !tau32) {
        status = PCS_ERR_NOMEM;
        goto done;
    }
    memcpy(d, t->diag, m * sizeof(double));
    memcpy(e, t->off, m * sizeof(double));
    if (all) {
        status = lapack_status(pcs_LAPACKE_dstedc(PCS_LAPACK_COL_MAJOR, 'I', mi, d, e, Z, mi));
        if (!status && w_all) {
            memcpy(w_all, d, m * sizeof(double)); /* dstedc: eigenvalues in d */
            *got_w = 1;
        }
    } else {
        pcs_blasint found = 0, tryrac = 1;
        status = lapack_status(pcs_LAPACKE_dstemr(PCS_LAPACK_COL_MAJOR, 'V', 'I', mi, d, e,
                                                  0.0, 0.0, mi - ki + 1, mi, &found, w, Z,
                                                  mi, ki, isuppz, &tryrac));
        if (!status && (size_t)found != k)
            status = PCS_ERR_NO_CONVERGE;
    }
    if (status)
        goto done;
    /* comps column-major (m, k), column i = eigenvector of the i-th largest
     * (Z holds the last `nz` ascending), i.e. row-major (k, m) rows. */
    const size_t nz = all ? m : k;
    for (size_t i = 0; i < k; i++) {
        const double *z = Z + (nz - 1 - i) * m; /* (m) */
        float *c = comps + i * m;
        for (size_t j = 0; j < m; j++)
            c[j] = (float)z[j];
    }
    for (size_t j = 0; j < m; j++) /* sormtr reads the reflectors above the
                                       diagonal (column-major upper) only */
        for (size_t i = 0; i <= j; i++)
            A32[j * m + i] = (float)t->G[j * m + i];
    for (size_t i = 0; i < m; i++)
        tau32[i] = (float)t->tau[i];
    if (m > 1)
        status = lapack_status(pcs_LAPACKE_sormtr(PCS_LAPACK_COL_MAJOR, 'L', 'U', 'N', mi,
                                                  ki, A32, mi, tau32, comps, mi));
done:
    free(d);
    free(e);
    free(w);
    free(Z);
    free(isuppz);
    free(A32);
    free(tau32);
    return status;
}

/* Components to keep: keep_var in (0, 1) -> scikit-learn's rule, the fewest
 * whose cumulative ratio exceeds keep_var (searchsorted(cumsum(ratio), t,
 * side="right") + 1, with the same double operations as numpy.cumsum);
 * keep_var >= 1 -> all r; otherwise keep_k (0 = all). */
static size_t choose_k(const double *eigvals, size_t r, double total, size_t keep_k,
                       double keep_var)
{
    if (keep_var > 0.0) {
        if (keep_var >= 1.0)
            return r;
        double cum = 0.0;
        size_t below = 0; /* entries of the cumsum <= keep_var */
        for (size_t i = 0; i < r; i++) {
            cum += eigvals[i] / total;
            if (cum <= keep_var)
                below++;
            else
                break;
        }
        return below + 1 < r ? below + 1 : r;
    }
    return keep_k == 0 || keep_k > r ? r : keep_k;
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
        float amax = 0.0f;              /* a reduction the compiler vectorises */
        for (size_t j = 0; j < d; j++)
            amax = fmaxf(amax, fabsf(c[j]));
        size_t jmax = 0;                /* then its first position */
        while (jmax + 1 < d && fabsf(c[jmax]) != amax)
            jmax++;
        if (c[jmax] < 0.0f)
            for (size_t j = 0; j < d; j++)
                c[j] = -c[j];
    }
}

/* What every route of the fit shares. */
typedef struct {
    const PcsMatrix *mats;
    size_t n_mats;
    size_t n, d, r;     /* rows, columns, r = min(n, d) */
    const double *mu;   /* (d) the mean subtracted (zeros when !center) */
    int precision;
    size_t keep_k;
    double keep_var;
} FitJob;

/* eigvals (r) = the r largest of w (m, ascending), clipped at 0. */
static void take_largest(double *eigvals, const double *w, size_t m, size_t r)
{
    for (size_t i = 0; i < r; i++) {
        double lam = w[m - 1 - i];
        eigvals[i] = lam > 0.0 ? lam : 0.0;
    }
}

/* Gram route (n < d): G (n, n) = Xc Xc^T, its eigenvectors U (dsyevd in
 * double, or ssyevd), then the components v_i = Xc^T u_i / sigma_i. Rows
 * whose sigma_i is rounding noise are completed to an orthonormal basis. */
static int fit_gram(float *components, double *eigvals, double *total, size_t *k_out,
                    const FitJob *j)
{
    const size_t n = j->n, d = j->d, r = j->r;
    int status = PCS_OK;
    double *Xc = malloc(n * d * sizeof(double)); /* (n, d) centered stack */
    double *G = malloc(n * n * sizeof(double));  /* (n, n) Gram; then eigenvectors */
    double *w = malloc(n * sizeof(double));      /* (n) eigenvalues, ascending */
    double *T = NULL;                            /* (k, d) U_k^T @ Xc */
    double *colsq = NULL;                        /* (d) workspace of complete_basis */
    if (!Xc || !G || !w) {
        status = PCS_ERR_NOMEM;
        goto done;
    }
    double ss = gather_centered(Xc, j->mats, j->n_mats, d, j->mu, 0, n);
    *total = ss;
    if (!(ss > 0.0)) {
        status = PCS_ERR_ZERO_VARIANCE;
        goto done;
    }
    pcs_cblas_dsyrk(PcsRowMajor, PcsLower, PcsNoTrans, (pcs_blasint)n, (pcs_blasint)d, 1.0, Xc,
                    (pcs_blasint)d, 0.0, G, (pcs_blasint)n);
    status = eigh(G, w, n, j->precision);
    if (status)
        goto done;
    take_largest(eigvals, w, n, r);
    const size_t k = choose_k(eigvals, r, ss, j->keep_k, j->keep_var);
    *k_out = k;
    /* T (k, d) = U_k^T (k, n) @ Xc (n, d), with U_k^T the last k rows of G
     * (eigenvectors in ascending order). */
    T = malloc(k * d * sizeof(double));
    colsq = malloc(d * sizeof(double));
    if (!T || !colsq) {
        status = PCS_ERR_NOMEM;
        goto done;
    }
    pcs_cblas_dgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)k, (pcs_blasint)d,
                    (pcs_blasint)n, 1.0, G + (n - k) * n, (pcs_blasint)n, Xc, (pcs_blasint)d,
                    0.0, T, (pcs_blasint)d);
    /* Below this the direction of Xc^T u_i is rounding noise. */
    const double eps = j->precision == PCS_PRECISION_SINGLE ? FLT_EPSILON : DBL_EPSILON;
    const double cutoff = eigvals[0] * eps * (double)(n > d ? n : d) * 4.0;
    double *V = Xc; /* (k, d); Xc is no longer needed and k <= n */
    size_t first_null = k;
    for (size_t i = 0; i < k; i++) {
        if (eigvals[i] <= cutoff) {
            first_null = i;
            break;
        }
        const double *t = T + (k - 1 - i) * d; /* (d) */
        double inv = 1.0 / sqrt(eigvals[i]);
        for (size_t c = 0; c < d; c++)
            V[i * d + c] = t[c] * inv;
    }
    if (first_null < k)
        complete_basis(V, colsq, first_null, k, d);
    store_f32(components, V, k, d);
done:
    free(Xc);
    free(G);
    free(w);
    free(T);
    free(colsq);
    return status;
}

/* G (d, d) = Xc^T Xc, summed over blocks of ROW_BLOCK centered rows (in
 * double); *total = the sum of squares. */
static int covariance(double *G, double *total, const FitJob *j)
{
    const size_t n = j->n, d = j->d, B = n < ROW_BLOCK ? n : ROW_BLOCK;
    double *Xb = malloc(B * d * sizeof(double)); /* (B, d) */
    if (!Xb)
        return PCS_ERR_NOMEM;
    double ss = 0.0;
    for (size_t row0 = 0; row0 < n; row0 += ROW_BLOCK) {
        size_t nb = n - row0 < ROW_BLOCK ? n - row0 : ROW_BLOCK;
        ss += gather_centered(Xb, j->mats, j->n_mats, d, j->mu, row0, nb);
        pcs_cblas_dsyrk(PcsRowMajor, PcsLower, PcsTrans, (pcs_blasint)d, (pcs_blasint)nb, 1.0,
                        Xb, (pcs_blasint)d, row0 == 0 ? 0.0 : 1.0, G, (pcs_blasint)d);
    }
    free(Xb);
    *total = ss;
    return ss > 0.0 ? PCS_OK : PCS_ERR_ZERO_VARIANCE;
}

/* Covariance route in double: tridiagonalise once, every eigenvalue
 * (dsterf), then the k leading eigenvectors only (see tridiag_eigvecs).
 * With k known in advance and large, divide and conquer gives the
 * eigenvalues and the vectors in one go. */
static int fit_covariance_tridiag(float *components, double *eigvals, double *total,
                                  size_t *k_out, const FitJob *j)
{
    const size_t d = j->d, r = j->r;
    Tridiag tri = {0};
    double *G = malloc(d * d * sizeof(double)); /* (d, d); then the reflectors */
    double *w = malloc(d * sizeof(double));     /* (d) eigenvalues, ascending */
    int status = !G || !w ? PCS_ERR_NOMEM : covariance(G, total, j);
    if (status)
        goto done;
    status = tridiag_reduce(&tri, G, d);
    if (status)
        goto done;
    int have_vecs = 0;
    size_t k_known = j->keep_k == 0 || j->keep_k > r ? r : j->keep_k;
    if (j->keep_var <= 0.0 && k_known * 5 >= d) { /* dstedc: values and vectors */
        status = tridiag_eigvecs(components, w, &have_vecs, &tri, k_known);
        if (!status && !have_vecs) /* cannot happen: k_known * 5 >= d picks dstedc */
            status = tridiag_eigvals(&tri, w);
    } else {
        status = tridiag_eigvals(&tri, w);
    }
    if (status)
        goto done;
    take_largest(eigvals, w, d, r);
    const size_t k = choose_k(eigvals, r, *total, j->keep_k, j->keep_var);
    *k_out = k;
    if (!have_vecs) {
        int unused = 0;
        status = tridiag_eigvecs(components, NULL, &unused, &tri, k);
    }
done:
    tridiag_free(&tri);
    free(G);
    free(w);
    return status;
}

/* Covariance route in single precision: one dense ssyevd; the components
 * are the eigenvectors, largest first. */
static int fit_covariance_dense(float *components, double *eigvals, double *total,
                                size_t *k_out, const FitJob *j)
{
    const size_t d = j->d, r = j->r;
    double *G = malloc(d * d * sizeof(double)); /* (d, d); then eigenvectors */
    double *w = malloc(d * sizeof(double));     /* (d) eigenvalues, ascending */
    int status = !G || !w ? PCS_ERR_NOMEM : covariance(G, total, j);
    if (!status)
        status = eigh(G, w, d, j->precision);
    if (!status) {
        take_largest(eigvals, w, d, r);
        const size_t k = choose_k(eigvals, r, *total, j->keep_k, j->keep_var);
        *k_out = k;
        for (size_t i = 0; i < k; i++) {
            const double *g = G + (d - 1 - i) * d; /* (d) */
            for (size_t c = 0; c < d; c++)
                components[i * d + c] = (float)g[c];
        }
    }
    free(G);
    free(w);
    return status;
}

int pcs_pca_fit(float *components, double *eigvals, float *mean, double *total,
                size_t *k_out, const PcsMatrix *mats, size_t n_mats, size_t d,
                int center, int precision, int solver, size_t keep_k,
                double keep_var, PcsWhere *where)
{
    size_t n = 0;
    for (size_t m = 0; m < n_mats; m++)
        n += mats[m].rows;
    if (n_mats == 0 || n == 0 || d == 0)
        return PCS_ERR_ARG;
    /* eigenproblem of X X^T (n, n) instead of X^T X (d, d)? */
    const int gram = solver == PCS_SOLVER_GRAM || (solver == PCS_SOLVER_AUTO && n < d);
    const size_t m_eig = gram ? n : d;
    if (!fits_blas(n) || !fits_blas(d) || !fits_blas(n * d) || m_eig > 40000)
        return PCS_ERR_TOO_LARGE; /* 40000: dsyevd's integer workspace 2m^2 */
    double *mu = calloc(d, sizeof(double)); /* (d) column mean, double */
    if (!mu)
        return PCS_ERR_NOMEM;
    int status = stack_mean(mu, mats, n_mats, d, n, where);
    if (!status) {
        if (!center)
            memset(mu, 0, d * sizeof(double));
        FitJob job = {mats, n_mats, n, d, n < d ? n : d, mu, precision, keep_k, keep_var};
        if (gram)
            status = fit_gram(components, eigvals, total, k_out, &job);
        else if (precision == PCS_PRECISION_DOUBLE)
            status = fit_covariance_tridiag(components, eigvals, total, k_out, &job);
        else
            status = fit_covariance_dense(components, eigvals, total, k_out, &job);
    }
    if (!status) {
        svd_flip_rows(components, *k_out, d);
        for (size_t c = 0; c < d; c++)
            mean[c] = (float)mu[c];
    }
    free(mu);
    return status;
}

int pcs_pca_project(float *Z, size_t ldz, const float *X, size_t ldx,
                    const float *mean, const float *C, size_t n, size_t d,
                    size_t k, PcsWhere *where)
{
    if (!fits_blas(n) || !fits_blas(d) || !fits_blas(k) || !fits_blas(ldz) ||
        !fits_blas(ldx))
        return PCS_ERR_TOO_LARGE;
    if (n == 0)
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
            float poison = 0.0f; /* stays 0 unless some x[j] is NaN/Inf */
            for (size_t j = 0; j < d; j++) {
                o[j] = x[j] - mean[j];
                poison += x[j] * 0.0f;
            }
            if (poison != 0.0f) {
                where->matrix = 0;
                where->row = row0 + i;
                where->col = first_nonfinite(x, d);
                free(Xb);
                return PCS_ERR_NONFINITE;
            }
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
