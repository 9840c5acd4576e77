/* The destination's write lane as a native thread (fusedisk.destination, "the write lane").

Why native: a Python worker thread must take the GIL to run each write, and it takes it from
the event loop's thread, which serves every FUSE request; each such trip costs both threads a
context switch and the event loop its turn (docs/benchmarks.md section 2).  This worker never
takes the GIL: it runs the mirrored writes, truncates and fallocates in the order they were
submitted, each as one syscall on a descriptor of its own, and tells the event loop through an
eventfd when finished operations wait to be reaped.

Ownership: the Python object and the worker share one `lane` (two references, the last one
frees it and closes the eventfd).  The worker owns its duplicate of the file's descriptor and
closes it when it ends, so a write that returns late lands in the file it was meant for and
never in one that reused a descriptor number.  Python objects (the caller's token and the
written bytes) are only ever touched with the GIL: by submit, reap, stop and dealloc. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

enum kind { PWRITE, TRUNCATE, FALLOCATE, BARRIER };

typedef struct op {
    struct op *next;
    PyObject *token; /* the caller's, handed back by reap */
    PyObject *data;  /* PWRITE: the bytes, alive until reaped */
    const char *buf;
    Py_ssize_t len;
    long long offset, length;
    int mode;
    int kind;
    int error; /* set by the worker: 0 or an errno */
} op;

typedef struct {
    op *head, *tail;
} oplist;

typedef struct lane {
    pthread_mutex_t mutex;
    pthread_cond_t wake;  /* the worker waits here for work or stop */
    pthread_cond_t ended; /* join() waits here for the worker's end */
    oplist todo, done;
    int fd;        /* the worker's own duplicate */
    int efd;       /* readable when done is not empty */
    int signalled; /* the eventfd was written and not yet reaped */
    int stop, is_ended, refs;
} lane;

static void push(oplist *list, op *o)
{
    o->next = NULL;
    if (list->tail)
        list->tail->next = o;
    else
        list->head = o;
    list->tail = o;
}

static op *take_all(oplist *list)
{
    op *all = list->head;
    list->head = list->tail = NULL;
    return all;
}

static void run(int fd, op *o)
{
    int r;
    switch (o->kind) {
    case PWRITE: {
        Py_ssize_t written = 0;
        while (written < o->len) {
            ssize_t n = pwrite(fd, o->buf + written, (size_t)(o->len - written),
                               (off_t)(o->offset + written));
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) { /* 0: a short write that makes no progress */
                o->error = n < 0 ? errno : EIO;
                return;
            }
            written += n;
        }
        return;
    }
    case TRUNCATE:
        while ((r = ftruncate(fd, (off_t)o->offset)) != 0 && errno == EINTR)
            ;
        break;
    case FALLOCATE:
        while ((r = fallocate(fd, o->mode, (off_t)o->offset, (off_t)o->length)) != 0
               && errno == EINTR)
            ;
        break;
    default:
        return;
    }
    if (r != 0)
        o->error = errno;
}

/* Drop one reference; the last frees the lane (operations still listed keep their Python
   objects: only a holder of the GIL may release those, see Lane_dealloc). */
static void unref(lane *l)
{
    int last;
    pthread_mutex_lock(&l->mutex);
    last = --l->refs == 0;
    pthread_mutex_unlock(&l->mutex);
    if (last) {
        close(l->efd);
        pthread_mutex_destroy(&l->mutex);
        pthread_cond_destroy(&l->wake);
        pthread_cond_destroy(&l->ended);
        PyMem_RawFree(l);
    }
}

static void *work(void *arg)
{
    lane *l = arg;
    pthread_mutex_lock(&l->mutex);
    for (;;) {
        while (!l->todo.head && !l->stop)
            pthread_cond_wait(&l->wake, &l->mutex);
        if (l->stop)
            break;
        op *o = l->todo.head;
        l->todo.head = o->next;
        if (!l->todo.head)
            l->todo.tail = NULL;
        pthread_mutex_unlock(&l->mutex);
        run(l->fd, o);
        pthread_mutex_lock(&l->mutex);
        push(&l->done, o);
        if (!l->signalled) { /* one wake-up per reap, however many finish before it */
            l->signalled = 1;
            uint64_t one = 1;
            ssize_t ignored = write(l->efd, &one, sizeof one);
            (void)ignored; /* an eventfd write fails only on overflow: it is readable then */
        }
    }
    pthread_mutex_unlock(&l->mutex);
    close(l->fd); /* before saying it ended: join() promises the descriptor is gone */
    pthread_mutex_lock(&l->mutex);
    l->is_ended = 1;
    pthread_cond_broadcast(&l->ended);
    pthread_mutex_unlock(&l->mutex);
    unref(l);
    return NULL;
}

typedef struct {
    PyObject_HEAD
    lane *lane;
} Lane;

static void release_ops(op *o)
{
    while (o) {
        op *next = o->next;
        Py_XDECREF(o->token);
        Py_XDECREF(o->data);
        PyMem_RawFree(o);
        o = next;
    }
}

static int Lane_init(Lane *self, PyObject *args, PyObject *kwds)
{
    int fd;
    static char *names[] = {"fd", NULL};
    if (self->lane) {
        PyErr_SetString(PyExc_RuntimeError, "a lane is started once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", names, &fd))
        return -1;
    lane *l = PyMem_RawCalloc(1, sizeof *l);
    if (!l) {
        PyErr_NoMemory();
        return -1;
    }
    l->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    l->efd = l->fd < 0 ? -1 : eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (l->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        if (l->fd >= 0)
            close(l->fd);
        PyMem_RawFree(l);
        return -1;
    }
    pthread_mutex_init(&l->mutex, NULL);
    pthread_cond_init(&l->wake, NULL);
    pthread_cond_init(&l->ended, NULL);
    l->refs = 2;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int e = pthread_create(&thread, &attr, work, l);
    pthread_attr_destroy(&attr);
    if (e) {
        close(l->fd);
        close(l->efd);
        PyMem_RawFree(l);
        errno = e;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->lane = l;
    return 0;
}

static int check(Lane *self)
{
    if (!self->lane) {
        PyErr_SetString(PyExc_RuntimeError, "the lane was not started");
        return -1;
    }
    return 0;
}

static PyObject *submit(Lane *self, op *o)
{
    lane *l = self->lane;
    pthread_mutex_lock(&l->mutex);
    int stopped = l->stop;
    if (!stopped) {
        push(&l->todo, o);
        pthread_cond_signal(&l->wake);
    }
    pthread_mutex_unlock(&l->mutex);
    if (stopped) {
        release_ops(o);
        PyErr_SetString(PyExc_RuntimeError, "the lane was stopped");
        return NULL;
    }
    Py_RETURN_NONE;
}

static op *new_op(PyObject *token, int kind)
{
    op *o = PyMem_RawCalloc(1, sizeof *o);
    if (!o)
        return (op *)PyErr_NoMemory();
    Py_INCREF(token);
    o->token = token;
    o->kind = kind;
    return o;
}

static PyObject *Lane_pwrite(Lane *self, PyObject *args)
{
    PyObject *token, *data;
    long long offset;
    if (check(self) || !PyArg_ParseTuple(args, "OSL", &token, &data, &offset))
        return NULL;
    op *o = new_op(token, PWRITE);
    if (!o)
        return NULL;
    Py_INCREF(data);
    o->data = data;
    o->buf = PyBytes_AS_STRING(data);
    o->len = PyBytes_GET_SIZE(data);
    o->offset = offset;
    return submit(self, o);
}

static PyObject *Lane_truncate(Lane *self, PyObject *args)
{
    PyObject *token;
    long long size;
    if (check(self) || !PyArg_ParseTuple(args, "OL", &token, &size))
        return NULL;
    op *o = new_op(token, TRUNCATE);
    if (!o)
        return NULL;
    o->offset = size;
    return submit(self, o);
}

static PyObject *Lane_fallocate(Lane *self, PyObject *args)
{
    PyObject *token;
    int mode;
    long long offset, length;
    if (check(self) || !PyArg_ParseTuple(args, "OiLL", &token, &mode, &offset, &length))
        return NULL;
    op *o = new_op(token, FALLOCATE);
    if (!o)
        return NULL;
    o->mode = mode;
    o->offset = offset;
    o->length = length;
    return submit(self, o);
}

static PyObject *Lane_barrier(Lane *self, PyObject *token)
{
    if (check(self))
        return NULL;
    op *o = new_op(token, BARRIER);
    return o ? submit(self, o) : NULL;
}

static PyObject *Lane_reap(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (check(self))
        return NULL;
    lane *l = self->lane;
    uint64_t count;
    ssize_t ignored = read(l->efd, &count, sizeof count); /* clear it before looking */
    (void)ignored;
    pthread_mutex_lock(&l->mutex);
    op *done = take_all(&l->done);
    l->signalled = 0;
    pthread_mutex_unlock(&l->mutex);
    PyObject *list = PyList_New(0);
    for (op *o = done; o && list; o = o->next) {
        PyObject *item = Py_BuildValue("(Oi)", o->token, o->error);
        if (!item || PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_XDECREF(item);
    }
    release_ops(done);
    return list;
}

static PyObject *Lane_stop(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (check(self))
        return NULL;
    lane *l = self->lane;
    pthread_mutex_lock(&l->mutex);
    l->stop = 1;
    op *todo = take_all(&l->todo);
    pthread_cond_signal(&l->wake);
    pthread_mutex_unlock(&l->mutex);
    release_ops(todo); /* never run */
    Py_RETURN_NONE;
}

static PyObject *Lane_join(Lane *self, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    if (check(self) || (timeout == -1.0 && PyErr_Occurred()))
        return NULL;
    lane *l = self->lane;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    long long ns = until.tv_nsec + (long long)(timeout * 1e9);
    until.tv_sec += ns / 1000000000;
    until.tv_nsec = ns % 1000000000;
    int ended;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&l->mutex);
    while (!l->is_ended && pthread_cond_timedwait(&l->ended, &l->mutex, &until) == 0)
        ;
    ended = l->is_ended;
    pthread_mutex_unlock(&l->mutex);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ended);
}

static PyObject *Lane_fileno(Lane *self, PyObject *Py_UNUSED(ignored))
{
    return check(self) ? NULL : PyLong_FromLong(self->lane->efd);
}

static void Lane_dealloc(Lane *self)
{
    lane *l = self->lane;
    if (l) {
        pthread_mutex_lock(&l->mutex);
        l->stop = 1;
        op *todo = take_all(&l->todo);
        op *done = take_all(&l->done);
        pthread_cond_signal(&l->wake);
        pthread_mutex_unlock(&l->mutex);
        release_ops(todo);
        release_ops(done);
        /* An operation the worker is still in (stuck in the kernel) keeps its bytes: they
           are never released, as the worker may not touch Python objects. */
        unref(l);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Lane_methods[] = {
    {"pwrite", (PyCFunction)Lane_pwrite, METH_VARARGS, "pwrite(token, data, offset): queue a write"},
    {"truncate", (PyCFunction)Lane_truncate, METH_VARARGS, "truncate(token, size): queue one"},
    {"fallocate", (PyCFunction)Lane_fallocate, METH_VARARGS,
     "fallocate(token, mode, offset, length): queue one"},
    {"barrier", (PyCFunction)Lane_barrier, METH_O,
     "barrier(token): queue nothing to do, reaped once everything before it is"},
    {"reap", (PyCFunction)Lane_reap, METH_NOARGS,
     "reap() -> [(token, errno)]: the operations finished since the last reap, in order"},
    {"stop", (PyCFunction)Lane_stop, METH_NOARGS,
     "stop(): run nothing more; the worker ends once its current syscall returns"},
    {"join", (PyCFunction)Lane_join, METH_O,
     "join(timeout) -> bool: whether the worker ended (its descriptor closed)"},
    {"fileno", (PyCFunction)Lane_fileno, METH_NOARGS,
     "fileno() -> the eventfd, readable when finished operations wait to be reaped"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fusedisk._lane.Lane",
    .tp_doc = "Lane(fd): a native thread that writes to a duplicate of fd, in order",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fusedisk._lane",
    .m_doc = "The destination's write lane as a native thread.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__lane(void)
{
    if (PyType_Ready(&LaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
