/*
 * kitegreen.codec._headers: TTHeader (Kitex, kite) and THeader (Apache Thrift, fbthrift) frames,
 * parsed and built in C. The layout, the limits and the reasons for them are documented in
 * kitegreen/codec/headers.py, which wraps this module; the messages of every refusal are the
 * ones the Python parser gave (tests/headers_reference.py keeps it as the tests' oracle).
 *
 * The same rule as _thrift.c: a frame comes from a peer, so every size, count and length it
 * announces is checked against the bytes present before anything is read or allocated for it,
 * and every loop consumes bytes on each step. At most MAX_ENTRIES key-values in MAX_BLOCKS info
 * blocks are read from one frame.
 *
 * parse() reads the fixed part and the header, and for TTHeader removes Kitex's inner framing;
 * THeader's zlib transform is undone in Python (headers.py), which bounds the inflation. No
 * borrowed reference is held across a call into Python: the only Python calls made while the
 * buffer is held are allocations of strings, ints, dicts and the result.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define FIXED_SIZE 14
#define MAX_LENGTH 0x3FFFFFFFL
#define MAX_HEADER_SIZE (4 * 0xFFFF)
#define MAX_ENTRIES 1000
#define MAX_BLOCKS 16
#define TTHEADER_MAGIC 0x1000
#define THEADER_MAGIC 0x0FFF
#define TRANSFORM_ZLIB 1

static PyObject *ProtocolError;
static PyObject *FrameTooLarge;
static PyObject *S_TTHEADER; /* "ttheader" */
static PyObject *S_THEADER;  /* "theader" */
static PyObject *S_BINARY;   /* "binary" */
static PyObject *S_COMPACT;  /* "compact" */
static PyObject *EMPTY_TUPLE;
static PyObject *ZLIB_TUPLE; /* (1,) */

/* kitegreen.codec._thrift's protocol numbers (BINARY, COMPACT; checked in headers.py). */
#define CODEC_BINARY 0
#define CODEC_COMPACT 2

#define INT_KEY_LOG_ID 2       /* gopkg metakey.go: LogID */
#define INT_KEY_RPC_TIMEOUT 12 /* RPCTimeout */
#define INT_KEY_MSG_TYPE 22    /* MsgType, which Kitex's server writes in its replies */

/* The readers below run for every field of every header: inlined, their error paths kept out
 * of line (truncated(), fail()). */
#if defined(__GNUC__)
#define READER static inline __attribute__((always_inline))
#else
#define READER static inline
#endif


/* -- errors -------------------------------------------------------------------------------- */

/* A ProtocolError (or FrameTooLarge) with a printf-formatted message; returns NULL. */
static PyObject *
fail(PyObject *type, const char *fmt, ...)
{
    char message[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    PyErr_SetString(type, message);
    return NULL;
}

/* -- reading ------------------------------------------------------------------------------- */

/* A header region; pos and end are offsets into the frame, so that messages can say where. */
typedef struct {
    const uint8_t *buf;
    Py_ssize_t pos;
    Py_ssize_t end;
    const char *name; /* "TTHeader" or "THeader" */
    int blocks;
} Cursor;

#if defined(__GNUC__)
__attribute__((noinline, cold))
#endif
static int
truncated(Cursor *c, const char *what, long long needed)
{
    fail(ProtocolError,
         "%s header truncated: %s needs %lld bytes at header offset %zd, %zd remain", c->name,
         what, needed, c->pos - FIXED_SIZE, c->end - c->pos);
    return -1;
}

static int
block(Cursor *c)
{
    if (++c->blocks > MAX_BLOCKS) {
        fail(ProtocolError, "%s header has more than %d info blocks", c->name, MAX_BLOCKS);
        return -1;
    }
    return 0;
}

READER int
u8(Cursor *c, const char *what, unsigned *out)
{
    if (c->pos >= c->end)
        return truncated(c, what, 1);
    *out = c->buf[c->pos++];
    return 0;
}

READER int
u16(Cursor *c, const char *what, unsigned *out)
{
    if (c->end - c->pos < 2)
        return truncated(c, what, 2);
    *out = ((unsigned)c->buf[c->pos] << 8) | c->buf[c->pos + 1];
    c->pos += 2;
    return 0;
}

/* An unsigned LEB128 varint of at most five bytes and 32 bits. */
static int
varint(Cursor *c, const char *what, uint64_t *out)
{
    uint64_t value = 0;
    int shift = 0;
    for (int i = 0; i < 5; i++) {
        unsigned byte;
        if (u8(c, what, &byte) < 0)
            return -1;
        value |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            if (value > 0xFFFFFFFFu) {
                fail(ProtocolError, "%s %s: varint exceeds 32 bits", c->name, what);
                return -1;
            }
            *out = value;
            return 0;
        }
        shift += 7;
    }
    fail(ProtocolError, "%s %s: varint longer than 5 bytes", c->name, what);
    return -1;
}

/* size bytes at p as text: UTF-8, any other byte b as the lone surrogate U+DC00+b. ASCII
 * (a log id, a service name: nearly every header value) is copied into a new str directly,
 * 8 bytes tested at a time: PyUnicode_DecodeUTF8 with an error handler costs ~265
 * instructions for a 30-byte log id, this ~195 (callgrind, the str's allocation included). */
static PyObject *
decode_text(const uint8_t *p, Py_ssize_t size)
{
    Py_ssize_t i = 0;
    uint64_t high = 0;
    for (; i + 8 <= size; i += 8) {
        uint64_t word;
        memcpy(&word, p + i, 8);
        high |= word;
    }
    for (; i < size; i++)
        high |= p[i];
    if (high & UINT64_C(0x8080808080808080))
        return PyUnicode_DecodeUTF8((const char *)p, size, "surrogateescape");
    PyObject *s = PyUnicode_New(size, 127);
    if (s != NULL)
        memcpy(PyUnicode_DATA(s), p, (size_t)size);
    return s;
}

/* size bytes as text (see decode_text()). */
static PyObject *
text(Cursor *c, uint64_t size, const char *what)
{
    if (size > (uint64_t)(c->end - c->pos)) {
        truncated(c, what, (long long)size);
        return NULL;
    }
    PyObject *s = decode_text(c->buf + c->pos, (Py_ssize_t)size);
    c->pos += (Py_ssize_t)size;
    return s;
}

/* Check that size bytes are there, and step over them (a header only validated, not read). */
READER int
skip(Cursor *c, uint64_t size, const char *what)
{
    if (size > (uint64_t)(c->end - c->pos))
        return truncated(c, what, (long long)size);
    c->pos += (Py_ssize_t)size;
    return 0;
}

/* Check a block's announced count before reading any of it; *total counts entries so far. */
static int
entries(Cursor *c, uint64_t count, int least, long long *total, const char *what)
{
    Py_ssize_t left = c->end - c->pos;
    if (count * (uint64_t)least > (uint64_t)left) {
        fail(ProtocolError,
             "%s %s block announces %llu entries, but only %zd header bytes remain (an entry "
             "takes at least %d)",
             c->name, what, (unsigned long long)count, left, least);
        return -1;
    }
    *total += (long long)count;
    if (*total > MAX_ENTRIES) {
        fail(ProtocolError, "%s header carries %lld key-values or more; at most %d are accepted",
             c->name, *total, MAX_ENTRIES);
        return -1;
    }
    return 0;
}

/* The rest of the header, after a padding id, must be zeros. */
static int
padding(Cursor *c)
{
    for (Py_ssize_t i = c->pos; i < c->end; i++) {
        if (c->buf[i]) {
            fail(ProtocolError,
                 "%s padding holds 0x%02x at header offset %zd; padding must be zeros to the "
                 "end of the header",
                 c->name, c->buf[i], i - FIXED_SIZE);
            return -1;
        }
    }
    c->pos = c->end;
    return 0;
}

/* Read one key (text or u16 integer) and its text value into the dict; -1 on error. */
static int
put(PyObject *into, PyObject *key, PyObject *value)
{
    if (key == NULL || value == NULL) {
        Py_XDECREF(key);
        Py_XDECREF(value);
        return -1;
    }
    int rc = PyDict_SetItem(into, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    return rc;
}

typedef struct {
    unsigned protocol_id;
    PyObject *protocol;   /* borrowed: S_BINARY or S_COMPACT */
    PyObject *transforms; /* borrowed: EMPTY_TUPLE or ZLIB_TUPLE */
    PyObject *int_info;   /* new; NULL: validate the key-values without reading them */
    PyObject *str_info;   /* new; NULL with int_info */
    PyObject *acl_token;  /* new, or NULL */
    /* Where the last LOG_ID and RPC_TIMEOUT values are (offsets in the header), -1 if absent:
     * noted while validating, so that the request loop reads them without a second walk. */
    Py_ssize_t log_id_at, timeout_at;
    unsigned log_id_size, timeout_size;
} Header;

static int
protocol_of(Cursor *c, int tt, uint64_t id, Header *h)
{
    if (id == 0) {
        h->protocol = S_BINARY;
    } else if (id == 2 || (tt && id == 3)) {
        /* TTHeader: gopkg names 3 compact v2 and refuses 2, Apache-derived peers send 2. */
        h->protocol = S_COMPACT;
    } else {
        const char *known = "unknown";
        if (tt) {
            if (id == 4)
                known = "Kitex protobuf";
            else if (id == 0x10)
                known = "TTHeader streaming Thrift struct";
            else if (id == 0x11)
                known = "TTHeader streaming protobuf struct";
        } else if (id == 1) {
            known = "JSON";
        }
        fail(ProtocolError, "%s protocol id %llu (%s) is not served; binary (0) and compact (%s) are",
             c->name, (unsigned long long)id, known, tt ? "2, 3" : "2");
        return -1;
    }
    h->protocol_id = (unsigned)id;
    return 0;
}

/* Step over a u16 length at *at and the bytes it announces, checked against end (the walk's
 * position kept in the caller's local: see skip_entries()); *size is the length. -1 when either
 * is cut short, with the message read_ttheader()'s reading loop gives. */
READER int
skip_sized(Cursor *c, const uint8_t *buf, Py_ssize_t end, Py_ssize_t *at, const char *length,
           const char *what, unsigned *size)
{
    Py_ssize_t pos = *at;
    if (end - pos < 2) {
        c->pos = pos;
        return truncated(c, length, 2);
    }
    *size = ((unsigned)buf[pos] << 8) | buf[pos + 1];
    pos += 2;
    if (*size > (uint64_t)(end - pos)) {
        c->pos = pos;
        return truncated(c, what, *size);
    }
    *at = pos + *size;
    return 0;
}

/*
 * Validate n key-values of a TTHeader block without reading them (strings: a u16-sized key,
 * else a u16 integer key; then a u16-sized value), noting where the last LOG_ID and
 * RPC_TIMEOUT values are. The checks and messages of read_ttheader()'s reading loop; the
 * position is kept in a local, which a byte read through c->buf could otherwise alias, so
 * that it stays in a register (this runs for every key-value of every request), and each
 * kind of block has a loop of its own rather than one testing the kind for every field.
 */
static int
skip_entries(Cursor *c, int strings, unsigned n, Header *h)
{
    const uint8_t *buf = c->buf;
    Py_ssize_t pos = c->pos, end = c->end;
    unsigned size;
    if (strings) {
        for (unsigned i = 0; i < n; i++) {
            if (skip_sized(c, buf, end, &pos, "key length", "string key", &size) < 0 ||
                skip_sized(c, buf, end, &pos, "value length", "string value", &size) < 0)
                return -1;
        }
    } else {
        for (unsigned i = 0; i < n; i++) {
            if (end - pos < 2) {
                c->pos = pos;
                return truncated(c, "integer key", 2);
            }
            unsigned key_id = ((unsigned)buf[pos] << 8) | buf[pos + 1];
            pos += 2;
            if (skip_sized(c, buf, end, &pos, "value length", "integer value", &size) < 0)
                return -1;
            if (key_id == INT_KEY_LOG_ID) {
                h->log_id_at = pos - (Py_ssize_t)size;
                h->log_id_size = size;
            } else if (key_id == INT_KEY_RPC_TIMEOUT) {
                h->timeout_at = pos - (Py_ssize_t)size;
                h->timeout_size = size;
            }
        }
    }
    c->pos = pos;
    return 0;
}

static int
read_ttheader(Cursor *c, Header *h)
{
    unsigned id, count;
    if (u8(c, "protocol id", &id) < 0 || protocol_of(c, 1, id, h) < 0 ||
        u8(c, "transform count", &count) < 0)
        return -1;
    if (count) {
        if ((Py_ssize_t)count > c->end - c->pos) {
            char what[32];
            snprintf(what, sizeof what, "%u transform ids", count);
            return truncated(c, what, count);
        }
        /* The ids as Python lists them: [1, 2]. At most 255 ids of at most ", 255" each. */
        char ids[5 * 255 + 3];
        size_t n = 0;
        ids[n++] = '[';
        for (unsigned i = 0; i < count; i++) {
            unsigned id = c->buf[c->pos + i];
            if (i) {
                ids[n++] = ',';
                ids[n++] = ' ';
            }
            if (id >= 100)
                ids[n++] = (char)('0' + id / 100);
            if (id >= 10)
                ids[n++] = (char)('0' + id / 10 % 10);
            ids[n++] = (char)('0' + id % 10);
        }
        ids[n++] = ']';
        ids[n] = '\0';
        /* PyErr_Format: the message can be longer than fail()'s buffer. */
        PyErr_Format(ProtocolError,
                     "TTHeader transforms %s are not supported: gopkg defines no TTHeader "
                     "transform",
                     ids);
        return -1;
    }
    h->transforms = EMPTY_TUPLE;
    long long total = 0;
    while (c->pos < c->end) {
        unsigned info;
        if (u8(c, "info id", &info) < 0)
            return -1;
        if (info == 0x00)
            return padding(c);
        if (block(c) < 0)
            return -1;
        if (info == 0x01 || info == 0x10) {
            int strings = info == 0x01;
            unsigned n;
            if (u16(c, strings ? "string key-value count" : "integer key-value count", &n) < 0 ||
                entries(c, n, 4, &total, strings ? "string key-value" : "integer key-value") < 0)
                return -1;
            PyObject *into = strings ? h->str_info : h->int_info;
            if (into == NULL) {
                /* The same reads and checks as below, without the objects. */
                if (skip_entries(c, strings, n, h) < 0)
                    return -1;
                continue;
            }
            for (unsigned i = 0; i < n; i++) {
                PyObject *key;
                unsigned size;
                if (strings) {
                    if (u16(c, "key length", &size) < 0)
                        return -1;
                    key = text(c, size, "string key");
                } else {
                    unsigned key_id;
                    if (u16(c, "integer key", &key_id) < 0)
                        return -1;
                    key = PyLong_FromLong((long)key_id);
                }
                if (key == NULL)
                    return -1;
                if (u16(c, "value length", &size) < 0) {
                    Py_DECREF(key);
                    return -1;
                }
                if (put(into, key, text(c, size, strings ? "string value" : "integer value")) < 0)
                    return -1;
            }
        } else if (info == 0x11) {
            unsigned size;
            if (entries(c, 1, 0, &total, "ACL token") < 0 || u16(c, "ACL token length", &size) < 0)
                return -1;
            PyObject *token = text(c, size, "ACL token");
            if (token == NULL)
                return -1;
            Py_XSETREF(h->acl_token, token);
        } else {
            fail(ProtocolError, "unknown TTHeader info id 0x%02x at header offset %zd", info,
                 c->pos - 1 - FIXED_SIZE);
            return -1;
        }
    }
    return 0;
}

static const char *
transform_name(uint64_t id)
{
    switch (id) {
    case 2: return "HMAC";
    case 3: return "snappy";
    case 4: return "QuickLZ";
    case 5: return "zstd";
    default: return "unknown";
    }
}

static int
read_theader(Cursor *c, Header *h)
{
    uint64_t id, count;
    if (varint(c, "protocol id", &id) < 0 || protocol_of(c, 0, id, h) < 0 ||
        varint(c, "transform count", &count) < 0)
        return -1;
    if (count > (uint64_t)(c->end - c->pos)) {
        fail(ProtocolError, "THeader announces %llu transforms, but only %zd header bytes remain",
             (unsigned long long)count, c->end - c->pos);
        return -1;
    }
    h->transforms = EMPTY_TUPLE;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t transform;
        if (varint(c, "transform id", &transform) < 0)
            return -1;
        if (transform != TRANSFORM_ZLIB) {
            fail(ProtocolError, "THeader transform %llu (%s) is not supported; only zlib (1) is",
                 (unsigned long long)transform, transform_name(transform));
            return -1;
        }
        if (h->transforms != EMPTY_TUPLE) {
            /* Only zlib is known, so a second transform repeats it: one inflation per frame. */
            fail(ProtocolError, "THeader lists the zlib transform twice");
            return -1;
        }
        h->transforms = ZLIB_TUPLE;
    }
    PyObject *persistent = NULL;
    long long total = 0;
    int rc = 0;
    while (c->pos < c->end) {
        uint64_t info, n;
        if (varint(c, "info id", &info) < 0)
            goto error;
        if (info == 0) {
            if (padding(c) < 0)
                goto error;
            break;
        }
        if (block(c) < 0)
            goto error;
        if (info != 1 && info != 2)
            /* HeaderFormat.md: info headers are ignorable, and ordered oldest first, so none
             * after an unknown one is known either; skip to the payload. */
            break;
        int plain = info == 1;
        const char *what = plain ? "key-value" : "persistent key-value";
        if (varint(c, plain ? "key-value count" : "persistent key-value count", &n) < 0 ||
            entries(c, n, 2, &total, what) < 0)
            goto error;
        int reading = h->str_info != NULL;
        if (reading && !plain && persistent == NULL && (persistent = PyDict_New()) == NULL)
            goto error;
        PyObject *into = plain ? h->str_info : persistent;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t size;
            if (!reading) {
                if (varint(c, "key length", &size) < 0 || skip(c, size, "key") < 0 ||
                    varint(c, "value length", &size) < 0 || skip(c, size, "value") < 0)
                    goto error;
                continue;
            }
            if (varint(c, "key length", &size) < 0)
                goto error;
            PyObject *key = text(c, size, "key");
            if (key == NULL)
                goto error;
            if (varint(c, "value length", &size) < 0) {
                Py_DECREF(key);
                goto error;
            }
            if (put(into, key, text(c, size, "value")) < 0)
                goto error;
        }
    }
    if (persistent != NULL && PyDict_GET_SIZE(persistent)) {
        /* A per-request value wins over a persistent one of the same key. */
        if (PyDict_Update(persistent, h->str_info) < 0)
            goto error;
        Py_SETREF(h->str_info, persistent);
        persistent = NULL;
    }
    goto done;
error:
    rc = -1;
done:
    Py_XDECREF(persistent);
    return rc;
}

/* -- HeaderFrame ------------------------------------------------------------------------- */

/*
 * A parsed frame. The key-values are validated by parse() but read into dicts only when
 * int_info or str_info is first asked for (from a copy of the header kept for that): a
 * request whose handler never looks at them pays for the walk over the header, not for a
 * dict and two strings per key-value. int_value() reads one integer key-value directly.
 */
typedef struct {
    PyObject_HEAD
    PyObject *kind;       /* S_TTHEADER or S_THEADER */
    PyObject *protocol;   /* S_BINARY or S_COMPACT */
    PyObject *transforms; /* EMPTY_TUPLE or ZLIB_TUPLE */
    PyObject *acl_token;  /* str or None */
    PyObject *buffer;     /* the object parsed, or the inflated payload */
    PyObject *payload;    /* a memoryview of buffer[payload_start:payload_end], or NULL */
    /* bytes holding the frame, LENGTH included, up to the end of its header, from header_at:
     * the buffer parsed itself when it is bytes (immutable), a copy of the header otherwise. */
    PyObject *header;
    Py_ssize_t header_at;
    Py_ssize_t header_size;
    Py_ssize_t payload_start;
    Py_ssize_t payload_end;
    /* What the request loop reads of every frame, as objects: members of type T_OBJECT_EX are
     * the ones CPython's specializing interpreter reads without a lookup (an int member or a
     * getter costs a generic attribute lookup, ~150 instructions each, per request). */
    PyObject *py_codec_protocol; /* CODEC_BINARY or CODEC_COMPACT (_thrift's numbering) */
    PyObject *py_payload_start;  /* payload_start, as an int */
    PyObject *py_payload_end;    /* payload_end, as an int */
    PyObject *log_id;            /* LOG_ID's value as text, or None (absent or empty) */
    Py_ssize_t log_id_at;  /* TTHeader LOG_ID's value in the header, or -1 */
    Py_ssize_t timeout_at; /* TTHeader RPC_TIMEOUT's, or -1 */
    unsigned log_id_size;
    unsigned timeout_size;
    PyObject *int_info;   /* dict, or NULL until asked for */
    PyObject *str_info;   /* dict, or NULL until asked for */
    int flags;
    int seqid;
    int protocol_id;
    char payload_framed;
    char tt;
} Frame;

static PyTypeObject FrameType;

/* The frame's bytes up to the end of its header (validated by parse()). */
static inline const uint8_t *
frame_header(Frame *self)
{
    return (const uint8_t *)PyBytes_AS_STRING(self->header) + self->header_at;
}

/* The header's bytes [at, at + size) as text (validated by parse()); None when at < 0. */
static PyObject *
header_text(Frame *self, Py_ssize_t at, unsigned size)
{
    if (at < 0)
        Py_RETURN_NONE;
    return decode_text(frame_header(self) + at, (Py_ssize_t)size);
}

static int
frame_traverse(Frame *self, visitproc visit, void *arg)
{
    Py_VISIT(self->acl_token);
    Py_VISIT(self->buffer);
    Py_VISIT(self->payload);
    Py_VISIT(self->header);
    Py_VISIT(self->int_info);
    Py_VISIT(self->str_info);
    return 0;
}

static int
frame_clear(Frame *self)
{
    Py_CLEAR(self->kind);
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->transforms);
    Py_CLEAR(self->acl_token);
    Py_CLEAR(self->buffer);
    Py_CLEAR(self->payload);
    Py_CLEAR(self->header);
    Py_CLEAR(self->int_info);
    Py_CLEAR(self->str_info);
    Py_CLEAR(self->py_codec_protocol);
    Py_CLEAR(self->py_payload_start);
    Py_CLEAR(self->py_payload_end);
    Py_CLEAR(self->log_id);
    return 0;
}

static void
frame_dealloc(Frame *self)
{
    PyObject_GC_UnTrack(self);
    frame_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Read the key-values of a frame parse() validated into its two dicts. */
static int
frame_materialize(Frame *self)
{
    if (self->int_info != NULL)
        return 0;
    Header h = {0, NULL, NULL, PyDict_New(), PyDict_New(), NULL, -1, -1, 0, 0};
    int rc = -1;
    if (h.int_info != NULL && h.str_info != NULL) {
        /* The header belongs to the frame, which the caller holds: bytes, immutable. */
        Cursor c = {frame_header(self), FIXED_SIZE, self->header_size,
                    self->tt ? "TTHeader" : "THeader", 0};
        rc = self->tt ? read_ttheader(&c, &h) : read_theader(&c, &h);
    }
    if (rc == 0) {
        self->int_info = h.int_info;
        self->str_info = h.str_info;
        h.int_info = h.str_info = NULL;
    }
    Py_XDECREF(h.int_info);
    Py_XDECREF(h.str_info);
    Py_XDECREF(h.acl_token);
    return rc;
}

static PyObject *
frame_get_int_info(Frame *self, void *closure)
{
    if (frame_materialize(self) < 0)
        return NULL;
    return Py_NewRef(self->int_info);
}

static PyObject *
frame_get_str_info(Frame *self, void *closure)
{
    if (frame_materialize(self) < 0)
        return NULL;
    return Py_NewRef(self->str_info);
}

/* The payload as a memoryview, made when first asked for: the request loop reads the message
 * from buffer[payload_start:payload_end] and needs none. */
static PyObject *
frame_get_payload(Frame *self, void *closure)
{
    if (self->payload == NULL) {
        if (PyBytes_CheckExact(self->buffer) && self->payload_start == 0 &&
            self->payload_end == PyBytes_GET_SIZE(self->buffer))
            self->payload = Py_NewRef(self->buffer); /* an inflated payload */
        else {
            PyObject *whole = PyMemoryView_FromObject(self->buffer);
            if (whole == NULL)
                return NULL;
            self->payload = PySequence_GetSlice(whole, self->payload_start, self->payload_end);
            Py_DECREF(whole);
            if (self->payload == NULL)
                return NULL;
        }
    }
    return Py_NewRef(self->payload);
}

/* int_value(key) -> str | None: one TTHeader integer key-value, without reading the rest. */
static PyObject *
frame_int_value(Frame *self, PyObject *key)
{
    if (self->int_info != NULL) {
        PyObject *value = PyDict_GetItemWithError(self->int_info, key);
        if (value == NULL && PyErr_Occurred())
            return NULL;
        return Py_NewRef(value ? value : Py_None);
    }
    int overflow;
    long wanted = PyLong_Check(key) ? PyLong_AsLongAndOverflow(key, &overflow) : -1;
    if (!self->tt || wanted < 0 || wanted > 0xFFFF)
        Py_RETURN_NONE;
    /* Found by parse() already. */
    if (wanted == INT_KEY_LOG_ID)
        return header_text(self, self->log_id_at, self->log_id_size);
    if (wanted == INT_KEY_RPC_TIMEOUT)
        return header_text(self, self->timeout_at, self->timeout_size);
    const uint8_t *p = frame_header(self);
    /* The header was validated: every read below fits. The last value of the key wins. */
    Py_ssize_t end = self->header_size, pos = FIXED_SIZE + 2;
    Py_ssize_t found = -1;
    unsigned found_size = 0;
    while (pos < end) {
        unsigned info = p[pos++];
        if (info == 0x00)
            break;
        if (info == 0x11) {
            pos += 2 + (((unsigned)p[pos] << 8) | p[pos + 1]);
            continue;
        }
        unsigned n = ((unsigned)p[pos] << 8) | p[pos + 1];
        pos += 2;
        for (unsigned i = 0; i < n; i++) {
            unsigned first = ((unsigned)p[pos] << 8) | p[pos + 1];
            pos += 2;
            if (info == 0x01)
                pos += first; /* the key's bytes */
            unsigned size = ((unsigned)p[pos] << 8) | p[pos + 1];
            pos += 2;
            if (info == 0x10 && first == (unsigned)wanted) {
                found = pos;
                found_size = size;
            }
            pos += size;
        }
    }
    return header_text(self, found, found_size);
}

/* Step over one key of a header walk, noting where its value is if the key is the one wanted
 * (the last such wins, as in str_info). Every length is checked against the header's end. */
static int
match_value(Cursor *c, uint64_t key_size, const char *key, Py_ssize_t key_len, uint64_t value_size,
            Py_ssize_t key_at, Py_ssize_t *found, uint64_t *found_size)
{
    if (skip(c, value_size, "value") < 0)
        return -1;
    if ((uint64_t)key_len == key_size && memcmp(c->buf + key_at, key, (size_t)key_len) == 0) {
        *found = c->pos - (Py_ssize_t)value_size;
        *found_size = value_size;
    }
    return 0;
}

/* Where the TTHeader string key-value `key` (UTF-8) is: its offset in *found, -1 if absent. */
static int
find_tt_string(Cursor *c, const char *key, Py_ssize_t key_len, Py_ssize_t *found,
               uint64_t *found_size)
{
    unsigned id, count;
    if (u8(c, "protocol id", &id) < 0 || u8(c, "transform count", &count) < 0 ||
        skip(c, count, "transform ids") < 0)
        return -1;
    while (c->pos < c->end) {
        unsigned info, n, size;
        if (u8(c, "info id", &info) < 0)
            return -1;
        if (info == 0x00)
            break;
        if (info == 0x11) {
            if (u16(c, "ACL token length", &size) < 0 || skip(c, size, "ACL token") < 0)
                return -1;
            continue;
        }
        if (info != 0x01 && info != 0x10) {
            fail(ProtocolError, "unknown TTHeader info id 0x%02x", info);
            return -1;
        }
        if (u16(c, "key-value count", &n) < 0)
            return -1;
        for (unsigned i = 0; i < n; i++) {
            unsigned key_size = 0, value_size;
            Py_ssize_t key_at = c->pos;
            if (info == 0x01) {
                if (u16(c, "key length", &key_size) < 0)
                    return -1;
                key_at = c->pos;
                if (skip(c, key_size, "string key") < 0)
                    return -1;
            } else if (u16(c, "integer key", &key_size) < 0) {
                return -1;
            }
            if (u16(c, "value length", &value_size) < 0)
                return -1;
            if (info == 0x10) {
                if (skip(c, value_size, "integer value") < 0)
                    return -1;
                continue;
            }
            if (match_value(c, key_size, key, key_len, value_size, key_at, found, found_size) < 0)
                return -1;
        }
    }
    return 0;
}

/* The same for a THeader header: a per-request key-value wins over a persistent one. */
static int
find_t_string(Cursor *c, const char *key, Py_ssize_t key_len, Py_ssize_t *found,
              uint64_t *found_size)
{
    uint64_t id, count;
    if (varint(c, "protocol id", &id) < 0 || varint(c, "transform count", &count) < 0)
        return -1;
    for (uint64_t i = 0; i < count; i++)
        if (varint(c, "transform id", &id) < 0)
            return -1;
    Py_ssize_t persistent = -1;
    uint64_t persistent_size = 0;
    while (c->pos < c->end) {
        uint64_t info, n;
        if (varint(c, "info id", &info) < 0)
            return -1;
        if (info != 1 && info != 2)
            break; /* padding, or an unknown info block: nothing known after it (see parse) */
        if (varint(c, "key-value count", &n) < 0)
            return -1;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t key_size, value_size;
            if (varint(c, "key length", &key_size) < 0)
                return -1;
            Py_ssize_t key_at = c->pos;
            if (skip(c, key_size, "key") < 0 || varint(c, "value length", &value_size) < 0)
                return -1;
            if (match_value(c, key_size, key, key_len, value_size, key_at,
                            info == 1 ? found : &persistent,
                            info == 1 ? found_size : &persistent_size) < 0)
                return -1;
        }
    }
    if (*found < 0) {
        *found = persistent;
        *found_size = persistent_size;
    }
    return 0;
}

/* str_value(key) -> str | None: one string header, read without the others. */
static PyObject *
frame_str_value(Frame *self, PyObject *key)
{
    if (!PyUnicode_Check(key)) {
        PyErr_Format(PyExc_TypeError, "str_value() key must be str, not %s",
                     Py_TYPE(key)->tp_name);
        return NULL;
    }
    if (self->str_info != NULL) {
        PyObject *value = PyDict_GetItemWithError(self->str_info, key);
        if (value == NULL && PyErr_Occurred())
            return NULL;
        return Py_NewRef(value ? value : Py_None);
    }
    /* Keys are decoded as text() does, which maps distinct bytes to distinct strings: the
     * key's bytes are compared. A string text() cannot make is no key of any header. */
    PyObject *wanted = PyUnicode_AsEncodedString(key, "utf-8", "surrogateescape");
    if (wanted == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    /* The header copy belongs to the frame, which the caller holds: no Python code runs
     * during the walk. */
    Cursor c = {frame_header(self), FIXED_SIZE, self->header_size,
                self->tt ? "TTHeader" : "THeader", 0};
    Py_ssize_t found = -1;
    uint64_t found_size = 0;
    int rc = self->tt ? find_tt_string(&c, PyBytes_AS_STRING(wanted), PyBytes_GET_SIZE(wanted),
                                       &found, &found_size)
                      : find_t_string(&c, PyBytes_AS_STRING(wanted), PyBytes_GET_SIZE(wanted),
                                      &found, &found_size);
    Py_DECREF(wanted);
    if (rc < 0)
        return NULL;
    if (found < 0)
        Py_RETURN_NONE;
    return decode_text(c.buf + found, (Py_ssize_t)found_size);
}

static PyObject *do_build(int tt, long long seqid, long protocol_id, PyObject *payload_obj,
                          long long flags, PyObject *strs_in, PyObject *ints_in, PyObject *acl,
                          PyObject *transforms, int framed, int message_type);
static PyObject *assemble(int tt, long long seqid, long long flags, const uint8_t *header,
                          size_t header_len, PyObject *payload_obj, int framed);
static PyObject *zlib_compress;

/* The reply frame to this request: same kind, protocol id, seqid, flags, transforms and
 * payload framing; message_type >= 0 adds TTHeader's MSG_TYPE. */
static PyObject *
reply_frame(Frame *self, PyObject *payload, PyObject *strs, PyObject *ints, int message_type)
{
    if (strs == Py_None && ints == Py_None && !PyTuple_GET_SIZE(self->transforms)) {
        /* The request loop's common case: no key-values but TTHeader's MSG_TYPE, no zlib. The
         * header, as do_build() would write it, straight from the frame's checked fields: the
         * protocol id (0, 2 or 3: one byte as a u8 or a varint), no transforms, MSG_TYPE. */
        uint8_t header[12] = {(uint8_t)self->protocol_id, 0};
        size_t n = 2;
        if (self->tt && message_type >= 0) {
            const uint8_t msg_type[8] = {0x10, 0, 1, 0, INT_KEY_MSG_TYPE, 0, 1,
                                         (uint8_t)('0' + message_type)};
            memcpy(header + n, msg_type, sizeof msg_type);
            n += sizeof msg_type;
        }
        n += (4 - n % 4) % 4; /* zero padding, from the initializer */
        return assemble(self->tt, self->seqid, self->flags, header, n, payload,
                        self->payload_framed);
    }
    PyObject *compressed = NULL;
    if (PyTuple_GET_SIZE(self->transforms)) {
        /* THeader's zlib, applied again as fbthrift's server does. */
        compressed = PyObject_CallOneArg(zlib_compress, payload);
        if (compressed == NULL)
            return NULL;
        payload = compressed;
    }
    PyObject *frame = do_build(self->tt, self->seqid, self->protocol_id, payload, self->flags,
                               strs, ints, Py_None, self->transforms, self->payload_framed,
                               message_type);
    Py_XDECREF(compressed);
    return frame;
}

static PyObject *
frame_reply(Frame *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    /* reply(payload, *, str_info=None, int_info=None), parsed by hand: once per request. */
    PyObject *payload, *strs = Py_None, *ints = Py_None;
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "reply() takes one positional argument, the payload");
        return NULL;
    }
    payload = args[0];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(name, "str_info") == 0)
            strs = args[1 + i];
        else if (PyUnicode_CompareWithASCIIString(name, "int_info") == 0)
            ints = args[1 + i];
        else {
            PyErr_Format(PyExc_TypeError, "reply() got an unexpected keyword argument %R", name);
            return NULL;
        }
    }
    return reply_frame(self, payload, strs, ints, -1);
}

/* answer(payload, message_type, str_info, /): reply() for the request loop, positional, with
 * Kitex's MSG_TYPE integer key-value written from message_type (TTHeader; ignored for
 * THeader). */
static PyObject *
frame_answer(Frame *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "answer(payload, message_type, str_info)");
        return NULL;
    }
    PyObject *payload = args[0], *strs = args[2];
    long message_type = PyLong_AsLong(args[1]);
    if (message_type == -1 && PyErr_Occurred())
        return NULL;
    if (message_type < 1 || message_type > 4) {
        PyErr_Format(PyExc_ValueError, "message type %ld; a Thrift message type is 1 to 4",
                     message_type);
        return NULL;
    }
    return reply_frame(self, payload, strs, Py_None, (int)message_type);
}

/* with_payload(payload): the same frame with another payload (an inflated one). */
static PyObject *
frame_with_payload(Frame *self, PyObject *payload)
{
    if (!PyBytes_CheckExact(payload)) {
        PyErr_SetString(PyExc_TypeError, "with_payload() takes bytes");
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(payload);
    PyObject *end = PyLong_FromSsize_t(size);
    if (end == NULL)
        return NULL;
    Frame *copy = PyObject_GC_New(Frame, &FrameType);
    if (copy == NULL) {
        Py_DECREF(end);
        return NULL;
    }
    copy->kind = Py_NewRef(self->kind);
    copy->protocol = Py_NewRef(self->protocol);
    copy->transforms = Py_NewRef(self->transforms);
    copy->acl_token = Py_NewRef(self->acl_token);
    copy->buffer = Py_NewRef(payload);
    copy->payload = NULL;
    copy->payload_start = 0;
    copy->payload_end = size;
    copy->py_codec_protocol = Py_XNewRef(self->py_codec_protocol);
    copy->py_payload_start = PyLong_FromLong(0); /* a small int: cannot fail */
    copy->py_payload_end = end;
    copy->log_id = Py_XNewRef(self->log_id);
    copy->header = Py_NewRef(self->header);
    copy->header_at = self->header_at;
    copy->header_size = self->header_size;
    copy->log_id_at = self->log_id_at;
    copy->log_id_size = self->log_id_size;
    copy->timeout_at = self->timeout_at;
    copy->timeout_size = self->timeout_size;
    copy->int_info = Py_XNewRef(self->int_info);
    copy->str_info = Py_XNewRef(self->str_info);
    copy->flags = self->flags;
    copy->seqid = self->seqid;
    copy->protocol_id = self->protocol_id;
    copy->payload_framed = self->payload_framed;
    copy->tt = self->tt;
    PyObject_GC_Track(copy);
    return (PyObject *)copy;
}

static PyObject *
frame_repr(Frame *self)
{
    return PyUnicode_FromFormat("HeaderFrame(kind=%R, flags=%d, seqid=%d, protocol=%R, "
                                "protocol_id=%d, transforms=%R, acl_token=%R, "
                                "payload_framed=%s, payload=<%zd bytes>)",
                                self->kind, self->flags, self->seqid, self->protocol,
                                self->protocol_id, self->transforms, self->acl_token,
                                self->payload_framed ? "True" : "False",
                                self->payload_end - self->payload_start);
}

static PyMemberDef frame_members[] = {
    {"kind", T_OBJECT_EX, offsetof(Frame, kind), READONLY, "'ttheader' or 'theader'."},
    {"flags", T_INT, offsetof(Frame, flags), READONLY, "FLAGS, as sent."},
    {"seqid", T_INT, offsetof(Frame, seqid), READONLY, "SEQID, signed 32-bit."},
    {"protocol", T_OBJECT_EX, offsetof(Frame, protocol), READONLY, "'binary' or 'compact'."},
    {"protocol_id", T_INT, offsetof(Frame, protocol_id), READONLY, "The protocol id as sent."},
    {"codec_protocol", T_OBJECT_EX, offsetof(Frame, py_codec_protocol), READONLY,
     "The payload's protocol as kitegreen's codec numbers it: 0 binary, 2 compact."},
    {"transforms", T_OBJECT_EX, offsetof(Frame, transforms), READONLY,
     "THeader transforms undone: () or (1,)."},
    {"acl_token", T_OBJECT_EX, offsetof(Frame, acl_token), READONLY,
     "TTHeader's ACL token, or None."},
    {"buffer", T_OBJECT_EX, offsetof(Frame, buffer), READONLY,
     "The object the message is in: the buffer parsed, or the inflated payload."},
    {"payload_start", T_OBJECT_EX, offsetof(Frame, py_payload_start), READONLY,
     "Where the message starts in buffer."},
    {"payload_end", T_OBJECT_EX, offsetof(Frame, py_payload_end), READONLY,
     "Where the message ends in buffer."},
    {"payload_framed", T_BOOL, offsetof(Frame, payload_framed), READONLY,
     "Whether a TTHeader payload was framed again (Kitex's TTHeaderFramed)."},
    {"log_id", T_OBJECT_EX, offsetof(Frame, log_id), READONLY,
     "TTHeader's LOG_ID integer key-value (the last sent); None when absent or empty, and for "
     "THeader."},
    {NULL},
};

static PyGetSetDef frame_getset[] = {
    {"int_info", (getter)frame_get_int_info, NULL,
     "TTHeader integer key-values, read on first access; {} for THeader.", NULL},
    {"str_info", (getter)frame_get_str_info, NULL,
     "TTHeader string key-values or THeader key-values, read on first access.", NULL},
    {"payload", (getter)frame_get_payload, NULL,
     "The Thrift message: a memoryview of buffer[payload_start:payload_end], or the inflated "
     "bytes.", NULL},
    {NULL},
};

static PyMethodDef frame_methods[] = {
    {"reply", (PyCFunction)(void (*)(void))frame_reply, METH_FASTCALL | METH_KEYWORDS,
     "reply(payload, *, str_info=None, int_info=None) -> bytes: the reply frame for this "
     "request: same kind, protocol id, seqid, flags, transforms and payload framing."},
    {"answer", (PyCFunction)(void (*)(void))frame_answer, METH_FASTCALL,
     "answer(payload, message_type, str_info, /) -> bytes: reply(payload, str_info=str_info) "
     "with TTHeader's MSG_TYPE integer key-value set to message_type, as a Kitex server "
     "writes it (THeader: no integer key-values)."},
    {"str_value", (PyCFunction)frame_str_value, METH_O,
     "str_value(key) -> str | None: one string header (a TTHeader string key-value, a THeader "
     "header; a per-request one before a persistent one), read without the others."},
    {"int_value", (PyCFunction)frame_int_value, METH_O,
     "int_value(key) -> str | None: one TTHeader integer key-value (None for THeader)."},
    {"with_payload", (PyCFunction)frame_with_payload, METH_O,
     "with_payload(payload): the same frame carrying another payload."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FrameType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kitegreen.codec.headers.HeaderFrame",
    .tp_doc = "One parsed TTHeader or THeader request frame: its header, and the Thrift "
              "message it carries. Built by parse_frame() only.",
    .tp_basicsize = sizeof(Frame),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)frame_dealloc,
    .tp_traverse = (traverseproc)frame_traverse,
    .tp_clear = (inquiry)frame_clear,
    .tp_repr = (reprfunc)frame_repr,
    .tp_members = frame_members,
    .tp_getset = frame_getset,
    .tp_methods = frame_methods,
};

/* -- parsing ------------------------------------------------------------------------------- */

static PyObject *
parse(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "parse(buf, start, end, max_frame_size)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t stop = PyLong_AsSsize_t(args[2]);
    Py_ssize_t max_frame_size = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    /* bytes are read in place (immutable, and held by the caller for the call); any other
     * buffer through the buffer protocol, which keeps a bytearray from being resized while an
     * allocation below runs a finalizer. */
    int is_bytes = PyBytes_CheckExact(args[0]);
    Py_buffer view = {0};
    if (is_bytes) {
        view.buf = PyBytes_AS_STRING(args[0]);
        view.len = PyBytes_GET_SIZE(args[0]);
    } else if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Frame *result = NULL;
    Header h = {0, NULL, NULL, NULL, NULL, NULL, -1, -1, 0, 0};
    if (start < 0 || stop > view.len || start > stop) {
        PyErr_Format(PyExc_ValueError, "frame [%zd:%zd] outside a buffer of %zd bytes", start,
                     stop, view.len);
        goto done;
    }
    const uint8_t *frame = (const uint8_t *)view.buf + start;
    Py_ssize_t size = stop - start;
    if (size < FIXED_SIZE) {
        fail(ProtocolError, "header frame truncated: %zd bytes, the fixed part alone takes %d",
             size, FIXED_SIZE);
        goto done;
    }
    uint32_t length = ((uint32_t)frame[0] << 24) | ((uint32_t)frame[1] << 16) |
                      ((uint32_t)frame[2] << 8) | frame[3];
    unsigned magic = ((unsigned)frame[4] << 8) | frame[5];
    unsigned flags = ((unsigned)frame[6] << 8) | frame[7];
    int32_t seqid = (int32_t)(((uint32_t)frame[8] << 24) | ((uint32_t)frame[9] << 16) |
                              ((uint32_t)frame[10] << 8) | frame[11]);
    unsigned words = ((unsigned)frame[12] << 8) | frame[13];
    if ((Py_ssize_t)length > max_frame_size || length > MAX_LENGTH) {
        fail(FrameTooLarge, "frame of %u bytes, max_frame_size is %zd (the formats allow %ld)",
             length, max_frame_size, MAX_LENGTH);
        goto done;
    }
    if ((Py_ssize_t)length != size - 4) {
        fail(ProtocolError, "frame LENGTH says %u bytes follow it, %zd do", length, size - 4);
        goto done;
    }
    int tt;
    if (magic == TTHEADER_MAGIC)
        tt = 1;
    else if (magic == THEADER_MAGIC)
        tt = 0;
    else {
        fail(ProtocolError, "not a TTHeader or THeader frame: magic 0x%04x", magic);
        goto done;
    }
    const char *name = tt ? "TTHeader" : "THeader";
    Py_ssize_t header_end = FIXED_SIZE + 4 * (Py_ssize_t)words;
    if (words == 0) {
        fail(ProtocolError,
             "%s HEADER SIZE is 0; the protocol id and transform count need at least one word",
             name);
        goto done;
    }
    if (header_end > size) {
        fail(ProtocolError,
             "%s HEADER SIZE is %zd bytes, but only %zd follow the fixed part", name,
             4 * (Py_ssize_t)words, size - FIXED_SIZE);
        goto done;
    }
    /* Validated only: the key-values are read if and when they are asked for. */
    Cursor c = {frame, FIXED_SIZE, header_end, name, 0};
    if ((tt ? read_ttheader(&c, &h) : read_theader(&c, &h)) < 0)
        goto done;

    Py_ssize_t payload_start = header_end;
    int framed = 0;
    if (tt) {
        /* Kitex's TTHeaderFramed: a 4-byte length before the message, inside the payload. */
        const uint8_t *p = frame + header_end;
        Py_ssize_t n = size - header_end;
        if (n >= 6 && p[0] != 0x80 && p[0] != 0x82) {
            if (p[4] == 0x90 && p[5] == 0x01) {
                fail(ProtocolError, "TTHeader payload is Kitex protobuf (magic 0x9001), not served");
                goto done;
            }
            if (p[4] == 0x80 || p[4] == 0x82) {
                uint32_t inner = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
                                 ((uint32_t)p[2] << 8) | p[3];
                if ((Py_ssize_t)inner != n - 4) {
                    fail(ProtocolError,
                         "TTHeader payload's inner frame length is %u, but %zd bytes follow it",
                         inner, n - 4);
                    goto done;
                }
                payload_start += 4;
                framed = 1;
            }
        }
    }
    if (payload_start == size && h.transforms == EMPTY_TUPLE) {
        /* A zlib payload is checked once inflated (headers.py). */
        fail(ProtocolError, "%s frame carries no message after its header", name);
        goto done;
    }

    /* What int_info, str_info and the lookups read later: the bytes parsed, or a copy of the
     * header when they could change (a bytearray is reused for the next message). */
    PyObject *header = NULL, *log_id = NULL, *py_start = NULL, *py_end = NULL;
    /* Each made only once the one before it was: no call with an exception set. The log id
     * is decoded here rather than when asked for: the request loop asks every time. The
     * payload ends where the frame does: the caller's own int, when it is one. */
    if ((header = is_bytes ? Py_NewRef(args[0])
                           : PyBytes_FromStringAndSize((const char *)frame, header_end)) == NULL ||
        (log_id = h.log_id_size ? decode_text(frame + h.log_id_at, (Py_ssize_t)h.log_id_size)
                                : Py_NewRef(Py_None)) == NULL ||
        (py_start = PyLong_FromSsize_t(start + payload_start)) == NULL ||
        (py_end = PyLong_CheckExact(args[2]) ? Py_NewRef(args[2]) : PyLong_FromSsize_t(stop)) ==
            NULL ||
        (result = PyObject_GC_New(Frame, &FrameType)) == NULL) {
        Py_XDECREF(header);
        Py_XDECREF(log_id);
        Py_XDECREF(py_start);
        Py_XDECREF(py_end);
        goto done;
    }
    result->kind = Py_NewRef(tt ? S_TTHEADER : S_THEADER);
    result->protocol = Py_NewRef(h.protocol);
    result->transforms = Py_NewRef(h.transforms);
    result->acl_token = h.acl_token ? h.acl_token : Py_NewRef(Py_None);
    h.acl_token = NULL;
    result->buffer = Py_NewRef(args[0]);
    result->payload = NULL;
    result->payload_start = start + payload_start;
    result->payload_end = stop;
    result->header = header;
    result->header_at = is_bytes ? start : 0;
    result->header_size = header_end;
    result->log_id_at = h.log_id_at;
    result->log_id_size = h.log_id_size;
    result->timeout_at = h.timeout_at;
    result->timeout_size = h.timeout_size;
    result->int_info = result->str_info = NULL;
    result->flags = (int)flags;
    result->seqid = seqid;
    result->protocol_id = (int)h.protocol_id;
    /* The payload's protocol as _thrift numbers it; a small int, cached by CPython: this
     * cannot fail. */
    result->py_codec_protocol = PyLong_FromLong(h.protocol == S_BINARY ? CODEC_BINARY
                                                                        : CODEC_COMPACT);
    result->py_payload_start = py_start;
    result->py_payload_end = py_end;
    result->log_id = log_id;
    result->payload_framed = (char)framed;
    result->tt = (char)tt;
    PyObject_GC_Track(result);
done:
    Py_XDECREF(h.acl_token);
    if (!is_bytes)
        PyBuffer_Release(&view);
    return (PyObject *)result;
}

/* -- building ------------------------------------------------------------------------------ */

/* A header being built: in `local` while it fits (a reply's header does), on the heap after. */
typedef struct {
    char *p;
    size_t len;
    size_t cap;
    char local[256];
} Out;

#define OUT_INIT(o) ((o).p = (o).local, (o).len = 0, (o).cap = sizeof (o).local)
#define OUT_FREE(o) ((o).p != (o).local ? PyMem_Free((o).p) : (void)0)

static int
reserve(Out *o, size_t more)
{
    if (o->len + more <= o->cap)
        return 0;
    size_t cap = o->cap;
    while (cap < o->len + more)
        cap *= 2;
    char *p;
    if (o->p == o->local) {
        p = PyMem_Malloc(cap);
        if (p != NULL)
            memcpy(p, o->local, o->len);
    } else {
        p = PyMem_Realloc(o->p, cap);
    }
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->p = p;
    o->cap = cap;
    return 0;
}

static int
put_byte(Out *o, unsigned byte)
{
    if (reserve(o, 1) < 0)
        return -1;
    o->p[o->len++] = (char)byte;
    return 0;
}

static int
put_u16(Out *o, unsigned value)
{
    if (reserve(o, 2) < 0)
        return -1;
    o->p[o->len++] = (char)(value >> 8);
    o->p[o->len++] = (char)value;
    return 0;
}

static int
put_varint(Out *o, uint64_t value)
{
    while (value > 0x7F) {
        if (put_byte(o, (unsigned)((value & 0x7F) | 0x80)) < 0)
            return -1;
        value >>= 7;
    }
    return put_byte(o, (unsigned)value);
}

/* A str's bytes as UTF-8 with surrogateescape; *owner is a bytes object to release, or NULL. */
static const char *
encoded(PyObject *value, const char *what, Py_ssize_t *size, PyObject **owner)
{
    *owner = NULL;
    if (!PyUnicode_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, got %.100s", what, Py_TYPE(value)->tp_name);
        return NULL;
    }
    if (PyUnicode_IS_COMPACT_ASCII(value)) {
        *size = PyUnicode_GET_LENGTH(value);
        return (const char *)PyUnicode_DATA(value);
    }
    PyObject *raw = PyUnicode_AsEncodedString(value, "utf-8", "surrogateescape");
    if (raw == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
            PyObject *type, *exc, *tb;
            PyErr_Fetch(&type, &exc, &tb);
            PyErr_NormalizeException(&type, &exc, &tb);
            PyObject *reason = exc ? PyUnicodeEncodeError_GetReason(exc) : NULL;
            Py_XDECREF(type);
            Py_XDECREF(exc);
            Py_XDECREF(tb);
            if (reason != NULL) {
                PyErr_Format(ProtocolError, "%s %R cannot be encoded: %U", what, value, reason);
                Py_DECREF(reason);
            }
        }
        return NULL;
    }
    *owner = raw;
    *size = PyBytes_GET_SIZE(raw);
    return PyBytes_AS_STRING(raw);
}

/* TTHeader: a u16 length and the bytes. */
static int
put_u16_string(Out *o, PyObject *value, const char *what)
{
    Py_ssize_t size;
    PyObject *owner;
    const char *data = encoded(value, what, &size, &owner);
    if (data == NULL)
        return -1;
    int rc = -1;
    if (size > 0xFFFF)
        fail(ProtocolError, "TTHeader %s of %zd bytes; at most 65535 fit", what, size);
    else if (put_u16(o, (unsigned)size) == 0 && reserve(o, (size_t)size) == 0) {
        memcpy(o->p + o->len, data, (size_t)size);
        o->len += (size_t)size;
        rc = 0;
    }
    Py_XDECREF(owner);
    return rc;
}

/* THeader: a varint length and the bytes. */
static int
put_varint_string(Out *o, PyObject *value, const char *what)
{
    Py_ssize_t size;
    PyObject *owner;
    const char *data = encoded(value, what, &size, &owner);
    if (data == NULL)
        return -1;
    int rc = -1;
    if (put_varint(o, (uint64_t)size) == 0 && reserve(o, (size_t)size) == 0) {
        memcpy(o->p + o->len, data, (size_t)size);
        o->len += (size_t)size;
        rc = 0;
    }
    Py_XDECREF(owner);
    return rc;
}

/* The (key, value) pairs of a mapping, as a new list; a dict's own items otherwise. */
static PyObject *
items_of(PyObject *mapping)
{
    return PyDict_CheckExact(mapping) ? PyDict_Items(mapping) : PyMapping_Items(mapping);
}

static int
pair(PyObject *item, PyObject **key, PyObject **value)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
        PyErr_SetString(PyExc_TypeError, "mapping items must be (key, value) pairs");
        return -1;
    }
    *key = PyTuple_GET_ITEM(item, 0);
    *value = PyTuple_GET_ITEM(item, 1);
    return 0;
}

/* The items lists hold their own references to keys and values: a __eq__ or __str__ that
 * mutates the mapping cannot free them under us. */
static int
tt_header(Out *o, unsigned protocol_id, PyObject *strs, PyObject *ints, PyObject *acl,
          int message_type)
{
    if (put_byte(o, protocol_id) < 0 || put_byte(o, 0) < 0)
        return -1;
    if (acl != Py_None && (put_byte(o, 0x11) < 0 || put_u16_string(o, acl, "ACL token") < 0))
        return -1;
    if (strs != NULL && PyList_GET_SIZE(strs)) {
        if (put_byte(o, 0x01) < 0 || put_u16(o, (unsigned)PyList_GET_SIZE(strs)) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(strs); i++) {
            PyObject *key, *value;
            if (pair(PyList_GET_ITEM(strs, i), &key, &value) < 0 ||
                put_u16_string(o, key, "key") < 0 || put_u16_string(o, value, "string value") < 0)
                return -1;
        }
    }
    Py_ssize_t n_ints = ints != NULL ? PyList_GET_SIZE(ints) : 0;
    if (n_ints || message_type >= 0) {
        if (put_byte(o, 0x10) < 0 || put_u16(o, (unsigned)(n_ints + (message_type >= 0))) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n_ints; i++) {
            PyObject *key, *value;
            if (pair(PyList_GET_ITEM(ints, i), &key, &value) < 0)
                return -1;
            int overflow;
            long key_id = PyLong_Check(key) ? PyLong_AsLongAndOverflow(key, &overflow) : -1;
            if (!PyLong_Check(key)) {
                PyErr_Format(PyExc_TypeError, "TTHeader integer key must be int, got %.100s",
                             Py_TYPE(key)->tp_name);
                return -1;
            }
            if (overflow || key_id < 0 || key_id > 0xFFFF) {
                PyObject *number = PyNumber_Long(key);
                if (number != NULL) {
                    PyErr_Format(ProtocolError, "TTHeader integer key must fit 16 bits, got %S",
                                 number);
                    Py_DECREF(number);
                }
                return -1;
            }
            if (put_u16(o, (unsigned)key_id) < 0 || put_u16_string(o, value, "integer value") < 0)
                return -1;
        }
        if (message_type >= 0) {
            /* MSG_TYPE, decimal, as Kitex's server writes it (a Thrift message type: 1-4). */
            if (put_u16(o, INT_KEY_MSG_TYPE) < 0 || put_u16(o, 1) < 0 ||
                put_byte(o, '0' + (unsigned)message_type) < 0)
                return -1;
        }
    }
    return 0;
}

static int
th_header(Out *o, unsigned protocol_id, PyObject *strs, int zlib)
{
    if (put_varint(o, protocol_id) < 0 || put_varint(o, zlib ? 1 : 0) < 0 ||
        (zlib && put_varint(o, TRANSFORM_ZLIB) < 0))
        return -1;
    if (strs != NULL && PyList_GET_SIZE(strs)) {
        if (put_varint(o, 1) < 0 || put_varint(o, (uint64_t)PyList_GET_SIZE(strs)) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(strs); i++) {
            PyObject *key, *value;
            if (pair(PyList_GET_ITEM(strs, i), &key, &value) < 0 ||
                put_varint_string(o, key, "key") < 0 || put_varint_string(o, value, "value") < 0)
                return -1;
        }
    }
    return 0;
}

static Py_ssize_t
size_of(PyObject *mapping)
{
    return mapping == Py_None ? 0 : PyObject_Length(mapping);
}

/*
 * build(kind, seqid, protocol_id, payload, flags, str_info, int_info, acl_token, transforms,
 *       payload_framed) -> bytes. The payload is given as sent: zlib already applied.
 */
static PyObject *
build(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "build(kind, seqid, protocol_id, payload, flags, str_info, int_info, "
                        "acl_token, transforms, payload_framed)");
        return NULL;
    }
    PyObject *kind = args[0], *strs_in = args[5], *ints_in = args[6], *acl = args[7];
    PyObject *transforms = args[8];
    int tt;
    if (!PyTuple_Check(transforms)) {
        PyErr_SetString(PyExc_TypeError, "transforms must be a tuple");
        return NULL;
    }
    if (kind == S_TTHEADER || (PyUnicode_Check(kind) && PyUnicode_Compare(kind, S_TTHEADER) == 0))
        tt = 1;
    else if (kind == S_THEADER ||
             (PyUnicode_Check(kind) && PyUnicode_Compare(kind, S_THEADER) == 0))
        tt = 0;
    else {
        if (!PyErr_Occurred())
            PyErr_Format(ProtocolError, "header kind must be 'ttheader' or 'theader', got %R",
                         kind);
        return NULL;
    }
    const char *name = tt ? "TTHeader" : "THeader";
    int overflow_flags, overflow_seqid;
    long long flags = PyLong_AsLongLongAndOverflow(args[4], &overflow_flags);
    if (flags == -1 && PyErr_Occurred())
        return NULL;
    if (overflow_flags || flags < 0 || flags > 0xFFFF) {
        PyErr_Format(ProtocolError, "%s FLAGS must fit 16 bits, got %S", name, args[4]);
        return NULL;
    }
    long long seqid = PyLong_AsLongLongAndOverflow(args[1], &overflow_seqid);
    if (seqid == -1 && PyErr_Occurred())
        return NULL;
    if (overflow_seqid || seqid < -(1LL << 31) || seqid >= (1LL << 32)) {
        PyErr_Format(ProtocolError, "%s SEQID must fit 32 bits, got %S", name, args[1]);
        return NULL;
    }
    long protocol_id = PyLong_AsLong(args[2]);
    int framed = PyObject_IsTrue(args[9]);
    if ((protocol_id == -1 && PyErr_Occurred()) || framed < 0)
        return NULL;
    if (protocol_id < 0 || protocol_id > 0x7F) {
        PyErr_Format(PyExc_ValueError, "protocol id %ld", protocol_id);
        return NULL;
    }
    return do_build(tt, seqid, protocol_id, args[3], flags, strs_in, ints_in, acl, transforms,
                    framed, -1);
}

/* One whole frame from checked fixed fields; the key-values and transforms are checked here. */
static PyObject *
do_build(int tt, long long seqid, long protocol_id, PyObject *payload_obj, long long flags,
         PyObject *strs_in, PyObject *ints_in, PyObject *acl, PyObject *transforms, int framed,
         int message_type)
{
    const char *name = tt ? "TTHeader" : "THeader";
    Py_ssize_t n_strs = size_of(strs_in), n_ints = size_of(ints_in);
    if (n_strs < 0 || n_ints < 0)
        return NULL;
    if (!tt)
        message_type = -1; /* THeader has no integer key-values */
    Py_ssize_t n = n_strs + n_ints + (acl != Py_None) + (message_type >= 0);
    if (n > MAX_ENTRIES)
        return fail(ProtocolError, "%s header of %zd key-values; at most %d are accepted", name,
                    n, MAX_ENTRIES);
    Py_ssize_t n_transforms = PyTuple_GET_SIZE(transforms);
    int zlib = 0;
    if (tt) {
        if (n_transforms) {
            PyErr_Format(ProtocolError, "TTHeader defines no transforms, got %R", transforms);
            return NULL;
        }
    } else {
        if (n_ints || acl != Py_None || framed)
            return fail(ProtocolError,
                        "THeader has no integer key-values, ACL token or inner framing; send "
                        "key-values in str_info");
        if (n_transforms) {
            PyObject *first = PyTuple_GET_ITEM(transforms, 0);
            int is_zlib = n_transforms == 1 && PyLong_Check(first) &&
                          PyLong_AsLong(first) == TRANSFORM_ZLIB;
            if (PyErr_Occurred())
                PyErr_Clear();
            if (!is_zlib) {
                PyErr_Format(ProtocolError, "THeader transforms must be () or (1,) (zlib), got %R",
                             transforms);
                return NULL;
            }
            zlib = 1;
        }
    }

    PyObject *result = NULL, *strs = NULL, *ints = NULL;
    Out header;
    OUT_INIT(header);
    if ((n_strs && (strs = items_of(strs_in)) == NULL) ||
        (n_ints && (ints = items_of(ints_in)) == NULL))
        goto done;
    if ((tt ? tt_header(&header, (unsigned)protocol_id, strs, ints, acl, message_type)
            : th_header(&header, (unsigned)protocol_id, strs, zlib)) < 0)
        goto done;
    size_t pad = (4 - header.len % 4) % 4;
    if (reserve(&header, pad) < 0)
        goto done;
    memset(header.p + header.len, 0, pad);
    header.len += pad;
    if (header.len > MAX_HEADER_SIZE) {
        fail(ProtocolError, "%s header of %zu bytes; HEADER SIZE can describe %d", name,
             header.len, MAX_HEADER_SIZE);
        goto done;
    }
    result = assemble(tt, seqid, flags, (const uint8_t *)header.p, header.len, payload_obj,
                      framed);
done:
    OUT_FREE(header);
    Py_XDECREF(strs);
    Py_XDECREF(ints);
    return result;
}

/* The whole frame: the fixed part, a header of whole words (padding included, at most
 * MAX_HEADER_SIZE bytes), the payload's inner length if framed, the payload. */
static PyObject *
assemble(int tt, long long seqid, long long flags, const uint8_t *header, size_t header_len,
         PyObject *payload_obj, int framed)
{
    const char *name = tt ? "TTHeader" : "THeader";
    PyObject *result = NULL;
    Py_buffer payload = {0};
    if (PyBytes_CheckExact(payload_obj)) {
        /* Immutable, held by the caller; nothing below calls into Python code. */
        payload.buf = PyBytes_AS_STRING(payload_obj);
        payload.len = PyBytes_GET_SIZE(payload_obj);
    } else if (PyObject_GetBuffer(payload_obj, &payload, PyBUF_SIMPLE) < 0) {
        goto done;
    }
    long long inner = framed ? 4 : 0;
    long long length = FIXED_SIZE - 4 + (long long)header_len + inner + payload.len;
    if (length > MAX_LENGTH) {
        fail(FrameTooLarge, "%s frame of %lld bytes; the format allows %ld", name, length,
             MAX_LENGTH);
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(length + 4));
    if (result == NULL)
        goto done;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(result);
    uint32_t seq = (uint32_t)(seqid & 0xFFFFFFFF);
    unsigned magic = tt ? TTHEADER_MAGIC : THEADER_MAGIC;
    unsigned words = (unsigned)(header_len / 4);
    uint8_t fixed[FIXED_SIZE] = {
        (uint8_t)(length >> 24), (uint8_t)(length >> 16), (uint8_t)(length >> 8), (uint8_t)length,
        (uint8_t)(magic >> 8), (uint8_t)magic, (uint8_t)(flags >> 8), (uint8_t)flags,
        (uint8_t)(seq >> 24), (uint8_t)(seq >> 16), (uint8_t)(seq >> 8), (uint8_t)seq,
        (uint8_t)(words >> 8), (uint8_t)words,
    };
    memcpy(p, fixed, FIXED_SIZE);
    p += FIXED_SIZE;
    memcpy(p, header, header_len);
    p += header_len;
    if (framed) {
        uint32_t plen = (uint32_t)payload.len;
        uint8_t be[4] = {(uint8_t)(plen >> 24), (uint8_t)(plen >> 16), (uint8_t)(plen >> 8),
                         (uint8_t)plen};
        memcpy(p, be, 4);
        p += 4;
    }
    if (payload.len)
        memcpy(p, payload.buf, (size_t)payload.len);
done:
    if (payload.obj != NULL)
        PyBuffer_Release(&payload);
    return result;
}

static PyMethodDef module_methods[] = {
    {"parse", (PyCFunction)(void (*)(void))parse, METH_FASTCALL,
     "parse(buf, start, end, max_frame_size) -> HeaderFrame: the frame buf[start:end], LENGTH "
     "included, its header validated whole. THeader's zlib payload is returned as sent. Raises "
     "ProtocolError (FrameTooLarge for a LENGTH over max_frame_size)."},
    {"build", (PyCFunction)(void (*)(void))build, METH_FASTCALL,
     "build(kind, seqid, protocol_id, payload, flags, str_info, int_info, acl_token, transforms, "
     "payload_framed) -> bytes: one whole frame; a THeader zlib payload must be compressed "
     "already."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kitegreen.codec._headers",
    .m_doc = "TTHeader and THeader frames for kitegreen: parsed and built in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__headers(void)
{
    PyObject *errors = PyImport_ImportModule("kitegreen.exceptions");
    if (errors == NULL)
        return NULL;
    ProtocolError = PyObject_GetAttrString(errors, "ProtocolError");
    FrameTooLarge = PyObject_GetAttrString(errors, "FrameTooLarge");
    Py_DECREF(errors);
    if (ProtocolError == NULL || FrameTooLarge == NULL)
        return NULL;
    S_TTHEADER = PyUnicode_InternFromString("ttheader");
    S_THEADER = PyUnicode_InternFromString("theader");
    S_BINARY = PyUnicode_InternFromString("binary");
    S_COMPACT = PyUnicode_InternFromString("compact");
    EMPTY_TUPLE = PyTuple_New(0);
    PyObject *zlib = PyImport_ImportModule("zlib");
    if (zlib == NULL)
        return NULL;
    zlib_compress = PyObject_GetAttrString(zlib, "compress");
    Py_DECREF(zlib);
    if (zlib_compress == NULL || PyType_Ready(&FrameType) < 0)
        return NULL;
    ZLIB_TUPLE = Py_BuildValue("(i)", TRANSFORM_ZLIB);
    if (!S_TTHEADER || !S_THEADER || !S_BINARY || !S_COMPACT || !EMPTY_TUPLE || !ZLIB_TUPLE)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "HeaderFrame", (PyObject *)&FrameType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEADER_ENTRIES", MAX_ENTRIES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_INFO_BLOCKS", MAX_BLOCKS) < 0 ||
        PyModule_AddIntConstant(m, "CODEC_BINARY", CODEC_BINARY) < 0 ||
        PyModule_AddIntConstant(m, "CODEC_COMPACT", CODEC_COMPACT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
