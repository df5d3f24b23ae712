/*
 * twinvol.host._relay: the host agent's native data path.
 *
 * Why native: every request a host sends through the agent crosses it twice (request
 * in, reply out) on the same two cores the storage nodes and the client use. The
 * Python data path cost about 12 us per request, which capped reads through the agent
 * well below the node's own rate. Here a request costs a header parse, a table entry
 * and a share of one recv and one send per batch.
 *
 * What stays in Python (twinvol.host.native / paths.py): negotiation on both sides,
 * path (re)connection, identity checks, I/O-mode events, the hold timer, stall checks,
 * logging and status. This module owns, once Python hands it the sockets:
 *   - the client's transmission phase: request parsing and validation (the same rules
 *     and messages as twinvol.nbd.server), replies in simple or structured form;
 *   - the paths' transmission phase: requests out, replies in (single-chunk structured
 *     replies or simple replies, as twinvol nodes send them);
 *   - the routing rules of twinvol.host.policy: reads to the path with the fewest
 *     requests outstanding (ties round-robin), everything else to one path (primary,
 *     else the lowest order); no usable path: held until Python adds one or fails them;
 *   - the retry rules of twinvol.host.retry: a lost path's requests, and requests a node
 *     answers with a path fault (EIO, ESHUTDOWN: fenced, blocked, partner lost), are
 *     re-sent on another path, once every request still on the faulted path is answered
 *     or lost, in the order the client sent them; the client sees an error only for a
 *     fault after hold_timeout (counted from the request's first fault).
 *
 * No threads: Python's event loop calls client_readable / path_readable / writable
 * when a socket is ready (level-triggered) and acts on the events returned (a list of
 * tuples, or None when there is nothing to do -- the common case).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_MAGIC 0x67446698u
#define STRUCT_MAGIC 0x668e33efu

enum { C_READ = 0, C_WRITE = 1, C_DISC = 2, C_FLUSH = 3, C_TRIM = 4, C_CACHE = 5,
       C_ZEROES = 6, C_BLOCK_STATUS = 7 };
enum { F_FUA = 1, F_NO_HOLE = 2, F_DF = 4, F_REQ_ONE = 8, F_FAST_ZERO = 16 };
enum { R_NONE = 0, R_OFFSET_DATA = 1, R_OFFSET_HOLE = 2, R_BLOCK_STATUS = 5,
       R_ERROR = 32769, R_ERROR_OFFSET = 32770 };
enum { E_EPERM = 1, E_EIO = 5, E_EINVAL = 22, E_ENOSPC = 28, E_EOVERFLOW = 75,
       E_ENOTSUP = 95, E_ESHUTDOWN = 108 };

#define MAX_PAYLOAD (32u * 1024u * 1024u)
#define MAX_STRING 4096
#define MAX_STATUS_CHUNK (1u << 20)     /* a non-data chunk from a node larger than this is bad */
#define DIRECT_MIN 65536                /* payloads this big are received straight into place */
#define RECV_CHUNK (256 * 1024)
#define CLIENT_OUT_HIGH (4u * 1024u * 1024u)
#define MAX_OUT_BYTES (64u * 1024u * 1024u)  /* payload bytes in flight per client */
#define MAX_PATHS 16
#define IOV_BATCH 256
#define DEFER_MIN 0                     /* default off: see flush_paths */
#define DEFER_MAX 32
#define BATCH_SLACK 16                  /* see choose_path */
#define META_CONTEXT_ID 1               /* the agent's id for base:allocation (as nbd/server.py) */
/* Latency: one request in LAT_SAMPLE is timed, from the whole request read to its reply
   queued, and binned by bit length as twinvol.nbd.iostats does (same buckets). */
#define LAT_SAMPLE_MASK 15u
#define LAT_SHIFT 14
#define LAT_BUCKETS 18

static const char *CMD_NAMES[] = {"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE",
                                  "WRITE_ZEROES", "BLOCK_STATUS"};
static const uint16_t ALLOWED_FLAGS[] = {
    F_FUA | F_DF, F_FUA, F_FUA, F_FUA, F_FUA, F_FUA, F_FUA | F_NO_HOLE | F_FAST_ZERO,
    F_FUA | F_REQ_ONE};

/* ---- byte helpers ------------------------------------------------------------ */

static inline uint16_t rd16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t rd64(const unsigned char *p) {
    return (uint64_t)rd32(p) << 32 | rd32(p + 4);
}
static inline void wr16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = (unsigned char)v; }
static inline void wr32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}
static inline void wr64(unsigned char *p, uint64_t v) { wr32(p, (uint32_t)(v >> 32)); wr32(p + 4, (uint32_t)v); }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A refcounted payload: a write's data (kept for a retry until its reply) or a read's. */
typedef struct {
    size_t refs, len, cap;
    unsigned char data[];
} Payload;

/* Large payloads are kept for reuse: a fresh 1 MiB malloc is an mmap, and touching it
   page-faults every page in (a tenth of the agent's time at 1 MiB writes). */
#define POOL_MIN (64 * 1024)
#define POOL_SLOTS 16
static Payload *pool[POOL_SLOTS];
static int npool;

static Payload *pl_new(size_t len) {
    if (len >= POOL_MIN) {
        for (int i = 0; i < npool; i++) {
            Payload *p = pool[i];
            if (p->cap >= len && p->cap / 2 <= len) {
                pool[i] = pool[--npool];
                p->refs = 1;
                p->len = len;
                return p;
            }
        }
    }
    Payload *p = malloc(sizeof(Payload) + (len ? len : 1));
    if (p) { p->refs = 1; p->len = len; p->cap = len; }
    return p;
}

static void pl_unref(Payload *p) {
    if (!p || --p->refs) return;
    if (p->cap >= POOL_MIN) {
        if (npool < POOL_SLOTS) { pool[npool++] = p; return; }
        /* Full: replace the smallest kept buffer if this one is larger. */
        int small = 0;
        for (int i = 1; i < npool; i++) if (pool[i]->cap < pool[small]->cap) small = i;
        if (pool[small]->cap < p->cap) { free(pool[small]); pool[small] = p; return; }
    }
    free(p);
}

/* A growable byte buffer; `off` is where unconsumed bytes start. */
typedef struct {
    unsigned char *p;
    size_t len, cap, off;
} Buf;

static int buf_reserve(Buf *b, size_t extra) {
    if (b->off && b->off == b->len) { b->off = b->len = 0; }
    if (b->len + extra <= b->cap) return 0;
    if (b->off) {  /* slide down first */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap) return 0;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    unsigned char *np = realloc(b->p, cap);
    if (!np) return -1;
    b->p = np;
    b->cap = cap;
    return 0;
}

/* ---- output queues: inline bytes and payload references, sent with sendmsg --------- */

typedef struct {
    Payload *pl;      /* NULL: bytes in the queue's inline buffer at `off` */
    size_t off, len;
} Seg;

typedef struct {
    Seg *segs;
    size_t nsegs, cap, head;  /* segs[head..nsegs) are pending */
    size_t head_done;         /* bytes of segs[head] already sent */
    Buf inl;                  /* inline bytes (headers, small payloads) */
    size_t pending;           /* bytes not yet sent */
    int want_write;           /* Python watches the fd for writability */
} OutQ;

static int q_seg(OutQ *q, Payload *pl, size_t off, size_t len) {
    if (q->nsegs == q->cap) {
        if (q->head) {
            memmove(q->segs, q->segs + q->head, (q->nsegs - q->head) * sizeof(Seg));
            q->nsegs -= q->head;
            q->head = 0;
        }
        if (q->nsegs == q->cap) {
            size_t cap = q->cap ? q->cap * 2 : 64;
            Seg *ns = realloc(q->segs, cap * sizeof(Seg));
            if (!ns) return -1;
            q->segs = ns;
            q->cap = cap;
        }
    }
    q->segs[q->nsegs++] = (Seg){pl, off, len};
    q->pending += len;
    return 0;
}

/* Append inline bytes (copied). */
static int q_bytes(OutQ *q, const void *data, size_t len) {
    if (!len) return 0;
    if (q->inl.len + len > q->inl.cap) {
        size_t cap = q->inl.cap ? q->inl.cap : 4096;
        while (cap < q->inl.len + len) cap *= 2;
        unsigned char *np = realloc(q->inl.p, cap);
        if (!np) return -1;
        q->inl.p = np;
        q->inl.cap = cap;
    }
    size_t off = q->inl.len;
    memcpy(q->inl.p + off, data, len);
    q->inl.len += len;
    if (q->nsegs > q->head) {
        Seg *last = &q->segs[q->nsegs - 1];
        if (!last->pl && last->off + last->len == off) {
            last->len += len;
            q->pending += len;
            return 0;
        }
    }
    return q_seg(q, NULL, off, len);
}

static int q_payload(OutQ *q, Payload *pl, size_t off, size_t len) {
    if (len < 4096) return q_bytes(q, pl->data + off, len);
    pl->refs++;
    if (q_seg(q, pl, off, len) < 0) { pl->refs--; return -1; }
    return 0;
}

static void q_clear(OutQ *q) {
    for (size_t i = q->head; i < q->nsegs; i++) pl_unref(q->segs[i].pl);
    q->nsegs = q->head = q->head_done = q->pending = 0;
    q->inl.len = 0;
}

static void q_free(OutQ *q) {
    q_clear(q);
    free(q->segs);
    free(q->inl.p);
    memset(q, 0, sizeof(*q));
}

/* Send what can be sent. 0: all sent or would block; -1: error (errno set). */
static int q_send(OutQ *q, int fd) {
    while (q->head < q->nsegs) {
        struct iovec iov[IOV_BATCH];
        int n = 0;
        for (size_t i = q->head; i < q->nsegs && n < IOV_BATCH; i++, n++) {
            Seg *s = &q->segs[i];
            unsigned char *base = s->pl ? s->pl->data : q->inl.p;
            size_t skip = i == q->head ? q->head_done : 0;
            iov[n].iov_base = base + s->off + skip;
            iov[n].iov_len = s->len - skip;
        }
        struct msghdr mh = {0};
        mh.msg_iov = iov;
        mh.msg_iovlen = (size_t)n;
        ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        size_t left = (size_t)w;
        q->pending -= left;
        while (left && q->head < q->nsegs) {
            Seg *s = &q->segs[q->head];
            size_t rest = s->len - q->head_done;
            if (left >= rest) {
                left -= rest;
                pl_unref(s->pl);
                q->head++;
                q->head_done = 0;
            } else {
                q->head_done += left;
                left = 0;
            }
        }
        if (q->head == q->nsegs) {
            q->head = q->nsegs = q->head_done = 0;
            q->inl.len = 0;
        }
        if ((size_t)w < 16384 && q->head < q->nsegs) return 0; /* short write: kernel full */
    }
    return 0;
}

/* ---- requests -------------------------------------------------------------------- */

typedef struct {
    uint64_t cookie;     /* the client's */
    uint64_t offset;
    uint32_t length;
    uint16_t cmd, flags;
    Payload *data;       /* a write's payload */
    int path;            /* index in paths[], -1 when held or free */
    uint64_t seq;        /* arrival order: faulted requests are re-sent in this order */
    uint32_t faults;     /* times a path failed it (see fault) */
    double first_fault;  /* now_mono() of the first */
    int parked;          /* 1 + the path it waits to drain, 0 when not parked */
    uint32_t gen;        /* bumped each time the slot is (re)sent: stale replies are refused */
    uint32_t charged;    /* bytes of payload this request holds or will (see out_bytes) */
    uint64_t t0;         /* now_ns() when read, for the one in LAT_SAMPLE timed; else 0 */
    int next;            /* free list / held queue link */
    int used;
} Slot;

typedef struct {
    int fd;              /* -1: no path at this index */
    int dead;            /* failed: waiting for Python to remove it */
    int draining;        /* faulted: no new requests; closed once nothing is in flight */
    char why[400];       /* the fault that started the draining */
    int order, primary;
    uint32_t ctx_id;     /* this path's id for base:allocation */
    char node[64];
    OutQ out;
    Buf in;
    Payload *rd;         /* a large read reply being received straight into place */
    size_t rd_got;
    int rd_slot;
    unsigned char rd_hdr[32];
    size_t inflight;
    size_t unsent;       /* requests queued since the last send (see flush_paths) */
    unsigned long long requests;
    double progress;
} Path;

/* Timed requests of one kind (read, write, other) since take_latency last took them. */
typedef struct {
    unsigned long long samples, ns, buckets[LAT_BUCKETS];
} Lat;

typedef struct {
    PyObject_HEAD
    int client_fd;
    uint64_t size;
    int structured, meta_context, read_only;
    size_t max_outstanding;
    Buf cin;
    OutQ cout;
    /* a write payload arriving */
    int w_active;
    int w_slot;              /* -1: discarding (bad write); else the slot being filled */
    Payload *w_pl;
    size_t w_got, w_len;
    uint16_t w_err;
    char w_msg[160];
    uint64_t w_cookie;
    Slot *slots;
    int nslots, free_head;
    int held_head, held_tail;
    size_t held, outstanding;
    size_t out_bytes;        /* read and write payload bytes of the outstanding requests */
    Path paths[MAX_PATHS];
    int npaths;
    unsigned rr;
    int batch_path;          /* where this batch of reads goes (-1: choose) */
    size_t defer_min, batch_slack;  /* tuning, see flush_paths and choose_path */
    int failing;
    char *fail_msg;
    double hold_timeout;     /* a request faulted this long ago gets its error */
    uint64_t next_seq;
    int client_paused, closing, client_gone;
    int big_write;           /* the last request parsed was a large write (see read_client) */
    const char *close_reason;  /* why closing: a DISC or the client's EOF */
    unsigned long long retries, held_total, requests;
    Lat lat[3];              /* by kind: read, write, other */
    PyObject *events;        /* list being built during one call, or NULL */
    PyObject *on_events;     /* called with the events of an I/O call (see deliver) */
} Relay;

/* ---- events back to Python -------------------------------------------------------- */

static int ev_add(Relay *r, PyObject *tuple) {
    if (!tuple) return -1;
    if (!r->events) {
        r->events = PyList_New(0);
        if (!r->events) { Py_DECREF(tuple); return -1; }
    }
    int rc = PyList_Append(r->events, tuple);
    Py_DECREF(tuple);
    return rc;
}

static PyObject *ev_take(Relay *r) {
    PyObject *ev = r->events;
    r->events = NULL;
    if (PyErr_Occurred()) { Py_XDECREF(ev); return NULL; }
    if (!ev) Py_RETURN_NONE;
    return ev;
}

/* The I/O entry points (client_readable, path_readable, writable) are called by the event
   loop itself: their events go to `on_events` when set, so the loop calls C directly and
   Python runs only when there is something to do. */
static PyObject *deliver(Relay *r) {
    PyObject *ev = ev_take(r);
    if (!ev || ev == Py_None || !r->on_events) return ev;
    PyObject *res = PyObject_CallOneArg(r->on_events, ev);
    Py_DECREF(ev);
    if (!res) return NULL;
    Py_DECREF(res);
    Py_RETURN_NONE;
}

/* ---- client replies -------------------------------------------------------------- */

static int reply_ok(Relay *r, uint64_t cookie) {
    unsigned char h[16];
    wr32(h, SIMPLE_MAGIC); wr32(h + 4, 0); wr64(h + 8, cookie);
    return q_bytes(&r->cout, h, 16);
}

static int reply_error(Relay *r, uint64_t cookie, uint32_t err, const char *msg, size_t mlen) {
    if (r->structured) {
        if (mlen > MAX_STRING) {
            mlen = MAX_STRING;
            while (mlen && ((unsigned char)msg[mlen] & 0xC0) == 0x80) mlen--; /* char boundary */
        }
        unsigned char h[26];
        wr32(h, STRUCT_MAGIC); wr16(h + 4, 1); wr16(h + 6, (uint16_t)R_ERROR);
        wr64(h + 8, cookie); wr32(h + 16, (uint32_t)(6 + mlen));
        wr32(h + 20, err); wr16(h + 24, (uint16_t)mlen);
        if (q_bytes(&r->cout, h, 26) < 0) return -1;
        return q_bytes(&r->cout, msg, mlen);
    }
    unsigned char h[16];
    wr32(h, SIMPLE_MAGIC); wr32(h + 4, err); wr64(h + 8, cookie);
    return q_bytes(&r->cout, h, 16);
}

static int reply_errorf(Relay *r, uint64_t cookie, uint32_t err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int reply_errorf(Relay *r, uint64_t cookie, uint32_t err, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof msg) n = sizeof msg - 1;
    return reply_error(r, cookie, err, msg, (size_t)n);
}

/* ---- slots ----------------------------------------------------------------------- */

static int slot_new(Relay *r) {
    if (r->free_head < 0) {
        int n = r->nslots ? r->nslots * 2 : 64;
        Slot *ns = realloc(r->slots, (size_t)n * sizeof(Slot));
        if (!ns) return -1;
        for (int i = r->nslots; i < n; i++) {
            memset(&ns[i], 0, sizeof(Slot));
            ns[i].next = i + 1 < n ? i + 1 : -1;
            ns[i].path = -1;
        }
        r->slots = ns;
        r->free_head = r->nslots;
        r->nslots = n;
    }
    int i = r->free_head;
    Slot *s = &r->slots[i];
    r->free_head = s->next;
    uint32_t gen = s->gen;
    memset(s, 0, sizeof *s);
    s->gen = gen + 1;
    s->path = -1;
    s->next = -1;
    s->used = 1;
    s->seq = r->next_seq++;
    r->outstanding++;
    return i;
}

static void slot_free(Relay *r, int i) {
    Slot *s = &r->slots[i];
    pl_unref(s->data);
    s->data = NULL;
    r->out_bytes -= s->charged;
    s->charged = 0;
    s->used = 0;
    s->path = -1;
    s->next = r->free_head;
    r->free_head = i;
    r->outstanding--;
}

/* ---- routing (the rules of twinvol.host.policy) ------------------------------------ */

static int path_usable(Relay *r, int i) {
    return r->paths[i].fd >= 0 && !r->paths[i].dead && !r->paths[i].draining;
}

static int n_usable(Relay *r) {
    int n = 0;
    for (int i = 0; i < r->npaths; i++) n += path_usable(r, i);
    return n;
}

static int is_read_like(uint16_t cmd) {
    return cmd == C_READ || cmd == C_CACHE || cmd == C_BLOCK_STATUS;
}

static int choose_path(Relay *r, Slot *s) {
    int best = -1;
    if (is_read_like(s->cmd)) {
        int n = r->npaths;
        if (n == 0) return -1;
        unsigned start = ++r->rr;
        for (int k = 0; k < n; k++) {
            int i = (int)((start + (unsigned)k) % (unsigned)n);
            if (!path_usable(r, i)) continue;
            if (best < 0 || r->paths[i].inflight < r->paths[best].inflight) best = i;
        }
        /* Reads that arrived together stay together while their path is not much busier
           than the least busy one: one send instead of one per path, and the node gets
           a batch it can answer in one go. */
        int b = r->batch_path;
        if (best >= 0 && !s->faults && b >= 0 && b != best && path_usable(r, b)
            && r->paths[b].inflight <= r->paths[best].inflight + r->batch_slack)
            return b;
        if (!s->faults) r->batch_path = best;
        return best;
    }
    for (int i = 0; i < r->npaths; i++) {
        if (!path_usable(r, i)) continue;
        if (r->paths[i].primary) return i;
        if (best < 0 || r->paths[i].order < r->paths[best].order) best = i;
    }
    return best;
}

static void hold(Relay *r, int si);

static int send_to(Relay *r, int si, int pi) {
    Slot *s = &r->slots[si];
    Path *p = &r->paths[pi];
    unsigned char h[28];
    wr32(h, REQUEST_MAGIC); wr16(h + 4, s->flags); wr16(h + 6, s->cmd);
    wr32(h + 8, (uint32_t)si); wr32(h + 12, s->gen);
    wr64(h + 16, s->offset); wr32(h + 24, s->length);
    if (q_bytes(&p->out, h, 28) < 0) return -1;
    if (s->cmd == C_WRITE && s->length && q_payload(&p->out, s->data, 0, s->length) < 0)
        return -1;
    s->path = pi;
    if (!p->inflight) p->progress = now_mono();
    p->inflight++;
    p->unsent++;
    return 0;
}

static int no_path_message(Relay *r, uint64_t cookie) {
    const char *m = r->fail_msg ? r->fail_msg : "no usable path";
    return reply_error(r, cookie, E_EIO, m, strlen(m));
}

/* Route a request: to a path, into the held queue, or (no path, failing) EIO. */
static int dispatch(Relay *r, int si) {
    Slot *s = &r->slots[si];
    if (!n_usable(r)) {
        if (r->failing) {
            int rc = no_path_message(r, s->cookie);
            slot_free(r, si);
            return rc;
        }
        hold(r, si);
        return 0;
    }
    return send_to(r, si, choose_path(r, s));  /* a usable path exists: never -1 */
}

/* Queue a request until a path is usable. A re-sent one goes before later arrivals, so
   held requests leave in the order the client sent them. */
static void hold(Relay *r, int si) {
    Slot *s = &r->slots[si];
    s->path = -1;
    s->next = -1;
    int prev = -1, cur = r->held_head;
    if (s->faults) {
        while (cur >= 0 && r->slots[cur].seq < s->seq) { prev = cur; cur = r->slots[cur].next; }
    } else {
        prev = r->held_tail;
        cur = -1;
    }
    s->next = cur;
    if (prev >= 0) r->slots[prev].next = si;
    else r->held_head = si;
    if (cur < 0) r->held_tail = si;
    r->held++;
    r->held_total++;
    ev_add(r, Py_BuildValue("(si)", "held", 1));
}

static int retry(Relay *r, int si) {
    r->retries++;
    ev_add(r, Py_BuildValue("(si)", "retried", 1));
    return dispatch(r, si);
}

/* Count a path fault against slot si. 1: re-send it; 0: its first fault was
   hold_timeout ago or more, so the client gets the error (answered here); -1: OOM. */
static int count_fault(Relay *r, int si, uint32_t err, const char *msg, size_t mlen) {
    Slot *s = &r->slots[si];
    double now = now_mono();
    if (s->faults && now - s->first_fault >= r->hold_timeout) {
        int rc = reply_error(r, s->cookie, err, msg, mlen);
        slot_free(r, si);
        return rc < 0 ? -1 : 0;
    }
    if (!s->faults) s->first_fault = now;
    s->faults++;
    return 1;
}

/* A path is gone: stop using it, tell Python, and re-send what was in flight on it or
   parked waiting for it to drain, oldest first. */
static void path_fail(Relay *r, int pi, const char *reason) {
    Path *p = &r->paths[pi];
    if (p->fd < 0 || p->dead) return;
    p->dead = 1;
    p->draining = 0;
    q_clear(&p->out);
    p->unsent = 0;
    p->in.len = p->in.off = 0;
    if (p->rd) { pl_unref(p->rd); p->rd = NULL; }
    ev_add(r, Py_BuildValue("(sis)", "path_lost", pi, reason));
    for (int i = 0; i < r->nslots; i++) {
        Slot *s = &r->slots[i];
        if (s->used && s->path == pi) {
            s->path = -1;
            if (count_fault(r, i, E_EIO, reason, strlen(reason)) > 0) s->parked = pi + 1;
        }
    }
    p->inflight = 0;
    for (;;) {  /* at most max_outstanding slots: a selection is cheap enough */
        int best = -1;
        for (int i = 0; i < r->nslots; i++) {
            Slot *s = &r->slots[i];
            if (s->used && s->parked == pi + 1 && (best < 0 || s->seq < r->slots[best].seq))
                best = i;
        }
        if (best < 0) break;
        r->slots[best].parked = 0;
        retry(r, best);
    }
}

/* The node on path pi answered slot si with a path fault (or the fault is the path's):
   take the path out of use now; reads go elsewhere at once, anything else waits until
   the path has nothing in flight (a re-sent write must not overtake an older one still
   on the faulted path), then the path is closed and its waiting requests re-sent. */
static int fault(Relay *r, int si, int pi, uint32_t err, const char *msg, size_t mlen,
                 const char *reason) {
    Path *p = &r->paths[pi];
    Slot *s = &r->slots[si];
    int rc = 0;
    s->path = -1;
    if (!p->draining) {
        p->draining = 1;
        snprintf(p->why, sizeof p->why, "%s", reason);
        ev_add(r, Py_BuildValue("(sis)", "path_draining", pi, reason));
    }
    int go = count_fault(r, si, err, msg, mlen);
    if (go > 0 && is_read_like(s->cmd)) rc = retry(r, si);
    else if (go > 0) s->parked = pi + 1;
    if (!p->inflight) path_fail(r, pi, reason);
    return go < 0 ? -1 : rc;
}

/* ---- client input ------------------------------------------------------------------- */

static void client_close_event(Relay *r, const char *reason, int error) {
    if (r->client_gone) return;
    if (r->client_fd >= 0) q_send(&r->cout, r->client_fd);  /* what was answered, best effort */
    r->client_gone = 1;
    ev_add(r, Py_BuildValue("(ssO)", "client_closed", reason, error ? Py_True : Py_False));
}

/* Validate like twinvol.nbd.server.ServerConnection._check; 0 = valid. */
static uint32_t check(Relay *r, uint16_t cmd, uint16_t flags, uint64_t off, uint32_t len,
                      char *msg, size_t msz) {
    if (flags & ~ALLOWED_FLAGS[cmd]) {
        snprintf(msg, msz, "flags %#x are not valid for %s", flags, CMD_NAMES[cmd]);
        return E_EINVAL;
    }
    if ((flags & F_DF) && !r->structured) {
        snprintf(msg, msz, "DF flag needs structured replies");
        return E_EINVAL;
    }
    if (cmd == C_DISC || cmd == C_FLUSH) return 0;
    if ((cmd == C_WRITE || cmd == C_TRIM || cmd == C_ZEROES) && r->read_only) {
        snprintf(msg, msz, "export is read-only");
        return E_EPERM;
    }
    if (cmd == C_READ && len > MAX_PAYLOAD) {
        if (r->structured) {
            snprintf(msg, msz, "read of %u bytes is over the %u byte maximum; split it", len,
                     MAX_PAYLOAD);
            return E_EOVERFLOW;
        }
        snprintf(msg, msz, "read of %u bytes exceeds the maximum payload", len);
        return E_EINVAL;
    }
    if (cmd == C_BLOCK_STATUS) {
        if (!r->meta_context) {
            snprintf(msg, msz, "no metadata context was negotiated");
            return E_EINVAL;
        }
        if (len == 0) {
            snprintf(msg, msz, "block status length must not be zero");
            return E_EINVAL;
        }
    }
    if (off > r->size || len > r->size - off) {
        snprintf(msg, msz, "request [%llu, +%u) is past the end of the export (%llu)",
                 (unsigned long long)off, len, (unsigned long long)r->size);
        return (cmd == C_WRITE || cmd == C_ZEROES) ? E_ENOSPC : E_EINVAL;
    }
    return 0;
}

/* One request in LAT_SAMPLE (by arrival number) is timed. */
static inline void lat_start(Slot *s) {
    if (!(s->seq & LAT_SAMPLE_MASK)) s->t0 = now_ns();
}

/* A timed request is answered (its reply queued): count its time. */
static void lat_done(Relay *r, Slot *s) {
    if (!s->t0) return;
    uint64_t ns = now_ns() - s->t0;
    Lat *l = &r->lat[s->cmd == C_READ ? 0 : s->cmd == C_WRITE ? 1 : 2];
    l->samples++;
    l->ns += ns;
    unsigned b = 0;
    for (uint64_t v = ns >> LAT_SHIFT; v && b < LAT_BUCKETS - 1; v >>= 1) b++;
    l->buckets[b]++;
}

/* A complete write payload: route it (or answer the error found in its header). */
static int finish_write(Relay *r) {
    r->w_active = 0;
    if (r->w_slot < 0) {
        return reply_error(r, r->w_cookie, r->w_err, r->w_msg, strlen(r->w_msg));
    }
    int si = r->w_slot;
    r->slots[si].data = r->w_pl;
    r->w_pl = NULL;
    lat_start(&r->slots[si]);
    r->requests++;
    return dispatch(r, si);
}

/* Requests stop being parsed (and the client's socket read) past these bounds, so a
   client that sends faster than it reads replies cannot make the agent buffer without
   limit. */
static int over_limits(Relay *r) {
    return r->outstanding >= r->max_outstanding || r->out_bytes >= MAX_OUT_BYTES;
}

/* Parse what is in cin. Returns -1 on allocation failure. */
static int parse_requests(Relay *r) {
    Buf *b = &r->cin;
    while (!r->closing && !r->client_gone) {
        size_t avail = b->len - b->off;
        unsigned char *p = b->p + b->off;
        if (r->w_active) {
            size_t n = r->w_len - r->w_got;
            if (n > avail) n = avail;
            if (r->w_pl && n) memcpy(r->w_pl->data + r->w_got, p, n);
            r->w_got += n;
            b->off += n;
            if (r->w_got < r->w_len) return 0;
            if (finish_write(r) < 0) return -1;
            continue;
        }
        if (avail < 28 || over_limits(r)) return 0;
        uint32_t magic = rd32(p);
        uint16_t flags = rd16(p + 4), cmd = rd16(p + 6);
        uint64_t cookie = rd64(p + 8), off = rd64(p + 16);
        uint32_t len = rd32(p + 24);
        b->off += 28;
        r->big_write = cmd == C_WRITE && len >= DIRECT_MIN;
        if (magic != REQUEST_MAGIC) {
            char reason[64];
            snprintf(reason, sizeof reason, "bad request magic %#x", magic);
            client_close_event(r, reason, 1);
            return 0;
        }
        char msg[256];
        if (cmd == C_WRITE) {
            if (len > MAX_PAYLOAD) {
                char reason[128];
                snprintf(reason, sizeof reason,
                         "write payload of %u bytes exceeds the %u byte maximum", len,
                         MAX_PAYLOAD);
                client_close_event(r, reason, 1);
                return 0;
            }
            uint32_t err = check(r, cmd, flags, off, len, msg, sizeof msg);
            r->w_active = 1;
            r->w_got = 0;
            r->w_len = len;
            r->w_cookie = cookie;
            r->w_pl = NULL;
            if (err) {
                r->w_slot = -1;
                r->w_err = (uint16_t)err;
                snprintf(r->w_msg, sizeof r->w_msg, "%s", msg);
            } else {
                int si = slot_new(r);
                if (si < 0) return -1;
                Slot *s = &r->slots[si];
                s->cookie = cookie; s->offset = off; s->length = len;
                s->cmd = cmd; s->flags = flags;
                s->charged = len;
                r->out_bytes += len;
                r->w_slot = si;
                r->w_pl = pl_new(len);
                if (!r->w_pl) return -1;
            }
            continue;
        }
        if (cmd > C_BLOCK_STATUS) {
            if (reply_errorf(r, cookie, E_EINVAL, "unknown command %u", cmd) < 0) return -1;
            continue;
        }
        uint32_t err = check(r, cmd, flags, off, len, msg, sizeof msg);
        if (err) {
            if (reply_error(r, cookie, err, msg, strlen(msg)) < 0) return -1;
            continue;
        }
        if (cmd == C_DISC) {
            r->closing = 1;  /* answer what is in flight, then close */
            r->close_reason = "client sent NBD_CMD_DISC";
            b->off = b->len;
            return 0;
        }
        int si = slot_new(r);
        if (si < 0) return -1;
        Slot *s = &r->slots[si];
        s->cookie = cookie; s->offset = off; s->length = len; s->cmd = cmd; s->flags = flags;
        if (cmd == C_READ) {
            s->charged = len;
            r->out_bytes += len;
        }
        lat_start(s);
        r->requests++;
        if (dispatch(r, si) < 0) return -1;
    }
    return 0;
}

/* ---- sending ---------------------------------------------------------------------- */

static void want_write(Relay *r, OutQ *q, int fd) {
    if (q->pending && !q->want_write) {
        q->want_write = 1;
        ev_add(r, Py_BuildValue("(si)", "want_write", fd));
    } else if (!q->pending && q->want_write) {
        q->want_write = 0;
        ev_add(r, Py_BuildValue("(si)", "write_idle", fd));
    }
}

static void flush_client(Relay *r) {
    if (r->client_gone) { q_clear(&r->cout); return; }
    if (q_send(&r->cout, r->client_fd) < 0) {
        char reason[128];
        snprintf(reason, sizeof reason, "sending to the client failed: %s", strerror(errno));
        q_clear(&r->cout);
        client_close_event(r, reason, 1);
        return;
    }
    want_write(r, &r->cout, r->client_fd);
}

/* Send what is queued for the paths. With `defer` and tuning defer_min > 0, a path that
   already has defer_min requests sent and unanswered keeps new ones queued (up to
   DEFER_MAX): its replies will wake us soon, and they go out then, in one send, as one
   bigger batch for the node. Measured on an active-active pair it cost a quarter of the
   4k write rate through the agent (the primary's replies wait for its partner) and gained
   nothing on reads, so it is off by default. */
static void flush_paths(Relay *r, int defer) {
    for (int i = 0; i < r->npaths; i++) {
        Path *p = &r->paths[i];
        if (p->fd < 0 || p->dead || !p->out.pending) {
            if (p->fd >= 0 && !p->dead && p->out.want_write) want_write(r, &p->out, p->fd);
            continue;
        }
        if (defer && r->defer_min && p->unsent < DEFER_MAX
            && p->inflight - p->unsent >= r->defer_min)
            continue;
        p->unsent = 0;
        if (q_send(&p->out, p->fd) < 0) {
            char reason[160];
            snprintf(reason, sizeof reason, "sending to node %s failed: %s", p->node,
                     strerror(errno));
            path_fail(r, i, reason);
            i = -1;  /* re-sent requests may have gone to any path: look at all again */
            continue;
        }
        want_write(r, &p->out, p->fd);
    }
}

/* Reading the client pauses while too much is outstanding or unsent. */
static void update_reading(Relay *r) {
    int pause = over_limits(r) || r->cout.pending >= CLIENT_OUT_HIGH || r->closing
                || r->client_gone;
    if (pause != r->client_paused) {
        r->client_paused = pause;
        ev_add(r, Py_BuildValue("(s)", pause ? "pause_client" : "resume_client"));
    }
    if (r->closing && !r->client_gone && r->outstanding == 0 && !r->cout.pending)
        client_close_event(r, r->close_reason, 0);
}

static void after_io(Relay *r, int defer) {
    /* Requests left unparsed at a bound go once replies made room. */
    if (r->cin.len > r->cin.off && !r->w_active && !over_limits(r) && !r->closing
        && !r->client_gone && parse_requests(r) < 0 && !PyErr_Occurred())
        PyErr_NoMemory();
    flush_paths(r, defer);
    flush_client(r);
    update_reading(r);
}

/* ---- path replies ------------------------------------------------------------------ */

/* The reply for slot si (from path pi) is a success to hand to the client: done. */
static void done_ok(Relay *r, int si, int pi) {
    Path *p = &r->paths[pi];
    p->requests++;
    lat_done(r, &r->slots[si]);
    slot_free(r, si);
}

/* The request's own errors: every copy would answer the same (twinvol.host.retry). */
static int client_error(uint32_t err) {
    return err == E_EPERM || err == E_EINVAL || err == E_ENOSPC || err == E_EOVERFLOW
           || err == E_ENOTSUP;
}

/* An error answer from a path: the client's, or a path fault. Returns -1 on OOM. */
static int done_error(Relay *r, int si, int pi, uint32_t err, const unsigned char *msg,
                      size_t mlen) {
    Path *p = &r->paths[pi];
    Slot *s = &r->slots[si];
    p->requests++;
    if (client_error(err)) {
        int rc = reply_error(r, s->cookie, err, (const char *)msg, mlen);
        lat_done(r, s);
        slot_free(r, si);
        return rc;
    }
    char reason[sizeof p->why];
    const char *name = err == E_EIO ? "EIO" : err == E_ESHUTDOWN ? "NBD_ESHUTDOWN" : NULL;
    int n = name ? snprintf(reason, sizeof reason, "node %s answered %s", p->node, name)
                 : snprintf(reason, sizeof reason, "node %s answered error %u", p->node, err);
    if (n < 0) n = 0;
    size_t k = (size_t)n;
    if (mlen && k + 3 < sizeof reason) {  /* the node's message, as ASCII: a str for Python */
        reason[k++] = ':';
        reason[k++] = ' ';
        for (size_t i = 0; i < mlen && k + 1 < sizeof reason; i++)
            reason[k++] = msg[i] >= 0x20 && msg[i] < 0x7f ? (char)msg[i] : '?';
        reason[k] = 0;
    }
    return fault(r, si, pi, err, (const char *)msg, mlen, reason);
}

static const unsigned char ZEROES[65536];

static int q_zeroes(OutQ *q, size_t n) {
    while (n) {
        size_t k = n < sizeof ZEROES ? n : sizeof ZEROES;
        if (q_bytes(q, ZEROES, k) < 0) return -1;
        n -= k;
    }
    return 0;
}

/* Look up the slot a path reply names; -1 when it is not one of this path's. */
static int reply_slot(Relay *r, int pi, uint64_t handle) {
    uint32_t si = (uint32_t)(handle >> 32), gen = (uint32_t)handle;
    if (si >= (uint32_t)r->nslots) return -1;
    Slot *s = &r->slots[si];
    if (!s->used || s->gen != gen || s->path != pi) return -1;
    return (int)si;
}

/* A read's data (single OFFSET_DATA chunk) is complete: answer the client. */
static int read_data_done(Relay *r, int si, int pi, uint64_t off, Payload *pl,
                          const unsigned char *inl, size_t n) {
    Slot *s = &r->slots[si];
    OutQ *q = &r->cout;
    unsigned char h[28];
    int rc;
    if (r->structured) {
        wr32(h, STRUCT_MAGIC); wr16(h + 4, 1); wr16(h + 6, R_OFFSET_DATA);
        wr64(h + 8, s->cookie); wr32(h + 16, (uint32_t)(8 + n)); wr64(h + 20, off);
        rc = q_bytes(q, h, 28);
    } else {
        wr32(h, SIMPLE_MAGIC); wr32(h + 4, 0); wr64(h + 8, s->cookie);
        rc = q_bytes(q, h, 16);
    }
    if (rc == 0) rc = pl ? q_payload(q, pl, 0, n) : q_bytes(q, inl, n);
    done_ok(r, si, pi);
    return rc;
}

/* Parse replies in path pi's buffer. 0 ok (maybe path failed), -1 OOM. */
static int parse_replies(Relay *r, int pi) {
    Path *p = &r->paths[pi];
    char why[200];
    while (!p->dead) {
        Buf *b = &p->in;
        size_t avail = b->len - b->off;
        unsigned char *d = b->p + b->off;
        if (avail < 4) return 0;
        uint32_t magic = rd32(d);
        if (magic == SIMPLE_MAGIC) {
            if (avail < 16) return 0;
            uint32_t err = rd32(d + 4);
            int si = reply_slot(r, pi, rd64(d + 8));
            b->off += 16;
            if (si < 0) {
                snprintf(why, sizeof why, "node %s replied to a request not in flight", p->node);
                path_fail(r, pi, why);
                return 0;
            }
            Slot *s = &r->slots[si];
            p->inflight--;
            s->path = -1;
            if (err) {
                if (done_error(r, si, pi, err, (const unsigned char *)"", 0) < 0) return -1;
            } else if (s->cmd == C_READ || s->cmd == C_BLOCK_STATUS) {
                s->path = pi; p->inflight++;
                snprintf(why, sizeof why, "node %s sent a simple reply to a %s", p->node,
                         CMD_NAMES[s->cmd]);
                path_fail(r, pi, why);
                return 0;
            } else {
                if (reply_ok(r, s->cookie) < 0) return -1;
                done_ok(r, si, pi);
            }
            continue;
        }
        if (magic != STRUCT_MAGIC) {
            snprintf(why, sizeof why, "node %s sent a reply with bad magic %#x", p->node, magic);
            path_fail(r, pi, why);
            return 0;
        }
        if (avail < 20) return 0;
        uint16_t cflags = rd16(d + 4), type = rd16(d + 6);
        uint32_t clen = rd32(d + 16);
        int si = reply_slot(r, pi, rd64(d + 8));
        if (si < 0) {
            snprintf(why, sizeof why, "node %s replied to a request not in flight", p->node);
            path_fail(r, pi, why);
            return 0;
        }
        Slot *s = &r->slots[si];
        if (!(cflags & 1)) {
            snprintf(why, sizeof why,
                     "node %s sent a multi-chunk reply (the agent relays single chunks)",
                     p->node);
            path_fail(r, pi, why);
            return 0;
        }
        if (type == R_OFFSET_DATA) {
            if (s->cmd != C_READ || clen < 8 || clen - 8 != s->length) {
                snprintf(why, sizeof why, "node %s sent read data that does not match the "
                         "request", p->node);
                path_fail(r, pi, why);
                return 0;
            }
            if (avail < 28) return 0;
            uint64_t off = rd64(d + 20);
            if (off != s->offset) {
                snprintf(why, sizeof why, "node %s sent read data for the wrong offset",
                         p->node);
                path_fail(r, pi, why);
                return 0;
            }
            size_t n = clen - 8;
            if (n >= DIRECT_MIN && avail - 28 < n) {
                /* Receive the rest straight into a payload of its own. */
                Payload *pl = pl_new(n);
                if (!pl) return -1;
                size_t have = avail - 28;
                memcpy(pl->data, d + 28, have);
                memcpy(p->rd_hdr, d, 28);
                b->off = b->len;
                p->rd = pl;
                p->rd_got = have;
                p->rd_slot = si;
                return 0;
            }
            if (avail - 28 < n) return 0;
            p->inflight--;
            s->path = -1;
            b->off += 28 + n;
            if (read_data_done(r, si, pi, off, NULL, d + 28, n) < 0) return -1;
            continue;
        }
        if (clen > MAX_STATUS_CHUNK) {
            snprintf(why, sizeof why, "node %s sent a %u byte reply chunk", p->node, clen);
            path_fail(r, pi, why);
            return 0;
        }
        if (avail < 20 + (size_t)clen) {
            if (buf_reserve(b, 20 + (size_t)clen) < 0) return -1;
            return 0;
        }
        unsigned char *pay = d + 20;
        b->off += 20 + clen;
        p->inflight--;
        s->path = -1;
        if (type == R_ERROR || type == R_ERROR_OFFSET) {
            if (clen < 6 || (size_t)rd16(pay + 4) + 6 > clen) {
                s->path = pi; p->inflight++;
                snprintf(why, sizeof why, "node %s sent a malformed error chunk", p->node);
                path_fail(r, pi, why);
                return 0;
            }
            if (done_error(r, si, pi, rd32(pay), pay + 6, rd16(pay + 4)) < 0) return -1;
            continue;
        }
        int ok = 0;
        unsigned char h[20];
        if (type == R_NONE && clen == 0) {
            ok = 1;
            if (r->structured) {
                wr32(h, STRUCT_MAGIC); wr16(h + 4, 1); wr16(h + 6, R_NONE);
                wr64(h + 8, s->cookie); wr32(h + 16, 0);
                if (q_bytes(&r->cout, h, 20) < 0) return -1;
            } else if (reply_ok(r, s->cookie) < 0) {
                return -1;
            }
        } else if (type == R_OFFSET_HOLE && s->cmd == C_READ && clen == 12
                   && rd64(pay) == s->offset && rd32(pay + 8) == s->length) {
            ok = 1;
            if (r->structured) {
                memcpy(h, d, 20);
                wr64(h + 8, s->cookie);
                if (q_bytes(&r->cout, h, 20) < 0 || q_bytes(&r->cout, pay, 12) < 0) return -1;
            } else if (reply_ok(r, s->cookie) < 0 || q_zeroes(&r->cout, s->length) < 0) {
                return -1;
            }
        } else if (type == R_BLOCK_STATUS && s->cmd == C_BLOCK_STATUS && clen >= 12
                   && (clen - 4) % 8 == 0 && rd32(pay) == p->ctx_id && r->structured) {
            ok = 1;
            memcpy(h, d, 20);
            wr64(h + 8, s->cookie);
            unsigned char ctx[4];
            wr32(ctx, META_CONTEXT_ID);
            if (q_bytes(&r->cout, h, 20) < 0 || q_bytes(&r->cout, ctx, 4) < 0
                || q_bytes(&r->cout, pay + 4, clen - 4) < 0)
                return -1;
        }
        if (!ok) {
            s->path = pi; p->inflight++;
            snprintf(why, sizeof why, "node %s sent an unexpected reply chunk (type %u) to a %s",
                     p->node, type, CMD_NAMES[s->cmd]);
            path_fail(r, pi, why);
            return 0;
        }
        done_ok(r, si, pi);
    }
    return 0;
}

/* ---- the Python type ------------------------------------------------------------------ */

static PyObject *oom(Relay *r) {
    Py_CLEAR(r->events);
    return PyErr_NoMemory();
}


static int Relay_init(Relay *r, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"size", "max_outstanding", "defer_min", "batch_slack",
                             "hold_timeout", NULL};
    unsigned long long size;
    Py_ssize_t maxo = 256, defer_min = DEFER_MIN, slack = BATCH_SLACK;
    double hold_timeout = 30.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|nnnd", kwlist, &size, &maxo, &defer_min,
                                     &slack, &hold_timeout))
        return -1;
    if (defer_min < 0 || slack < 0) {
        PyErr_SetString(PyExc_ValueError, "defer_min and batch_slack must be >= 0");
        return -1;
    }
    r->defer_min = (size_t)defer_min;
    r->batch_slack = (size_t)slack;
    r->hold_timeout = hold_timeout;
    r->client_fd = -1;
    r->size = size;
    r->max_outstanding = maxo > 0 ? (size_t)maxo : 256;
    r->free_head = -1;
    r->held_head = r->held_tail = -1;
    r->batch_path = -1;
    for (int i = 0; i < MAX_PATHS; i++) r->paths[i].fd = -1;
    return 0;
}

/* attach_client(fd, structured, meta_context, read_only, pending_in, pending_out) -> events:
   the client's transmission phase starts; pending_in are request bytes already read during
   negotiation, pending_out negotiation replies not yet sent. */
static PyObject *Relay_attach_client(Relay *r, PyObject *args) {
    int fd, structured, meta, ro;
    Py_buffer in = {0}, out = {0};
    if (r->client_fd >= 0 || r->client_gone) {
        PyErr_SetString(PyExc_ValueError, "a client is already attached");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "ipppy*y*", &fd, &structured, &meta, &ro, &in, &out))
        return NULL;
    r->client_fd = fd;
    r->structured = structured;
    r->meta_context = meta;
    r->read_only = ro;
    int rc = 0;
    if (in.len && buf_reserve(&r->cin, (size_t)in.len) == 0) {
        memcpy(r->cin.p + r->cin.len, in.buf, (size_t)in.len);
        r->cin.len += (size_t)in.len;
    } else if (in.len) {
        rc = -1;
    }
    if (rc == 0) rc = q_bytes(&r->cout, out.buf, (size_t)out.len);
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    if (rc == 0) rc = parse_requests(r);
    if (rc < 0) return oom(r);
    after_io(r, 0);
    return ev_take(r);
}

static void close_path(Path *p) {
    if (p->fd >= 0) close(p->fd);
    p->fd = -1;
    p->dead = 0;
    p->draining = 0;
    q_free(&p->out);
    free(p->in.p);
    memset(&p->in, 0, sizeof p->in);
    if (p->rd) { pl_unref(p->rd); p->rd = NULL; }
    p->inflight = 0;
}

static void relay_close_all(Relay *r) {
    for (int i = 0; i < MAX_PATHS; i++) if (r->paths[i].fd >= 0) close_path(&r->paths[i]);
    if (r->client_fd >= 0) close(r->client_fd);
    r->client_fd = -1;
    q_free(&r->cout);
    free(r->cin.p);
    memset(&r->cin, 0, sizeof r->cin);
    for (int i = 0; i < r->nslots; i++) if (r->slots[i].used) pl_unref(r->slots[i].data);
    free(r->slots);
    r->slots = NULL;
    r->nslots = 0;
    r->free_head = -1;
    r->held_head = r->held_tail = -1;
    r->held = r->outstanding = 0;
    r->out_bytes = 0;
    pl_unref(r->w_pl);
    r->w_pl = NULL;
    r->client_gone = 1;
}

static void Relay_dealloc(Relay *r) {
    relay_close_all(r);
    free(r->fail_msg);
    Py_XDECREF(r->events);
    Py_XDECREF(r->on_events);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* Receives from the client and the requests they complete. A large write's payload is
   received straight into its buffer, and after one the next receive takes just a request
   header: if it starts another large write, that payload goes straight into place too
   (else a 256 KiB receive would take a quarter of it into cin, to be copied again).
   1: bytes came; 0: nothing (or the client went); -1: OOM. */
static int read_client(Relay *r) {
    if (r->client_gone || r->client_fd < 0 || r->client_paused) return 0;
    int got = 0;
    for (int rounds = 0; rounds < 2; rounds++) {
        ssize_t n;
        if (r->w_active && r->w_pl && r->w_len >= DIRECT_MIN && r->cin.off == r->cin.len) {
            size_t want = r->w_len - r->w_got;
            n = recv(r->client_fd, r->w_pl->data + r->w_got, want, MSG_DONTWAIT);
            if (n > 0) {
                r->w_got += (size_t)n;
                got = 1;
                if (r->w_got == r->w_len && finish_write(r) < 0) return -1;
                return 1;  /* sent on before the next request is read */
            }
        } else {
            if (buf_reserve(&r->cin, RECV_CHUNK) < 0) return -1;
            size_t want = r->cin.cap - r->cin.len;
            int hdr = r->big_write && r->cin.off == r->cin.len && !r->w_active;
            if (hdr) want = 28;
            n = recv(r->client_fd, r->cin.p + r->cin.len, want, MSG_DONTWAIT);
            if (n > 0) {
                r->cin.len += (size_t)n;
                if (parse_requests(r) < 0) return -1;
                got = 1;
                if (!hdr || (size_t)n < want) return 1;
                continue;  /* a whole header came: its payload may follow at once */
            }
        }
        if (n == 0) {
            if (r->w_active) client_close_event(r, "client disconnected in the middle of a write "
                                                   "payload", 1);
            else {
                r->closing = 1;  /* answer what is in flight (a half-closed client reads) */
                r->close_reason = "client closed the connection";
            }
            return got;
        }
        if (errno == EINTR) { rounds--; continue; }
        if (errno == EAGAIN || errno == EWOULDBLOCK) return got;
        char reason[128];
        snprintf(reason, sizeof reason, "connection lost: %s", strerror(errno));
        client_close_event(r, reason, 1);
        return got;
    }
    return got;
}

/* client_readable() -> events | None */
static PyObject *Relay_client_readable(Relay *r, PyObject *unused) {
    if (r->client_gone || r->client_fd < 0) Py_RETURN_NONE;
    r->batch_path = -1;
    if (read_client(r) < 0) return oom(r);
    after_io(r, 1);
    return deliver(r);
}

/* A path index from Python: -1 (ValueError set) when out of range. */
static int check_index(long i) {
    if (i < 0 || i >= MAX_PATHS) {
        PyErr_SetString(PyExc_ValueError, "path index out of range");
        return -1;
    }
    return (int)i;
}

static int path_index(Relay *r, PyObject *arg) {
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred()) return -1;
    return check_index(i);
}

/* One receive from path pi and what it completes.
   1: bytes came; 0: nothing (or the path failed); -1: OOM. */
static int read_path(Relay *r, int pi) {
    Path *p = &r->paths[pi];
    if (p->fd < 0 || p->dead) return 0;
    for (;;) {
        ssize_t n;
        if (p->rd) {
            n = recv(p->fd, p->rd->data + p->rd_got, p->rd->len - p->rd_got, MSG_DONTWAIT);
            if (n > 0) {
                p->rd_got += (size_t)n;
                p->progress = now_mono();
                if (p->rd_got == p->rd->len) {
                    Payload *pl = p->rd;
                    int si = p->rd_slot;
                    p->rd = NULL;
                    p->inflight--;
                    r->slots[si].path = -1;
                    int rc = read_data_done(r, si, pi, rd64(p->rd_hdr + 20), pl, NULL, pl->len);
                    pl_unref(pl);
                    if (rc < 0) return -1;
                }
                return 1;
            }
        } else {
            if (buf_reserve(&p->in, RECV_CHUNK) < 0) return -1;
            n = recv(p->fd, p->in.p + p->in.len, p->in.cap - p->in.len, MSG_DONTWAIT);
            if (n > 0) {
                p->in.len += (size_t)n;
                p->progress = now_mono();
                return parse_replies(r, pi) < 0 ? -1 : 1;
            }
        }
        if (n == 0) {
            char reason[128];
            snprintf(reason, sizeof reason, "node %s closed the connection", p->node);
            path_fail(r, pi, reason);
            return 0;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        char reason[160];
        snprintf(reason, sizeof reason, "connection to node %s lost: %s", p->node,
                 strerror(errno));
        path_fail(r, pi, reason);
        return 0;
    }
}

/* path_readable(i) -> events | None */
static PyObject *Relay_path_readable(Relay *r, PyObject *arg) {
    int pi = path_index(r, arg);
    if (pi < 0) return NULL;
    Path *p = &r->paths[pi];
    if (p->fd < 0 || p->dead) Py_RETURN_NONE;
    if (read_path(r, pi) < 0) return oom(r);
    if (p->draining && !p->dead && !p->inflight)
        path_fail(r, pi, p->why);  /* the last request on it was answered: drained */
    after_io(r, 0);
    return deliver(r);
}

/* writable(fd) -> events | None: the loop says fd can take more. */
static PyObject *Relay_writable(Relay *r, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    after_io(r, 0);
    return deliver(r);
}

/* add_path(i, fd, node, order, primary, ctx_id) -> events | None; releases held requests. */
static PyObject *Relay_add_path(Relay *r, PyObject *args) {
    int pi, fd, order, primary;
    unsigned int ctx;
    const char *node;
    if (!PyArg_ParseTuple(args, "iisipI", &pi, &fd, &node, &order, &primary, &ctx)) return NULL;
    if (check_index(pi) < 0) return NULL;
    Path *p = &r->paths[pi];
    if (p->fd >= 0) {
        PyErr_SetString(PyExc_ValueError, "path index already in use");
        return NULL;
    }
    memset(p, 0, sizeof *p);
    p->fd = fd;
    p->order = order;
    p->primary = primary;
    p->ctx_id = ctx;
    snprintf(p->node, sizeof p->node, "%s", node);
    if (pi >= r->npaths) r->npaths = pi + 1;
    r->failing = 0;
    while (r->held_head >= 0 && n_usable(r)) {
        int si = r->held_head;
        r->held_head = r->slots[si].next;
        if (r->held_head < 0) r->held_tail = -1;
        r->held--;
        if (dispatch(r, si) < 0) return oom(r);
    }
    after_io(r, 0);
    return ev_take(r);
}

/* fail_path(i, reason) -> events | None: Python took the path out (block, stall). */
static PyObject *Relay_fail_path(Relay *r, PyObject *args) {
    int pi;
    const char *reason;
    if (!PyArg_ParseTuple(args, "is", &pi, &reason)) return NULL;
    if (check_index(pi) < 0) return NULL;
    path_fail(r, pi, reason);
    after_io(r, 0);
    return ev_take(r);
}

/* remove_path(i): close a failed path's socket (Python stopped watching it first). */
static PyObject *Relay_remove_path(Relay *r, PyObject *arg) {
    int pi = path_index(r, arg);
    if (pi < 0) return NULL;
    Path *p = &r->paths[pi];
    if (p->fd >= 0 && !p->dead) {
        PyErr_SetString(PyExc_ValueError, "fail the path before removing it");
        return NULL;
    }
    close_path(p);
    while (r->npaths > 0 && r->paths[r->npaths - 1].fd < 0) r->npaths--;
    Py_RETURN_NONE;
}

/* fail_held(err, message, failing) -> events | None: answer every held request with err;
   with failing=True later requests fail at once while no path is usable. */
static PyObject *Relay_fail_held(Relay *r, PyObject *args) {
    unsigned int err;
    const char *msg;
    Py_ssize_t mlen;
    int failing;
    if (!PyArg_ParseTuple(args, "Is#p", &err, &msg, &mlen, &failing)) return NULL;
    free(r->fail_msg);
    r->fail_msg = strndup(msg, (size_t)mlen);
    r->failing = failing;
    while (r->held_head >= 0) {
        int si = r->held_head;
        r->held_head = r->slots[si].next;
        r->held--;
        if (reply_error(r, r->slots[si].cookie, err, msg, (size_t)mlen) < 0) return oom(r);
        slot_free(r, si);
    }
    r->held_tail = -1;
    after_io(r, 0);
    return ev_take(r);
}

/* path_stats(i) -> (inflight, requests, progress) with progress in time.monotonic() terms */
static PyObject *Relay_path_stats(Relay *r, PyObject *arg) {
    int pi = path_index(r, arg);
    if (pi < 0) return NULL;
    Path *p = &r->paths[pi];
    return Py_BuildValue("(nKd)", (Py_ssize_t)p->inflight, p->requests, p->progress);
}

static PyObject *Relay_stats(Relay *r, PyObject *unused) {
    return Py_BuildValue("{s:n,s:n,s:K,s:K,s:K,s:n,s:n,s:n}", "outstanding",
                         (Py_ssize_t)r->outstanding, "held", (Py_ssize_t)r->held, "retries",
                         r->retries, "held_total", r->held_total, "requests", r->requests,
                         "client_out", (Py_ssize_t)r->cout.pending, "client_in",
                         (Py_ssize_t)(r->cin.len - r->cin.off), "out_bytes",
                         (Py_ssize_t)r->out_bytes);
}

/* take_latency() -> ((samples, ns, (bucket counts...)) for read, write, other): the timed
   requests since the last call, which starts them again from zero. */
static PyObject *Relay_take_latency(Relay *r, PyObject *unused) {
    PyObject *out = PyTuple_New(3);
    if (!out) return NULL;
    for (int k = 0; k < 3; k++) {
        Lat *l = &r->lat[k];
        PyObject *b = PyTuple_New(LAT_BUCKETS);
        if (!b) { Py_DECREF(out); return NULL; }
        for (int i = 0; i < LAT_BUCKETS; i++) {
            PyObject *n = PyLong_FromUnsignedLongLong(l->buckets[i]);
            if (!n) { Py_DECREF(b); Py_DECREF(out); return NULL; }
            PyTuple_SET_ITEM(b, i, n);
        }
        PyObject *t = Py_BuildValue("(KKN)", l->samples, l->ns, b);
        if (!t) { Py_DECREF(out); return NULL; }
        PyTuple_SET_ITEM(out, k, t);
        memset(l, 0, sizeof *l);
    }
    return out;
}

/* flush() -> events | None: try to send what is queued (before a close). */
static PyObject *Relay_flush(Relay *r, PyObject *unused) {
    after_io(r, 0);
    return ev_take(r);
}

static PyObject *Relay_close(Relay *r, PyObject *unused) {
    relay_close_all(r);
    Py_RETURN_NONE;
}

static PyObject *Relay_path_fd(Relay *r, PyObject *arg) {
    int pi = path_index(r, arg);
    if (pi < 0) return NULL;
    return PyLong_FromLong(r->paths[pi].fd);
}

static PyObject *Relay_get_client_fd(Relay *r, void *closure) {
    return PyLong_FromLong(r->client_fd);
}

static PyObject *Relay_get_outstanding(Relay *r, void *closure) {
    return PyLong_FromSsize_t((Py_ssize_t)r->outstanding);
}

static PyObject *Relay_get_held(Relay *r, void *closure) {
    return PyLong_FromSsize_t((Py_ssize_t)r->held);
}

static PyMethodDef Relay_methods[] = {
    {"attach_client", (PyCFunction)Relay_attach_client, METH_VARARGS, NULL},
    {"client_readable", (PyCFunction)Relay_client_readable, METH_NOARGS, NULL},
    {"path_readable", (PyCFunction)Relay_path_readable, METH_O, NULL},
    {"writable", (PyCFunction)Relay_writable, METH_O, NULL},
    {"add_path", (PyCFunction)Relay_add_path, METH_VARARGS, NULL},
    {"fail_path", (PyCFunction)Relay_fail_path, METH_VARARGS, NULL},
    {"remove_path", (PyCFunction)Relay_remove_path, METH_O, NULL},
    {"fail_held", (PyCFunction)Relay_fail_held, METH_VARARGS, NULL},
    {"path_stats", (PyCFunction)Relay_path_stats, METH_O, NULL},
    {"path_fd", (PyCFunction)Relay_path_fd, METH_O, NULL},
    {"stats", (PyCFunction)Relay_stats, METH_NOARGS, NULL},
    {"take_latency", (PyCFunction)Relay_take_latency, METH_NOARGS, NULL},
    {"flush", (PyCFunction)Relay_flush, METH_NOARGS, NULL},
    {"close", (PyCFunction)Relay_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyObject *Relay_get_on_events(Relay *r, void *closure) {
    if (!r->on_events) Py_RETURN_NONE;
    Py_INCREF(r->on_events);
    return r->on_events;
}

static int Relay_set_on_events(Relay *r, PyObject *value, void *closure) {
    PyObject *old = r->on_events;
    r->on_events = value == Py_None ? NULL : value;
    Py_XINCREF(r->on_events);
    Py_XDECREF(old);
    return 0;
}

static PyGetSetDef Relay_getset[] = {
    {"on_events", (getter)Relay_get_on_events, (setter)Relay_set_on_events, NULL, NULL},
    {"client_fd", (getter)Relay_get_client_fd, NULL, NULL, NULL},
    {"outstanding", (getter)Relay_get_outstanding, NULL, NULL, NULL},
    {"held", (getter)Relay_get_held, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "twinvol.host._relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One client connection's native data path (see the module source).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
};

static struct PyModuleDef relaymodule = {
    PyModuleDef_HEAD_INIT, "twinvol.host._relay",
    "The host agent's native data path: NBD requests relayed to storage-node paths.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&relaymodule);
    if (!m) return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MAX_PATHS", MAX_PATHS);
    return m;
}
