/* The small path's arithmetic (see attention/small.py): a whole forward pass of the book's
 * chapter-3 modules in one call, for computations too small to pay per-operation dispatch.
 *
 * Why C: inside a server, between requests, the caches go cold, and each numpy or torch call
 * then costs several times its cost in a loop. The book's example took ~15 numpy calls (~32 us
 * in the server, against a bare echo endpoint's whole request of ~120 us); one call here takes
 * a few. Measured in `make bench` (small answer, throughput): docs/performance.md.
 *
 * Float32 throughout, as torch stores every intermediate: products summed in float32 in a fixed
 * order, softmax shifted by its row's maximum, as torch shifts it. The answer equals torch's up
 * to float32 rounding (each sums in its own order) and is the same to the bit whether or not
 * the steps are asked for: they are copies of what the computation holds anyway.
 *
 * Every buffer is checked against the shape the input implies before anything is read or
 * written: a caller's mistake is a ValueError, never a stray read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

/* How the module's weights are laid out (attention.small.NumpyWeights.kind). */
enum { SIMPLIFIED = 0, SINGLE = 1, WRAPPER = 2, FUSED = 3 };

/* Inputs whose squares sum to more than this are declined (see small.MODERATE_SUM_OF_SQUARES):
 * with them float32 scores could overflow. */
static const double MODERATE_SUM_OF_SQUARES = 1e24;

/* out (rows, cols) = a (rows, inner) @ w (inner, cols) + bias (cols) if any: nn.Linear in the
 * x @ W convention. Summed over `inner` in order, each row of w added to the whole output row:
 * the inner loop runs along contiguous memory, which the compiler vectorises. */
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

/* A float32 buffer of exactly `count` numbers, or None (view->obj stays NULL) where allowed. */
static int get_floats(PyObject *object, Py_buffer *view, Py_ssize_t count, int writable,
                      int optional, const char *name)
{
    view->obj = NULL;
    if (object == Py_None) {
        if (optional)
            return 0;
        PyErr_Format(PyExc_ValueError, "%s is required", name);
        return -1;
    }
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, view, flags) < 0)
        return -1;
    if (strcmp(view->format, "f") != 0 || view->len != count * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd float32 numbers", name, count);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

#define STEP_COUNT 6 /* queries, keys, values, attention_scores, scaled_scores, head_outputs */

static PyObject *forward(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *proj_obj, *pbias_obj, *oproj_obj, *obias_obj, *wout_obj, *cout_obj,
        *steps_obj;
    int kind, causal;
    Py_ssize_t heads, width;
    float scale;
    if (!PyArg_ParseTuple(args, "OiinnfOOOOOOO:forward", &x_obj, &kind, &causal, &heads, &width,
                          &scale, &proj_obj, &pbias_obj, &oproj_obj, &obias_obj, &wout_obj,
                          &cout_obj, &steps_obj))
        return NULL;
    if (kind < SIMPLIFIED || kind > FUSED || heads < 1 || width < 1 ||
        (kind == FUSED && width % heads != 0) || (kind != WRAPPER && kind != FUSED && heads != 1)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent kind, heads and width");
        return NULL;
    }
    if (steps_obj != Py_None && (!PyTuple_Check(steps_obj) || PyTuple_GET_SIZE(steps_obj) != STEP_COUNT)) {
        PyErr_SetString(PyExc_ValueError, "steps: None or a tuple of six buffers or Nones");
        return NULL;
    }

    Py_buffer x, proj = {0}, pbias = {0}, oproj = {0}, obias = {0}, wout = {0}, cout = {0};
    Py_buffer steps[STEP_COUNT] = {{0}};
    float *scratch = NULL;
    PyObject *result = NULL;

    if (PyObject_GetBuffer(x_obj, &x, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (strcmp(x.format, "f") != 0 || x.ndim != 3 || x.shape[0] < 1 || x.shape[1] < 1 ||
        x.shape[2] < 1) {
        PyErr_SetString(PyExc_ValueError, "x: expected float32 numbers of shape (b, T, d_in)");
        goto done;
    }
    const Py_ssize_t B = x.shape[0], T = x.shape[1], d_in = x.shape[2];
    if (kind == SIMPLIFIED)
        width = d_in;
    const Py_ssize_t blocks = kind == WRAPPER ? heads : 1; /* projections of their own */
    const Py_ssize_t row = 3 * width;                      /* [q | k | v] per block */
    const Py_ssize_t head_dim = kind == FUSED ? width / heads : width;
    const Py_ssize_t context_width = kind == WRAPPER ? heads * width : width;
    const Py_ssize_t per_head = T * head_dim;

    if (kind != SIMPLIFIED) {
        if (get_floats(proj_obj, &proj, blocks * d_in * row, 0, 0, "projections") < 0 ||
            get_floats(pbias_obj, &pbias, blocks * row, 0, 1, "projection_biases") < 0)
            goto done;
    }
    if (kind == FUSED) {
        if (get_floats(oproj_obj, &oproj, width * width, 0, 0, "out_proj") < 0 ||
            get_floats(obias_obj, &obias, width, 0, 1, "out_proj_bias") < 0)
            goto done;
    }
    if (get_floats(wout_obj, &wout, B * heads * T * T, 1, 0, "weights_out") < 0 ||
        get_floats(cout_obj, &cout, B * T * context_width, 1, 0, "context_out") < 0)
        goto done;
    if (steps_obj != Py_None) {
        static const char *names[STEP_COUNT] = {"queries",        "keys",          "values",
                                                "attention_scores", "scaled_scores", "head_outputs"};
        for (int s = 0; s < STEP_COUNT; s++) {
            Py_ssize_t count = s < 3 || s == 5 ? B * heads * per_head : B * heads * T * T;
            if (get_floats(PyTuple_GET_ITEM(steps_obj, s), &steps[s], count, 1, 1, names[s]) < 0)
                goto done;
        }
    }

    const float *xs = x.buf;
    double sum_of_squares = 0.0;
    for (Py_ssize_t i = 0; i < B * T * d_in; i++)
        sum_of_squares += (double)xs[i] * (double)xs[i];
    if (!(sum_of_squares <= MODERATE_SUM_OF_SQUARES)) { /* also NaN */
        result = Py_False;
        Py_INCREF(result);
        goto done;
    }

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
    const float *weights = proj.buf, *biases = pbias.buf;

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
                float *w = (float *)wout.buf + square + t * T;
                /* q_t . k_u for every key: the scores' row, each key's column added in turn */
                memset(raw, 0, (size_t)T * sizeof(float));
                for (Py_ssize_t d = 0; d < head_dim; d++) {
                    const float qd = q[t * head_dim + d];
                    const float *kd = keys_t + d * T;
                    for (Py_ssize_t u = 0; u < T; u++)
                        raw[u] += qd * kd[u];
                }
                if (steps[3].obj != NULL)
                    memcpy((float *)steps[3].buf + square + t * T, raw, (size_t)T * sizeof(float));
                const Py_ssize_t visible = causal ? t + 1 : T; /* the mask hides later keys */
                float largest = -INFINITY;
                for (Py_ssize_t u = 0; u < visible; u++) {
                    w[u] = scale > 0.0f ? raw[u] / scale : raw[u];
                    if (w[u] > largest)
                        largest = w[u];
                }
                for (Py_ssize_t u = visible; u < T; u++)
                    w[u] = -INFINITY;
                if (steps[4].obj != NULL)
                    memcpy((float *)steps[4].buf + square + t * T, w, (size_t)T * sizeof(float));
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
                float *out = head_outputs + h * per_head + t * head_dim;
                memset(out, 0, (size_t)head_dim * sizeof(float));
                for (Py_ssize_t u = 0; u < visible; u++) {
                    const float weight = w[u];
                    const float *vu = v + u * head_dim;
                    for (Py_ssize_t j = 0; j < head_dim; j++)
                        out[j] += weight * vu[j];
                }
            }
        }
        float *step_buffers[STEP_COUNT] = {queries, keys, values, NULL, NULL, head_outputs};
        for (int s = 0; s < STEP_COUNT; s++)
            if (step_buffers[s] != NULL && steps[s].obj != NULL)
                memcpy((float *)steps[s].buf + b * heads * per_head, step_buffers[s],
                       (size_t)(heads * per_head) * sizeof(float));
        /* the heads side by side, (T, heads x head_dim); the fused module projects them once more */
        float *context = (float *)cout.buf + b * T * context_width;
        float *joined = kind == FUSED ? concatenated : context;
        for (Py_ssize_t t = 0; t < T; t++)
            for (Py_ssize_t h = 0; h < heads; h++)
                memcpy(joined + t * heads * head_dim + h * head_dim,
                       head_outputs + h * per_head + t * head_dim,
                       (size_t)head_dim * sizeof(float));
        if (kind == FUSED)
            linear(concatenated, T, width, oproj.buf, width, obias.buf, context);
    }
    result = Py_True;
    Py_INCREF(result);

done:
    PyMem_Free(scratch);
    PyBuffer_Release(&x);
    Py_buffer *views[] = {&proj, &pbias, &oproj, &obias, &wout, &cout};
    for (size_t i = 0; i < sizeof(views) / sizeof(views[0]); i++)
        if (views[i]->obj != NULL)
            PyBuffer_Release(views[i]);
    for (int s = 0; s < STEP_COUNT; s++)
        if (steps[s].obj != NULL)
            PyBuffer_Release(&steps[s]);
    return result;
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS,
     "forward(x, kind, causal, heads, width, scale, projections, projection_biases, out_proj,\n"
     "        out_proj_bias, weights_out, context_out, steps) -> bool\n\n"
     "Fills weights_out (b, heads, T, T) and context_out (b, T, output_dim) and returns True;\n"
     "returns False, writing nothing, for inputs whose squares sum beyond 1e24. See\n"
     "attention.small.forward."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "attention._small_kernel",
    "The small path's arithmetic in one call (attention/small_kernel.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__small_kernel(void) { return PyModule_Create(&module); }
