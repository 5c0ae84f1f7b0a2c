/* module.c: the CPython / NumPy face of the C core (pcasurgery._C).
 *
 * The only file that includes Python.h and the NumPy headers. It checks and
 * converts arguments, allocates every output before a kernel runs, releases
 * the GIL around the kernel and turns a kernel status into exactly one
 * Python exception. Python owns every array; the kernels borrow pointers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
"pca_fit(matrices, names, center, precision, solver, keep_k, keep_var)\n"
"    -> (components, eigvals, mean, total)\n"
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
    PyObject *seq = PySequence_Fast(seq_obj, "matrices must be a sequence of 2-D arrays");
    if (!seq)
        return NULL;
    PyObject *names = PySequence_Fast(names_obj, "names must be a sequence of str");
    if (!names) {
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t M = PySequence_Fast_GET_SIZE(seq);
    matview *views = NULL;
    PcsMatrix *mats = NULL;
    PyArrayObject *comp = NULL, *eig = NULL, *mean = NULL;

    if (PySequence_Fast_GET_SIZE(names) != M) {
        PyErr_Format(PyExc_ValueError, "names has %zd entries but matrices has %zd",
                     PySequence_Fast_GET_SIZE(names), M);
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
        const char *name = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(names, i));
        if (!name)
            goto done;
        if (to_matview(PySequence_Fast_GET_ITEM(seq, i), name, 0, &views[i]) < 0)
            goto done;
        if (views[i].cols != views[0].cols) {
            PyErr_Format(PyExc_ValueError,
                         "%s has %zu columns but %s has %zu; stacked matrices "
                         "must share the input dimension",
                         name, views[i].cols,
                         PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(names, 0)),
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
                     PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(names, (Py_ssize_t)where.matrix)),
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
"pca_project(X, mean, components, k, name='X') -> Z\n"
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
"pca_reconstruct(Z, components, mean, out=None) -> Xhat\n"
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

/* ---------------------------------------------------------------- threads */

static PyObject *set_num_threads(PyObject *module, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "n must be a positive thread count, got %ld", n);
        return NULL;
    }
    pcs_set_num_threads((int)n);
    Py_RETURN_NONE;
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
    {"set_num_threads", set_num_threads, METH_O,
     "set_num_threads(n): threads of pcasurgery's own OpenBLAS."},
    {"get_num_threads", get_num_threads, METH_NOARGS,
     "get_num_threads() -> threads of pcasurgery's own OpenBLAS."},
    {"blas_config", blas_config, METH_NOARGS,
     "blas_config() -> the OpenBLAS build string (version, core, threads)."},
    {"blas_library", blas_library, METH_NOARGS,
     "blas_library() -> path of the shared library that provides our BLAS."},
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
    .m_doc = "pcasurgery's C core: stacked PCA kernels (BLAS/LAPACKE).",
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
