/*
 * kitegreen.codec._thrift: Thrift binary and compact, decoded from whole messages in memory and
 * encoded into one buffer, over thriftpy2's struct specs.
 *
 * A server decodes bytes from peers it does not control, so the decoder is written around one
 * rule: nothing is allocated or looped over on the strength of a number the peer sent until the
 * bytes that number implies are known to be there.
 *
 * - Every type byte is checked: undefined types (0 where a value is due, 1, 5, 7, 9, 16 and up)
 *   are refused at once, in fields, container headers and skipped values alike.
 * - Every string length and container count is checked against the bytes left in the message
 *   (count x the smallest encoding of one element) before anything is allocated for it.
 * - Nesting is bounded (MAX_DEPTH, as Apache Thrift and thriftpy2 bound it).
 * - Compact varints are refused when they overflow their declared type (an i16 of 70000, an i32
 *   of 2**41), and encoded integers are range-checked the same way.
 *
 * Decoding works on complete messages only. On a buffered wire the end of a message is found
 * first by the Scanner, a resumable walk over the wire types that keeps its state between reads:
 * its work is proportional to the bytes that arrived, never to a count the peer announced.
 *
 * Neither half touches a socket. Errors are kitegreen.exceptions.ProtocolError (FrameTooLarge
 * for lengths over the message size limit); encoding a value that does not match its spec
 * raises TypeError, ValueError or OverflowError naming the field (RuntimeError for a container
 * that the encoding of its own elements changed).
 *
 * Encoding runs Python code: a struct's properties, a subclass's __iter__ or __buffer__. No
 * borrowed reference is held across such a call; containers are held, or copied, first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>
#include <stdint.h>
#include <string.h>

#define PROTO_BINARY 0
#define PROTO_COMPACT 2
#define MAX_DEPTH 64
#define LARGE_MESSAGE (64 * 1024)

/* thriftpy2's TType values (BINARY is thriftpy2's own: a STRING on the wire, bytes in Python). */
enum {
    T_STOP = 0,
    T_BOOL = 2,
    T_BYTE = 3,
    T_DOUBLE = 4,
    T_I16 = 6,
    T_I32 = 8,
    T_I64 = 10,
    T_STRING = 11,
    T_STRUCT = 12,
    T_MAP = 13,
    T_SET = 14,
    T_LIST = 15,
    T_BINARY = 18,
};

/* Compact type nibble -> TType; -1: undefined. 1 and 2 are bool true/false. */
static const int8_t CT_TO_T[16] = {
    T_STOP, T_BOOL, T_BOOL, T_BYTE, T_I16, T_I32, T_I64, T_DOUBLE,
    T_STRING, T_LIST, T_SET, T_MAP, T_STRUCT, -1, -1, -1,
};

static PyObject *ProtocolError;
static PyObject *FrameTooLarge;
static PyObject *MemoryBudgetExceeded;
static PyObject *EncodeBudgetExceeded;
static PyObject *spec_cache; /* {thriftpy2 class: StructSpec} */

static int
is_wire_type(int t)
{
    switch (t) {
    case T_BOOL: case T_BYTE: case T_DOUBLE: case T_I16: case T_I32: case T_I64:
    case T_STRING: case T_STRUCT: case T_MAP: case T_SET: case T_LIST:
        return 1;
    default:
        return 0;
    }
}

/* The fewest bytes one value of wire type t takes: a count times this must fit what is left. */
static Py_ssize_t
min_size(int proto, int t)
{
    if (proto == PROTO_COMPACT)
        return t == T_DOUBLE ? 8 : 1;
    switch (t) {
    case T_I16: return 2;
    case T_I32: return 4;
    case T_STRING: return 4;
    case T_I64: case T_DOUBLE: return 8;
    case T_SET: case T_LIST: return 5;
    case T_MAP: return 6;
    default: return 1; /* bool, byte, struct (its STOP byte) */
    }
}

static const char *
type_name(int t)
{
    switch (t) {
    case T_BOOL: return "bool";
    case T_BYTE: return "byte";
    case T_DOUBLE: return "double";
    case T_I16: return "i16";
    case T_I32: return "i32";
    case T_I64: return "i64";
    case T_STRING: return "string";
    case T_BINARY: return "binary";
    case T_STRUCT: return "struct";
    case T_MAP: return "map";
    case T_SET: return "set";
    case T_LIST: return "list";
    default: return "undefined";
    }
}

/* ---- compiled specs ------------------------------------------------------------------------ */

typedef struct TypeInfo {
    int ttype;
    struct TypeInfo *a; /* list/set element, map key */
    struct TypeInfo *b; /* map value */
    PyObject *spec;     /* StructSpec of a struct (owned: never freed while a field uses it) */
} TypeInfo;

typedef struct {
    int fid;
    PyObject *name;    /* interned */
    PyObject *dflt;    /* the default thriftpy2's __init__ gives it (with `fast_new`) */
    int copy_dflt;     /* dflt is mutable (a list, set, dict, struct): each decode copies it */
    TypeInfo type;
} FieldInfo;

typedef struct {
    PyObject_HEAD
    PyObject *cls;
    int state;          /* SPEC_COMPILING, SPEC_READY or SPEC_BROKEN */
    Py_ssize_t nfields;
    FieldInfo *fields;  /* thrift_spec order: the order thriftpy2 writes in */
    int min_fid;
    int span;           /* max_fid - min_fid + 1 when the index is used, else 0 */
    int16_t *index;     /* fid - min_fid -> position in fields, -1 when absent */
    int fast_new;       /* build instances without calling the class (see compile_defaults) */
} StructSpec;

enum { SPEC_COMPILING, SPEC_READY, SPEC_BROKEN };

static PyTypeObject StructSpecType;

static void
free_typeinfo(TypeInfo *t)
{
    if (t == NULL)
        return;
    free_typeinfo(t->a);
    free_typeinfo(t->b);
    Py_XDECREF(t->spec);
    PyMem_Free(t);
}

/* Back to no fields: before a dealloc, or before a spec that failed to compile is tried again. */
static void
clear_fields(StructSpec *self)
{
    for (Py_ssize_t i = 0; i < self->nfields; i++) {
        Py_XDECREF(self->fields[i].name);
        Py_XDECREF(self->fields[i].dflt);
        free_typeinfo(self->fields[i].type.a);
        free_typeinfo(self->fields[i].type.b);
        Py_XDECREF(self->fields[i].type.spec);
    }
    PyMem_Free(self->fields);
    PyMem_Free(self->index);
    self->nfields = 0;
    self->fields = NULL;
    self->min_fid = 0;
    self->span = 0;
    self->index = NULL;
    self->fast_new = 0;
}

static void
StructSpec_dealloc(StructSpec *self)
{
    clear_fields(self);
    Py_XDECREF(self->cls);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
StructSpec_repr(StructSpec *self)
{
    return PyUnicode_FromFormat("<StructSpec %R, %zd fields>", self->cls, self->nfields);
}

static PyTypeObject StructSpecType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kitegreen.codec._thrift.StructSpec",
    .tp_basicsize = sizeof(StructSpec),
    .tp_dealloc = (destructor)StructSpec_dealloc,
    .tp_repr = (reprfunc)StructSpec_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A thriftpy2 struct's spec, compiled once for the codec.",
};

static PyObject *compile_spec(PyObject *cls);
static int parse_type(PyObject *arg, TypeInfo *out, PyObject *cls, PyObject *name);

static TypeInfo *
new_typeinfo(PyObject *arg, PyObject *cls, PyObject *name)
{
    TypeInfo *t = PyMem_Calloc(1, sizeof(TypeInfo));
    if (t == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (parse_type(arg, t, cls, name) < 0) {
        free_typeinfo(t);
        return NULL;
    }
    return t;
}

/* One type from a thriftpy2 spec: the ttype, and its argument (element types, a struct class,
 * an enum class) or NULL. */
static int
parse_typed(long ttype, PyObject *sub, TypeInfo *out, PyObject *cls, PyObject *name)
{
    out->ttype = (int)ttype;
    switch (ttype) {
    case T_BOOL: case T_BYTE: case T_DOUBLE: case T_I16: case T_I32: case T_I64:
    case T_STRING: case T_BINARY:
        /* An i32 may carry its enum class: thriftpy2 enums are plain ints on both sides. */
        return 0;
    case T_LIST: case T_SET:
        if (sub == NULL)
            break;
        out->a = new_typeinfo(sub, cls, name);
        return out->a ? 0 : -1;
    case T_MAP:
        if (sub == NULL || !PyTuple_Check(sub) || PyTuple_GET_SIZE(sub) != 2)
            break;
        out->a = new_typeinfo(PyTuple_GET_ITEM(sub, 0), cls, name);
        if (out->a == NULL)
            return -1;
        out->b = new_typeinfo(PyTuple_GET_ITEM(sub, 1), cls, name);
        return out->b ? 0 : -1;
    case T_STRUCT: {
        if (sub == NULL || !PyType_Check(sub))
            break;
        PyObject *spec = compile_spec(sub);
        if (spec == NULL)
            return -1;
        out->spec = spec; /* owned, so that no spec a field names is ever freed under it */
        return 0;
    }
    default:
        PyErr_Format(PyExc_TypeError, "%S.%S: thrift type %ld is not supported", cls, name,
                     ttype);
        return -1;
    }
    PyErr_Format(PyExc_TypeError, "%S.%S: malformed spec for %s", cls, name,
                 type_name((int)ttype));
    return -1;
}

static int
parse_type(PyObject *arg, TypeInfo *out, PyObject *cls, PyObject *name)
{
    long ttype;
    PyObject *sub = NULL;
    if (PyLong_Check(arg)) {
        ttype = PyLong_AsLong(arg);
    } else if (PyTuple_Check(arg) && PyTuple_GET_SIZE(arg) == 2) {
        ttype = PyLong_AsLong(PyTuple_GET_ITEM(arg, 0));
        sub = PyTuple_GET_ITEM(arg, 1);
    } else {
        PyErr_Format(PyExc_TypeError, "%S.%S: cannot read type %R", cls, name, arg);
        return -1;
    }
    if (ttype == -1 && PyErr_Occurred())
        return -1;
    return parse_typed(ttype, sub, out, cls, name);
}

/* Values a decode may hand to every message that lacks the field: those nobody can change. A
 * list, set, dict or struct default is copied per decode instead (deepcopy, field_default), so
 * that a handler that appends to one does not change what later requests receive. */
static int
is_immutable(PyObject *v)
{
    return v == Py_None || PyBool_Check(v) || PyLong_Check(v) || PyFloat_CheckExact(v) ||
           PyUnicode_CheckExact(v) || PyBytes_CheckExact(v);
}

/* thriftpy2's generated __init__ only assigns each field its default from default_spec, in
 * thrift_spec order. When default_spec is exactly that, the decoder builds instances itself: it
 * decodes the fields first, then creates the object and sets every attribute once (the decoded
 * value or the default), which saves a Python call per struct and half the attribute stores.
 * Any other class is built by calling it. */
static int
compile_defaults(StructSpec *self)
{
    PyObject *spec = PyObject_GetAttrString(self->cls, "default_spec");
    if (spec == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    /* A tuple of our own: the comparisons below may run Python code (a str subclass's __eq__)
     * that changes default_spec, whose items would then be freed under us. */
    PyObject *seq = PySequence_Tuple(spec);
    Py_DECREF(spec);
    if (seq == NULL)
        return -1;
    int same = PyTuple_GET_SIZE(seq) == self->nfields &&
               ((PyTypeObject *)self->cls)->tp_new != NULL;
    for (Py_ssize_t i = 0; same && i < self->nfields; i++) {
        PyObject *pair = PyTuple_GET_ITEM(seq, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            same = 0;
            break;
        }
        int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(pair, 0), self->fields[i].name, Py_EQ);
        if (eq < 0) {
            Py_DECREF(seq);
            return -1;
        }
        same = eq;
    }
    for (Py_ssize_t i = 0; same && i < self->nfields; i++) {
        PyObject *dflt = PyTuple_GET_ITEM(PyTuple_GET_ITEM(seq, i), 1);
        self->fields[i].dflt = Py_NewRef(dflt);
        self->fields[i].copy_dflt = !is_immutable(dflt);
    }
    self->fast_new = same;
    Py_DECREF(seq);
    return 0;
}

/* Compile cls.thrift_spec, or return the spec compiled before. The spec enters the cache before
 * its fields are compiled, so a struct that contains itself (a tree node) finds it there.
 *
 * A spec that failed (a struct class whose thrift_spec was not filled in yet) stays in the cache,
 * since other specs may hold it, and refuses every use; the next compile of its class tries again
 * in place, so those other specs work too once it succeeds. Nothing can be reading its fields
 * then: every reader checks for SPEC_READY first, and a ready spec never changes. */
static PyObject *
compile_spec(PyObject *cls)
{
    StructSpec *self;
    PyObject *cached = PyDict_GetItemWithError(spec_cache, cls);
    if (cached != NULL && ((StructSpec *)cached)->state != SPEC_BROKEN) {
        /* SPEC_COMPILING is a struct that contains itself: its fields follow. */
        return Py_NewRef(cached);
    }
    if (cached == NULL && PyErr_Occurred())
        return NULL;
    if (cached != NULL)
        Py_INCREF(cached);
    PyObject *tspec = PyObject_GetAttrString(cls, "thrift_spec");
    if (tspec != NULL && !PyDict_Check(tspec)) {
        PyErr_Format(PyExc_TypeError, "%R.thrift_spec must be a dict, got %R", cls, tspec);
        Py_CLEAR(tspec);
    }
    /* The fields are compiled from a list of (id, spec) pairs of our own: compiling a field runs
     * Python code (another class's thrift_spec may be a property) that may change the dict. */
    PyObject *items = tspec != NULL ? PyDict_Items(tspec) : NULL;
    Py_XDECREF(tspec);
    if (items == NULL) {
        Py_XDECREF(cached);
        return NULL;
    }
    if (cached != NULL) {
        self = (StructSpec *)cached;
        if (self->state != SPEC_BROKEN) {
            /* Compiled again by the Python code above. */
            Py_DECREF(items);
            return cached;
        }
        clear_fields(self);
        self->state = SPEC_COMPILING;
    } else {
        self = PyObject_New(StructSpec, &StructSpecType);
        if (self == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        self->cls = Py_NewRef(cls);
        self->state = SPEC_COMPILING;
        self->nfields = 0;
        self->fields = NULL;
        self->index = NULL;
        clear_fields(self);
        if (PyDict_SetItem(spec_cache, cls, (PyObject *)self) < 0)
            goto fail;
    }

    Py_ssize_t n = PyList_GET_SIZE(items);
    self->fields = PyMem_Calloc(n ? n : 1, sizeof(FieldInfo));
    if (self->fields == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    int min_fid = 0, max_fid = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *key = PyTuple_GET_ITEM(PyList_GET_ITEM(items, k), 0);
        PyObject *value = PyTuple_GET_ITEM(PyList_GET_ITEM(items, k), 1);
        long fid = PyLong_Check(key) ? PyLong_AsLong(key) : -100000;
        if (fid < INT16_MIN || fid > INT16_MAX) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "%R: field id %R is not an i16", cls, key);
            goto fail;
        }
        if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) < 3 ||
            PyTuple_GET_SIZE(value) > 4 || !PyUnicode_Check(PyTuple_GET_ITEM(value, 1))) {
            PyErr_Format(PyExc_TypeError, "%R: malformed spec for field %ld: %R", cls, fid,
                         value);
            goto fail;
        }
        FieldInfo *f = &self->fields[self->nfields];
        f->fid = (int)fid;
        f->name = Py_NewRef(PyTuple_GET_ITEM(value, 1));
        PyUnicode_InternInPlace(&f->name);
        self->nfields++;
        long ttype = PyLong_AsLong(PyTuple_GET_ITEM(value, 0));
        if (ttype == -1 && PyErr_Occurred())
            goto fail;
        PyObject *sub = PyTuple_GET_SIZE(value) == 4 ? PyTuple_GET_ITEM(value, 2) : NULL;
        if (parse_typed(ttype, sub, &f->type, cls, f->name) < 0)
            goto fail;
        if (self->nfields == 1 || fid < min_fid)
            min_fid = (int)fid;
        if (self->nfields == 1 || fid > max_fid)
            max_fid = (int)fid;
    }
    /* A direct index for the usual small, dense field ids; a linear scan otherwise. */
    if (self->nfields && max_fid - min_fid < 1024) {
        self->span = max_fid - min_fid + 1;
        self->min_fid = min_fid;
        self->index = PyMem_Malloc(sizeof(int16_t) * self->span);
        if (self->index == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        for (int i = 0; i < self->span; i++)
            self->index[i] = -1;
        for (Py_ssize_t i = 0; i < self->nfields; i++)
            self->index[self->fields[i].fid - min_fid] = (int16_t)i;
    }
    if (compile_defaults(self) < 0)
        goto fail;
    Py_DECREF(items);
    self->state = SPEC_READY;
    return (PyObject *)self;

fail:
    /* The broken spec stays cached (other specs may point at it) and refuses every use. */
    self->state = SPEC_BROKEN;
    Py_DECREF(items);
    Py_DECREF(self);
    return NULL;
}

/* ---- reading ------------------------------------------------------------------------------- */

typedef struct {
    const unsigned char *base; /* the message's first byte */
    const unsigned char *p;
    const unsigned char *end;  /* end of the bytes present */
    Py_ssize_t limit;          /* offset from base no value may reach past: the message's end
                                * when complete, max_size while its end is still unknown */
    int proto;
    int depth;                 /* nesting levels still allowed */
    int streaming;             /* the message may continue past `end` (the Scanner) */
    int shortage;              /* streaming: a read stopped at `end`, not at an error */
    int bool_value;            /* compact: the value a bool field carries in its header */
    Py_ssize_t budget;         /* decoding: what the objects built may cost, estimated (below) */
    Py_ssize_t spent;          /* decoding: what they cost so far */
    Py_ssize_t slice;          /* objects decoded between two releases of the GIL; 0: none */
    Py_ssize_t until_release;  /* objects left until the next release */
} Reader;

/* A reader over a complete message of `size` bytes at `data`. */
static void
init_reader(Reader *r, int proto, const unsigned char *data, Py_ssize_t size)
{
    memset(r, 0, sizeof(*r));
    r->base = r->p = data;
    r->end = data + size;
    r->limit = size;
    r->proto = proto;
    r->depth = MAX_DEPTH;
    r->budget = PY_SSIZE_T_MAX;
}

#define LEFT(r) ((Py_ssize_t)((r)->end - (r)->p))
#define ROOM(r) ((r)->limit - (Py_ssize_t)((r)->p - (r)->base))

/* The message holds fewer than `need` more bytes. Complete: the message is malformed.
 * Streaming: more bytes may come, unless `need` passes the size limit. */
static int
short_read(Reader *r, Py_ssize_t need, const char *what)
{
    if (!r->streaming) {
        PyErr_Format(ProtocolError, "truncated message: %s needs %zd bytes, %zd left", what,
                     need, LEFT(r));
        return -1;
    }
    if (need > ROOM(r)) {
        PyErr_Format(FrameTooLarge,
                     "message exceeds max_frame_size (%zd bytes): %s of %zd bytes at offset %zd",
                     r->limit, what, need, (Py_ssize_t)(r->p - r->base));
        return -1;
    }
    r->shortage = 1;
    return -1;
}

#define NEED(r, n, what)                                                                      \
    do {                                                                                      \
        if (LEFT(r) < (Py_ssize_t)(n))                                                        \
            return short_read((r), (Py_ssize_t)(n), (what));                                  \
    } while (0)

static int
bad(const char *fmt, ...)
{
    va_list vargs;
    va_start(vargs, fmt);
    PyErr_FormatV(ProtocolError, fmt, vargs);
    va_end(vargs);
    return -1;
}

static inline uint16_t
be16(const unsigned char *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t
be64(const unsigned char *p)
{
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

static inline uint64_t
le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static int
rd_byte(Reader *r, int *out)
{
    NEED(r, 1, "a byte");
    *out = *r->p++;
    return 0;
}

/* An unsigned varint of at most 5 bytes (32 bits) or 10 (64 bits); an overflow is refused
 * rather than truncated, so an i32 of 2**41 never turns into some other i32. */
static int
rd_varint(Reader *r, uint64_t *out, int max_bytes, const char *what)
{
    uint64_t v = 0;
    const unsigned char *p = r->p;
    for (int i = 0;; i++) {
        if (p >= r->end)
            return short_read(r, (Py_ssize_t)(p - r->p) + 1, what);
        unsigned b = *p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            if (max_bytes == 5 ? v > 0xffffffffULL : (i == 9 && b > 1))
                return bad("%s overflows %d bits", what, max_bytes == 5 ? 32 : 64);
            r->p = p;
            *out = v;
            return 0;
        }
        if (i + 1 == max_bytes)
            return bad("%s overflows %d bits (a varint of over %d bytes)", what,
                       max_bytes == 5 ? 32 : 64, max_bytes);
    }
}

static inline int64_t
unzigzag(uint64_t v)
{
    return (int64_t)(v >> 1) ^ -(int64_t)(v & 1);
}

static int
rd_int(Reader *r, int ttype, int64_t *out)
{
    if (r->proto == PROTO_BINARY) {
        switch (ttype) {
        case T_I16:
            NEED(r, 2, "an i16");
            *out = (int16_t)be16(r->p);
            r->p += 2;
            return 0;
        case T_I32:
            NEED(r, 4, "an i32");
            *out = (int32_t)be32(r->p);
            r->p += 4;
            return 0;
        default:
            NEED(r, 8, "an i64");
            *out = (int64_t)be64(r->p);
            r->p += 8;
            return 0;
        }
    }
    uint64_t v = 0;
    if (ttype == T_I64) {
        if (rd_varint(r, &v, 10, "an i64") < 0)
            return -1;
        *out = unzigzag(v);
        return 0;
    }
    if (rd_varint(r, &v, 5, ttype == T_I16 ? "an i16" : "an i32") < 0)
        return -1;
    *out = unzigzag(v);
    if (ttype == T_I16 && (*out < INT16_MIN || *out > INT16_MAX))
        return bad("i16 out of range: %lld", (long long)*out);
    return 0;
}

static int
rd_double(Reader *r, double *out)
{
    NEED(r, 8, "a double");
    uint64_t bits = r->proto == PROTO_BINARY ? be64(r->p) : le64(r->p);
    memcpy(out, &bits, 8);
    r->p += 8;
    return 0;
}

/* A string length or container count: 0 .. 2**31-1. */
static int
rd_size(Reader *r, Py_ssize_t *out, const char *what)
{
    if (r->proto == PROTO_BINARY) {
        NEED(r, 4, what);
        int32_t n = (int32_t)be32(r->p);
        if (n < 0)
            return bad("negative %s: %d", what, n);
        r->p += 4;
        *out = n;
        return 0;
    }
    uint64_t v = 0;
    if (rd_varint(r, &v, 5, what) < 0)
        return -1;
    if (v > INT32_MAX)
        return bad("%s of %llu is over 2**31-1", what, (unsigned long long)v);
    *out = (Py_ssize_t)v;
    return 0;
}

/* `count` elements of `size` bytes each at least: refused unless they can fit the message. */
static int
check_count(Reader *r, Py_ssize_t count, Py_ssize_t size, const char *what)
{
    Py_ssize_t room = ROOM(r);
    if (count <= room / size)
        return 0;
    if (r->streaming) {
        PyErr_Format(FrameTooLarge,
                     "%s of %zd elements needs at least %zd bytes, over max_frame_size (%zd)",
                     what, count, count * size, r->limit);
        return -1;
    }
    return bad("%s of %zd elements needs at least %zd bytes, %zd left", what, count,
               count * size, room);
}

static int
wire_type(int t, const char *what)
{
    if (is_wire_type(t))
        return t;
    bad("undefined %s type %d", what, t);
    return -1;
}

static int
compact_type(int ct, const char *what)
{
    int t = CT_TO_T[ct & 0x0f];
    if (t > 0)
        return t;
    bad("undefined compact %s type %d", what, ct);
    return -1;
}

/* A field header: the wire type (T_STOP at the end of the struct) and the field id. */
static int
rd_field_header(Reader *r, int *last_fid, int *ttype, int *fid)
{
    int b = 0;
    if (rd_byte(r, &b) < 0)
        return -1;
    if (b == T_STOP) {
        *ttype = T_STOP;
        return 0;
    }
    if (r->proto == PROTO_BINARY) {
        if ((*ttype = wire_type(b, "field")) < 0)
            return -1;
        NEED(r, 2, "a field id");
        *fid = (int16_t)be16(r->p);
        r->p += 2;
        return 0;
    }
    if ((*ttype = compact_type(b & 0x0f, "field")) < 0)
        return -1;
    int delta = b >> 4;
    if (delta) {
        *fid = *last_fid + delta;
        if (*fid > INT16_MAX)
            return bad("field id %d is over 32767", *fid);
    } else {
        int64_t id;
        if (rd_int(r, T_I16, &id) < 0)
            return -1;
        *fid = (int)id;
    }
    *last_fid = *fid;
    if (*ttype == T_BOOL)
        r->bool_value = (b & 0x0f) == 1;
    return 0;
}

static int
rd_list_header(Reader *r, int *etype, Py_ssize_t *count)
{
    int b = 0;
    if (rd_byte(r, &b) < 0)
        return -1;
    if (r->proto == PROTO_BINARY) {
        if ((*etype = wire_type(b, "list element")) < 0)
            return -1;
        if (rd_size(r, count, "list size") < 0)
            return -1;
    } else {
        if ((*etype = compact_type(b & 0x0f, "list element")) < 0)
            return -1;
        *count = b >> 4;
        if (*count == 15 && rd_size(r, count, "list size") < 0)
            return -1;
    }
    return check_count(r, *count, min_size(r->proto, *etype), "a list");
}

static int
rd_map_header(Reader *r, int *ktype, int *vtype, Py_ssize_t *count)
{
    if (r->proto == PROTO_BINARY) {
        NEED(r, 2, "map types");
        if ((*ktype = wire_type(r->p[0], "map key")) < 0 ||
            (*vtype = wire_type(r->p[1], "map value")) < 0)
            return -1;
        r->p += 2;
        if (rd_size(r, count, "map size") < 0)
            return -1;
    } else {
        if (rd_size(r, count, "map size") < 0)
            return -1;
        if (*count == 0) {
            /* Compact writes an empty map as one 0 byte, without types. */
            *ktype = *vtype = T_STOP;
            return 0;
        }
        int b = 0;
        if (rd_byte(r, &b) < 0)
            return -1;
        if ((*ktype = compact_type(b >> 4, "map key")) < 0 ||
            (*vtype = compact_type(b & 0x0f, "map value")) < 0)
            return -1;
    }
    return check_count(r, *count, min_size(r->proto, *ktype) + min_size(r->proto, *vtype),
                       "a map");
}

static int
enter(Reader *r)
{
    if (--r->depth >= 0)
        return 0;
    r->depth++;
    return bad("structs and containers nested deeper than %d levels", MAX_DEPTH);
}

/* A bool value outside a compact field header: one byte. */
static int
rd_bool(Reader *r, int *out)
{
    int b = 0;
    if (rd_byte(r, &b) < 0)
        return -1;
    if (r->proto == PROTO_COMPACT) {
        /* 1 is true, 2 false (0 from writers that emit 0/1); anything else is not a bool. */
        if (b > 2)
            return bad("compact bool byte %d", b);
        *out = b == 1;
    } else {
        *out = b != 0;
    }
    return 0;
}

static int
rd_string_span(Reader *r, const unsigned char **data, Py_ssize_t *size)
{
    if (rd_size(r, size, "string length") < 0)
        return -1;
    NEED(r, *size, "a string");
    *data = r->p;
    r->p += *size;
    return 0;
}

static int skip_value(Reader *r, int t);

static int
skip_struct(Reader *r)
{
    if (enter(r) < 0)
        return -1;
    int last_fid = 0, t, fid;
    for (;;) {
        if (rd_field_header(r, &last_fid, &t, &fid) < 0)
            return -1;
        if (t == T_STOP)
            break;
        if (r->proto == PROTO_COMPACT && t == T_BOOL)
            continue; /* the value was in the field header */
        if (skip_value(r, t) < 0)
            return -1;
    }
    r->depth++;
    return 0;
}

static int
skip_value(Reader *r, int t)
{
    int64_t i;
    double d;
    int b = 0;
    Py_ssize_t n = 0;
    const unsigned char *s = NULL;
    switch (t) {
    case T_BOOL:
        return rd_bool(r, &b);
    case T_BYTE:
        return rd_byte(r, &b);
    case T_I16: case T_I32: case T_I64:
        return rd_int(r, t, &i);
    case T_DOUBLE:
        return rd_double(r, &d);
    case T_STRING:
        return rd_string_span(r, &s, &n);
    case T_STRUCT:
        return skip_struct(r);
    case T_LIST: case T_SET: {
        int et;
        if (enter(r) < 0 || rd_list_header(r, &et, &n) < 0)
            return -1;
        for (Py_ssize_t k = 0; k < n; k++)
            if (skip_value(r, et) < 0)
                return -1;
        r->depth++;
        return 0;
    }
    case T_MAP: {
        int kt, vt;
        if (enter(r) < 0 || rd_map_header(r, &kt, &vt, &n) < 0)
            return -1;
        for (Py_ssize_t k = 0; k < n; k++)
            if (skip_value(r, kt) < 0 || skip_value(r, vt) < 0)
                return -1;
        r->depth++;
        return 0;
    }
    default:
        return bad("undefined type %d", t);
    }
}

/* ---- decoding into thriftpy2 objects ------------------------------------------------------- */

static inline int
matches(int declared, int wire)
{
    return declared == wire || (declared == T_BINARY && wire == T_STRING);
}

static const FieldInfo *
find_field(const StructSpec *spec, int fid)
{
    if (spec->span) {
        int i = fid - spec->min_fid;
        if (i < 0 || i >= spec->span || spec->index[i] < 0)
            return NULL;
        return &spec->fields[spec->index[i]];
    }
    for (Py_ssize_t i = 0; i < spec->nfields; i++)
        if (spec->fields[i].fid == fid)
            return &spec->fields[i];
    return NULL;
}

static PyObject *
decode_text(const unsigned char *s, Py_ssize_t n)
{
    /* thriftpy2 hands a string that is not UTF-8 to the handler as bytes; so do we, so that
     * a service moved from thriftpy2's server sees what it saw before. */
    PyObject *text = PyUnicode_DecodeUTF8((const char *)s, n, NULL);
    if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        return PyBytes_FromStringAndSize((const char *)s, n);
    }
    return text;
}

static PyObject *dec_value(Reader *r, const TypeInfo *ti);

/* The memory budget. One wire byte can become one Python object (an empty struct in a list:
 * 1 byte, ~80 bytes of memory), so a message's size says little about what decoding it costs.
 * Each object is charged before it is built, at what CPython 3.11-3.13 allocates for it on
 * 64-bit (measured with tracemalloc, rounded up), and the decode stops with
 * MemoryBudgetExceeded as soon as the total passes the budget. */
#define COST_STRUCT 80        /* an instance with inline values: header, managed dict slots */
#define COST_FIELD 16         /* per field of a struct, each set on every instance */
#define COST_LIST 56          /* a list (GC header included); + COST_SLOT per item */
#define COST_SLOT 8
#define COST_DICT 232         /* a dict with its first keys table */
#define COST_DICT_ENTRY 72    /* per entry: index, entry, growth slack and the resize's copy */
#define COST_INT 32           /* an int outside CPython's small-int cache, up to 2**60 */
#define COST_BIG_INT 40
#define COST_FLOAT 24
#define COST_STR 56           /* + 1 per byte; wider kinds are charged once built */
#define COST_BYTES 40         /* + 1 per byte */
#define COST_TUPLE 40         /* + COST_SLOT per item */

static int
over_budget(Reader *r)
{
    PyErr_Format(MemoryBudgetExceeded,
                 "decoding would take more than %zd bytes of memory (passed at offset %zd)",
                 r->budget, (Py_ssize_t)(r->p - r->base));
    return -1;
}

/* Charge one object of `cost` bytes about to be built. Every `slice` objects, let go of the
 * GIL for a moment: a decode in a worker thread lets the hub's thread run between objects.
 * Nothing here touches a Python object while the GIL is released, and everything the decoder
 * holds across it is an owned reference or the caller's buffer export. */
/* Give the GIL to a thread waiting for it (the gevent hub, while a large message is decoded
 * or encoded in a worker thread), then take it back. Releasing and taking it again at once is
 * not enough: the waiter is woken, but this thread takes the GIL first and the waiter's 5 ms
 * timeout starts over. sched_yield() lets the waiter in only when both share a CPU: on an
 * idle machine with two cores it returns at once and the hub starved for 200 ms and more.
 * A 50 us sleep outlasts a waiter's wake-up on another core; it costs about 3 ms per
 * million objects (one release per 4096). */
static void
let_others_in(void)
{
    struct timespec pause = {0, 50 * 1000};
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&pause, NULL);
    Py_END_ALLOW_THREADS
}

static inline int
charge(Reader *r, Py_ssize_t cost)
{
    if (cost > r->budget - r->spent)
        return over_budget(r);
    r->spent += cost;
    if (r->slice && --r->until_release <= 0) {
        r->until_release = r->slice;
        let_others_in();
    }
    return 0;
}

static int release_steps(PyObject *holder, Py_ssize_t steps);

/* Let go of a value built before an error. In a sliced decode (a worker thread) it is taken
 * apart a slice at a time as release() does, letting go of the GIL between slices: a refused
 * message may hold 1M objects, and freeing them at once holds the GIL for ~140 ms. */
static void
discard(Reader *r, PyObject *obj)
{
    if (!r->slice) {
        Py_DECREF(obj);
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *holder = PyList_New(1);
    if (holder == NULL) {
        PyErr_Clear();
        Py_DECREF(obj);
    } else {
        PyList_SET_ITEM(holder, 0, obj);
        int rc;
        while ((rc = release_steps(holder, r->slice)) == 0)
            let_others_in();
        if (rc < 0)
            PyErr_Clear();
        Py_DECREF(holder);
    }
    PyErr_Restore(type, value, tb);
}

/* A decoded int: the small-int cache's values cost nothing. */
static inline Py_ssize_t
int_cost(int64_t i)
{
    if (i >= -5 && i <= 256)
        return 0;
    return i > -((int64_t)1 << 60) && i < ((int64_t)1 << 60) ? COST_INT : COST_BIG_INT;
}

/* Decode a struct's fields; each decoded value goes to vals[field index] (a later duplicate
 * replaces an earlier one), or straight onto obj when obj is given. */
static int
dec_fields(Reader *r, const StructSpec *spec, PyObject **vals, PyObject *obj)
{
    if (spec->state != SPEC_READY) {
        PyErr_Format(PyExc_TypeError, "%R has a spec kitegreen cannot compile", spec->cls);
        return -1;
    }
    if (enter(r) < 0)
        return -1;
    int last_fid = 0, t, fid;
    for (;;) {
        if (rd_field_header(r, &last_fid, &t, &fid) < 0)
            return -1;
        if (t == T_STOP)
            break;
        const FieldInfo *f = find_field(spec, fid);
        int header_bool = r->proto == PROTO_COMPACT && t == T_BOOL;
        if (f == NULL || !matches(f->type.ttype, t)) {
            /* Unknown or mistyped fields are skipped, as every Thrift implementation does:
             * newer clients may send fields this IDL does not have. */
            if (!header_bool && skip_value(r, t) < 0)
                return -1;
            continue;
        }
        PyObject *v = header_bool ? Py_NewRef(r->bool_value ? Py_True : Py_False)
                                  : dec_value(r, &f->type);
        if (v == NULL)
            return -1;
        if (obj == NULL) {
            Py_XSETREF(vals[f - spec->fields], v);
            continue;
        }
        int rc = PyObject_SetAttr(obj, f->name, v);
        Py_DECREF(v);
        if (rc < 0)
            return -1;
    }
    r->depth++;
    return 0;
}

static PyObject *empty_tuple;
static PyObject *deepcopy; /* copy.deepcopy */

/* A new reference to the value a field absent from the message gets: its default, or a copy of
 * it when it is mutable, so that no two messages share one list. */
static PyObject *
field_default(const FieldInfo *f)
{
    if (f->dflt == NULL)
        return Py_NewRef(Py_None);
    if (!f->copy_dflt)
        return Py_NewRef(f->dflt);
    return PyObject_CallOneArg(deepcopy, f->dflt);
}

#define STACK_FIELDS 32

static PyObject *
dec_struct(Reader *r, const StructSpec *spec)
{
    if (charge(r, COST_STRUCT + COST_FIELD * spec->nfields) < 0)
        return NULL;
    if (!spec->fast_new) {
        PyObject *obj = PyObject_CallNoArgs(spec->cls);
        if (obj != NULL && dec_fields(r, spec, NULL, obj) < 0)
            Py_CLEAR(obj);
        return obj;
    }
    Py_ssize_t n = spec->nfields;
    PyObject *stack[STACK_FIELDS];
    PyObject **vals = n <= STACK_FIELDS ? stack : PyMem_Calloc(n, sizeof(PyObject *));
    if (vals == NULL)
        return PyErr_NoMemory();
    if (vals == stack)
        memset(stack, 0, sizeof(PyObject *) * n);
    PyObject *obj = NULL;
    if (dec_fields(r, spec, vals, NULL) == 0) {
        PyTypeObject *type = (PyTypeObject *)spec->cls;
        obj = type->tp_new(type, empty_tuple, NULL);
        for (Py_ssize_t i = 0; obj != NULL && i < n; i++) {
            const FieldInfo *f = &spec->fields[i];
            PyObject *v = vals[i] ? Py_NewRef(vals[i]) : field_default(f);
            if (v == NULL || PyObject_SetAttr(obj, f->name, v) < 0)
                Py_CLEAR(obj);
            Py_XDECREF(v);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(vals[i]);
    if (vals != stack)
        PyMem_Free(vals);
    return obj;
}

static PyObject *
dec_list(Reader *r, const TypeInfo *ti)
{
    int et;
    Py_ssize_t n = 0;
    if (enter(r) < 0 || rd_list_header(r, &et, &n) < 0)
        return NULL;
    if (!matches(ti->a->ttype, et)) {
        /* thriftpy2's rule for a container of the wrong element type: skip it, give []. */
        for (Py_ssize_t k = 0; k < n; k++)
            if (skip_value(r, et) < 0)
                return NULL;
        r->depth++;
        return PyList_New(0);
    }
    if (charge(r, COST_LIST + COST_SLOT * n) < 0)
        return NULL;
    PyObject *list = PyList_New(n); /* n fits the bytes left: check_count */
    if (list == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = dec_value(r, ti->a);
        if (item == NULL) {
            /* The items not built yet are NULL: cut them off before taking the rest apart. */
            if (r->slice && PyList_SetSlice(list, k, n, NULL) < 0) {
                Py_DECREF(list);
                return NULL;
            }
            discard(r, list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, item);
    }
    r->depth++;
    return list;
}

static PyObject *
dec_map(Reader *r, const TypeInfo *ti)
{
    int kt, vt;
    Py_ssize_t n = 0;
    if (enter(r) < 0 || rd_map_header(r, &kt, &vt, &n) < 0)
        return NULL;
    if (n && (!matches(ti->a->ttype, kt) || !matches(ti->b->ttype, vt))) {
        for (Py_ssize_t k = 0; k < n; k++)
            if (skip_value(r, kt) < 0 || skip_value(r, vt) < 0)
                return NULL;
        r->depth++;
        return PyDict_New();
    }
    if (charge(r, COST_DICT + COST_DICT_ENTRY * n) < 0)
        return NULL;
    PyObject *dict = PyDict_New();
    if (dict == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *key = dec_value(r, ti->a);
        if (key == NULL)
            goto fail;
        PyObject *value = dec_value(r, ti->b);
        if (value == NULL) {
            Py_DECREF(key);
            goto fail;
        }
        int rc = PyDict_SetItem(dict, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc < 0) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                bad("a map key of type %s cannot be a Python dict key",
                    type_name(ti->a->ttype));
            }
            goto fail;
        }
    }
    r->depth++;
    return dict;
fail:
    discard(r, dict);
    return NULL;
}

/* A string field: text (bytes if not UTF-8), charged again for a kind wider than a byte. */
static PyObject *
dec_text(Reader *r, const unsigned char *s, Py_ssize_t n)
{
    PyObject *text = decode_text(s, n);
    if (text != NULL && PyUnicode_Check(text)) {
        Py_ssize_t wide = PyUnicode_GET_LENGTH(text) * PyUnicode_KIND(text);
        if (wide > n && charge(r, wide - n) < 0)
            Py_CLEAR(text);
    }
    return text;
}

static PyObject *
dec_value(Reader *r, const TypeInfo *ti)
{
    int64_t i;
    double d;
    int b = 0;
    Py_ssize_t n = 0;
    const unsigned char *s = NULL;
    switch (ti->ttype) {
    case T_BOOL:
        if (rd_bool(r, &b) < 0)
            return NULL;
        return Py_NewRef(b ? Py_True : Py_False);
    case T_BYTE:
        if (rd_byte(r, &b) < 0 || charge(r, int_cost((signed char)b)) < 0)
            return NULL;
        return PyLong_FromLong((signed char)b);
    case T_I16: case T_I32: case T_I64:
        if (rd_int(r, ti->ttype, &i) < 0 || charge(r, int_cost(i)) < 0)
            return NULL;
        return PyLong_FromLongLong(i);
    case T_DOUBLE:
        if (rd_double(r, &d) < 0 || charge(r, COST_FLOAT) < 0)
            return NULL;
        return PyFloat_FromDouble(d);
    case T_STRING:
        if (rd_string_span(r, &s, &n) < 0 || charge(r, COST_STR + n) < 0)
            return NULL;
        return dec_text(r, s, n);
    case T_BINARY:
        if (rd_string_span(r, &s, &n) < 0 || charge(r, COST_BYTES + n) < 0)
            return NULL;
        return PyBytes_FromStringAndSize((const char *)s, n);
    case T_LIST: case T_SET:
        return dec_list(r, ti);
    case T_MAP:
        return dec_map(r, ti);
    case T_STRUCT:
        return dec_struct(r, (const StructSpec *)ti->spec);
    default:
        PyErr_Format(PyExc_TypeError, "cannot decode thrift type %d", ti->ttype);
        return NULL;
    }
}

/* The message header: name, type, sequence id. A name that is not UTF-8 comes back as bytes. */
static int
rd_message_begin(Reader *r, PyObject **name, int *mtype, int32_t *seqid)
{
    const unsigned char *s = NULL;
    Py_ssize_t n = 0;
    if (r->proto == PROTO_BINARY) {
        NEED(r, 4, "a message header");
        uint32_t word = be32(r->p);
        if ((word & 0xffff0000u) != 0x80010000u)
            return bad("not a strict binary message: starts with 0x%08x", word);
        r->p += 4;
        *mtype = (int)(word & 0xff);
        if (rd_string_span(r, &s, &n) < 0)
            return -1;
        NEED(r, 4, "a sequence id");
        *seqid = (int32_t)be32(r->p);
        r->p += 4;
    } else {
        NEED(r, 2, "a message header");
        if (r->p[0] != 0x82)
            return bad("not a compact message: starts with 0x%02x", r->p[0]);
        if ((r->p[1] & 0x1f) != 1)
            return bad("unsupported compact protocol version %d", r->p[1] & 0x1f);
        *mtype = r->p[1] >> 5;
        r->p += 2;
        uint64_t v = 0;
        if (rd_varint(r, &v, 5, "a sequence id") < 0)
            return -1;
        *seqid = (int32_t)(uint32_t)v;
        if (rd_string_span(r, &s, &n) < 0)
            return -1;
    }
    if (name != NULL) {
        *name = PyUnicode_DecodeUTF8((const char *)s, n, NULL);
        if (*name == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                return -1;
            PyErr_Clear();
            *name = PyBytes_FromStringAndSize((const char *)s, n);
            if (*name == NULL)
                return -1;
        }
    }
    return 0;
}

/* ---- the scanner: where a buffered message ends ------------------------------------------- */

enum { K_STRUCT, K_LIST, K_MAP };

typedef struct {
    uint8_t kind;
    uint8_t a, b;   /* list: element type; map: key and value types */
    uint8_t half;   /* map: 1 between a key and its value */
    int32_t left;   /* list and map: elements still to come */
    int32_t last_fid;
} Frame;

/* Everything a scan needs to resume: the walk is a loop over this explicit stack rather than
 * recursion, and each step commits only once its bytes are all there. */
typedef struct {
    int proto;
    int started;        /* the message header is behind us */
    int pending;        /* wire type of the value to consume next; -1 for none */
    int sp;             /* frames in use */
    Py_ssize_t pos;     /* bytes of the message consumed */
    Py_ssize_t max_size;
    Frame stack[MAX_DEPTH];
} ScanState;

/* 1: the message ends at s->pos; 0: more bytes are needed; -1: error set. */
static int
scan_run(ScanState *s, const unsigned char *msg, Py_ssize_t avail)
{
    Reader r;
    memset(&r, 0, sizeof(r));
    r.base = msg;
    /* Bytes past max_size are never looked at: reaching them means the message is too big. */
    r.end = msg + (avail < s->max_size ? avail : s->max_size);
    r.limit = s->max_size;
    r.proto = s->proto;
    r.depth = MAX_DEPTH;
    r.streaming = 1;
    for (;;) {
        r.p = msg + s->pos;
        r.shortage = 0;
        if (!s->started) {
            int mtype;
            int32_t seqid;
            if (rd_message_begin(&r, NULL, &mtype, &seqid) < 0)
                break;
            memset(&s->stack[0], 0, sizeof(Frame));
            s->stack[0].kind = K_STRUCT;
            s->sp = 1;
            s->started = 1;
            s->pending = -1;
            s->pos = r.p - msg;
            continue;
        }
        if (s->pending >= 0) {
            int t = s->pending;
            if (t == T_STRUCT || t == T_LIST || t == T_SET || t == T_MAP) {
                if (s->sp >= MAX_DEPTH) {
                    bad("structs and containers nested deeper than %d levels", MAX_DEPTH);
                    return -1;
                }
                Frame f;
                memset(&f, 0, sizeof(f));
                Py_ssize_t n = 0;
                int a = 0, b = 0;
                if (t == T_STRUCT) {
                    f.kind = K_STRUCT;
                } else if (t == T_MAP) {
                    if (rd_map_header(&r, &a, &b, &n) < 0)
                        break;
                    f.kind = K_MAP;
                } else {
                    if (rd_list_header(&r, &a, &n) < 0)
                        break;
                    f.kind = K_LIST;
                }
                f.a = (uint8_t)a;
                f.b = (uint8_t)b;
                f.left = (int32_t)n;
                s->stack[s->sp++] = f;
            } else if (skip_value(&r, t) < 0) {
                break;
            }
            s->pending = -1;
            s->pos = r.p - msg;
            continue;
        }
        if (s->sp == 0)
            return 1;
        Frame *f = &s->stack[s->sp - 1];
        if (f->kind == K_STRUCT) {
            int last = f->last_fid, t, fid;
            if (rd_field_header(&r, &last, &t, &fid) < 0)
                break;
            f->last_fid = last;
            if (t == T_STOP)
                s->sp--;
            else if (!(s->proto == PROTO_COMPACT && t == T_BOOL))
                s->pending = t;
            s->pos = r.p - msg;
        } else if (f->left == 0) {
            s->sp--;
        } else if (f->kind == K_LIST) {
            f->left--;
            s->pending = f->a;
        } else if (!f->half) {
            f->half = 1;
            s->pending = f->a;
        } else {
            f->half = 0;
            f->left--;
            s->pending = f->b;
        }
    }
    return r.shortage ? 0 : -1;
}

typedef struct {
    PyObject_HEAD
    ScanState st;
} Scanner;

static PyTypeObject ScannerType;

/* ---- buffers -------------------------------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    int has_view;
    const unsigned char *data;
    Py_ssize_t len;
} Bytes;

static int
get_bytes(PyObject *obj, Bytes *b)
{
    if (PyBytes_Check(obj)) {
        b->has_view = 0;
        b->data = (const unsigned char *)PyBytes_AS_STRING(obj);
        b->len = PyBytes_GET_SIZE(obj);
        return 0;
    }
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_SIMPLE) < 0)
        return -1;
    b->has_view = 1;
    b->data = b->view.buf;
    b->len = b->view.len;
    return 0;
}

static void
release_bytes(Bytes *b)
{
    if (b->has_view)
        PyBuffer_Release(&b->view);
}

static int
get_span(PyObject *start_obj, PyObject *end_obj, Py_ssize_t len, Py_ssize_t *start,
         Py_ssize_t *end)
{
    *start = PyLong_AsSsize_t(start_obj);
    if (*start == -1 && PyErr_Occurred())
        return -1;
    *end = PyLong_AsSsize_t(end_obj);
    if (*end == -1 && PyErr_Occurred())
        return -1;
    if (*start < 0 || *start > *end || *end > len) {
        PyErr_Format(PyExc_ValueError, "span %zd..%zd is outside the %zd-byte buffer", *start,
                     *end, len);
        return -1;
    }
    return 0;
}

static int
get_proto(PyObject *obj, int *proto)
{
    long p = PyLong_AsLong(obj);
    if (p == -1 && PyErr_Occurred())
        return -1;
    if (p != PROTO_BINARY && p != PROTO_COMPACT) {
        PyErr_Format(PyExc_ValueError, "protocol must be 0 (binary) or 2 (compact), got %ld", p);
        return -1;
    }
    *proto = (int)p;
    return 0;
}

static int
get_spec(PyObject *obj, const StructSpec **spec)
{
    if (!PyObject_TypeCheck(obj, &StructSpecType)) {
        PyErr_Format(PyExc_TypeError, "spec must be a StructSpec, got %R", obj);
        return -1;
    }
    *spec = (const StructSpec *)obj;
    if ((*spec)->state != SPEC_READY) {
        PyErr_Format(PyExc_TypeError, "%R has a spec kitegreen cannot compile", (*spec)->cls);
        return -1;
    }
    return 0;
}

static int
check_nargs(const char *fname, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments, got %zd", fname, want, nargs);
    return -1;
}

static PyObject *
Scanner_feed(Scanner *self, PyObject *const *args, Py_ssize_t nargs)
{
    Bytes b;
    Py_ssize_t start, end;
    if (check_nargs("feed", nargs, 3) < 0 || get_bytes(args[0], &b) < 0)
        return NULL;
    if (get_span(args[1], args[2], b.len, &start, &end) < 0) {
        release_bytes(&b);
        return NULL;
    }
    int rc = scan_run(&self->st, b.data + start, end - start);
    release_bytes(&b);
    if (rc < 0)
        return NULL;
    return PyLong_FromSsize_t(rc ? start + self->st.pos : -1);
}

static PyMethodDef Scanner_methods[] = {
    {"feed", (PyCFunction)(void (*)(void))Scanner_feed, METH_FASTCALL,
     "feed(buf, start, end) -> int\n\nGo on scanning the message that begins at buf[start], "
     "of which end-start bytes are present. Returns the offset just past its end, or -1 "
     "when more bytes are needed."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kitegreen.codec._thrift.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The state of a scan for the end of a message whose bytes are still arriving.",
    .tp_methods = Scanner_methods,
};

/* scan(proto, buf, start, end, max_size) -> int | Scanner */
static PyObject *
mod_scan(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    Bytes b;
    Py_ssize_t start, end;
    int proto;
    if (check_nargs("scan", nargs, 5) < 0 || get_proto(args[0], &proto) < 0)
        return NULL;
    Py_ssize_t max_size = PyLong_AsSsize_t(args[4]);
    if (max_size == -1 && PyErr_Occurred())
        return NULL;
    if (max_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "max_size must be > 0");
        return NULL;
    }
    if (get_bytes(args[1], &b) < 0)
        return NULL;
    if (get_span(args[2], args[3], b.len, &start, &end) < 0) {
        release_bytes(&b);
        return NULL;
    }
    ScanState st;
    st.proto = proto;
    st.started = 0;
    st.pending = -1;
    st.sp = 0;
    st.pos = 0;
    st.max_size = max_size;
    int rc = scan_run(&st, b.data + start, end - start);
    release_bytes(&b);
    if (rc < 0)
        return NULL;
    if (rc)
        return PyLong_FromSsize_t(start + st.pos);
    Scanner *sc = PyObject_New(Scanner, &ScannerType);
    if (sc == NULL)
        return NULL;
    memcpy(&sc->st, &st, sizeof(st));
    return (PyObject *)sc;
}

/* frame_end(buf, start, end, max_size) -> int: where the frame that begins at buf[start] (a
 * 4-byte big-endian length, then that many bytes) ends, or -1 while buf[start:end] does not
 * hold it all yet. One call per message on a framed wire, like scan() on a buffered one. */
static PyObject *
mod_frame_end(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    Bytes b;
    Py_ssize_t start, end;
    if (check_nargs("frame_end", nargs, 4) < 0)
        return NULL;
    Py_ssize_t max_size = PyLong_AsSsize_t(args[3]);
    if (max_size == -1 && PyErr_Occurred())
        return NULL;
    if (get_bytes(args[0], &b) < 0)
        return NULL;
    if (get_span(args[1], args[2], b.len, &start, &end) < 0) {
        release_bytes(&b);
        return NULL;
    }
    Py_ssize_t found = -1;
    if (end - start >= 4) {
        int32_t length = (int32_t)be32(b.data + start);
        if (length <= 0)
            found = -2;
        else if (length > max_size)
            found = -3 - (Py_ssize_t)length;
        else if (end - start - 4 >= length)
            found = start + 4 + length;
        if (found == -2)
            bad("frame length must be positive, got %d", length);
        else if (found < -2)
            PyErr_Format(FrameTooLarge, "frame of %d bytes, max_frame_size is %zd", length,
                         max_size);
    }
    release_bytes(&b);
    return found < -1 ? NULL : PyLong_FromSsize_t(found);
}

/* A tuple of n new references, which it takes: each may be NULL (a failed conversion), and
 * then the others are released and NULL returned. Per request, in place of Py_BuildValue,
 * which parses its format string on each call. */
static PyObject *
steal_tuple(Py_ssize_t n, PyObject **items)
{
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    out = PyTuple_New(n);
    if (out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(out, i, items[i]);
    return out;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

/* read_message_begin(proto, buf, start, end) -> (name, mtype, seqid, body_offset) */
static PyObject *
mod_read_message_begin(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    Bytes b;
    Py_ssize_t start, end;
    int proto;
    if (check_nargs("read_message_begin", nargs, 4) < 0 || get_proto(args[0], &proto) < 0 ||
        get_bytes(args[1], &b) < 0)
        return NULL;
    if (get_span(args[2], args[3], b.len, &start, &end) < 0) {
        release_bytes(&b);
        return NULL;
    }
    Reader r;
    init_reader(&r, proto, b.data + start, end - start);
    PyObject *name = NULL;
    int mtype;
    int32_t seqid;
    int rc = rd_message_begin(&r, &name, &mtype, &seqid);
    Py_ssize_t pos = start + (r.p - r.base);
    release_bytes(&b);
    if (rc < 0)
        return NULL;
    PyObject *items[4] = {name, PyLong_FromLong(mtype), PyLong_FromLong(seqid),
                          PyLong_FromSsize_t(pos)};
    return steal_tuple(4, items);
}

/* The fields of a struct, in spec order, as a tuple: decoded values, defaults for the rest.
 * The request loop calls handlers with it, which spares it building an args object. */
static PyObject *
dec_args(Reader *r, const StructSpec *spec)
{
    Py_ssize_t n = spec->nfields;
    if (charge(r, COST_TUPLE + COST_SLOT * n) < 0)
        return NULL;
    PyObject *stack[STACK_FIELDS];
    PyObject **vals = n <= STACK_FIELDS ? stack : PyMem_Calloc(n, sizeof(PyObject *));
    if (vals == NULL)
        return PyErr_NoMemory();
    if (vals == stack)
        memset(stack, 0, sizeof(PyObject *) * n);
    PyObject *tuple = NULL;
    if (dec_fields(r, spec, vals, NULL) == 0 && (tuple = PyTuple_New(n)) != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *v = vals[i] ? vals[i] : field_default(&spec->fields[i]);
            vals[i] = NULL;
            if (v == NULL) {
                Py_CLEAR(tuple);
                break;
            }
            PyTuple_SET_ITEM(tuple, i, v);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (vals[i] != NULL)
            discard(r, vals[i]); /* only after an error: the tuple took the rest */
    if (vals != stack)
        PyMem_Free(vals);
    return tuple;
}

/* read_struct / read_args / read_args_within: decode the struct that fills buf[start:end]
 * exactly; the last takes two more arguments, the memory budget and the slice (objects
 * between two releases of the GIL, 0 for none), and sets *cost to the estimate spent. */
static PyObject *
read_whole(const char *fname, PyObject *const *args, Py_ssize_t nargs, int as_tuple,
           Py_ssize_t *cost)
{
    Bytes b;
    Py_ssize_t start, end, budget = PY_SSIZE_T_MAX, slice = 0;
    int proto;
    const StructSpec *spec;
    if (check_nargs(fname, nargs, cost ? 7 : 5) < 0 || get_proto(args[0], &proto) < 0 ||
        get_spec(args[4], &spec) < 0)
        return NULL;
    if (cost != NULL) {
        budget = PyLong_AsSsize_t(args[5]);
        if (budget == -1 && PyErr_Occurred())
            return NULL;
        slice = PyLong_AsSsize_t(args[6]);
        if (slice == -1 && PyErr_Occurred())
            return NULL;
        if (budget < 0 || slice < 0) {
            PyErr_SetString(PyExc_ValueError, "budget and slice must be >= 0");
            return NULL;
        }
    }
    if (get_bytes(args[1], &b) < 0)
        return NULL;
    if (get_span(args[2], args[3], b.len, &start, &end) < 0) {
        release_bytes(&b);
        return NULL;
    }
    Reader r;
    init_reader(&r, proto, b.data + start, end - start);
    r.budget = budget;
    r.slice = r.until_release = slice;
    /* A large message is mostly new containers; the cyclic GC would traverse them over and
     * over while they are built (three quarters of the decode time of 16 MiB of small structs)
     * though decoding never makes a cycle. Collections wait until the decode is done.
     * A sliced decode (in a worker thread) leaves the collector to its caller, which must
     * also keep the new objects from the next collection (kitegreen.rpc.budget.DecodeLane). */
    int gc_was_on = end - start > LARGE_MESSAGE && slice == 0 ? PyGC_Disable() : 0;
    PyObject *obj = as_tuple ? dec_args(&r, spec) : dec_struct(&r, spec);
    if (gc_was_on)
        PyGC_Enable();
    if (obj != NULL && r.p != r.end) {
        bad("%zd bytes follow the end of the message", (Py_ssize_t)(r.end - r.p));
        discard(&r, obj);
        obj = NULL;
    }
    release_bytes(&b);
    if (cost != NULL)
        *cost = r.spent;
    return obj;
}

static PyObject *
mod_read_struct(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    return read_whole("read_struct", args, nargs, 0, NULL);
}

static PyObject *
mod_read_args(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    return read_whole("read_args", args, nargs, 1, NULL);
}

static PyObject *
mod_read_args_within(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    Py_ssize_t cost = 0;
    PyObject *tuple = read_whole("read_args_within", args, nargs, 1, &cost);
    if (tuple == NULL)
        return NULL;
    PyObject *items[2] = {tuple, PyLong_FromSsize_t(cost)};
    return steal_tuple(2, items);
}

/* ---- encoding ------------------------------------------------------------------------------- */

#define SMALL_OUT 1024

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
    int proto;
    int depth;
    Py_ssize_t values_left;   /* values still allowed (the budget); past it: EncodeBudgetExceeded */
    Py_ssize_t slice;         /* values encoded between two releases of the GIL; 0: none */
    Py_ssize_t until_release; /* values left until the next release */
    char small[SMALL_OUT];
} Writer;

static int
w_grow(Writer *w, Py_ssize_t n)
{
    if (n > PY_SSIZE_T_MAX / 2 - w->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = w->cap * 2;
    while (cap < w->len + n)
        cap *= 2;
    char *nb;
    if (w->buf == w->small) {
        nb = PyMem_Malloc(cap);
        if (nb != NULL)
            memcpy(nb, w->buf, w->len);
    } else {
        nb = PyMem_Realloc(w->buf, cap);
    }
    if (nb == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->buf = nb;
    w->cap = cap;
    return 0;
}

#define RESERVE(w, n)                                                                         \
    do {                                                                                      \
        if ((w)->len + (Py_ssize_t)(n) > (w)->cap && w_grow((w), (n)) < 0)                    \
            return -1;                                                                        \
    } while (0)

static int
w_byte(Writer *w, int b)
{
    RESERVE(w, 1);
    w->buf[w->len++] = (char)b;
    return 0;
}

static int
w_be(Writer *w, uint64_t v, int size)
{
    RESERVE(w, size);
    for (int i = size - 1; i >= 0; i--) {
        w->buf[w->len + i] = (char)(v & 0xff);
        v >>= 8;
    }
    w->len += size;
    return 0;
}

static int
w_varint(Writer *w, uint64_t v)
{
    RESERVE(w, 10);
    while (v > 0x7f) {
        w->buf[w->len++] = (char)((v & 0x7f) | 0x80);
        v >>= 7;
    }
    w->buf[w->len++] = (char)v;
    return 0;
}

static inline uint64_t
zigzag(int64_t v)
{
    return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
}

static int
w_raw(Writer *w, const char *data, Py_ssize_t n)
{
    RESERVE(w, n);
    memcpy(w->buf + w->len, data, n);
    w->len += n;
    return 0;
}

static int
w_size(Writer *w, Py_ssize_t n)
{
    if (w->proto == PROTO_BINARY)
        return w_be(w, (uint32_t)n, 4);
    return w_varint(w, (uint64_t)n);
}

static int
t_to_ct(int t)
{
    switch (t) {
    case T_BOOL: return 1;
    case T_BYTE: return 3;
    case T_I16: return 4;
    case T_I32: return 5;
    case T_I64: return 6;
    case T_DOUBLE: return 7;
    case T_STRING: case T_BINARY: return 8;
    case T_LIST: return 9;
    case T_SET: return 10;
    case T_MAP: return 11;
    default: return 12; /* struct */
    }
}

static inline int
wire_of(int t)
{
    return t == T_BINARY ? T_STRING : t;
}

static int enc_value(Writer *w, const TypeInfo *ti, PyObject *v, PyObject *field);

/* What each Thrift type takes, checked by Python type before any value is read, so that no
 * conversion hook (__bool__, __index__, __float__) of a handler's object runs, and a value of
 * the wrong type is an error rather than whatever it converts to:
 *   bool                 bool only (not 0/1, not "false", not any object with a truth value);
 *   byte, i16, i32, i64  int and its subclasses (IntEnum), but not bool: True is a bug there;
 *   double               float, and int (not bool), as thriftpy2 and Apache Thrift take it;
 *   string, binary       str (written as UTF-8), bytes, bytearray, memoryview;
 *   list, set            list, tuple, set, frozenset (not a str, bytes, dict or generator);
 *   map                  dict, or a mapping with items() (MappingProxyType);
 *   struct               an instance of the struct's class.
 * Subclasses count as their base type. thriftpy2 is looser (any truth value for bool, True for
 * an i32 or a double, any iterable for a list); a handler that relied on that gets an error. */
static int
enc_int(Writer *w, int ttype, PyObject *v, PyObject *field)
{
    if (!PyLong_Check(v) || PyBool_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%U: expected an int for %s, got %s", field,
                     type_name(ttype), Py_TYPE(v)->tp_name);
        return -1;
    }
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    long long lo = ttype == T_BYTE ? INT8_MIN : ttype == T_I16 ? INT16_MIN
                 : ttype == T_I32 ? INT32_MIN : INT64_MIN;
    long long hi = ttype == T_BYTE ? INT8_MAX : ttype == T_I16 ? INT16_MAX
                 : ttype == T_I32 ? INT32_MAX : INT64_MAX;
    if (overflow || x < lo || x > hi) {
        PyErr_Format(PyExc_OverflowError, "%U: %R is out of range for %s", field, v,
                     type_name(ttype));
        return -1;
    }
    if (ttype == T_BYTE)
        return w_byte(w, (int)(x & 0xff));
    if (w->proto == PROTO_COMPACT)
        return w_varint(w, ttype == T_I64 ? zigzag(x) : (uint32_t)zigzag(x));
    return w_be(w, (uint64_t)x, ttype == T_I16 ? 2 : ttype == T_I32 ? 4 : 8);
}

static int
enc_string(Writer *w, PyObject *v, PyObject *field)
{
    if (PyUnicode_Check(v)) {
        Py_ssize_t n = 0;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s == NULL)
            return -1;
        if (n > INT32_MAX)
            goto too_long;
        if (w_size(w, n) < 0)
            return -1;
        return w_raw(w, s, n);
    }
    if (PyBytes_Check(v)) {
        Py_ssize_t n = PyBytes_GET_SIZE(v);
        if (n > INT32_MAX)
            goto too_long;
        if (w_size(w, n) < 0)
            return -1;
        return w_raw(w, PyBytes_AS_STRING(v), n);
    }
    if (PyByteArray_Check(v) || PyMemoryView_Check(v)) {
        /* A subclass may define __buffer__ (3.12): Python code that may change anything but
         * the view it returns, which we hold until its bytes are copied. */
        Py_buffer view;
        if (PyObject_GetBuffer(v, &view, PyBUF_SIMPLE) < 0)
            return -1;
        int rc = view.len > INT32_MAX ? -2
                 : (w_size(w, view.len) < 0 || w_raw(w, view.buf, view.len) < 0) ? -1 : 0;
        PyBuffer_Release(&view);
        if (rc == -2)
            goto too_long;
        return rc;
    }
    PyErr_Format(PyExc_TypeError, "%U: expected str or bytes, got %s", field,
                 Py_TYPE(v)->tp_name);
    return -1;
too_long:
    PyErr_Format(PyExc_OverflowError, "%U: a string of over 2**31-1 bytes", field);
    return -1;
}

/* A bool's value: 1 or 0, or -1 with an error for anything but a bool (see enc_int). */
static int
bool_value(PyObject *v, PyObject *field)
{
    if (v == Py_True)
        return 1;
    if (v == Py_False)
        return 0;
    PyErr_Format(PyExc_TypeError, "%U: expected a bool, got %s", field, Py_TYPE(v)->tp_name);
    return -1;
}

static int
enc_list_header(Writer *w, int etype, Py_ssize_t n)
{
    if (w->proto == PROTO_BINARY) {
        if (w_byte(w, wire_of(etype)) < 0)
            return -1;
        return w_be(w, (uint32_t)n, 4);
    }
    int ct = t_to_ct(etype);
    if (n < 15)
        return w_byte(w, (int)(n << 4) | ct);
    if (w_byte(w, 0xf0 | ct) < 0)
        return -1;
    return w_varint(w, (uint64_t)n);
}

/* The element `i` of a list that held `n` when its header was written, as a new reference:
 * encoding an element may run Python code (a property of a struct, a set subclass's __iter__,
 * a __buffer__) that changes the list, which would free the elements under a borrowed pointer.
 * A list that changed size is an error, as it is for Python's own iteration. */
static PyObject *
list_item(PyObject *list, Py_ssize_t i, Py_ssize_t n, PyObject *field)
{
    if (PyList_GET_SIZE(list) != n) {
        PyErr_Format(PyExc_RuntimeError, "%U: the list changed size while it was encoded",
                     field);
        return NULL;
    }
    return Py_NewRef(PyList_GET_ITEM(list, i));
}

static int
enc_list(Writer *w, const TypeInfo *ti, PyObject *v, PyObject *field)
{
    if (!PyList_Check(v) && !PyTuple_Check(v) && !PyAnySet_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%U: expected a list, set or tuple for %s, got %s", field,
                     type_name(ti->ttype), Py_TYPE(v)->tp_name);
        return -1;
    }
    /* A list or tuple itself; a set as a new list that only we hold. */
    PyObject *seq = PySequence_Fast(v, "expected a list, set or tuple");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int rc = -1;
    if (n > INT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "%U: over 2**31-1 elements", field);
        goto done;
    }
    if (enc_list_header(w, ti->a->ttype, n) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* A list may change under us (see list_item); a tuple cannot. */
        PyObject *item = PyTuple_Check(seq) ? Py_NewRef(PyTuple_GET_ITEM(seq, i))
                                            : list_item(seq, i, n, field);
        if (item == NULL)
            goto done;
        int bad_item = enc_value(w, ti->a, item, field) < 0;
        Py_DECREF(item);
        if (bad_item)
            goto done;
    }
    if (!PyTuple_Check(seq) && PyList_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_RuntimeError, "%U: the list changed size while it was encoded",
                     field);
        goto done;
    }
    rc = 0;
done:
    Py_DECREF(seq);
    return rc;
}

static int
enc_map(Writer *w, const TypeInfo *ti, PyObject *v, PyObject *field)
{
    PyObject *items = NULL;
    Py_ssize_t n = 0;
    if (PyDict_Check(v)) {
        n = PyDict_GET_SIZE(v);
    } else {
        /* A tuple of our own: items() may return a list its mapping keeps and changes. */
        PyObject *listed = PyMapping_Check(v) && !PyList_Check(v) && !PyTuple_Check(v) &&
                                   !PyUnicode_Check(v) && !PyBytes_Check(v) &&
                                   !PyByteArray_Check(v) && !PyMemoryView_Check(v)
                               ? PyMapping_Items(v)
                               : NULL;
        items = listed != NULL ? PySequence_Tuple(listed) : NULL;
        Py_XDECREF(listed);
        if (items == NULL) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%U: expected a dict for map, got %s", field,
                         Py_TYPE(v)->tp_name);
            return -1;
        }
        n = PyTuple_GET_SIZE(items);
    }
    int rc = -1;
    if (n > INT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "%U: over 2**31-1 entries", field);
        goto done;
    }
    int kt = ti->a->ttype, vt = ti->b->ttype;
    if (w->proto == PROTO_BINARY) {
        if (w_byte(w, wire_of(kt)) < 0 || w_byte(w, wire_of(vt)) < 0 ||
            w_be(w, (uint32_t)n, 4) < 0)
            goto done;
    } else {
        if (w_varint(w, (uint64_t)n) < 0)
            goto done;
        if (n && w_byte(w, (t_to_ct(kt) << 4) | t_to_ct(vt)) < 0)
            goto done;
    }
    if (items == NULL) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        Py_ssize_t seen = 0;
        /* Encoding a key or value may run Python code (a struct's property, a __buffer__)
         * that changes the dict: each pair is held while it is encoded, and a size change is
         * an error, as it is for Python's own iteration. PyDict_Next itself stays in bounds. */
        while (PyDict_Next(v, &pos, &key, &value)) {
            Py_INCREF(key);
            Py_INCREF(value);
            int bad_kv = enc_value(w, ti->a, key, field) < 0 ||
                         enc_value(w, ti->b, value, field) < 0;
            Py_DECREF(key);
            Py_DECREF(value);
            if (bad_kv)
                goto done;
            seen++;
            if (PyDict_GET_SIZE(v) != n)
                break;
        }
        if (seen != n || PyDict_GET_SIZE(v) != n) {
            PyErr_Format(PyExc_RuntimeError, "%U: the dict changed size while encoded", field);
            goto done;
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *pair = PyTuple_GET_ITEM(items, i);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
                PyErr_Format(PyExc_TypeError, "%U: items() must give pairs", field);
                goto done;
            }
            if (enc_value(w, ti->a, PyTuple_GET_ITEM(pair, 0), field) < 0 ||
                enc_value(w, ti->b, PyTuple_GET_ITEM(pair, 1), field) < 0)
                goto done;
        }
    }
    rc = 0;
done:
    Py_XDECREF(items);
    return rc;
}

/* One field, header and value; compact's field ids are deltas from the previous field's. */
static int
enc_field(Writer *w, const FieldInfo *f, PyObject *v, int *last_fid)
{
    int t = f->type.ttype;
    if (w->proto == PROTO_BINARY) {
        if (w_byte(w, wire_of(t)) < 0 || w_be(w, (uint16_t)f->fid, 2) < 0)
            return -1;
        return enc_value(w, &f->type, v, f->name);
    }
    int ct = t_to_ct(t);
    if (t == T_BOOL) {
        int truth = bool_value(v, f->name);
        if (truth < 0)
            return -1;
        ct = truth ? 1 : 2;
    }
    int delta = f->fid - *last_fid;
    int rc = delta > 0 && delta <= 15
                 ? w_byte(w, (delta << 4) | ct)
                 : (w_byte(w, ct) < 0 || w_varint(w, (uint32_t)zigzag(f->fid)) < 0 ? -1 : 0);
    *last_fid = f->fid;
    if (rc < 0 || t == T_BOOL) /* a compact bool field's value is in its header */
        return rc;
    return enc_value(w, &f->type, v, f->name);
}

/* After getattr failed: 1 when the attribute is missing, which leaves its field unset as
 * thriftpy2 does (an attribute deleted from the instance, a slot never assigned, a __getattr__
 * that knows no such name); 0 when it is an error to pass on: anything but an AttributeError,
 * or an AttributeError raised by a property or another descriptor of the class, which is the
 * handler's bug and not an unset field. */
static int
attribute_is_missing(PyObject *obj, PyObject *name)
{
    if (!PyErr_ExceptionMatches(PyExc_AttributeError))
        return 0;
    /* The lookup may compare names (a str subclass's __eq__), so not with an exception set. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *exc_type, *exc, *exc_tb;
    PyErr_Fetch(&exc_type, &exc, &exc_tb);
#endif
    PyObject *attr = _PyType_Lookup(Py_TYPE(obj), name); /* borrowed, used at once */
    int missing = attr == NULL || Py_TYPE(attr) == &PyMemberDescr_Type ||
                  Py_TYPE(attr)->tp_descr_get == NULL;
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(exc_type, exc, exc_tb);
#endif
    return missing;
}

static int
enc_struct(Writer *w, const StructSpec *spec, PyObject *obj, PyObject *field)
{
    if (spec->state != SPEC_READY) {
        PyErr_Format(PyExc_TypeError, "%R has a spec kitegreen cannot compile", spec->cls);
        return -1;
    }
    if (!PyObject_TypeCheck(obj, (PyTypeObject *)spec->cls)) {
        PyErr_Format(PyExc_TypeError, "%U: expected %s, got %s", field,
                     ((PyTypeObject *)spec->cls)->tp_name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (--w->depth < 0) {
        w->depth++;
        /* A struct that contains itself (a cycle) would otherwise recurse until the C stack
         * overflows. */
        PyErr_Format(PyExc_ValueError, "%U: structs and containers nested deeper than %d levels",
                     field, MAX_DEPTH);
        return -1;
    }
    int last_fid = 0;
    for (Py_ssize_t i = 0; i < spec->nfields; i++) {
        const FieldInfo *f = &spec->fields[i];
        PyObject *v = PyObject_GetAttr(obj, f->name);
        if (v == NULL) {
            if (!attribute_is_missing(obj, f->name))
                return -1;
            PyErr_Clear();
            continue;
        }
        int rc = v == Py_None ? 0 : enc_field(w, f, v, &last_fid);
        Py_DECREF(v);
        if (rc < 0)
            return -1;
    }
    w->depth++;
    return w_byte(w, T_STOP);
}

/* Count one value about to be encoded against the writer's budget, and every `slice` values
 * let go of the GIL for a moment, as charge() does for a decode: an encode in a worker thread
 * lets the hub's thread run between values. Nothing here touches a Python object while the GIL
 * is released, and everything the encoder holds across it is an owned reference (the
 * hardening against Python code run by a value's hooks covers any code another thread runs
 * meanwhile); the output is the writer's own memory. */
static inline int
tick(Writer *w)
{
    if (--w->values_left < 0) {
        PyErr_SetString(EncodeBudgetExceeded, "the reply has more values than its budget");
        return -1;
    }
    if (w->slice && --w->until_release <= 0) {
        w->until_release = w->slice;
        let_others_in();
    }
    return 0;
}

static int
enc_value(Writer *w, const TypeInfo *ti, PyObject *v, PyObject *field)
{
    if (tick(w) < 0)
        return -1;
    switch (ti->ttype) {
    case T_BOOL: {
        int truth = bool_value(v, field);
        if (truth < 0)
            return -1;
        return w_byte(w, w->proto == PROTO_COMPACT ? (truth ? 1 : 2) : truth);
    }
    case T_BYTE: case T_I16: case T_I32: case T_I64:
        return enc_int(w, ti->ttype, v, field);
    case T_DOUBLE: {
        if (!PyFloat_Check(v) && (!PyLong_Check(v) || PyBool_Check(v))) {
            PyErr_Format(PyExc_TypeError, "%U: expected a float for double, got %s", field,
                         Py_TYPE(v)->tp_name);
            return -1;
        }
        /* Read without the type's __float__, which an int subclass may define. */
        double d = PyFloat_Check(v) ? PyFloat_AS_DOUBLE(v) : PyLong_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred())
            return -1;
        uint64_t bits;
        memcpy(&bits, &d, 8);
        if (w->proto == PROTO_BINARY)
            return w_be(w, bits, 8);
        RESERVE(w, 8);
        for (int i = 0; i < 8; i++)
            w->buf[w->len++] = (char)((bits >> (8 * i)) & 0xff);
        return 0;
    }
    case T_STRING: case T_BINARY:
        return enc_string(w, v, field);
    case T_LIST: case T_SET: {
        if (--w->depth < 0) {
            w->depth++;
            PyErr_Format(PyExc_ValueError, "%U: nested deeper than %d levels", field, MAX_DEPTH);
            return -1;
        }
        int rc = enc_list(w, ti, v, field);
        w->depth++;
        return rc;
    }
    case T_MAP: {
        if (--w->depth < 0) {
            w->depth++;
            PyErr_Format(PyExc_ValueError, "%U: nested deeper than %d levels", field, MAX_DEPTH);
            return -1;
        }
        int rc = enc_map(w, ti, v, field);
        w->depth++;
        return rc;
    }
    case T_STRUCT:
        return enc_struct(w, (const StructSpec *)ti->spec, v, field);
    default:
        PyErr_Format(PyExc_TypeError, "%U: cannot encode thrift type %d", field, ti->ttype);
        return -1;
    }
}

static PyObject *RESULT_NAME; /* "result": what encoding errors call the top struct */

/* A message header, after room for the frame length when `framed`. */
static int
begin_message(Writer *w, int proto, PyObject *const *args, int framed)
{
    if (!PyUnicode_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "name must be str, got %s", Py_TYPE(args[0])->tp_name);
        return -1;
    }
    long mtype = PyLong_AsLong(args[1]);
    if (mtype == -1 && PyErr_Occurred())
        return -1;
    long long seqid = PyLong_AsLongLong(args[2]);
    if (seqid == -1 && PyErr_Occurred())
        return -1;
    if (mtype < 1 || mtype > 4 || seqid < INT32_MIN || seqid > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "bad message type %ld or sequence id %lld", mtype, seqid);
        return -1;
    }
    Py_ssize_t name_len;
    const char *name = PyUnicode_AsUTF8AndSize(args[0], &name_len);
    if (name == NULL)
        return -1;
    if (name_len > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "a message name of over 2**31-1 bytes");
        return -1;
    }
    if (framed)
        w->len = 4; /* the frame length, filled in by end_message */
    if (proto == PROTO_BINARY)
        return w_be(w, 0x80010000u | (uint32_t)mtype, 4) < 0 ||
               w_be(w, (uint32_t)name_len, 4) < 0 || w_raw(w, name, name_len) < 0 ||
               w_be(w, (uint32_t)(int32_t)seqid, 4) < 0 ? -1 : 0;
    return w_byte(w, 0x82) < 0 || w_byte(w, (int)(mtype << 5) | 1) < 0 ||
           w_varint(w, (uint32_t)(int32_t)seqid) < 0 || w_varint(w, (uint64_t)name_len) < 0 ||
           w_raw(w, name, name_len) < 0 ? -1 : 0;
}

/* The message's bytes (rc == 0), the frame length filled in; frees the writer either way. */
static PyObject *
end_message(Writer *w, int framed, int rc)
{
    PyObject *out = NULL;
    if (rc == 0 && framed && w->len - 4 > INT32_MAX) {
        /* The frame length is an i32: a longer reply has no frame a peer could read. */
        PyErr_Format(PyExc_OverflowError, "a framed message of %zd bytes, over 2**31-1",
                     w->len - 4);
        rc = -1;
    }
    if (rc == 0) {
        if (framed) {
            uint32_t n = (uint32_t)(w->len - 4);
            w->buf[0] = (char)(n >> 24);
            w->buf[1] = (char)(n >> 16);
            w->buf[2] = (char)(n >> 8);
            w->buf[3] = (char)n;
        }
        out = PyBytes_FromStringAndSize(w->buf, w->len);
    }
    if (w->buf != w->small)
        PyMem_Free(w->buf);
    return out;
}

static void
init_writer(Writer *w, int proto)
{
    w->buf = w->small;
    w->len = 0;
    w->cap = SMALL_OUT;
    w->proto = proto;
    w->depth = MAX_DEPTH;
    w->values_left = PY_SSIZE_T_MAX;
    w->slice = w->until_release = 0;
}

/* The optional last two arguments of write_message and write_result: the most values the
 * message may hold (EncodeBudgetExceeded past it, raised before the encode goes on) and the
 * slice (values between two releases of the GIL; 0: never). */
static int
get_encode_budget(Writer *w, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t base)
{
    if (nargs == base)
        return 0;
    Py_ssize_t values = PyLong_AsSsize_t(args[base]);
    if (values == -1 && PyErr_Occurred())
        return -1;
    Py_ssize_t slice = PyLong_AsSsize_t(args[base + 1]);
    if (slice == -1 && PyErr_Occurred())
        return -1;
    if (values < 0 || slice < 0) {
        PyErr_SetString(PyExc_ValueError, "values and slice must be >= 0");
        return -1;
    }
    w->values_left = values;
    w->slice = w->until_release = slice;
    return 0;
}

static int
check_encode_nargs(const char *fname, Py_ssize_t nargs, Py_ssize_t base)
{
    return nargs == base + 2 ? 0 : check_nargs(fname, nargs, base);
}

/* write_message(proto, name, mtype, seqid, obj, spec, framed) -> bytes */
static PyObject *
mod_write_message(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    int proto, framed;
    const StructSpec *spec;
    if (check_encode_nargs("write_message", nargs, 7) < 0 || get_proto(args[0], &proto) < 0 ||
        get_spec(args[5], &spec) < 0 || (framed = PyObject_IsTrue(args[6])) < 0)
        return NULL;
    Writer w;
    init_writer(&w, proto);
    if (get_encode_budget(&w, args, nargs, 7) < 0)
        return NULL;
    int rc = begin_message(&w, proto, args + 1, framed);
    if (rc == 0)
        rc = enc_struct(&w, spec, args[4], RESULT_NAME);
    return end_message(&w, framed, rc);
}

/* write_result(proto, name, mtype, seqid, fid, value, spec, framed) -> bytes: a message whose
 * struct has one field, `fid` of `spec`, set to `value` (none when value is None). A reply
 * needs no result object: this is the message thriftpy2 would write for one. */
static PyObject *
mod_write_result(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    int proto, framed;
    const StructSpec *spec;
    if (check_encode_nargs("write_result", nargs, 8) < 0 || get_proto(args[0], &proto) < 0 ||
        get_spec(args[6], &spec) < 0 || (framed = PyObject_IsTrue(args[7])) < 0)
        return NULL;
    long fid = PyLong_AsLong(args[4]);
    if (fid == -1 && PyErr_Occurred())
        return NULL;
    if (fid < INT16_MIN || fid > INT16_MAX) {
        /* Not cast to an int: 2**32 would become field 0, the success field. */
        PyErr_Format(PyExc_OverflowError, "field id %ld is not an i16", fid);
        return NULL;
    }
    PyObject *value = args[5];
    const FieldInfo *f = NULL;
    if (value != Py_None && (f = find_field(spec, (int)fid)) == NULL) {
        PyErr_Format(PyExc_TypeError, "%R has no field %ld", spec->cls, fid);
        return NULL;
    }
    Writer w;
    init_writer(&w, proto);
    if (get_encode_budget(&w, args, nargs, 8) < 0)
        return NULL;
    int rc = begin_message(&w, proto, args + 1, framed);
    int last_fid = 0;
    if (rc == 0 && f != NULL)
        rc = enc_field(&w, f, value, &last_fid);
    if (rc == 0)
        rc = w_byte(&w, T_STOP);
    return end_message(&w, framed, rc);
}

/* ---- letting go of large values piecemeal -------------------------------------------------- */

/* Freeing a decoded list of 1M structs is one Py_DECREF that runs ~140 ms, with no point where
 * another greenlet could run. release() takes a value apart from its end instead, a bounded
 * number of steps a call, so that the request loop can yield between calls. Only what the
 * holder owns alone (a reference count of 1 all the way down) is taken apart; anything shared
 * is only let go of. An exact list, dict or set gives up its items; any other object the
 * cyclic GC knows (a struct, a tuple) is looked through, with tp_traverse, for such a
 * container among its children. No Python code runs while a value is being looked at. */

#define RELEASE_DEPTH 16

static int has_work(PyObject *o, int depth);

typedef struct {
    PyObject *found;
    int depth;
} Search;

static int
visit_work(PyObject *o, void *arg)
{
    Search *s = (Search *)arg;
    if (o != NULL && Py_REFCNT(o) == 1 && has_work(o, s->depth)) {
        s->found = o;
        return 1;
    }
    return 0;
}

/* The container inside o, owned alone, that has items to give up; NULL if none. */
static PyObject *
find_work(PyObject *o, int depth)
{
    if ((PyList_CheckExact(o) && PyList_GET_SIZE(o) > 0) ||
        (PyDict_CheckExact(o) && PyDict_GET_SIZE(o) > 0) ||
        (PySet_CheckExact(o) && PySet_GET_SIZE(o) > 0))
        return o;
    if (depth <= 0 || PyList_CheckExact(o) || PyDict_CheckExact(o) || PySet_CheckExact(o) ||
        !PyObject_IS_GC(o) || Py_TYPE(o)->tp_traverse == NULL)
        return NULL;
    Search s = {NULL, depth - 1};
    Py_TYPE(o)->tp_traverse(o, visit_work, &s);
    return s.found == NULL ? NULL : find_work(s.found, depth - 1);
}

static int
has_work(PyObject *o, int depth)
{
    return find_work(o, depth) != NULL;
}

/* Take apart the last item of the list `holder`, moving what it gives up onto holder's end,
 * for at most `steps` steps: 1 once holder is empty, 0 if not yet, -1 on error. */
static int
release_steps(PyObject *holder, Py_ssize_t steps)
{
    for (; steps > 0; steps--) {
        Py_ssize_t size = PyList_GET_SIZE(holder);
        if (size == 0)
            break;
        PyObject *top = PyList_GET_ITEM(holder, size - 1);
        PyObject *from = Py_REFCNT(top) == 1 ? find_work(top, RELEASE_DEPTH) : NULL;
        if (from == NULL) {
            /* Shared, or nothing left inside worth a step: let go of it. */
            if (PyList_SetSlice(holder, size - 1, size, NULL) < 0)
                return -1;
            continue;
        }
        PyObject *item;
        if (PyList_CheckExact(from)) {
            Py_ssize_t n = PyList_GET_SIZE(from);
            item = Py_XNewRef(PyList_GET_ITEM(from, n - 1)); /* NULL in a list being built */
            if (PyList_SetSlice(from, n - 1, n, NULL) < 0) {
                Py_XDECREF(item);
                return -1;
            }
            if (item == NULL)
                continue;
        } else if (PyDict_CheckExact(from)) {
            item = PyObject_CallMethod(from, "popitem", NULL); /* a (key, value) tuple */
        } else {
            item = PySet_Pop(from);
        }
        if (item == NULL)
            return -1;
        int rc = PyList_Append(holder, item);
        Py_DECREF(item);
        if (rc < 0)
            return -1;
    }
    return PyList_GET_SIZE(holder) == 0;
}

/* release(holder, steps) -> bool: release_steps() for Python; True once holder is empty. */
static PyObject *
mod_release(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (check_nargs("release", nargs, 2) < 0)
        return NULL;
    PyObject *holder = args[0];
    if (!PyList_CheckExact(holder)) {
        PyErr_Format(PyExc_TypeError, "release() takes a list, got %s",
                     Py_TYPE(holder)->tp_name);
        return NULL;
    }
    Py_ssize_t steps = PyLong_AsSsize_t(args[1]);
    if (steps == -1 && PyErr_Occurred())
        return NULL;
    int rc = release_steps(holder, steps);
    return rc < 0 ? NULL : Py_NewRef(rc ? Py_True : Py_False);
}

static PyObject *
mod_compile(PyObject *mod, PyObject *cls)
{
    (void)mod;
    if (!PyType_Check(cls)) {
        PyErr_Format(PyExc_TypeError, "compile() takes a thriftpy2 struct class, got %R", cls);
        return NULL;
    }
    return compile_spec(cls);
}

static PyMethodDef module_methods[] = {
    {"compile", (PyCFunction)mod_compile, METH_O,
     "compile(cls) -> StructSpec\n\nCompile a thriftpy2 struct class's thrift_spec (cached)."},
    {"scan", (PyCFunction)(void (*)(void))mod_scan, METH_FASTCALL,
     "scan(protocol, buf, start, end, max_size) -> int | Scanner\n\nFind where the message "
     "that begins at buf[start] ends, without decoding it: the offset just past it, or a "
     "Scanner to feed when more bytes arrive. Raises ProtocolError on malformed bytes and "
     "FrameTooLarge when the message cannot fit max_size bytes."},
    {"frame_end", (PyCFunction)(void (*)(void))mod_frame_end, METH_FASTCALL,
     "frame_end(buf, start, end, max_size) -> int\n\nWhere the frame (4-byte length, then "
     "its bytes) that begins at buf[start] ends, or -1 while buf[start:end] does not hold it "
     "all. Raises ProtocolError for a length <= 0, FrameTooLarge for one over max_size."},
    {"read_message_begin", (PyCFunction)(void (*)(void))mod_read_message_begin, METH_FASTCALL,
     "read_message_begin(protocol, buf, start, end) -> (name, mtype, seqid, offset)"},
    {"read_struct", (PyCFunction)(void (*)(void))mod_read_struct, METH_FASTCALL,
     "read_struct(protocol, buf, start, end, spec) -> object\n\nDecode the struct that fills "
     "buf[start:end] exactly."},
    {"write_message", (PyCFunction)(void (*)(void))mod_write_message, METH_FASTCALL,
     "write_message(protocol, name, mtype, seqid, obj, spec, framed[, values, slice]) -> bytes"
     "\n\nWith values and slice: raise EncodeBudgetExceeded as soon as the message would hold "
     "more than values values, and let go of the GIL every slice values (0: never)."},
    {"write_result", (PyCFunction)(void (*)(void))mod_write_result, METH_FASTCALL,
     "write_result(protocol, name, mtype, seqid, fid, value, spec, framed[, values, slice]) -> "
     "bytes\n\nA message whose struct holds one field of spec, fid, set to value (no field for "
     "None); values and slice as for write_message."},
    {"read_args", (PyCFunction)(void (*)(void))mod_read_args, METH_FASTCALL,
     "read_args(protocol, buf, start, end, spec) -> tuple\n\nDecode the struct that fills "
     "buf[start:end] into a tuple of its fields in spec order, defaults for those absent."},
    {"release", (PyCFunction)(void (*)(void))mod_release, METH_FASTCALL,
     "release(holder, steps) -> bool\n\nTake the value in the list holder apart from its end, "
     "at most steps steps (what is shared is only let go of); True once holder is empty."},
    {"read_args_within", (PyCFunction)(void (*)(void))mod_read_args_within, METH_FASTCALL,
     "read_args_within(protocol, buf, start, end, spec, budget, slice) -> (tuple, cost)\n\n"
     "read_args() that raises MemoryBudgetExceeded as soon as the memory its objects take, "
     "estimated, passes budget bytes; lets go of the GIL every slice objects (0: never); "
     "cost is the estimate of what the tuple holds."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kitegreen.codec._thrift",
    .m_doc = "Thrift binary and compact for kitegreen: hardened decoding of whole messages.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__thrift(void)
{
    if (PyType_Ready(&StructSpecType) < 0 || PyType_Ready(&ScannerType) < 0)
        return NULL;
    PyObject *errors = PyImport_ImportModule("kitegreen.exceptions");
    if (errors == NULL)
        return NULL;
    ProtocolError = PyObject_GetAttrString(errors, "ProtocolError");
    FrameTooLarge = PyObject_GetAttrString(errors, "FrameTooLarge");
    MemoryBudgetExceeded = PyObject_GetAttrString(errors, "MemoryBudgetExceeded");
    PyObject *root = PyObject_GetAttrString(errors, "KitegreenError");
    Py_DECREF(errors);
    if (ProtocolError == NULL || FrameTooLarge == NULL || MemoryBudgetExceeded == NULL ||
        root == NULL)
        return NULL;
    /* Not an error a caller sees: the request loop's signal to encode the reply off the hub. */
    EncodeBudgetExceeded = PyErr_NewExceptionWithDoc(
        "kitegreen.codec._thrift.EncodeBudgetExceeded",
        "A message holds more values than the budget write_message or write_result was given.",
        root, NULL);
    Py_DECREF(root);
    if (EncodeBudgetExceeded == NULL)
        return NULL;
    PyObject *copy = PyImport_ImportModule("copy");
    if (copy == NULL)
        return NULL;
    deepcopy = PyObject_GetAttrString(copy, "deepcopy");
    Py_DECREF(copy);
    if (deepcopy == NULL)
        return NULL;
    spec_cache = PyDict_New();
    empty_tuple = PyTuple_New(0);
    RESULT_NAME = PyUnicode_InternFromString("result");
    if (spec_cache == NULL || empty_tuple == NULL || RESULT_NAME == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "BINARY", PROTO_BINARY) < 0 ||
        PyModule_AddIntConstant(m, "COMPACT", PROTO_COMPACT) < 0 ||
        PyModule_AddObjectRef(m, "StructSpec", (PyObject *)&StructSpecType) < 0 ||
        PyModule_AddObjectRef(m, "Scanner", (PyObject *)&ScannerType) < 0 ||
        PyModule_AddObjectRef(m, "EncodeBudgetExceeded", EncodeBudgetExceeded) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
