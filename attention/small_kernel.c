/* The small path's arithmetic (see attention/small.py): a whole forward pass of the book's
 * chapter-3 modules in one call, for computations too small to pay per-operation dispatch.
 *
 * Why C: inside a server, between requests, the caches go cold, and each numpy or torch call
 * then costs several times its cost in a loop. The book's example took a dozen numpy calls
 * (~32 us of its ~275 us round trip); one call here takes a few. Measured in `make bench`
 * (small answer, throughput): docs/performance.md.
 *
 * Float32 throughout, as torch stores every intermediate: products summed in float32 in a fixed
 * order, softmax shifted by its row's maximum, as torch shifts it. The answer equals torch's up
 * to float32 rounding (each sums in its own order) and is the same to the bit whether or not
 * the steps are asked for: they are copies of what the computation holds anyway.
 *
 * The arrays are numpy's, read and made through its C API: a call through numpy's Python
 * functions (np.empty, the buffer protocol) costs more, inside a server, than the arithmetic.
 * Every array is checked against the shape the input implies before anything is read: a
 * caller's mistake is a ValueError, never a stray read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_23_API_VERSION
#include <numpy/arrayobject.h>
#include <math.h>
#include <string.h>

/* How the module's weights are laid out (attention.small.NumpyWeights.kind). */
enum { SIMPLIFIED = 0, SINGLE = 1, WRAPPER = 2, FUSED = 3 };

/* Inputs whose squares sum to more than this are declined: with them float32 scores could
 * overflow. Exported as MODERATE_SUM_OF_SQUARES, which attention.small reads. */
static const double MODERATE_SUM_OF_SQUARES = 1e24;

/* out (rows, cols) = a (rows, inner) @ w (inner, cols) + bias (cols) if any: nn.Linear in the
 * x @ W convention, and every other product of the computation. Summed over `inner` in order,
 * each row of w added to the whole output row: the inner loop runs along contiguous memory,
 * which the compiler vectorises. */
static void linear(const float *a, Py_ssize_t rows, Py_ssize_t inner, const float *w,
                   Py_ssize_t cols, const float *bias, float *out)
{
    for (Py_ssize_t r = 0; r < rows; r++) {
        float *o = out + r * cols;
        const float *ar = a + r * inner;
        memset(o, 0, (size_t)cols * sizeof(float));
        for (Py_ssize_t i = 0; i < inner; i++) {
            const float ai = ar[i];
            const float *wi = w + i * cols;
            for (Py_ssize_t c = 0; c < cols; c++)
                o[c] += ai * wi[c];
        }
        if (bias != NULL)
            for (Py_ssize_t c = 0; c < cols; c++)
                o[c] += bias[c];
    }
}

/* The numbers of a C-contiguous, aligned, native-order float32 array of exactly `count` of them;
 * NULL for None where `optional` (with no error set), or NULL with a ValueError. */
static const float *floats(PyObject *object, npy_intp count, int optional, const char *name,
                           int *failed)
{
    if (object == Py_None && optional)
        return NULL;
    if (!PyArray_Check(object) || PyArray_TYPE((PyArrayObject *)object) != NPY_FLOAT32 ||
        !PyArray_ISCARRAY_RO((PyArrayObject *)object) ||
        PyArray_SIZE((PyArrayObject *)object) != count) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous float32 array of %zd numbers",
                     name, (Py_ssize_t)count);
        *failed = 1;
        return NULL;
    }
    return PyArray_DATA((PyArrayObject *)object);
}

static inline float *step_data(PyArrayObject *step) { return (float *)PyArray_DATA(step); }

/* A new float32 array of the given shape, or NULL with MemoryError. */
static PyArrayObject *new_floats(int ndim, npy_intp *shape)
{
    return (PyArrayObject *)PyArray_SimpleNew(ndim, shape, NPY_FLOAT32);
}

#define STEP_COUNT 6 /* queries, keys, values, attention_scores, scaled_scores, head_outputs */

static PyObject *forward(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *proj_obj, *pbias_obj, *oproj_obj, *obias_obj;
    int kind, causal, with_steps;
    Py_ssize_t heads, width;
    float scale;
    if (!PyArg_ParseTuple(args, "OiinnfOOOOp:forward", &x_obj, &kind, &causal, &heads, &width,
                          &scale, &proj_obj, &pbias_obj, &oproj_obj, &obias_obj, &with_steps))
        return NULL;
    /* The multi-head classes answer weights with a head axis, even for one head. */
    const int multi_head = kind == WRAPPER || kind == FUSED;
    if (kind < SIMPLIFIED || kind > FUSED || heads < 1 || width < 1 ||
        (kind == FUSED && width % heads != 0) || (kind != WRAPPER && kind != FUSED && heads != 1)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent kind, heads and width");
        return NULL;
    }
    /* The input as a C-contiguous float32 array: itself when it is one (the usual case), else a
     * copy. */
    PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(x_obj, NPY_FLOAT32, 3, 3,
                                                        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (x == NULL)
        return NULL;
    PyArrayObject *weights_out = NULL, *context_out = NULL, *steps[STEP_COUNT] = {NULL};
    float *scratch = NULL;
    PyObject *result = NULL;
    int failed = 0;

    const npy_intp *x_shape = PyArray_DIMS(x);
    const Py_ssize_t B = x_shape[0], T = x_shape[1], d_in = x_shape[2];
    if (B < 1 || T < 1 || d_in < 1) {
        PyErr_SetString(PyExc_ValueError, "x: expected float32 numbers of shape (b, T, d_in)");
        goto done;
    }
    if (kind == SIMPLIFIED)
        width = d_in;
    const Py_ssize_t blocks = kind == WRAPPER ? heads : 1; /* projections of their own */
    const Py_ssize_t row = 3 * width;                      /* [q | k | v] per block */
    const Py_ssize_t head_dim = kind == FUSED ? width / heads : width;
    const Py_ssize_t context_width = kind == WRAPPER ? heads * width : width;
    const Py_ssize_t per_head = T * head_dim;

    const float *weights = NULL, *biases = NULL, *out_weights = NULL, *out_biases = NULL;
    if (kind != SIMPLIFIED) {
        weights = floats(proj_obj, blocks * d_in * row, 0, "projections", &failed);
        biases = floats(pbias_obj, blocks * row, 1, "projection_biases", &failed);
    }
    if (kind == FUSED) {
        out_weights = floats(oproj_obj, width * width, 0, "out_proj", &failed);
        out_biases = floats(obias_obj, width, 1, "out_proj_bias", &failed);
    }
    if (failed)
        goto done;

    const float *xs = PyArray_DATA(x);
    double sum_of_squares = 0.0;
    for (Py_ssize_t i = 0; i < B * T * d_in; i++)
        sum_of_squares += (double)xs[i] * (double)xs[i];
    if (!(sum_of_squares <= MODERATE_SUM_OF_SQUARES)) { /* also NaN */
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }

    /* The answer: weights (b, heads, T, T), without the head axis for a single head's module,
     * and context vectors (b, T, output width); the steps each (b, heads, T, head_dim) or
     * (b, heads, T, T). */
    npy_intp square_shape[4] = {B, heads, T, T}, head_shape[4] = {B, heads, T, head_dim};
    npy_intp single_square[3] = {B, T, T}, context_shape[3] = {B, T, context_width};
    weights_out = multi_head ? new_floats(4, square_shape) : new_floats(3, single_square);
    context_out = new_floats(3, context_shape);
    if (weights_out == NULL || context_out == NULL)
        goto done;
    if (with_steps)
        for (int s = 0; s < STEP_COUNT; s++)
            if ((steps[s] = new_floats(4, s == 3 || s == 4 ? square_shape : head_shape)) == NULL)
                goto done;

    /* Per sequence: the projections, then q, k, v and the heads' outputs as (heads, T, head_dim),
     * the keys transposed for one head, one row of scores, and the concatenated heads. */
    const Py_ssize_t scratch_count =
        blocks * T * row + 4 * heads * per_head + per_head + T + T * context_width;
    scratch = PyMem_Malloc((size_t)scratch_count * sizeof(float));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *projected = scratch;
    float *queries = projected + blocks * T * row;
    float *keys = queries + heads * per_head;
    float *values = keys + heads * per_head;
    float *head_outputs = values + heads * per_head;
    float *keys_t = head_outputs + heads * per_head;
    float *raw = keys_t + per_head;
    float *concatenated = raw + T;

    for (Py_ssize_t b = 0; b < B; b++) {
        const float *xb = xs + b * T * d_in;
        /* q, k, v of every head, (heads, T, head_dim) each */
        if (kind == SIMPLIFIED) {
            memcpy(queries, xb, (size_t)per_head * sizeof(float));
            memcpy(keys, xb, (size_t)per_head * sizeof(float));
            memcpy(values, xb, (size_t)per_head * sizeof(float));
        } else {
            for (Py_ssize_t k = 0; k < blocks; k++)
                linear(xb, T, d_in, weights + k * d_in * row, row,
                       biases == NULL ? NULL : biases + k * row, projected + k * T * row);
            for (Py_ssize_t h = 0; h < heads; h++)
                for (Py_ssize_t t = 0; t < T; t++) {
                    /* the wrapper: head h's own block; fused: head h's columns of the one block */
                    const float *source = kind == WRAPPER ? projected + (h * T + t) * row
                                                          : projected + t * row + h * head_dim;
                    const size_t bytes = (size_t)head_dim * sizeof(float);
                    memcpy(queries + h * per_head + t * head_dim, source, bytes);
                    memcpy(keys + h * per_head + t * head_dim, source + width, bytes);
                    memcpy(values + h * per_head + t * head_dim, source + 2 * width, bytes);
                }
        }
        for (Py_ssize_t h = 0; h < heads; h++) {
            const float *q = queries + h * per_head, *k = keys + h * per_head,
                        *v = values + h * per_head;
            for (Py_ssize_t u = 0; u < T; u++)
                for (Py_ssize_t d = 0; d < head_dim; d++)
                    keys_t[d * T + u] = k[u * head_dim + d];
            const Py_ssize_t square = (b * heads + h) * T * T;
            for (Py_ssize_t t = 0; t < T; t++) {
                float *w = (float *)PyArray_DATA(weights_out) + square + t * T;
                /* q_t . k_u for every key: the row q_t times the keys transposed */
                linear(q + t * head_dim, 1, head_dim, keys_t, T, NULL, raw);
                if (with_steps)
                    memcpy(step_data(steps[3]) + square + t * T, raw, (size_t)T * sizeof(float));
                const Py_ssize_t visible = causal ? t + 1 : T; /* the mask hides later keys */
                float largest = -INFINITY;
                for (Py_ssize_t u = 0; u < visible; u++) {
                    w[u] = scale > 0.0f ? raw[u] / scale : raw[u];
                    if (w[u] > largest)
                        largest = w[u];
                }
                for (Py_ssize_t u = visible; u < T; u++)
                    w[u] = -INFINITY;
                if (with_steps)
                    memcpy(step_data(steps[4]) + square + t * T, w, (size_t)T * sizeof(float));
                float total = 0.0f;
                for (Py_ssize_t u = 0; u < visible; u++) {
                    w[u] = expf(w[u] - largest);
                    total += w[u];
                }
                for (Py_ssize_t u = 0; u < visible; u++)
                    w[u] /= total;
                for (Py_ssize_t u = visible; u < T; u++)
                    w[u] = 0.0f;
                /* this head's output for token t: the weighted sum of the visible values */
                linear(w, 1, visible, v, head_dim, NULL, head_outputs + h * per_head + t * head_dim);
            }
        }
        float *step_buffers[STEP_COUNT] = {queries, keys, values, NULL, NULL, head_outputs};
        for (int s = 0; s < STEP_COUNT; s++)
            if (with_steps && step_buffers[s] != NULL)
                memcpy(step_data(steps[s]) + b * heads * per_head, step_buffers[s],
                       (size_t)(heads * per_head) * sizeof(float));
        /* the heads side by side, (T, heads x head_dim); the fused module projects them once more */
        float *context = (float *)PyArray_DATA(context_out) + b * T * context_width;
        float *joined = kind == FUSED ? concatenated : context;
        for (Py_ssize_t t = 0; t < T; t++)
            for (Py_ssize_t h = 0; h < heads; h++)
                memcpy(joined + t * heads * head_dim + h * head_dim,
                       head_outputs + h * per_head + t * head_dim,
                       (size_t)head_dim * sizeof(float));
        if (kind == FUSED)
            linear(concatenated, T, width, out_weights, width, out_biases, context);
    }
    if (with_steps) {
        PyObject *recorded = PyTuple_New(STEP_COUNT);
        if (recorded == NULL)
            goto done;
        for (int s = 0; s < STEP_COUNT; s++) {
            PyTuple_SET_ITEM(recorded, s, (PyObject *)steps[s]);
            steps[s] = NULL; /* the tuple holds it now */
        }
        result = Py_BuildValue("(NNN)", context_out, weights_out, recorded);
    } else {
        result = Py_BuildValue("(NN)", context_out, weights_out);
    }
    context_out = weights_out = NULL; /* Py_BuildValue's N took them, even on failure */

done:
    PyMem_Free(scratch);
    Py_DECREF(x);
    Py_XDECREF(weights_out);
    Py_XDECREF(context_out);
    for (int s = 0; s < STEP_COUNT; s++)
        Py_XDECREF(steps[s]);
    return result;
}

/* rows: a list of T lists of d Python floats each (as a JSON decoder gives them) -> a new (T, d)
 * float32 array, each number rounded from its double as numpy's cast rounds it; None for
 * anything else (no rows, an empty or ragged row, a number that is not a float), which the
 * caller takes to its careful path. numpy's own conversion of nested lists first discovers their
 * shape and type through its general machinery: inside a server it cost more than the
 * attention arithmetic. */
static PyObject *float32_rows(PyObject *self, PyObject *rows)
{
    if (!PyList_CheckExact(rows) || PyList_GET_SIZE(rows) == 0)
        Py_RETURN_NONE;
    const Py_ssize_t T = PyList_GET_SIZE(rows);
    PyObject *first = PyList_GET_ITEM(rows, 0);
    if (!PyList_CheckExact(first) || PyList_GET_SIZE(first) == 0)
        Py_RETURN_NONE;
    const Py_ssize_t d = PyList_GET_SIZE(first);
    npy_intp shape[2] = {T, d};
    PyArrayObject *matrix = new_floats(2, shape);
    if (matrix == NULL)
        return NULL;
    float *out = PyArray_DATA(matrix);
    for (Py_ssize_t t = 0; t < T; t++) {
        PyObject *row = PyList_GET_ITEM(rows, t);
        if (!PyList_CheckExact(row) || PyList_GET_SIZE(row) != d)
            goto not_floats;
        for (Py_ssize_t i = 0; i < d; i++) {
            PyObject *number = PyList_GET_ITEM(row, i);
            if (!PyFloat_CheckExact(number))
                goto not_floats;
            out[t * d + i] = (float)PyFloat_AS_DOUBLE(number);
        }
    }
    return (PyObject *)matrix;
not_floats:
    Py_DECREF(matrix);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"float32_rows", float32_rows, METH_O,
     "float32_rows(rows) -> (T, d) float32 array, or None unless rows is a non-empty list of\n"
     "equally long, non-empty lists of floats."},
    {"forward", forward, METH_VARARGS,
     "forward(x, kind, causal, heads, width, scale, projections, projection_biases, out_proj,\n"
     "        out_proj_bias, with_steps) -> (context, weights[, steps]) or None\n\n"
     "context (b, T, output_dim); weights (b, heads, T, T), or (b, T, T) for the single-head\n"
     "kinds;"
     "steps: queries, keys, values, attention_scores, scaled_scores, head_outputs, each with\n"
     "a head axis. None for inputs whose squares sum beyond 1e24. See attention.small.forward."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "attention._small_kernel",
    "The small path's arithmetic in one call (attention/small_kernel.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__small_kernel(void)
{
    import_array(); /* numpy's C API: returns NULL, with the error set, if numpy will not load */
    PyObject *created = PyModule_Create(&module);
    if (created != NULL &&
        PyModule_AddObject(created, "MODERATE_SUM_OF_SQUARES",
                           PyFloat_FromDouble(MODERATE_SUM_OF_SQUARES)) < 0) {
        Py_DECREF(created);
        return NULL;
    }
    return created;
}
