/*
 * kitegreen.transport._sockio: recv and send on a non-blocking socket, for the request loop.
 *
 * A request costs one recv and one send. CPython's socket methods spend about 2,600
 * instructions a pair around those two system calls (cachegrind, Python 3.11): parsing their
 * arguments with a format string, letting go of the GIL and taking it back (a mutex and a
 * condition each way), and for recv a 64 KiB bytes object allocated with malloc and shrunk to
 * what arrived. On a socket that never blocks none of that buys anything: here the GIL is
 * held throughout (the call returns at once, EAGAIN included), recv reads into one static
 * buffer and copies out only the bytes that arrived, and both take their arguments without a
 * format string. Roughly 6% of a small request's server CPU.
 *
 * The static buffer is safe because the GIL is never released while it is used; the module
 * is single-phase (one per process, as the codec's modules are). What the calls take is an fd
 * the caller owns and has not closed: MessageStream keeps it beside its socket and forgets it
 * (-1, which fails with EBADF) before closing the socket, so a number the kernel hands to a
 * later connection is never read here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <sys/socket.h>
#include <sys/types.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* no such flag: SIGPIPE is ignored by CPython at start anyway */
#endif

#define RECV_SIZE 65536

static char recv_buf[RECV_SIZE];

/* The fd argument: an int in C int range, or -1 on error with an exception set. */
static int
fd_arg(PyObject *obj)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "fd must be an int, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    long fd = PyLong_AsLong(obj);
    if (fd == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range");
        return -1;
    }
    if (fd < 0) {
        /* A forgotten (closed) stream's fd: what the socket module says of a closed socket. */
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return (int)fd;
}

PyDoc_STRVAR(recv_doc,
             "recv(fd, /)\n--\n\n"
             "Up to RECV_SIZE bytes from the non-blocking socket fd; b'' at its end of stream.\n"
             "Raises BlockingIOError when nothing has arrived, OSError (ConnectionResetError, ...)\n"
             "as socket.recv does.");

static PyObject *
sockio_recv(PyObject *module, PyObject *arg)
{
    (void)module;
    int fd = fd_arg(arg);
    if (fd < 0) {
        return NULL;
    }
    for (;;) {
        ssize_t n = recv(fd, recv_buf, RECV_SIZE, 0);
        if (n >= 0) {
            return PyBytes_FromStringAndSize(recv_buf, (Py_ssize_t)n);
        }
        if (errno != EINTR) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        /* A signal arrived: run its Python handler (which may raise), then try again, as the
           socket module does (PEP 475). */
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
}

PyDoc_STRVAR(send_doc,
             "send(fd, data, /)\n--\n\n"
             "Send what of data (bytes) the non-blocking socket fd takes now; how many bytes.\n"
             "Raises BlockingIOError when it takes none, OSError (BrokenPipeError, ...) as\n"
             "socket.send does.");

static PyObject *
sockio_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "send() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    int fd = fd_arg(args[0]);
    if (fd < 0) {
        return NULL;
    }
    PyObject *data = args[1];
    if (!PyBytes_Check(data)) {
        PyErr_Format(PyExc_TypeError, "data must be bytes, not %.100s", Py_TYPE(data)->tp_name);
        return NULL;
    }
    /* The GIL is held: nothing can change or free data during the call. */
    const char *bytes = PyBytes_AS_STRING(data);
    size_t size = (size_t)PyBytes_GET_SIZE(data);
    for (;;) {
        ssize_t n = send(fd, bytes, size, MSG_NOSIGNAL);
        if (n >= 0) {
            return PyLong_FromSsize_t((Py_ssize_t)n);
        }
        if (errno != EINTR) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
}

static PyMethodDef module_methods[] = {
    {"recv", (PyCFunction)sockio_recv, METH_O, recv_doc},
    {"send", (PyCFunction)(void (*)(void))sockio_send, METH_FASTCALL, send_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kitegreen.transport._sockio",
    .m_doc = "recv and send on a non-blocking socket, holding the GIL (see the source).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__sockio(void)
{
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "RECV_SIZE", RECV_SIZE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
