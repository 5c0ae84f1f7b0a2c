/* module.c: the CPython / NumPy face of the C core (pcasurgery._C).
 *
 * The only file that includes Python.h and the NumPy headers. It checks and
 * converts arguments, allocates every output before a kernel runs, releases
 * the GIL around the kernel and turns a kernel status into exactly one
 * Python exception. Python owns every array; the kernels borrow pointers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "pcasurgery.h"

typedef struct {
    PyObject *LinAlgError; /* numpy.linalg.LinAlgError */
} module_state;

static module_state *get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* ------------------------------------------------------------------ helpers */

/* A borrowed-row view of a 2-D float32 array: rows contiguous, row stride
 * ld floats. Holds a reference to the array that owns the memory. */
typedef struct {
    PyArrayObject *arr; /* owned reference */
    const float *data;
    size_t rows, cols, ld;
} matview;

static void matview_clear(matview *v)
{
    Py_CLEAR(v->arr);
}

/* Convert obj to a float32 matrix view, naming it `name` in errors.
 * Float32 arrays whose rows are contiguous are borrowed as they are
 * (column slices included); anything else is copied to a C-contiguous
 * float32 array. allow_no_cols accepts (rows, 0) (a rank-0 score matrix).
 * Returns 0, or -1 with an exception set. */
static int to_matview(PyObject *obj, const char *name, int allow_no_cols, matview *out)
{
    out->arr = NULL;
    PyArrayObject *a = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (!a) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s must be a 2-D numeric array, got an object of type '%s' "
                     "that NumPy cannot convert",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int t = PyArray_TYPE(a);
    if (!(PyTypeNum_ISINTEGER(t) || PyTypeNum_ISFLOAT(t))) {
        PyObject *descr = PyObject_Str((PyObject *)PyArray_DESCR(a));
        PyErr_Format(PyExc_TypeError,
                     "%s must be a real numeric (integer or floating) array, "
                     "got dtype %S (from an object of type '%s')",
                     name, descr ? descr : Py_None, Py_TYPE(obj)->tp_name);
        Py_XDECREF(descr);
        Py_DECREF(a);
        return -1;
    }
    if (PyArray_NDIM(a) != 2) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be a 2-D array (rows, columns), got a %d-d array",
                     name, PyArray_NDIM(a));
        Py_DECREF(a);
        return -1;
    }
    npy_intp rows = PyArray_DIM(a, 0), cols = PyArray_DIM(a, 1);
    if (rows == 0 || (cols == 0 && !allow_no_cols)) {
        PyErr_Format(PyExc_ValueError,
                     "%s is empty (shape (%zd, %zd)); expected at least one row "
                     "and one column",
                     name, (Py_ssize_t)rows, (Py_ssize_t)cols);
        Py_DECREF(a);
        return -1;
    }
    npy_intp s0 = PyArray_STRIDE(a, 0), s1 = PyArray_STRIDE(a, 1);
    int borrow = t == NPY_FLOAT32 && PyArray_ISALIGNED(a) && PyArray_ISNOTSWAPPED(a) &&
                 (s1 == (npy_intp)sizeof(float) || cols == 1) &&
                 (rows == 1 || (s0 > 0 && s0 % (npy_intp)sizeof(float) == 0 &&
                                s0 >= cols * (npy_intp)sizeof(float)));
    if (!borrow) {
        PyArrayObject *c = (PyArrayObject *)PyArray_FROM_OTF(
            (PyObject *)a, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
        Py_DECREF(a);
        if (!c)
            return -1;
        a = c;
        s0 = PyArray_STRIDE(a, 0);
    }
    out->arr = a;
    out->data = (const float *)PyArray_DATA(a);
    out->rows = (size_t)rows;
    out->cols = (size_t)cols;
    out->ld = rows == 1 ? (size_t)cols : (size_t)(s0 / (npy_intp)sizeof(float));
    return 0;
}

/* Byte range [lo, hi) touched by a matrix view / array. */
static int ranges_overlap(const void *a, size_t abytes, const void *b, size_t bbytes)
{
    const char *a0 = a, *b0 = b;
    return a0 < b0 + bbytes && b0 < a0 + abytes;
}

static size_t view_bytes(const matview *v)
{
    return v->cols == 0 ? 0 : ((v->rows - 1) * v->ld + v->cols) * sizeof(float);
}

/* Raise the exception for a failed kernel status. Returns NULL. */
static PyObject *raise_status(PyObject *module, int status, const char *what)
{
    switch (status) {
    case PCS_ERR_NOMEM:
        return PyErr_NoMemory();
    case PCS_ERR_NO_CONVERGE:
        PyErr_Format(get_state(module)->LinAlgError,
                     "%s: the LAPACK eigensolver did not converge", what);
        return NULL;
    case PCS_ERR_LAPACK_ARG:
        PyErr_Format(PyExc_SystemError,
                     "%s: LAPACK rejected an argument; this is a pcasurgery bug",
                     what);
        return NULL;
    default:
        PyErr_Format(PyExc_ValueError, "%s: %s", what, pcs_status_str(status));
        return NULL;
    }
}

/* ------------------------------------------------------------------ pca_fit */

PyDoc_STRVAR(pca_fit_doc,
"pca_fit($module, matrices, names, center, precision, solver, keep_k, keep_var, /)\n"
"--\n"
"\n"
"-> (components, eigvals, mean, total)\n"
"\n"
"Fit a PCA on the row-stack of `matrices` (a sequence of 2-D arrays with the\n"
"same number of columns d). `names` (a sequence of str, same length) names\n"
"them in error messages. Every eigenvalue is computed, and k components:\n"
"keep_var in (0, 1) -> the fewest that keep more than that fraction of the\n"
"variance; keep_var >= 1 -> all; keep_var <= 0 -> keep_k (0 = all).\n"
"Returns components (k, d) float32 (k <= r = min(n, d)),\n"
"eigvals (r,) float64 (squared singular values of the centered stack,\n"
"descending), mean (d,) float32 (zeros when not center) and total (float, the\n"
"squared Frobenius norm of the centered stack). precision: 0 = double\n"
"eigensolver, 1 = single. solver: 0 = auto, 1 = Gram (X X^T), 2 = covariance.");

static PyObject *pca_fit(PyObject *module, PyObject *args)
{
    PyObject *seq_obj, *names_obj, *result = NULL;
    int center, precision, solver;
    Py_ssize_t keep_k;
    double keep_var;
    if (!PyArg_ParseTuple(args, "OOpiind:pca_fit", &seq_obj, &names_obj, &center,
                          &precision, &solver, &keep_k, &keep_var))
        return NULL;
    if (keep_k < 0 || keep_var != keep_var) {
        PyErr_SetString(PyExc_ValueError, "keep_k must be >= 0 and keep_var a number");
        return NULL;
    }
    if (solver < PCS_SOLVER_AUTO || solver > PCS_SOLVER_COVARIANCE) {
        PyErr_Format(PyExc_ValueError, "solver must be 0 (auto), 1 (gram) or 2 (covariance), got %d",
                     solver);
        return NULL;
    }
    if (precision != PCS_PRECISION_DOUBLE && precision != PCS_PRECISION_SINGLE) {
        PyErr_Format(PyExc_ValueError, "precision must be 0 (double) or 1 (single), got %d",
                     precision);
        return NULL;
    }
    /* tuples of our own: converting a matrix can run Python code (__array__)
     * that changes the caller's lists, and the names are read again after
     * the kernel ran without the GIL */
    if (!PySequence_Check(seq_obj) || PyUnicode_Check(seq_obj)) {
        PyErr_SetString(PyExc_TypeError, "matrices must be a sequence of 2-D arrays");
        return NULL;
    }
    if (!PySequence_Check(names_obj) || PyUnicode_Check(names_obj)) {
        PyErr_SetString(PyExc_TypeError, "names must be a sequence of str");
        return NULL;
    }
    PyObject *seq = PySequence_Tuple(seq_obj);
    if (!seq)
        return NULL;
    PyObject *names = PySequence_Tuple(names_obj);
    if (!names) {
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t M = PyTuple_GET_SIZE(seq);
    matview *views = NULL;
    PcsMatrix *mats = NULL;
    PyArrayObject *comp = NULL, *eig = NULL, *mean = NULL;

    if (PyTuple_GET_SIZE(names) != M) {
        PyErr_Format(PyExc_ValueError, "names has %zd entries but matrices has %zd",
                     PyTuple_GET_SIZE(names), M);
        goto done;
    }
    if (M == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "matrices is empty; expected at least one 2-D array");
        goto done;
    }
    views = PyMem_Calloc((size_t)M, sizeof(matview));
    mats = PyMem_Calloc((size_t)M, sizeof(PcsMatrix));
    if (!views || !mats) {
        PyErr_NoMemory();
        goto done;
    }
    size_t n = 0;
    for (Py_ssize_t i = 0; i < M; i++) {
        PyObject *name_obj = PyTuple_GET_ITEM(names, i);
        if (!PyUnicode_Check(name_obj)) {
            PyErr_Format(PyExc_TypeError, "names[%zd] must be a str", i);
            goto done;
        }
        const char *name = PyUnicode_AsUTF8(name_obj);
        if (!name)
            goto done;
        if (to_matview(PyTuple_GET_ITEM(seq, i), name, 0, &views[i]) < 0)
            goto done;
        if (views[i].cols != views[0].cols) {
            PyErr_Format(PyExc_ValueError,
                         "%s has %zu columns but %s has %zu; stacked matrices "
                         "must share the input dimension",
                         name, views[i].cols,
                         PyUnicode_AsUTF8(PyTuple_GET_ITEM(names, 0)),
                         views[0].cols);
            goto done;
        }
        mats[i].data = views[i].data;
        mats[i].rows = views[i].rows;
        mats[i].ld = views[i].ld;
        n += views[i].rows;
    }
    size_t d = views[0].cols;
    if (center && n < 2) {
        PyErr_Format(PyExc_ValueError,
                     "matrices have 1 row in total; a centered PCA needs at least 2 "
                     "(pass center=False for an uncentered SVD)");
        goto done;
    }
    size_t r = n < d ? n : d;
    npy_intp cdims[2] = {(npy_intp)r, (npy_intp)d}, rdim = (npy_intp)r,
             ddim = (npy_intp)d;
    comp = (PyArrayObject *)PyArray_SimpleNew(2, cdims, NPY_FLOAT32);
    eig = (PyArrayObject *)PyArray_SimpleNew(1, &rdim, NPY_FLOAT64);
    mean = (PyArrayObject *)PyArray_SimpleNew(1, &ddim, NPY_FLOAT32);
    if (!comp || !eig || !mean)
        goto done;

    double total = 0.0;
    size_t k = 0;
    PcsWhere where = {0, 0, 0};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = pcs_pca_fit((float *)PyArray_DATA(comp), (double *)PyArray_DATA(eig),
                         (float *)PyArray_DATA(mean), &total, &k, mats, (size_t)M, d,
                         center, precision, solver, (size_t)keep_k, keep_var, &where);
    Py_END_ALLOW_THREADS
    if (status == PCS_ERR_NONFINITE) {
        PyErr_Format(PyExc_ValueError,
                     "%s contains NaN or Inf (first at row %zu, column %zu); "
                     "expected finite values",
                     PyUnicode_AsUTF8(PyTuple_GET_ITEM(names, (Py_ssize_t)where.matrix)),
                     where.row, where.col);
        goto done;
    }
    if (status == PCS_ERR_ZERO_VARIANCE) {
        PyErr_Format(PyExc_ValueError,
                     "the stacked matrices have zero total %s; PCA is undefined",
                     center ? "variance (every row equals the mean)" : "energy (all zeros)");
        goto done;
    }
    if (status) {
        raise_status(module, status, "pca_fit");
        goto done;
    }
    if (k < r) { /* keep only the k rows computed, in an array of their own */
        npy_intp kdims[2] = {(npy_intp)k, (npy_intp)d};
        PyArrayObject *ck = (PyArrayObject *)PyArray_SimpleNew(2, kdims, NPY_FLOAT32);
        if (!ck)
            goto done;
        memcpy(PyArray_DATA(ck), PyArray_DATA(comp), k * d * sizeof(float));
        Py_SETREF(comp, ck);
    }
    result = Py_BuildValue("OOOd", comp, eig, mean, total);

done:
    if (views)
        for (Py_ssize_t i = 0; i < M; i++)
            matview_clear(&views[i]);
    PyMem_Free(views);
    PyMem_Free(mats);
    Py_XDECREF(comp);
    Py_XDECREF(eig);
    Py_XDECREF(mean);
    Py_DECREF(seq);
    Py_DECREF(names);
    return result;
}

/* Check a 1-D float32 vector of length d (e.g. the mean); new reference. */
static PyArrayObject *as_vector(PyObject *obj, const char *name, size_t d)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(
        obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!a)
        return NULL;
    if (PyArray_NDIM(a) != 1 || (size_t)PyArray_DIM(a, 0) != d) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%zu,)", name, d);
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* Check a caller-provided output: float32, writeable, shape (rows, cols),
 * contiguous rows. Returns 0 and fills v (borrowing obj's reference), or -1. */
static int check_out(PyObject *obj, size_t rows, size_t cols, matview *v)
{
    if (!PyArray_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "out must be a numpy.ndarray");
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != NPY_FLOAT32 || PyArray_NDIM(a) != 2 ||
        (size_t)PyArray_DIM(a, 0) != rows || (size_t)PyArray_DIM(a, 1) != cols ||
        !PyArray_ISWRITEABLE(a) || !PyArray_ISALIGNED(a) ||
        !PyArray_ISNOTSWAPPED(a) || PyArray_STRIDE(a, 1) != (npy_intp)sizeof(float) ||
        PyArray_STRIDE(a, 0) < (npy_intp)(cols * sizeof(float)) ||
        PyArray_STRIDE(a, 0) % (npy_intp)sizeof(float) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "out must be a writeable float32 array of shape (%zu, %zu) "
                     "with contiguous rows",
                     rows, cols);
        return -1;
    }
    v->arr = NULL;
    v->data = PyArray_DATA(a);
    v->rows = rows;
    v->cols = cols;
    v->ld = (size_t)(PyArray_STRIDE(a, 0) / (npy_intp)sizeof(float));
    return 0;
}

/* ------------------------------------------------------------ pca_project */

PyDoc_STRVAR(pca_project_doc,
"pca_project($module, X, mean, components, k, name='X', /)\n"
"--\n"
"\n"
"Z (n, k) float32 = (X (n, d) - mean (d)) @ components[:k].T. `name` names X\n"
"in error messages (NaN/Inf in X is reported with its position).");

static PyObject *pca_project(PyObject *module, PyObject *args)
{
    PyObject *X_obj, *mean_obj, *C_obj, *result = NULL;
    Py_ssize_t k;
    const char *name = "X";
    if (!PyArg_ParseTuple(args, "OOOn|s:pca_project", &X_obj, &mean_obj, &C_obj, &k,
                          &name))
        return NULL;
    matview X = {0}, C = {0};
    PyArrayObject *mean = NULL, *Z = NULL;
    if (to_matview(X_obj, name, 0, &X) < 0 || to_matview(C_obj, "components", 0, &C) < 0)
        goto done;
    if (X.cols != C.cols) {
        PyErr_Format(PyExc_ValueError,
                     "%s has %zu columns but the PCA was fitted on %zu features",
                     name, X.cols, C.cols);
        goto done;
    }
    if (k < 0 || (size_t)k > C.rows) {
        PyErr_Format(PyExc_ValueError, "k must be between 0 and %zu, got %zd",
                     C.rows, k);
        goto done;
    }
    mean = as_vector(mean_obj, "mean", C.cols);
    if (!mean)
        goto done;
    npy_intp zdims[2] = {(npy_intp)X.rows, (npy_intp)k};
    Z = (PyArrayObject *)PyArray_SimpleNew(2, zdims, NPY_FLOAT32);
    if (!Z)
        goto done;
    int status;
    PcsWhere where = {0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    status = pcs_pca_project((float *)PyArray_DATA(Z), (size_t)k, X.data, X.ld,
                             (const float *)PyArray_DATA(mean), C.data, X.rows,
                             X.cols, (size_t)k, &where);
    Py_END_ALLOW_THREADS
    if (status == PCS_ERR_NONFINITE) {
        PyErr_Format(PyExc_ValueError,
                     "%s contains NaN or Inf (first at row %zu, column %zu); "
                     "expected finite values",
                     name, where.row, where.col);
        goto done;
    }
    if (status) {
        raise_status(module, status, "pca_project");
        goto done;
    }
    result = (PyObject *)Z;
    Z = NULL;
done:
    matview_clear(&X);
    matview_clear(&C);
    Py_XDECREF(mean);
    Py_XDECREF(Z);
    return result;
}

/* -------------------------------------------------------- pca_reconstruct */

PyDoc_STRVAR(pca_reconstruct_doc,
"pca_reconstruct($module, Z, components, mean, out=None)\n"
"--\n"
"\n"
"With mean (d,): Xhat (n, d) = Z (n, k) @ components[:k] + mean, written to\n"
"out if given. With mean=None: out += Z @ components[:k] (out required), which\n"
"adds components to an existing reconstruction. k = Z.shape[1].");

static PyObject *pca_reconstruct(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"Z", "components", "mean", "out", NULL};
    PyObject *Z_obj, *C_obj, *mean_obj, *out_obj = Py_None, *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O:pca_reconstruct", kwlist,
                                     &Z_obj, &C_obj, &mean_obj, &out_obj))
        return NULL;
    matview Z = {0}, C = {0}, O = {0};
    PyArrayObject *mean = NULL, *out = NULL;
    if (to_matview(Z_obj, "Z", 1, &Z) < 0 || to_matview(C_obj, "components", 0, &C) < 0)
        goto done;
    if (Z.cols > C.rows) {
        PyErr_Format(PyExc_ValueError,
                     "Z has %zu columns but only %zu components were fitted",
                     Z.cols, C.rows);
        goto done;
    }
    if (mean_obj != Py_None) {
        mean = as_vector(mean_obj, "mean", C.cols);
        if (!mean)
            goto done;
    } else if (out_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError,
                        "out is required when mean is None (accumulate mode)");
        goto done;
    }
    if (out_obj == Py_None) {
        npy_intp dims[2] = {(npy_intp)Z.rows, (npy_intp)C.cols};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (!out)
            goto done;
    } else {
        out = (PyArrayObject *)out_obj;
        Py_INCREF(out);
    }
    if (check_out((PyObject *)out, Z.rows, C.cols, &O) < 0)
        goto done;
    if (ranges_overlap(O.data, view_bytes(&O), Z.data, view_bytes(&Z)) ||
        ranges_overlap(O.data, view_bytes(&O), C.data, view_bytes(&C))) {
        PyErr_SetString(PyExc_ValueError, "out must not overlap Z or components");
        goto done;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = pcs_pca_reconstruct((float *)O.data, O.ld, Z.data, Z.ld, C.data,
                                 mean ? (const float *)PyArray_DATA(mean) : NULL,
                                 Z.rows, C.cols, Z.cols);
    Py_END_ALLOW_THREADS
    if (status) {
        raise_status(module, status, "pca_reconstruct");
        goto done;
    }
    result = (PyObject *)out;
    out = NULL;
done:
    matview_clear(&Z);
    matview_clear(&C);
    Py_XDECREF(mean);
    Py_XDECREF(out);
    return result;
}



/* ------------------------------------------------------------ to_float32 */

PyDoc_STRVAR(to_float32_doc,
"to_float32($module, buffer, offset, nbytes, dtype, shape, name='tensor', /)\n"
"--\n"
"\n"
"A new C-contiguous float32 array of `shape` from the nbytes bytes at\n"
"`offset` of `buffer` (any object with the buffer protocol, e.g. an mmap),\n"
"stored as dtype 'F32', 'F16' or 'BF16' (little-endian, any alignment).\n"
"Checks that the range lies inside the buffer, that nbytes =\n"
"prod(shape) * itemsize and that every value is finite; `name` names the\n"
"tensor in errors.");

static PyObject *to_float32(PyObject *module, PyObject *args)
{
    PyObject *buf_obj, *shape_obj, *result = NULL;
    Py_ssize_t offset, nbytes;
    const char *dt, *name = "tensor";
    if (!PyArg_ParseTuple(args, "OnnsO|s:to_float32", &buf_obj, &offset, &nbytes, &dt,
                          &shape_obj, &name))
        return NULL;
    int dtype;
    size_t item;
    if (strcmp(dt, "F32") == 0) { dtype = PCS_DTYPE_F32; item = 4; }
    else if (strcmp(dt, "F16") == 0) { dtype = PCS_DTYPE_F16; item = 2; }
    else if (strcmp(dt, "BF16") == 0) { dtype = PCS_DTYPE_BF16; item = 2; }
    else {
        PyErr_Format(PyExc_ValueError, "dtype must be 'F32', 'F16' or 'BF16', got %R",
                     PyTuple_GET_ITEM(args, 3));
        return NULL;
    }
    PyArray_Dims shape = {NULL, 0};
    if (!PyArray_IntpConverter(shape_obj, &shape))
        return NULL;
    size_t count = 1;
    for (int i = 0; i < shape.len; i++) {
        if (shape.ptr[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: shape must not have negative dimensions", name);
            goto done_shape;
        }
        if (shape.ptr[i] > 0 && count > ((size_t)PY_SSIZE_T_MAX / 8) / (size_t)shape.ptr[i]) {
            PyErr_Format(PyExc_ValueError, "%s: shape is too large", name);
            goto done_shape;
        }
        count *= (size_t)shape.ptr[i];
    }
    if (nbytes < 0 || (size_t)nbytes != count * item) {
        PyErr_Format(PyExc_ValueError,
                     "%s: nbytes (%zd) must equal prod(shape) * itemsize (%zu * %zu)", name,
                     nbytes, count, item);
        goto done_shape;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(buf_obj, &view, PyBUF_SIMPLE) < 0)
        goto done_shape;
    if (offset < 0 || offset > view.len || nbytes > view.len - offset) {
        PyErr_Format(PyExc_ValueError,
                     "%s: bytes [%zd, %zd) lie outside the buffer of %zd bytes", name, offset,
                     offset + nbytes, view.len);
        PyBuffer_Release(&view);
        goto done_shape;
    }
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(shape.len, shape.ptr, NPY_FLOAT32);
    if (!out) {
        PyBuffer_Release(&view);
        goto done_shape;
    }
    int status;
    size_t bad = 0;
    int n_threads = pcs_get_num_threads();
    Py_BEGIN_ALLOW_THREADS
    status = pcs_convert_to_f32((float *)PyArray_DATA(out), (const char *)view.buf + offset,
                                count, dtype, n_threads, &bad);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (status == PCS_ERR_NONFINITE) {
        Py_DECREF(out);
        PyErr_Format(PyExc_ValueError,
                     "%s contains NaN or Inf (first at flat index %zu of %zu); expected "
                     "finite weights",
                     name, bad, count);
        goto done_shape;
    }
    if (status) {
        Py_DECREF(out);
        raise_status(module, status, "to_float32");
        goto done_shape;
    }
    result = (PyObject *)out;
done_shape:
    PyDimMem_FREE(shape.ptr);
    return result;
}

/* ------------------------------------------------------------ LlamaRuntime */

/* The C forward pass bound to weight arrays that Python owns. `arrays`
 * keeps a reference to every array whose memory the kernel reads. */
typedef struct {
    PyObject_HEAD
    PcsLlamaConfig cfg;
    PcsLlamaWeights w;
    PcsLlamaState st;
    PyObject *arrays; /* list: tok_emb, final_norm, lm_head, then 13 per layer
                         (the 9 weights, then bq, bk, bv, bo or None) */
    PyObject *names;  /* list of str, same order */
    PyObject *latents; /* list (L) of lists: the arrays of the layer's factors, or None
                          (k_down, k_up, v_down, v_up, q_down, q_up) */
    int busy;         /* a kernel runs with the GIL released */
} LlamaRuntime;

enum { RT_GLOBAL = 3, RT_PER_LAYER = 13, RT_FIRST_BIAS = 9, RT_LATENT_SLOTS = 6 };

/* Expected shape of array `idx` (see the order above). */
static void runtime_shape(const PcsLlamaConfig *c, Py_ssize_t idx, npy_intp dims[2], int *nd)
{
    const npy_intp D = (npy_intp)c->dim, F = (npy_intp)c->hidden_dim, V = (npy_intp)c->vocab_size;
    const npy_intp Dq = (npy_intp)(c->n_heads * c->head_dim);
    const npy_intp Dkv = (npy_intp)(c->n_kv_heads * c->head_dim);
    *nd = 2;
    if (idx < RT_GLOBAL) {
        if (idx == 1) { *nd = 1; dims[0] = D; }
        else { dims[0] = V; dims[1] = D; }
        return;
    }
    switch ((idx - RT_GLOBAL) % RT_PER_LAYER) {
    case 0: case 5: *nd = 1; dims[0] = D; break;         /* norms */
    case 1: dims[0] = Dq; dims[1] = D; break;             /* wq */
    case 2: case 3: dims[0] = Dkv; dims[1] = D; break;    /* wk, wv */
    case 4: dims[0] = D; dims[1] = Dq; break;             /* wo */
    case 6: case 7: dims[0] = F; dims[1] = D; break;      /* gate, up */
    case 8: dims[0] = D; dims[1] = F; break;              /* down */
    case 9: *nd = 1; dims[0] = Dq; break;                 /* bq */
    case 10: case 11: *nd = 1; dims[0] = Dkv; break;      /* bk, bv */
    default: *nd = 1; dims[0] = D; break;                 /* bo */
    }
}

/* Is array `idx` a weight matrix (float32 or bf16), not a norm or bias
 * (float32 only)? */
static int runtime_is_matrix(Py_ssize_t idx)
{
    if (idx < RT_GLOBAL)
        return idx != 1;
    const Py_ssize_t k = (idx - RT_GLOBAL) % RT_PER_LAYER;
    return k != 0 && k != 5 && k < RT_FIRST_BIAS;
}

static void runtime_point(PcsLlamaWeights *w, Py_ssize_t idx, const void *p, int bf16)
{
    const PcsMat m = {p, bf16};
    if (idx == 0) { w->tok_emb = m; return; }
    if (idx == 1) { w->final_norm = p; return; }
    if (idx == 2) { w->lm_head = m; return; }
    PcsLlamaLayer *L = &w->layers[(idx - RT_GLOBAL) / RT_PER_LAYER];
    switch ((idx - RT_GLOBAL) % RT_PER_LAYER) {
    case 0: L->attn_norm = p; break;
    case 1: L->wq = m; break;
    case 2: L->wk = m; break;
    case 3: L->wv = m; break;
    case 4: L->wo = m; break;
    case 5: L->ffn_norm = p; break;
    case 6: L->w_gate = m; break;
    case 7: L->w_up = m; break;
    case 8: L->w_down = m; break;
    case 9: L->bq = p; break;
    case 10: L->bk = p; break;
    case 11: L->bv = p; break;
    default: L->bo = p; break;
    }
}

/* Is array `idx` one of a layer's optional biases (None allowed)? */
static int runtime_is_bias(Py_ssize_t idx)
{
    return idx >= RT_GLOBAL && (idx - RT_GLOBAL) % RT_PER_LAYER >= RT_FIRST_BIAS;
}

/* Check that obj is a float32, C-contiguous, aligned array of the shape
 * array `idx` must have; returns a new reference or NULL. */
static PyArrayObject *runtime_check(const PcsLlamaConfig *c, Py_ssize_t idx, PyObject *obj,
                                    const char *name)
{
    npy_intp dims[2];
    int nd;
    runtime_shape(c, idx, dims, &nd);
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    const int bf16_ok = runtime_is_matrix(idx);
    if (!(PyArray_TYPE(a) == NPY_FLOAT32 || (bf16_ok && PyArray_TYPE(a) == NPY_UINT16)) ||
        !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError,
                     bf16_ok ? "%s must be a C-contiguous, aligned float32 array or uint16 "
                               "array of bf16 bits"
                             : "%s must be a C-contiguous, aligned float32 array", name);
        return NULL;
    }
    int ok = PyArray_NDIM(a) == nd;
    for (int i = 0; ok && i < nd; i++)
        ok = PyArray_DIM(a, i) == dims[i];
    if (!ok) {
        if (nd == 1)
            PyErr_Format(PyExc_ValueError, "%s must have shape (%zd,) for this config",
                         name, (Py_ssize_t)dims[0]);
        else
            PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, %zd) for this config",
                         name, (Py_ssize_t)dims[0], (Py_ssize_t)dims[1]);
        return NULL;
    }
    Py_INCREF(a);
    return a;
}

static int size_arg(PyObject *tuple, Py_ssize_t i, const char *what, size_t *out)
{
    PyObject *o = PyTuple_GET_ITEM(tuple, i);
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "config %s must be an int, got %R", what, o);
        return -1;
    }
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "config %s is too large, got %R", what, o);
        return -1;
    }
    if (v <= 0) {
        PyErr_Format(PyExc_ValueError, "config %s must be a positive int, got %zd", what, v);
        return -1;
    }
    *out = (size_t)v;
    return 0;
}

/* Parse and check the config tuple into *c; 0, or -1 with an exception.
 * c->rope_inv_freq borrows the tuple's array: valid while cfg lives. */
static int runtime_config(PyObject *cfg, PcsLlamaConfig *c)
{
    if (PyTuple_GET_SIZE(cfg) != 12) {
        PyErr_SetString(PyExc_ValueError,
                        "config must be (dim, hidden_dim, n_layers, n_heads, n_kv_heads, "
                        "head_dim, vocab_size, seq_len, rms_eps, rope_theta, rope_inv_freq, "
                        "sliding_window)");
        return -1;
    }
    const char *what[] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                          "head_dim", "vocab_size", "seq_len"};
    size_t *field[] = {&c->dim, &c->hidden_dim, &c->n_layers, &c->n_heads, &c->n_kv_heads,
                       &c->head_dim, &c->vocab_size, &c->seq_len};
    for (int i = 0; i < 8; i++)
        if (size_arg(cfg, i, what[i], field[i]) < 0)
            return -1;
    PyObject *eps_obj = PyTuple_GET_ITEM(cfg, 8), *theta_obj = PyTuple_GET_ITEM(cfg, 9);
    double eps = PyFloat_AsDouble(eps_obj);
    double theta = PyFloat_AsDouble(theta_obj);
    if (PyErr_Occurred())
        return -1;
    if (!(eps > 0.0) || !(theta > 0.0) || !isfinite(eps) || !isfinite(theta)) {
        PyErr_Format(PyExc_ValueError,
                     "config rms_eps and rope_theta must be positive and finite, got %R and %R",
                     eps_obj, theta_obj);
        return -1;
    }
    c->rms_eps = (float)eps;
    c->rope_theta = theta;
    if (c->n_heads % c->n_kv_heads != 0) {
        PyErr_Format(PyExc_ValueError,
                     "config n_heads (%zu) must be a multiple of n_kv_heads (%zu)",
                     c->n_heads, c->n_kv_heads);
        return -1;
    }
    if (c->head_dim % 2 != 0) {
        PyErr_Format(PyExc_ValueError, "config head_dim must be even for RoPE, got %zu",
                     c->head_dim);
        return -1;
    }
    const char *too_large = NULL;
    if (pcs_llama_config_check(c, &too_large)) {
        PyErr_Format(PyExc_ValueError, "config is too large: %s does not fit",
                     too_large ? too_large : "a size");
        return -1;
    }
    /* rope_inv_freq: None (theta^(-2i/hd)) or float32 (head_dim/2), each
     * positive and finite */
    PyObject *inv = PyTuple_GET_ITEM(cfg, 10);
    c->rope_inv_freq = NULL;
    if (inv != Py_None) {
        PyArrayObject *a = (PyArrayObject *)inv;
        if (!PyArray_Check(inv) || PyArray_TYPE(a) != NPY_FLOAT32 || PyArray_NDIM(a) != 1 ||
            !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || !PyArray_ISNOTSWAPPED(a) ||
            (size_t)PyArray_DIM(a, 0) != c->head_dim / 2) {
            PyErr_Format(PyExc_TypeError, "config rope_inv_freq must be None or a contiguous "
                         "float32 array of shape (%zu,)", c->head_dim / 2);
            return -1;
        }
        const float *f = (const float *)PyArray_DATA(a);
        for (size_t i = 0; i < c->head_dim / 2; i++) {
            if (!(f[i] > 0.0f) || !isfinite(f[i])) {
                PyErr_Format(PyExc_ValueError, "config rope_inv_freq[%zu] must be positive and "
                             "finite, got %g", i, (double)f[i]);
                return -1;
            }
        }
        c->rope_inv_freq = f;
    }
    PyObject *win = PyTuple_GET_ITEM(cfg, 11);
    if (!PyLong_Check(win) || PyBool_Check(win)) {
        PyErr_Format(PyExc_TypeError, "config sliding_window must be an int, got %R", win);
        return -1;
    }
    Py_ssize_t w = PyLong_AsSsize_t(win);
    if (w == -1 && PyErr_Occurred())
        return -1;
    if (w < 0) {
        PyErr_Format(PyExc_ValueError, "config sliding_window must be >= 0 (0: none), got %zd", w);
        return -1;
    }
    c->sliding_window = (size_t)w;
    return 0;
}

/* Everything is built in locals and checked first; self is filled only once
 * nothing can fail any more, so a failed __init__ leaves the runtime
 * uninitialised (every method then raises), never half-built. */
static int runtime_init(LlamaRuntime *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"config", "arrays", "names", "max_batch", NULL};
    PyObject *cfg, *arrays_in, *names_in, *arrays = NULL, *names = NULL;
    Py_ssize_t max_batch = 512;
    PcsLlamaConfig c = {0};
    PcsLlamaState st = {0};
    PcsLlamaLayer *layers = NULL;
    int any_bf16 = 0;
    if (self->arrays) {
        PyErr_SetString(PyExc_RuntimeError, "LlamaRuntime is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O!|n:LlamaRuntime", kwlist,
                                     &PyTuple_Type, &cfg, &PyList_Type, &arrays_in,
                                     &PyList_Type, &names_in, &max_batch))
        return -1;
    if (runtime_config(cfg, &c) < 0)
        return -1;
    if (max_batch < 1) {
        PyErr_Format(PyExc_ValueError, "max_batch must be >= 1, got %zd", max_batch);
        return -1;
    }
    /* private copies: the caller's lists may change while we work */
    arrays = PySequence_List(arrays_in);
    names = PySequence_List(names_in);
    if (!arrays || !names)
        goto fail;
    Py_ssize_t n = (Py_ssize_t)(RT_GLOBAL + RT_PER_LAYER * c.n_layers);
    if (PyList_GET_SIZE(arrays) != n || PyList_GET_SIZE(names) != n) {
        PyErr_Format(PyExc_ValueError,
                     "arrays and names must each hold %zd entries (3 + 13 per layer), got %zd and %zd",
                     n, PyList_GET_SIZE(arrays), PyList_GET_SIZE(names));
        goto fail;
    }
    layers = PyMem_Calloc(c.n_layers, sizeof(PcsLlamaLayer));
    if (!layers) {
        PyErr_NoMemory();
        goto fail;
    }
    PcsLlamaWeights w = {.layers = layers};
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name_obj = PyList_GET_ITEM(names, i);
        if (!PyUnicode_Check(name_obj)) {
            PyErr_Format(PyExc_TypeError, "names[%zd] must be a str", i);
            goto fail;
        }
        const char *name = PyUnicode_AsUTF8(name_obj);
        if (!name)
            goto fail;
        if (PyList_GET_ITEM(arrays, i) == Py_None && runtime_is_bias(i))
            continue; /* no bias: the pointer stays NULL */
        PyArrayObject *a = runtime_check(&c, i, PyList_GET_ITEM(arrays, i), name);
        if (!a)
            goto fail;
        Py_DECREF(a); /* `arrays` holds it */
        const int bf16 = PyArray_TYPE(a) == NPY_UINT16;
        any_bf16 |= bf16;
        runtime_point(&w, i, PyArray_DATA(a), bf16);
    }
    const char *too_large = NULL;
    int status = pcs_llama_state_init(&st, &c, (size_t)max_batch, &too_large);
    if (!status && any_bf16 && pcs_llama_state_bf16(&st, &c)) {
        pcs_llama_state_free(&st);
        status = PCS_ERR_NOMEM;
    }
    if (status) {
        if (status == PCS_ERR_NOMEM)
            PyErr_Format(PyExc_MemoryError,
                         "cannot allocate the KV cache and buffers for seq_len=%zu", c.seq_len);
        else if (status == PCS_ERR_TOO_LARGE)
            PyErr_Format(PyExc_ValueError, "config is too large: %s does not fit",
                         too_large ? too_large : "a size");
        else
            PyErr_Format(PyExc_ValueError, "LlamaRuntime: %s", pcs_status_str(status));
        goto fail;
    }
    status = pcs_llama_state_layout(&st, &c, &w, &too_large);
    if (status) {
        pcs_llama_state_free(&st);
        if (status == PCS_ERR_NOMEM)
            PyErr_Format(PyExc_MemoryError, "cannot allocate the KV cache for seq_len=%zu",
                         c.seq_len);
        else
            PyErr_Format(PyExc_ValueError, "config is too large: %s does not fit",
                         too_large ? too_large : "the KV cache");
        goto fail;
    }
    PyObject *latents = PyList_New((Py_ssize_t)c.n_layers);
    if (!latents) {
        pcs_llama_state_free(&st);
        goto fail;
    }
    for (size_t l = 0; l < c.n_layers; l++) {
        PyObject *slots = PyList_New(RT_LATENT_SLOTS);
        if (!slots) {
            Py_DECREF(latents);
            pcs_llama_state_free(&st);
            goto fail;
        }
        for (Py_ssize_t i = 0; i < RT_LATENT_SLOTS; i++) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(slots, i, Py_None);
        }
        PyList_SET_ITEM(latents, (Py_ssize_t)l, slots);
    }
    /* commit */
    c.rope_inv_freq = NULL; /* read by state_init only; cfg's array is not kept */
    self->latents = latents;
    self->cfg = c;
    self->w = w;
    self->st = st;
    self->arrays = arrays;
    self->names = names;
    return 0;
fail:
    PyMem_Free(layers);
    Py_XDECREF(arrays);
    Py_XDECREF(names);
    return -1;
}

static int runtime_traverse(LlamaRuntime *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->arrays);
    Py_VISIT(self->names);
    Py_VISIT(self->latents);
    return 0;
}

static int runtime_clear(LlamaRuntime *self)
{
    Py_CLEAR(self->arrays);
    Py_CLEAR(self->names);
    Py_CLEAR(self->latents);
    return 0;
}

static void runtime_dealloc(LlamaRuntime *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    runtime_clear(self);
    pcs_llama_state_free(&self->st);
    PyMem_Free(self->w.layers);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int runtime_ready(LlamaRuntime *self)
{
    if (!self->arrays) {
        PyErr_SetString(PyExc_RuntimeError, "LlamaRuntime is not initialised");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "LlamaRuntime is running in another thread; use one runtime per thread");
        return -1;
    }
    return 0;
}

/* tokens (a 1-D integer sequence, every id in [0, V)) as a PyMem_Malloc'd
 * int array of *T entries; NULL with an exception set. */
static int *tokens_arg(PyObject *tok_obj, size_t V, npy_intp *T_out)
{
    PyArrayObject *raw = (PyArrayObject *)PyArray_FromAny(tok_obj, NULL, 0, 0, 0, NULL);
    if (!raw)
        return NULL;
    if (PyArray_NDIM(raw) != 1 || !PyTypeNum_ISINTEGER(PyArray_TYPE(raw))) {
        PyErr_SetString(PyExc_TypeError, "tokens must be a 1-D sequence of ints");
        Py_DECREF(raw);
        return NULL;
    }
    npy_intp T = PyArray_DIM(raw, 0);
    if (T == 0) {
        PyErr_SetString(PyExc_ValueError, "tokens is empty; expected at least one token");
        Py_DECREF(raw);
        return NULL;
    }
    /* range check on the original integers, before any narrowing cast */
    PyArrayObject *tok64 = (PyArrayObject *)PyArray_FROM_OTF((PyObject *)raw, NPY_INT64,
                                                             NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    Py_DECREF(raw);
    if (!tok64)
        return NULL;
    const int64_t *t64 = (const int64_t *)PyArray_DATA(tok64);
    for (npy_intp i = 0; i < T; i++) {
        if (t64[i] < 0 || (uint64_t)t64[i] >= V) {
            PyErr_Format(PyExc_ValueError,
                         "tokens[%zd] = %lld is outside the vocabulary [0, %zu)",
                         (Py_ssize_t)i, (long long)t64[i], V);
            Py_DECREF(tok64);
            return NULL;
        }
    }
    int *tokens = PyMem_Malloc((size_t)T * sizeof(int));
    if (!tokens) {
        Py_DECREF(tok64);
        PyErr_NoMemory();
        return NULL;
    }
    for (npy_intp i = 0; i < T; i++)
        tokens[i] = (int)t64[i];
    Py_DECREF(tok64);
    *T_out = T;
    return tokens;
}

PyDoc_STRVAR(runtime_forward_doc,
"forward($self, /, tokens, pos, all_logits=True)\n"
"--\n"
"\n"
"Run tokens (1-D ints) at positions pos..pos+T-1 (pos <= n_cached; the cache\n"
"beyond pos is overwritten). Returns float32 logits (T, V), or (1, V) for\n"
"the last token when all_logits is False.");

static PyObject *runtime_forward(LlamaRuntime *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"tokens", "pos", "all_logits", NULL};
    PyObject *tok_obj;
    Py_ssize_t pos;
    int all_logits = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|p:forward", kwlist, &tok_obj, &pos,
                                     &all_logits))
        return NULL;
    if (runtime_ready(self) < 0)
        return NULL;
    npy_intp T;
    int *tokens = tokens_arg(tok_obj, self->cfg.vocab_size, &T);
    if (!tokens)
        return NULL;
    const size_t V = self->cfg.vocab_size, S = self->cfg.seq_len;
    if (pos < 0 || (size_t)pos > self->st.n_cached) {
        PyErr_Format(PyExc_ValueError,
                     "pos must be between 0 and the %zu positions already cached, got %zd",
                     self->st.n_cached, pos);
        PyMem_Free(tokens);
        return NULL;
    }
    if ((size_t)pos + (size_t)T > S) {
        PyErr_Format(PyExc_ValueError,
                     "%zd tokens at position %zd exceed the context of %zu tokens",
                     (Py_ssize_t)T, pos, S);
        PyMem_Free(tokens);
        return NULL;
    }
    npy_intp dims[2] = {all_logits ? T : 1, (npy_intp)V};
    PyArrayObject *logits = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!logits) {
        PyMem_Free(tokens);
        return NULL;
    }
    int status;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    status = pcs_llama_forward((float *)PyArray_DATA(logits), &self->st, &self->cfg, &self->w,
                               tokens, (size_t)T, (size_t)pos, all_logits);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyMem_Free(tokens);
    if (status) {
        Py_DECREF(logits);
        PyErr_Format(PyExc_ValueError, "forward: %s", pcs_status_str(status));
        return NULL;
    }
    return (PyObject *)logits;
}


/* obj as a C-contiguous float32 matrix of shape (rows, cols), finite; a
 * new reference or NULL. cols or rows 0: any (the actual one in *got). */
static PyArrayObject *f32_matrix(PyObject *obj, const char *name, size_t rows, size_t cols,
                                 size_t *got_rows, size_t *got_cols)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(obj, NPY_FLOAT32,
                                                         NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!a)
        return NULL;
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 0) < 1 || PyArray_DIM(a, 1) < 1 ||
        (rows && (size_t)PyArray_DIM(a, 0) != rows) || (cols && (size_t)PyArray_DIM(a, 1) != cols)) {
        if (rows && cols)
            PyErr_Format(PyExc_ValueError, "%s must have shape (%zu, %zu)", name, rows, cols);
        else if (rows)
            PyErr_Format(PyExc_ValueError, "%s must have shape (%zu, r) with r >= 1", name, rows);
        else
            PyErr_Format(PyExc_ValueError, "%s must have shape (r, %zu) with r >= 1", name, cols);
        Py_DECREF(a);
        return NULL;
    }
    const float *x = (const float *)PyArray_DATA(a);
    size_t n = (size_t)PyArray_SIZE(a);
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(x[i])) {
            PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf", name);
            Py_DECREF(a);
            return NULL;
        }
    }
    if (got_rows)
        *got_rows = (size_t)PyArray_DIM(a, 0);
    if (got_cols)
        *got_cols = (size_t)PyArray_DIM(a, 1);
    return a;
}

/* Point layer's factors at the arrays in `arr` (RT_LATENT_SLOTS, each
 * NULL or a float32 matrix already checked), lay the cache out for them and
 * keep references; on failure the layer and the cache stay as they were
 * (returns -1 with an exception). The cache is cleared. */
static int runtime_commit_factors(LlamaRuntime *self, Py_ssize_t layer, PyArrayObject **arr,
                                  const size_t *rank)
{
    PcsLlamaLayer *L = &self->w.layers[layer];
    const PcsLlamaLayer old = *L;
#define PTR(i) (arr[i] ? (const float *)PyArray_DATA(arr[i]) : NULL)
    L->k_down = PTR(0); L->k_up = PTR(1); L->v_down = PTR(2); L->v_up = PTR(3);
    L->q_down = PTR(4); L->q_up = PTR(5);
#undef PTR
    L->k_rank = rank[0];
    L->v_rank = rank[1];
    L->q_rank = rank[2];
    const char *what = NULL;
    int status = pcs_llama_state_layout(&self->st, &self->cfg, &self->w, &what);
    if (status) {
        *L = old;
        if (status == PCS_ERR_NOMEM)
            PyErr_NoMemory();
        else if (status == PCS_ERR_TOO_LARGE)
            PyErr_Format(PyExc_ValueError, "%s does not fit", what ? what : "the cache");
        else
            PyErr_SetString(PyExc_ValueError, "these factors do not make a valid latent layer");
        return -1;
    }
    PyObject *slots = PyList_GET_ITEM(self->latents, layer);
    for (Py_ssize_t i = 0; i < RT_LATENT_SLOTS; i++) {
        PyObject *o = arr[i] ? (PyObject *)arr[i] : Py_None;
        Py_INCREF(o);
        PyList_SetItem(slots, i, o); /* steals o, drops the old */
    }
    return 0;
}

/* The end of set_latent and set_factored_q: arr[lo..hi) holds the new
 * factors (owned references, NULL = None) and rank their ranks (the others
 * as the layer has them). ok: keep the layer's other factors, commit and
 * return None; not ok (an exception is set): drop the new ones, NULL. */
static PyObject *runtime_finish_factors(LlamaRuntime *self, Py_ssize_t layer, PyArrayObject **arr,
                                        int lo, int hi, const size_t *rank, int ok)
{
    PyObject *slots = PyList_GET_ITEM(self->latents, layer);
    for (int i = 0; ok && i < RT_LATENT_SLOTS; i++) {
        if (i >= lo && i < hi)
            continue;
        PyObject *o = PyList_GET_ITEM(slots, i);
        arr[i] = o == Py_None ? NULL : (PyArrayObject *)Py_NewRef(o);
    }
    ok = ok && runtime_commit_factors(self, layer, arr, rank) == 0;
    for (int i = 0; i < RT_LATENT_SLOTS; i++)
        Py_XDECREF(arr[i]);
    return ok ? Py_NewRef(Py_None) : NULL;
}

/* obj None (NULL in *out) or a finite float32 matrix of (rows, cols) (0: any, the
 * actual one in *got). -1 with an exception. */
static int opt_matrix(PyObject *obj, const char *name, size_t rows, size_t cols, size_t *got_rows,
                      size_t *got_cols, PyArrayObject **out)
{
    *out = NULL;
    if (obj == Py_None)
        return 0;
    *out = f32_matrix(obj, name, rows, cols, got_rows, got_cols);
    return *out ? 0 : -1;
}

static int layer_arg(const LlamaRuntime *self, Py_ssize_t layer)
{
    if (layer < 0 || (size_t)layer >= self->cfg.n_layers) {
        PyErr_Format(PyExc_IndexError, "layer must be between 0 and %zu, got %zd",
                     self->cfg.n_layers - 1, layer);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(runtime_set_latent_doc,
"set_latent($self, layer, k_down, k_up, v_down=None, v_up=None, /)\n"
"--\n"
"\n"
"Run layer's K and V from latents and cache the latents instead of K and V:\n"
"K = k_up (k_down x), k_down (rk, D), k_up (Dkv, rk); V = v_up (v_down x),\n"
"v_down (rv, D), v_up (Dkv, rv), or, with v_down None, v_up (Dkv, rk)\n"
"applied to K's latent (one shared latent). k_down and k_up None: K stays\n"
"dense (wk); v_up None: V stays dense (wv). All None: the layer's dense K\n"
"and V. rk + rv is at most max(2 Dkv + 2, D + 1). The cache is laid out\n"
"again (and cleared); the runtime keeps the arrays (float32 copies where\n"
"needed).");

static PyObject *runtime_set_latent(LlamaRuntime *self, PyObject *args)
{
    Py_ssize_t layer;
    PyObject *kd_obj, *ku_obj, *vd_obj = Py_None, *vu_obj = Py_None;
    if (!PyArg_ParseTuple(args, "nOO|OO:set_latent", &layer, &kd_obj, &ku_obj, &vd_obj, &vu_obj))
        return NULL;
    if (runtime_ready(self) < 0 || layer_arg(self, layer) < 0)
        return NULL;
    const PcsLlamaConfig *c = &self->cfg;
    if ((kd_obj == Py_None) != (ku_obj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "k_down and k_up go together: give both or neither");
        return NULL;
    }
    if (vd_obj != Py_None && vu_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError, "v_down needs v_up");
        return NULL;
    }
    if (vu_obj != Py_None && vd_obj == Py_None && kd_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError,
                        "v_up without v_down reads K's latent: k_down and k_up are needed");
        return NULL;
    }
    const size_t D = c->dim, Dkv = c->n_kv_heads * c->head_dim;
    size_t rank[3] = {0, 0, self->w.layers[layer].q_rank}; /* Q's factors stay */
    PyArrayObject *arr[RT_LATENT_SLOTS] = {NULL};
    int ok = opt_matrix(kd_obj, "k_down", 0, D, &rank[0], NULL, &arr[0]) == 0 &&
             opt_matrix(ku_obj, "k_up", Dkv, rank[0], NULL, NULL, &arr[1]) == 0 &&
             opt_matrix(vd_obj, "v_down", 0, D, &rank[1], NULL, &arr[2]) == 0 &&
             opt_matrix(vu_obj, "v_up", Dkv, arr[2] ? rank[1] : rank[0], NULL, NULL, &arr[3]) == 0;
    if (ok && rank[0] + rank[1] > pcs_llama_max_latent(c)) {
        PyErr_Format(PyExc_ValueError,
                     "latent ranks %zu + %zu exceed max(2 * Dkv + 2, hidden_size + 1) = %zu",
                     rank[0], rank[1], pcs_llama_max_latent(c));
        ok = 0;
    }
    return runtime_finish_factors(self, layer, arr, 0, 4, rank, ok);
}

PyDoc_STRVAR(runtime_set_factored_q_doc,
"set_factored_q($self, layer, q_down, q_up, /)\n"
"--\n"
"\n"
"Compute layer's q from factors: q = q_up (q_down x), q_down (rq, D),\n"
"q_up (Dq, rq), rq <= D + 1. Both None: wq again. The cache is cleared.");

static PyObject *runtime_set_factored_q(LlamaRuntime *self, PyObject *args)
{
    Py_ssize_t layer;
    PyObject *qd_obj, *qu_obj;
    if (!PyArg_ParseTuple(args, "nOO:set_factored_q", &layer, &qd_obj, &qu_obj))
        return NULL;
    if (runtime_ready(self) < 0 || layer_arg(self, layer) < 0)
        return NULL;
    const PcsLlamaConfig *c = &self->cfg;
    if ((qd_obj == Py_None) != (qu_obj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "q_down and q_up go together: give both or neither");
        return NULL;
    }
    const PcsLlamaLayer *L = &self->w.layers[layer];
    size_t rank[3] = {L->k_rank, L->v_rank, 0}; /* K's and V's factors stay */
    PyArrayObject *arr[RT_LATENT_SLOTS] = {NULL};
    int ok = opt_matrix(qd_obj, "q_down", 0, c->dim, &rank[2], NULL, &arr[4]) == 0 &&
             opt_matrix(qu_obj, "q_up", c->n_heads * c->head_dim, rank[2], NULL, NULL, &arr[5]) == 0;
    if (ok && rank[2] > pcs_llama_max_q_latent(c)) {
        PyErr_Format(PyExc_ValueError, "q rank %zu exceeds hidden_size + 1 = %zu", rank[2],
                     pcs_llama_max_q_latent(c));
        ok = 0;
    }
    return runtime_finish_factors(self, layer, arr, 4, RT_LATENT_SLOTS, rank, ok);
}

PyDoc_STRVAR(runtime_cache_widths_doc,
"cache_widths($self, /)\n"
"--\n"
"\n"
"Floats per token that each layer's cache holds (a list of L ints): 2 Dkv\n"
"for dense K and V, the latent width for a latent layer, or a mix. The\n"
"cache is allocated for seq_len tokens: bytes = width * seq_len * 4.");

static PyObject *runtime_cache_widths(LlamaRuntime *self, PyObject *unused)
{
    if (runtime_ready(self) < 0)
        return NULL;
    PyObject *out = PyList_New((Py_ssize_t)self->cfg.n_layers);
    for (size_t l = 0; out && l < self->cfg.n_layers; l++) {
        PyObject *v = PyLong_FromSize_t(pcs_llama_cache_width(&self->st, &self->cfg, l));
        if (!v) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)l, v);
    }
    return out;
}

static PyObject *runtime_factors(LlamaRuntime *self, PyObject *args)
{
    Py_ssize_t layer;
    if (!PyArg_ParseTuple(args, "n:factors", &layer))
        return NULL;
    if (runtime_ready(self) < 0 || layer_arg(self, layer) < 0)
        return NULL;
    return PyList_AsTuple(PyList_GET_ITEM(self->latents, layer));
}

PyDoc_STRVAR(runtime_fill_cache_doc,
"fill_cache($self, n, /)\n"
"--\n"
"\n"
"Treat positions 0..n-1 as cached, zeroing their rows (so that their pages\n"
"are resident): a decode step can then be timed at context n without\n"
"prefilling it (its cost does not depend on the cached values).");

static PyObject *runtime_fill_cache(LlamaRuntime *self, PyObject *args)
{
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "n:fill_cache", &n))
        return NULL;
    if (runtime_ready(self) < 0)
        return NULL;
    const PcsLlamaConfig *c = &self->cfg;
    if (n < 0 || (size_t)n > c->seq_len) {
        PyErr_Format(PyExc_ValueError, "n must be between 0 and seq_len=%zu, got %zd", c->seq_len, n);
        return NULL;
    }
    const size_t Dkv = c->n_kv_heads * c->head_dim;
    PcsLlamaState *st = &self->st;
    for (size_t l = 0; l < c->n_layers; l++) {
        if (st->k_cache[l])
            memset(st->k_cache[l], 0, (size_t)n * Dkv * sizeof(float));
        if (st->v_cache[l])
            memset(st->v_cache[l], 0, (size_t)n * Dkv * sizeof(float));
        if (st->l_cache[l])
            memset(st->l_cache[l], 0, (size_t)n * st->l_width[l] * sizeof(float));
    }
    st->n_cached = (size_t)n;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(runtime_set_quant_doc,
"set_quant($self, k_bits=0, v_bits=0, group=32, k_per_channel=False, latent_bits=0,\n"
"          latent_group=32)\n"
"--\n"
"\n"
"Simulate a quantised cache: K and V rows (post-RoPE K) are rounded as\n"
"asymmetric b-bit groups of `group` values with float16 scale and minimum\n"
"as they are written; with k_per_channel, K is grouped per channel over\n"
"`group` tokens (KIVI: complete groups quantised, the open one exact);\n"
"latent_bits rounds the latents of latent K/V layers in groups of\n"
"latent_group. 0 bits: exact. The KV cache is not cleared.");

static PyObject *runtime_set_quant(LlamaRuntime *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"k_bits", "v_bits", "group", "k_per_channel", "latent_bits",
                             "latent_group", NULL};
    int k_bits = 0, v_bits = 0, per_channel = 0, latent_bits = 0;
    Py_ssize_t group = 32, latent_group = 32;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iinpin:set_quant", kwlist, &k_bits, &v_bits,
                                     &group, &per_channel, &latent_bits, &latent_group))
        return NULL;
    if (runtime_ready(self) < 0)
        return NULL;
    const int bits[3] = {k_bits, v_bits, latent_bits};
    const char *names[3] = {"k_bits", "v_bits", "latent_bits"};
    for (int i = 0; i < 3; i++) {
        if (bits[i] < 0 || bits[i] > 8) {
            PyErr_Format(PyExc_ValueError, "%s must be 0 (exact) or 1..8, got %d", names[i], bits[i]);
            return NULL;
        }
    }
    if (group < 1 || latent_group < 1) {
        PyErr_Format(PyExc_ValueError, "group and latent_group must be >= 1, got %zd and %zd",
                     group, latent_group);
        return NULL;
    }
    PcsKvQuant q = {k_bits, v_bits, (size_t)group, per_channel, latent_bits, (size_t)latent_group};
    int status = pcs_llama_set_quant(&self->st, &self->cfg, &q);
    if (status == PCS_ERR_NOMEM)
        return PyErr_NoMemory();
    if (status) {
        PyErr_Format(PyExc_ValueError, "set_quant: %s", pcs_status_str(status));
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(runtime_calibrate_doc,
"calibrate($self, tokens, sigma, sums, /)\n"
"--\n"
"\n"
"Run tokens from position 0 (the cache is reset) and, for every layer l,\n"
"add h h^T of each token's attention input h (after RMSNorm) to the upper\n"
"triangle of sigma[l] and h to sums[l]: sigma (L, D, D) and sums (L, D),\n"
"C-contiguous writable float64 arrays, updated in place.");

static PyObject *runtime_calibrate(LlamaRuntime *self, PyObject *args)
{
    PyObject *tok_obj, *sig_obj, *sum_obj;
    if (!PyArg_ParseTuple(args, "OOO:calibrate", &tok_obj, &sig_obj, &sum_obj))
        return NULL;
    if (runtime_ready(self) < 0)
        return NULL;
    const PcsLlamaConfig *c = &self->cfg;
    const size_t D = c->dim, L = c->n_layers;
    PyArrayObject *arrs[2] = {(PyArrayObject *)sig_obj, (PyArrayObject *)sum_obj};
    const char *names[2] = {"sigma", "sums"};
    for (int i = 0; i < 2; i++) {
        PyObject *o = i ? sum_obj : sig_obj;
        int nd = i ? 2 : 3;
        npy_intp want[3] = {(npy_intp)L, (npy_intp)D, (npy_intp)D};
        int ok = PyArray_Check(o) && PyArray_TYPE((PyArrayObject *)o) == NPY_FLOAT64 &&
                 PyArray_IS_C_CONTIGUOUS((PyArrayObject *)o) &&
                 PyArray_ISWRITEABLE((PyArrayObject *)o) && PyArray_ISALIGNED((PyArrayObject *)o) &&
                 PyArray_ISNOTSWAPPED((PyArrayObject *)o) && PyArray_NDIM((PyArrayObject *)o) == nd;
        for (int j = 0; ok && j < nd; j++)
            ok = PyArray_DIM((PyArrayObject *)o, j) == want[j];
        if (!ok) {
            if (i)
                PyErr_Format(PyExc_TypeError, "%s must be a writable C-contiguous float64 array "
                             "of shape (%zu, %zu)", names[i], L, D);
            else
                PyErr_Format(PyExc_TypeError, "%s must be a writable C-contiguous float64 array "
                             "of shape (%zu, %zu, %zu)", names[i], L, D, D);
            return NULL;
        }
    }
    npy_intp T;
    int *tokens = tokens_arg(tok_obj, c->vocab_size, &T);
    if (!tokens)
        return NULL;
    if ((size_t)T > c->seq_len) {
        PyErr_Format(PyExc_ValueError, "%zd tokens exceed the context of %zu tokens",
                     (Py_ssize_t)T, c->seq_len);
        PyMem_Free(tokens);
        return NULL;
    }
    float *tmp = malloc(D * D * sizeof(float));
    float *logits = malloc(c->vocab_size * sizeof(float));
    if (!tmp || !logits) {
        free(tmp);
        free(logits);
        PyMem_Free(tokens);
        return PyErr_NoMemory();
    }
    int status;
    self->busy = 1;
    self->st.calib_sigma = (double *)PyArray_DATA(arrs[0]);
    self->st.calib_sum = (double *)PyArray_DATA(arrs[1]);
    self->st.calib_tmp = tmp;
    self->st.n_cached = 0;
    Py_BEGIN_ALLOW_THREADS
    status = pcs_llama_forward(logits, &self->st, c, &self->w, tokens, (size_t)T, 0, 0);
    Py_END_ALLOW_THREADS
    self->st.calib_sigma = self->st.calib_sum = NULL;
    self->st.calib_tmp = NULL;
    self->busy = 0;
    free(tmp);
    free(logits);
    PyMem_Free(tokens);
    if (status) {
        PyErr_Format(PyExc_ValueError, "calibrate: %s", pcs_status_str(status));
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(runtime_set_weight_doc,
"set_weight($self, index, array, /)\n"
"--\n"
"\n"
"Point weight `index` at another array of the same\n"
"shape (float32, C-contiguous). The runtime keeps a reference to it. The KV\n"
"cache is not cleared: call reset() before running a new sequence.");

static PyObject *runtime_set_weight(LlamaRuntime *self, PyObject *args)
{
    Py_ssize_t idx;
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "nO:set_weight", &idx, &obj))
        return NULL;
    if (runtime_ready(self) < 0)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(self->arrays);
    if (idx < 0 || idx >= n) {
        PyErr_Format(PyExc_IndexError, "index must be between 0 and %zd, got %zd", n - 1, idx);
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(PyList_GET_ITEM(self->names, idx));
    if (!name)
        return NULL;
    PyArrayObject *a = runtime_check(&self->cfg, idx, obj, name);
    if (!a)
        return NULL;
    const int bf16 = PyArray_TYPE(a) == NPY_UINT16;
    if (bf16 && pcs_llama_state_bf16(&self->st, &self->cfg)) {
        Py_DECREF(a);
        return PyErr_NoMemory();
    }
    runtime_point(&self->w, idx, PyArray_DATA(a), bf16);
    PyList_SetItem(self->arrays, idx, (PyObject *)a); /* steals a, drops the old */
    Py_RETURN_NONE;
}

static PyObject *runtime_reset(LlamaRuntime *self, PyObject *unused)
{
    if (runtime_ready(self) < 0)
        return NULL;
    self->st.n_cached = 0;
    Py_RETURN_NONE;
}

static PyObject *runtime_get_n_cached(LlamaRuntime *self, void *closure)
{
    return PyLong_FromSize_t(self->arrays ? self->st.n_cached : 0);
}

static PyObject *runtime_get_arrays(LlamaRuntime *self, void *closure)
{
    if (!self->arrays)
        return PyList_New(0);
    return PyList_GetSlice(self->arrays, 0, PyList_GET_SIZE(self->arrays));
}

static PyMethodDef runtime_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))runtime_forward, METH_VARARGS | METH_KEYWORDS,
     runtime_forward_doc},
    {"set_weight", (PyCFunction)runtime_set_weight, METH_VARARGS, runtime_set_weight_doc},
    {"set_latent", (PyCFunction)runtime_set_latent, METH_VARARGS, runtime_set_latent_doc},
    {"set_factored_q", (PyCFunction)runtime_set_factored_q, METH_VARARGS,
     runtime_set_factored_q_doc},
    {"cache_widths", (PyCFunction)runtime_cache_widths, METH_NOARGS, runtime_cache_widths_doc},
    {"fill_cache", (PyCFunction)runtime_fill_cache, METH_VARARGS, runtime_fill_cache_doc},
    {"factors", (PyCFunction)runtime_factors, METH_VARARGS,
     "factors($self, layer, /)\n--\n\nThe layer's factor arrays or None: (k_down, k_up, "
     "v_down, v_up, q_down, q_up)."},
    {"set_quant", (PyCFunction)(void (*)(void))runtime_set_quant, METH_VARARGS | METH_KEYWORDS,
     runtime_set_quant_doc},
    {"calibrate", (PyCFunction)runtime_calibrate, METH_VARARGS, runtime_calibrate_doc},
    {"reset", (PyCFunction)runtime_reset, METH_NOARGS, "reset($self, /)\n--\n\nForget the KV cache."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef runtime_getset[] = {
    {"n_cached", (getter)runtime_get_n_cached, NULL, "positions held in the KV cache", NULL},
    {"arrays", (getter)runtime_get_arrays, NULL, "the weight arrays, in kernel order", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot runtime_slots[] = {
    {Py_tp_doc, "LlamaRuntime(config, arrays, names, max_batch=512)\n--\n\n"
                "The C forward pass over weight arrays owned by Python (see\n"
                "pcasurgery.model)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, runtime_init},
    {Py_tp_dealloc, runtime_dealloc},
    {Py_tp_traverse, runtime_traverse},
    {Py_tp_clear, runtime_clear},
    {Py_tp_methods, runtime_methods},
    {Py_tp_getset, runtime_getset},
    {0, NULL},
};

static PyType_Spec runtime_spec = {
    .name = "pcasurgery._C.LlamaRuntime",
    .basicsize = sizeof(LlamaRuntime),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = runtime_slots,
};


/* ------------------------------------------------ activation-aware bases */

PyDoc_STRVAR(weighted_gram_doc,
"weighted_gram($module, W, sigma, name='W', /)\n"
"--\n"
"\n"
"M (n, n) float64 = W Sigma W^T, in double, for W (n, d) (float32 or any\n"
"real array) and Sigma (d, d) float64 symmetric.");

static PyObject *weighted_gram(PyObject *module, PyObject *args)
{
    PyObject *w_obj, *s_obj;
    const char *name = "W";
    if (!PyArg_ParseTuple(args, "OO|s:weighted_gram", &w_obj, &s_obj, &name))
        return NULL;
    matview v;
    if (to_matview(w_obj, name, 0, &v) < 0)
        return NULL;
    PyArrayObject *sig = (PyArrayObject *)PyArray_FROM_OTF(s_obj, NPY_FLOAT64,
                                                           NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!sig) {
        matview_clear(&v);
        return NULL;
    }
    if (PyArray_NDIM(sig) != 2 || (size_t)PyArray_DIM(sig, 0) != v.cols ||
        (size_t)PyArray_DIM(sig, 1) != v.cols) {
        PyErr_Format(PyExc_ValueError, "sigma must have shape (%zu, %zu) for %s with %zu columns",
                     v.cols, v.cols, name, v.cols);
        Py_DECREF(sig);
        matview_clear(&v);
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)v.rows, (npy_intp)v.rows};
    PyArrayObject *M = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (!M) {
        Py_DECREF(sig);
        matview_clear(&v);
        return NULL;
    }
    PcsMatrix mat = {v.data, v.rows, v.ld};
    PcsWhere where = {0, 0, 0};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = pcs_weighted_gram((double *)PyArray_DATA(M), &mat, 1, v.cols,
                               (const double *)PyArray_DATA(sig), &where);
    Py_END_ALLOW_THREADS
    Py_DECREF(sig);
    matview_clear(&v);
    if (status == PCS_ERR_NONFINITE) {
        PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf (first at row %zu, column %zu)",
                     name, where.row, where.col);
        Py_DECREF(M);
        return NULL;
    }
    if (status) {
        Py_DECREF(M);
        return raise_status(module, status, "weighted_gram");
    }
    return (PyObject *)M;
}

PyDoc_STRVAR(symmetrize_upper_doc,
"symmetrize_upper($module, S, scale, /)\n"
"--\n"
"\n"
"In place, for a writable C-contiguous float64 array S of shape (..., n, n):\n"
"each matrix's upper triangle (diagonal included) times scale, mirrored into\n"
"its lower triangle.");

static PyObject *symmetrize_upper(PyObject *module, PyObject *args)
{
    PyObject *obj;
    double scale;
    if (!PyArg_ParseTuple(args, "Od:symmetrize_upper", &obj, &scale))
        return NULL;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_Check(obj) || PyArray_TYPE(a) != NPY_FLOAT64 || !PyArray_IS_C_CONTIGUOUS(a) ||
        !PyArray_ISWRITEABLE(a) || !PyArray_ISALIGNED(a) || !PyArray_ISNOTSWAPPED(a) ||
        PyArray_NDIM(a) < 2 || PyArray_DIM(a, PyArray_NDIM(a) - 1) != PyArray_DIM(a, PyArray_NDIM(a) - 2)) {
        PyErr_SetString(PyExc_TypeError,
                        "S must be a writable C-contiguous float64 array of shape (..., n, n)");
        return NULL;
    }
    const size_t n = (size_t)PyArray_DIM(a, PyArray_NDIM(a) - 1);
    const size_t count = n ? (size_t)PyArray_SIZE(a) / (n * n) : 0;
    double *p = (double *)PyArray_DATA(a);
    Py_BEGIN_ALLOW_THREADS
    for (size_t m = 0; m < count; m++)
        pcs_symmetrize_upper(p + m * n * n, n, scale);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sym_eig_doc,
"sym_eig($module, A, /)\n"
"--\n"
"\n"
"-> (vals, vecs): the eigenvalues (n,) of the symmetric float64 matrix A\n"
"(n, n), descending, and vecs (n, n) whose column i is the eigenvector of\n"
"vals[i] (largest-magnitude entry positive). Only A's upper triangle is read.");

static PyObject *sym_eig(PyObject *module, PyObject *arg)
{
    PyArrayObject *A = (PyArrayObject *)PyArray_FROM_OTF(arg, NPY_FLOAT64,
                                                         NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!A)
        return NULL;
    if (PyArray_NDIM(A) != 2 || PyArray_DIM(A, 0) != PyArray_DIM(A, 1) || PyArray_DIM(A, 0) < 1) {
        PyErr_SetString(PyExc_ValueError, "A must be a square 2-D array with at least one row");
        Py_DECREF(A);
        return NULL;
    }
    npy_intp n = PyArray_DIM(A, 0), dims[2] = {n, n};
    PyArrayObject *vals = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_FLOAT64);
    PyArrayObject *vecs = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (!vals || !vecs) {
        Py_DECREF(A);
        Py_XDECREF(vals);
        Py_XDECREF(vecs);
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = pcs_sym_eig((double *)PyArray_DATA(vals), (double *)PyArray_DATA(vecs),
                         (const double *)PyArray_DATA(A), (size_t)n);
    Py_END_ALLOW_THREADS
    Py_DECREF(A);
    if (status) {
        Py_DECREF(vals);
        Py_DECREF(vecs);
        if (status == PCS_ERR_NONFINITE) {
            PyErr_SetString(PyExc_ValueError, "A contains NaN or Inf; expected finite values");
            return NULL;
        }
        return raise_status(module, status, "sym_eig");
    }
    return Py_BuildValue("(NN)", vals, vecs);
}

PyDoc_STRVAR(fake_quant_doc,
"fake_quant($module, x, bits, group, per_column=False, /)\n"
"--\n"
"\n"
"A float32 copy of the 2-D array x, quantised and dequantised as the KV\n"
"cache simulation does it: asymmetric `bits`-bit groups (1..8) with a\n"
"float16 scale and minimum, each row in groups of `group` values, or, with\n"
"per_column, each column as one group.");

static PyObject *fake_quant(PyObject *module, PyObject *args)
{
    PyObject *x_obj;
    int bits, per_column = 0;
    Py_ssize_t group;
    if (!PyArg_ParseTuple(args, "Oin|p:fake_quant", &x_obj, &bits, &group, &per_column))
        return NULL;
    if (bits < 1 || bits > 8) {
        PyErr_Format(PyExc_ValueError, "bits must be between 1 and 8, got %d", bits);
        return NULL;
    }
    if (group < 1) {
        PyErr_Format(PyExc_ValueError, "group must be >= 1, got %zd", group);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(x_obj, NPY_FLOAT32,
                                                         NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST |
                                                         NPY_ARRAY_ENSURECOPY);
    if (!a)
        return NULL;
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 0) < 1 || PyArray_DIM(a, 1) < 1) {
        PyErr_SetString(PyExc_ValueError, "x must be a non-empty 2-D array");
        Py_DECREF(a);
        return NULL;
    }
    const float *p = (const float *)PyArray_DATA(a);
    for (npy_intp i = 0; i < PyArray_SIZE(a); i++) {
        if (!isfinite(p[i])) {
            PyErr_SetString(PyExc_ValueError, "x contains NaN or Inf; expected finite values");
            Py_DECREF(a);
            return NULL;
        }
    }
    size_t T = (size_t)PyArray_DIM(a, 0), n = (size_t)PyArray_DIM(a, 1);
    float *x = (float *)PyArray_DATA(a);
    Py_BEGIN_ALLOW_THREADS
    if (per_column)
        pcs_fake_quant_cols(x, T, n, n, bits);
    else
        pcs_fake_quant_rows(x, T, n, n, bits, (size_t)group);
    Py_END_ALLOW_THREADS
    return (PyObject *)a;
}

/* ---------------------------------------------------------------- threads */

/* The most threads our OpenBLAS runs: its build's MAX_THREADS (it clamps
 * larger requests silently), or 4096 when the build string does not say. */
static long max_blas_threads(void)
{
    const char *cfg = pcs_blas_config();
    const char *p = cfg ? strstr(cfg, "MAX_THREADS=") : NULL;
    long n = p ? strtol(p + strlen("MAX_THREADS="), NULL, 10) : 0;
    return n > 0 ? n : 4096;
}

static PyObject *set_num_threads(PyObject *module, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        n = LONG_MAX;
    }
    long limit = max_blas_threads();
    if (n < 1 || n > limit) {
        PyErr_Format(PyExc_ValueError,
                     "threads must be between 1 and %ld (the MAX_THREADS of pcasurgery's "
                     "OpenBLAS build), got %R",
                     limit, arg);
        return NULL;
    }
    pcs_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *max_threads(PyObject *module, PyObject *unused)
{
    return PyLong_FromLong(max_blas_threads());
}

static PyObject *get_num_threads(PyObject *module, PyObject *unused)
{
    return PyLong_FromLong(pcs_get_num_threads());
}

static PyObject *blas_config(PyObject *module, PyObject *unused)
{
    const char *c = pcs_blas_config();
    return PyUnicode_FromString(c ? c : "");
}

PyDoc_STRVAR(bf16_nonfinite_doc, "bf16_nonfinite(bits, /)\n--\n\n"
"Flat index of the first NaN or Inf in a C-contiguous uint16 array of bf16\n"
"bits, or -1 when every value is finite.");

static PyObject *bf16_nonfinite(PyObject *module, PyObject *arg)
{
    if (!PyArray_Check(arg) || PyArray_TYPE((PyArrayObject *)arg) != NPY_UINT16 ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)arg) ||
        !PyArray_ISALIGNED((PyArrayObject *)arg)) {
        PyErr_SetString(PyExc_TypeError, "bits must be a C-contiguous, aligned uint16 array");
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)arg;
    const size_t n = (size_t)PyArray_SIZE(a);
    size_t at;
    Py_BEGIN_ALLOW_THREADS
    at = pcs_bf16_first_nonfinite((const unsigned short *)PyArray_DATA(a), n);
    Py_END_ALLOW_THREADS
    return at == n ? PyLong_FromLong(-1) : PyLong_FromSize_t(at);
}

PyDoc_STRVAR(matmul_bf16_doc, "matmul_bf16(out, x, W, beta, n_threads, scratch=0, /)\n--\n\n"
"out (T, n) = beta * out + x (T, K) W^T on n_threads of pcasurgery's threads,\n"
"as prefill computes it with bf16 weights: W (n, K) C-contiguous uint16 bf16\n"
"bits; x and out float32 with unit column stride (rows may be strided).\n"
"scratch: floats of buffer per thread (0: enough for 512 tokens). For tests\n"
"and benchmarks of the two paths (bf16_prefill).");

static int row_strided(PyObject *o, int type, int writable, const char *name, npy_intp *ld)
{
    PyArrayObject *a = (PyArrayObject *)o;
    const npy_intp es = type == NPY_FLOAT32 ? 4 : 2;
    if (!PyArray_Check(o) || PyArray_TYPE(a) != type || PyArray_NDIM(a) != 2 ||
        !PyArray_ISALIGNED(a) || (writable && !PyArray_ISWRITEABLE(a)) ||
        (PyArray_DIM(a, 1) > 1 && PyArray_STRIDE(a, 1) != es) || PyArray_STRIDE(a, 0) % es ||
        PyArray_STRIDE(a, 0) / es < PyArray_DIM(a, 1)) {
        PyErr_Format(PyExc_TypeError,
                     "%s must be a%s 2-D %s array with contiguous rows (ascending)", name,
                     writable ? " writable" : "", type == NPY_FLOAT32 ? "float32" : "uint16");
        return -1;
    }
    *ld = PyArray_DIM(a, 0) > 1 ? PyArray_STRIDE(a, 0) / es : PyArray_DIM(a, 1);
    return 0;
}

static PyObject *matmul_bf16(PyObject *module, PyObject *args)
{
    PyObject *o_out, *o_x, *o_w;
    float beta;
    int n_threads;
    Py_ssize_t scratch = 0;
    if (!PyArg_ParseTuple(args, "OOOfi|n:matmul_bf16", &o_out, &o_x, &o_w, &beta, &n_threads,
                          &scratch))
        return NULL;
    npy_intp ldo, ldx, ldw;
    if (row_strided(o_out, NPY_FLOAT32, 1, "out", &ldo) ||
        row_strided(o_x, NPY_FLOAT32, 0, "x", &ldx) ||
        row_strided(o_w, NPY_UINT16, 0, "W", &ldw))
        return NULL;
    PyArrayObject *out = (PyArrayObject *)o_out, *x = (PyArrayObject *)o_x,
                  *w = (PyArrayObject *)o_w;
    const size_t T = (size_t)PyArray_DIM(x, 0), K = (size_t)PyArray_DIM(x, 1);
    const size_t n = (size_t)PyArray_DIM(w, 0);
    if ((size_t)PyArray_DIM(w, 1) != K || ldw != (npy_intp)K || (size_t)PyArray_DIM(out, 0) != T ||
        (size_t)PyArray_DIM(out, 1) != n || T == 0 || K == 0 || n == 0) {
        PyErr_Format(PyExc_ValueError,
                     "matmul_bf16: expected x (T, K), W (n, K) C-contiguous and out (T, n), "
                     "none empty; got x (%zu, %zu), W (%zu, %zu), out (%zu, %zu)",
                     T, K, n, (size_t)PyArray_DIM(w, 1), (size_t)PyArray_DIM(out, 0),
                     (size_t)PyArray_DIM(out, 1));
        return NULL;
    }
    if (n_threads < 1 || n_threads > max_blas_threads() || scratch < 0) {
        PyErr_Format(PyExc_ValueError,
                     "matmul_bf16: n_threads must be 1..%ld and scratch >= 0, got %d and %zd",
                     max_blas_threads(), n_threads, scratch);
        return NULL;
    }
    /* scratch: floats per thread; by default gemm.c's for 512 tokens at a time */
    size_t per = scratch ? (size_t)scratch
                         : (pcs_gemm_bf16_scratch(512, K, n_threads) + (size_t)n_threads - 1) /
                               (size_t)n_threads;
    if (per < K)
        per = K;
    float *buf = malloc(per * (size_t)n_threads * sizeof(float));
    if (!buf)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    pcs_blas_threads_off();
    pcs_matmul_bf16((float *)PyArray_DATA(out), (size_t)ldo, (const float *)PyArray_DATA(x),
                    (size_t)ldx, (const unsigned short *)PyArray_DATA(w), T, K, n, beta, buf,
                    per * (size_t)n_threads, n_threads, 1);
    pcs_blas_threads_on();
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(elementwise_doc, "elementwise(name, a, b, m, simd, /)\n--\n\n"
"In place on a (1-D C-contiguous float32), as the forward pass computes it:\n"
"name 'exp': a = e^(a - m) (softmax's exp); 'swiglu': a = SiLU(a) * b (b\n"
"like a, same length). simd: 8 lanes at a time where the CPU has AVX2 (True)\n"
"or one at a time (False), the same bits. For tests.");

static PyObject *elementwise(PyObject *module, PyObject *args)
{
    const char *name;
    PyObject *o_a, *o_b;
    float m;
    int simd;
    if (!PyArg_ParseTuple(args, "sOOfp:elementwise", &name, &o_a, &o_b, &m, &simd))
        return NULL;
    const int swiglu = strcmp(name, "swiglu") == 0;
    if (!swiglu && strcmp(name, "exp") != 0) {
        PyErr_Format(PyExc_ValueError, "elementwise: name must be 'exp' or 'swiglu', got '%s'",
                     name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)o_a, *b = (PyArrayObject *)o_b;
    if (!PyArray_Check(o_a) || PyArray_TYPE(a) != NPY_FLOAT32 || PyArray_NDIM(a) != 1 ||
        !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISWRITEABLE(a) || !PyArray_ISALIGNED(a)) {
        PyErr_SetString(PyExc_TypeError,
                        "elementwise: a must be a writable 1-D C-contiguous float32 array");
        return NULL;
    }
    const size_t n = (size_t)PyArray_DIM(a, 0);
    if (swiglu && (!PyArray_Check(o_b) || PyArray_TYPE(b) != NPY_FLOAT32 ||
                   PyArray_NDIM(b) != 1 || !PyArray_IS_C_CONTIGUOUS(b) ||
                   !PyArray_ISALIGNED(b) || (size_t)PyArray_DIM(b, 0) != n)) {
        PyErr_SetString(PyExc_TypeError,
                        "elementwise: b must be a 1-D C-contiguous float32 array as long as a");
        return NULL;
    }
    if (swiglu)
        pcs_swiglu((float *)PyArray_DATA(a), (const float *)PyArray_DATA(b), n, simd);
    else
        pcs_exp_sub((float *)PyArray_DATA(a), n, m, simd);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(bf16_kernel_doc, "bf16_kernel()\n--\n\n"
"The bf16 dot-product kernel chosen for this CPU at run time: 'avx512f',\n"
"'avx2+fma' or 'generic'.");

static PyObject *bf16_kernel(PyObject *module, PyObject *unused)
{
    return PyUnicode_FromString(pcs_bf16_kernel());
}

PyDoc_STRVAR(attn_kernel_doc, "attn_kernel(name=None, /)\n--\n\n"
"What decode's attention scores run on: 'avx2+fma' (pcasurgery's own kernel:\n"
"keys rebuilt from a latent, rotated and scored in cache; head sizes a\n"
"multiple of 16) or 'blas' (OpenBLAS products). With 'avx2+fma', decode\n"
"steps and prefill chunks run their parallel work on pcasurgery's threads;\n"
"with 'blas', on OpenBLAS's. name 'blas' or 'auto' sets it first\n"
"(PCASURGERY_ATTN_KERNEL=blas does at import); both compute the same\n"
"function, summed in a different order.");

/* fn(name=None): name `other` or 'auto' set by set(); get()'s name back */
static PyObject *kernel_switch(PyObject *args, const char *fn, const char *other,
                               int (*set)(const char *), const char *(*get)(void))
{
    const char *name = NULL;
    char fmt[64];
    snprintf(fmt, sizeof fmt, "|z:%s", fn);
    if (!PyArg_ParseTuple(args, fmt, &name))
        return NULL;
    if (name && set(name) != PCS_OK) {
        PyErr_Format(PyExc_ValueError, "%s: name must be '%s' or 'auto', got '%s'", fn, other,
                     name);
        return NULL;
    }
    return PyUnicode_FromString(get());
}

static PyObject *attn_kernel(PyObject *module, PyObject *args)
{
    return kernel_switch(args, "attn_kernel", "blas", pcs_attn_set_kernel, pcs_attn_kernel);
}

PyDoc_STRVAR(bf16_prefill_doc, "bf16_prefill(name=None, /)\n--\n\n"
"What prefill's products with bf16 weights run on: 'avx512f' (pcasurgery's\n"
"GEMM, packing W straight from bf16; CPUs with AVX-512F) or 'sgemm' (W's\n"
"rows widened into a float32 buffer for OpenBLAS's sgemm). name 'sgemm' or\n"
"'auto' (gemm.c's where the CPU has it) sets it first.\n"
"PCASURGERY_BF16_PREFILL=sgemm makes 'sgemm' the default, as does\n"
"PCASURGERY_BF16_KERNEL=avx2+fma or generic. Both compute the same float32\n"
"products, summed in different orders.");

static PyObject *bf16_prefill(PyObject *module, PyObject *args)
{
    return kernel_switch(args, "bf16_prefill", "sgemm", pcs_gemm_bf16_set, pcs_gemm_bf16_name);
}

static PyObject *blas_library(PyObject *module, PyObject *unused)
{
    const char *path = pcs_blas_library();
    if (!path)
        Py_RETURN_NONE;
    return PyUnicode_DecodeFSDefault(path);
}

/* ----------------------------------------------------------------- module */

static PyMethodDef methods[] = {
    {"pca_fit", pca_fit, METH_VARARGS, pca_fit_doc},
    {"pca_project", pca_project, METH_VARARGS, pca_project_doc},
    {"pca_reconstruct", (PyCFunction)(void (*)(void))pca_reconstruct,
     METH_VARARGS | METH_KEYWORDS, pca_reconstruct_doc},
    {"to_float32", to_float32, METH_VARARGS, to_float32_doc},
    {"weighted_gram", weighted_gram, METH_VARARGS, weighted_gram_doc},
    {"sym_eig", sym_eig, METH_O, sym_eig_doc},
    {"symmetrize_upper", symmetrize_upper, METH_VARARGS, symmetrize_upper_doc},
    {"fake_quant", fake_quant, METH_VARARGS, fake_quant_doc},
    {"set_num_threads", set_num_threads, METH_O,
     "set_num_threads($module, n, /)\n--\n\nThreads of pcasurgery's own OpenBLAS."},
    {"max_threads", max_threads, METH_NOARGS,
     "max_threads($module, /)\n--\n\nThe most threads pcasurgery's OpenBLAS runs (its MAX_THREADS)."},
    {"get_num_threads", get_num_threads, METH_NOARGS,
     "get_num_threads($module, /)\n--\n\nThreads of pcasurgery's own OpenBLAS."},
    {"blas_config", blas_config, METH_NOARGS,
     "blas_config($module, /)\n--\n\nThe OpenBLAS build string (version, core, threads)."},
    {"blas_library", blas_library, METH_NOARGS,
     "blas_library($module, /)\n--\n\nPath of the shared library that provides our BLAS."},
    {"bf16_kernel", bf16_kernel, METH_NOARGS, bf16_kernel_doc},
    {"elementwise", elementwise, METH_VARARGS, elementwise_doc},
    {"attn_kernel", attn_kernel, METH_VARARGS, attn_kernel_doc},
    {"bf16_prefill", bf16_prefill, METH_VARARGS, bf16_prefill_doc},
    {"matmul_bf16", matmul_bf16, METH_VARARGS, matmul_bf16_doc},
    {"bf16_nonfinite", bf16_nonfinite, METH_O, bf16_nonfinite_doc},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *module)
{
    if (_import_array() < 0)
        return -1;
    module_state *st = get_state(module);
    PyObject *linalg = PyImport_ImportModule("numpy.linalg");
    if (!linalg)
        return -1;
    st->LinAlgError = PyObject_GetAttrString(linalg, "LinAlgError");
    Py_DECREF(linalg);
    if (!st->LinAlgError)
        return -1;
    PyObject *rt = PyType_FromModuleAndSpec(module, &runtime_spec, NULL);
    if (!rt)
        return -1;
    if (PyModule_AddObject(module, "LlamaRuntime", rt) < 0) {
        Py_DECREF(rt);
        return -1;
    }
    return 0;
}

static int module_traverse(PyObject *module, visitproc visit, void *arg)
{
    Py_VISIT(get_state(module)->LinAlgError);
    return 0;
}

static int module_clear(PyObject *module)
{
    Py_CLEAR(get_state(module)->LinAlgError);
    return 0;
}

static void module_free(void *module)
{
    module_clear((PyObject *)module);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pcasurgery._C",
    .m_doc = "pcasurgery's C core (OpenBLAS + LAPACKE): stacked PCA, the Llama forward "
             "pass, checkpoint dtype conversion, BLAS threads.",
    .m_size = sizeof(module_state),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__C(void)
{
    return PyModuleDef_Init(&moduledef);
}
