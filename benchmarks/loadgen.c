/*
 * loadgen: a closed-loop Thrift load generator for kitegreen's benchmarks.
 *
 * N connections, each with exactly one request in flight: send the pre-encoded request, read
 * exactly as many bytes as the reference reply has, check them byte for byte, send again.
 * Replies to the same request are identical every time (same method, same arguments, same
 * seqid), so the reply's length is its boundary on buffered transports too.
 *
 * --refusal FILE: a second reply accepted, the server's refusal of the same call (kitegreen's
 * LOADSHEDDING past its QPS limit): counted as "refused" (and "refused_rps") instead of a
 * mismatch that drops the connection, and the connection goes on. Each reply is told apart by
 * its bytes, compared as they arrive against both; a refused call is not in the latencies.
 *
 * Bounded in time and in count: it stops after warmup + duration seconds, or after
 * --max-requests measured replies, whichever comes first, and gives up on connecting after
 * --connect-timeout seconds. It connects only to 127.0.0.0/8 or to a Unix socket.
 *
 * Modes:
 *   load (default)  warm up, measure, print one JSON object on stdout.
 *   --hold SECONDS  send one request on every connection, print {"ready": n, ...} once all
 *                   replies are in, then keep the connections open and idle until stdin
 *                   closes or SECONDS pass (for resident-memory-per-connection checks).
 *   --serve SECONDS a null server on 127.0.0.1:--port: answer every request_len bytes read
 *                   with the reply, for SECONDS at most. Run the load mode against it to
 *                   measure the load generator's own ceiling. With --touch BYTES, each
 *                   connection also owns a block of BYTES (at most 16 KiB) that every request it answers
 *                   writes a byte of each cache line of: a server's own per-connection state,
 *                   so its effect on the kernel's cost can be told from the kernel's.
 *
 * --rate R (load mode): at most R requests a second in all, instead of as many as the server
 * answers. A connection whose reply is in waits in a queue for its turn (a token bucket
 * holding at most 10 ms of them), so every connection still has at most one request in
 * flight and sends again no sooner than its turn comes. Two servers, or two connection counts,
 * compared at the same R do the same work at the same pace: each connection sends every
 * conns / R seconds whatever the server's speed (TCP's timers depend on that interval).
 * Latency is measured from the request's send, not from its wait in the queue.
 *
 * Build: cc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 20000
#define MAX_MSG (16 * 1024 * 1024)

/* HDR-ish latency histogram: values below 128 ns exact, above that 64 sub-buckets per power
 * of two (under 1.6% error), up to 2^63 ns. */
#define SUB_BITS 6
#define SUB (1 << SUB_BITS)
#define NBUCKETS (2 * SUB + 58 * SUB)

static uint64_t hist[NBUCKETS];

static int bucket_of(uint64_t v) {
    if (v < 2 * SUB) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB_BITS;
    return 2 * SUB + (shift - 1) * SUB + (int)((v >> shift) - SUB);
}

static double bucket_mid(int b) {
    if (b < 2 * SUB) return (double)b;
    int shift = (b - 2 * SUB) / SUB + 1;
    uint64_t top = (uint64_t)((b - 2 * SUB) % SUB + SUB);
    return (double)(top << shift) + (double)(1ULL << shift) / 2.0;
}

static double percentile_ns(uint64_t total, double p) {
    if (total == 0) return 0.0;
    uint64_t rank = (uint64_t)(p * (double)total);
    if (rank >= total) rank = total - 1;
    uint64_t seen = 0;
    for (int b = 0; b < NBUCKETS; b++) {
        seen += hist[b];
        if (seen > rank) return bucket_mid(b);
    }
    return bucket_mid(NBUCKETS - 1);
}

struct conn {
    int fd;
    int dead;
    size_t sent;     /* bytes of the request written so far */
    size_t got;      /* bytes of the reply read so far */
    uint64_t start;  /* ns when the request's first byte was written */
    int replied;     /* hold mode: the first reply is in */
    int which;       /* 0: the bytes so far match both replies; 1: the reply; 2: the refusal */
};

static unsigned char *request, *reply, *refusal;
static size_t request_len, reply_len, refusal_len;
static unsigned char *scratch;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *msg) {
    fprintf(stderr, "loadgen: %s\n", msg);
    exit(2);
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "loadgen: cannot open %s: %s\n", path, strerror(errno));
        exit(2);
    }
    unsigned char *buf = malloc(MAX_MSG);
    if (!buf) die("out of memory");
    size_t n = fread(buf, 1, MAX_MSG, f);
    if (ferror(f) || n == 0 || n == MAX_MSG) die("request/reply file is empty, unreadable or too big");
    fclose(f);
    *len = n;
    return buf;
}

static int connect_one(const char *host, int port, const char *unix_path, double timeout_s) {
    int fd;
    if (unix_path) {
        struct sockaddr_un sa;
        memset(&sa, 0, sizeof sa);
        sa.sun_family = AF_UNIX;
        if (strlen(unix_path) >= sizeof sa.sun_path) die("unix socket path too long");
        strcpy(sa.sun_path, unix_path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return -1;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            close(fd);
            return -1;
        }
    } else {
        struct sockaddr_in sa;
        memset(&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        sa.sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) die("host must be an IPv4 address");
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return -1;
        /* A blocking connect with a send timeout: a full accept queue delays, it does not fail. */
        struct timeval tv = {(time_t)timeout_s, (suseconds_t)((timeout_s - (double)(time_t)timeout_s) * 1e6)};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            close(fd);
            return -1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    int flags = fcntl(fd, F_GETFL, 0);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    return fd;
}

/* Send a connection's request from its first byte (the rest on EPOLLOUT); -1 when the write
 * failed and the connection is closed. */
static int send_request(struct conn *c) {
    c->start = now_ns();
    ssize_t n = write(c->fd, request, request_len);
    if (n < 0 && errno != EAGAIN) {
        c->dead = 1;
        close(c->fd);
        return -1;
    }
    c->sent = n > 0 ? (size_t)n : 0;
    return 0;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* The null server: the cheapest possible peer, so that a load run against it shows how fast
 * the load generator itself can go. */
static size_t touch_bytes; /* --touch: per-connection state written per request */
static unsigned char *touched[65536];

static int serve(int port, double seconds) {
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 1024) < 0) die("cannot listen");
    fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL, 0) | O_NONBLOCK);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    size_t *got = calloc(65536, sizeof *got);
    unsigned char *buf = malloc(request_len);
    if (!got || !buf) die("out of memory");
    uint64_t end = now_ns() + (uint64_t)(seconds * 1e9);
    struct epoll_event events[1024];
    for (;;) {
        uint64_t t = now_ns();
        if (t >= end) break;
        int n = epoll_wait(ep, events, 1024, (int)((end - t) / 1000000ULL) + 1);
        for (int e = 0; e < n; e++) {
            int fd = events[e].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    if (c >= 65536) {
                        close(c);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    got[c] = 0;
                    if (touch_bytes) {
                        free(touched[c]);
                        touched[c] = calloc(1, touch_bytes);
                        if (!touched[c]) die("out of memory");
                    }
                    struct epoll_event ev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            for (;;) {
                ssize_t r = read(fd, buf + got[fd], request_len - got[fd]);
                if (r <= 0) {
                    if (r < 0 && errno == EAGAIN) break;
                    close(fd);
                    break;
                }
                got[fd] += (size_t)r;
                if (got[fd] == request_len) {
                    got[fd] = 0;
                    for (size_t i = 0; i < touch_bytes; i += 64) touched[fd][i]++;
                    /* Replies are small and one is outstanding per connection: it fits. */
                    if (write(fd, reply, reply_len) != (ssize_t)reply_len) {
                        close(fd);
                        break;
                    }
                }
            }
        }
    }
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --request FILE --reply FILE [--refusal FILE]\n"
            "               (--port N [--host 127.0.0.1] | --unix PATH)\n"
            "               [--conns N] [--duration S] [--warmup S] [--max-requests N]\n"
            "               [--connect-timeout S] [--hold S] [--rate R]\n"
            "       loadgen --request FILE --reply FILE --port N --serve S [--touch BYTES]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *unix_path = NULL, *req_path = NULL, *rep_path = NULL;
    const char *ref_path = NULL;
    int port = 0, nconns = 1;
    double duration = 3.0, warmup = 1.0, connect_timeout = 10.0, hold = 0.0, serve_s = 0.0;
    double rate = 0.0;
    uint64_t max_requests = 50000000ULL;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--unix")) unix_path = v;
        else if (!strcmp(a, "--conns")) nconns = atoi(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--max-requests")) max_requests = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--connect-timeout")) connect_timeout = atof(v);
        else if (!strcmp(a, "--hold")) hold = atof(v);
        else if (!strcmp(a, "--serve")) serve_s = atof(v);
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--touch")) touch_bytes = (size_t)strtoull(v, NULL, 10);
        else if (!strcmp(a, "--request")) req_path = v;
        else if (!strcmp(a, "--reply")) rep_path = v;
        else if (!strcmp(a, "--refusal")) ref_path = v;
        else usage();
        i++;
    }
    if (!req_path || !rep_path || (!unix_path && port <= 0)) usage();
    if (nconns < 1 || nconns > MAX_CONNS) die("--conns must be between 1 and 20000");
    if (duration <= 0 || duration > 600 || warmup < 0 || warmup > 600) die("--duration/--warmup out of range (0-600 s)");
    if (hold < 0 || hold > 3600) die("--hold out of range (0-3600 s)");
    if (!(rate >= 0 && rate <= 1e8) || (rate > 0 && (hold > 0 || serve_s > 0)))
        die("--rate takes 0 to 1e8 requests a second, in load mode only");
    if (touch_bytes > 16384 || (touch_bytes && serve_s <= 0))
        die("--touch takes at most 16384 bytes, with --serve only");
    if (!unix_path) {
        struct in_addr addr;
        if (inet_pton(AF_INET, host, &addr) != 1 || (ntohl(addr.s_addr) >> 24) != 127)
            die("only loopback targets (127.0.0.0/8) or Unix sockets are allowed");
    }
    request = read_file(req_path, &request_len);
    reply = read_file(rep_path, &reply_len);
    if (ref_path) {
        refusal = read_file(ref_path, &refusal_len);
        if (refusal_len == reply_len && !memcmp(refusal, reply, reply_len))
            die("--refusal is the reply itself");
    }
    scratch = malloc(reply_len > refusal_len ? reply_len : refusal_len);
    if (!scratch) die("out of memory");
    if (serve_s > 0) {
        if (serve_s > 3600 || unix_path) die("--serve takes a TCP --port and at most 3600 s");
        return serve(port, serve_s);
    }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)nconns + 64) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)nconns + 64 ? rl.rlim_max : (rlim_t)nconns + 64;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || ep < 0) die("cannot allocate connections or epoll");

    uint64_t t0 = now_ns();
    uint64_t connect_deadline = t0 + (uint64_t)(connect_timeout * 1e9);
    int connected = 0, connect_failures = 0;
    for (int i = 0; i < nconns; i++) {
        int fd = -1;
        while (fd < 0 && now_ns() < connect_deadline) {
            fd = connect_one(host, port, unix_path, connect_timeout);
            if (fd < 0) {
                connect_failures++;
                if (connect_failures > nconns + 100) break;
                usleep(10000);
            }
        }
        if (fd < 0) break;
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl failed");
        connected++;
    }
    if (connected < nconns) {
        printf("{\"error\": \"connected %d of %d connections\", \"connect_failures\": %d}\n",
               connected, nconns, connect_failures);
        return 1;
    }
    double connect_s = (double)(now_ns() - t0) / 1e9;

    uint64_t start_all = now_ns();
    uint64_t measure_start = start_all + (uint64_t)(warmup * 1e9);
    uint64_t measure_end = measure_start + (uint64_t)(duration * 1e9);
    uint64_t hard_end = hold > 0 ? start_all + (uint64_t)((connect_timeout + hold) * 1e9) : measure_end;
    uint64_t requests = 0, warm_requests = 0, errors = 0, mismatches = 0, refused = 0,
             warm_refused = 0;
    double sum_us = 0.0, max_us = 0.0;
    double cpu_at_start = 0.0;
    int measuring = warmup <= 0, alive = nconns, ready = 0, announced = 0;
    if (measuring) cpu_at_start = cpu_seconds();

    /* Paced (--rate): the connections waiting for their turn, each at most once, in order. */
    int *turns = rate > 0 ? malloc((size_t)nconns * sizeof *turns) : NULL;
    int turns_head = 0, turns_len = 0;
    double tokens = 0.0, burst = rate * 0.01 > 1.0 ? rate * 0.01 : 1.0;
    uint64_t tokens_at = now_ns();
    if (rate > 0 && !turns) die("out of memory");

    /* Kick off one request per connection (paced: queue them all for their turn). */
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (rate > 0) {
            c->sent = request_len; /* nothing for EPOLLOUT to finish before its turn */
            turns[turns_len++] = i;
            continue;
        }
        if (send_request(c) < 0) {
            alive--;
            errors++;
        }
    }

    struct epoll_event events[1024];
    for (;;) {
        uint64_t t = now_ns();
        if (!measuring && hold <= 0 && t >= measure_start) {
            measuring = 1;
            cpu_at_start = cpu_seconds();
        }
        if (t >= hard_end || alive == 0) break;
        if (hold <= 0 && requests >= max_requests) break;
        if (hold > 0 && ready == nconns && !announced) {
            printf("{\"ready\": %d, \"errors\": %llu, \"connect_s\": %.3f}\n", ready,
                   (unsigned long long)errors, connect_s);
            fflush(stdout);
            announced = 1;
            /* Now idle: wait for stdin to close (the caller is done) or the hold to pass. */
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
            epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
        }
        if (rate > 0) {
            tokens += rate * (double)(t - tokens_at) / 1e9;
            tokens_at = t;
            if (tokens > burst) tokens = burst;
            while (turns_len > 0 && tokens >= 1.0) {
                struct conn *c = &conns[turns[turns_head]];
                turns_head = (turns_head + 1) % nconns;
                turns_len--;
                if (c->dead) continue; /* its turn goes to the next */
                tokens -= 1.0;
                if (send_request(c) < 0) {
                    alive--;
                    errors++;
                }
            }
        }
        int timeout_ms = (int)((hard_end - t) / 1000000ULL) + 1;
        if (!measuring && hold <= 0) {
            int w = (int)((measure_start - t) / 1000000ULL) + 1;
            if (w < timeout_ms) timeout_ms = w;
        }
        if (turns_len > 0) {
            /* Until the next turn's token: at least 1 ms, epoll's resolution. */
            int next_ms = (int)((1.0 - tokens) * 1000.0 / rate) + 1;
            if (next_ms < timeout_ms) timeout_ms = next_ms;
        }
        int n = epoll_wait(ep, events, 1024, timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait failed");
        }
        for (int e = 0; e < n; e++) {
            if (events[e].data.u32 == UINT32_MAX) goto done; /* stdin readable or closed */
            struct conn *c = &conns[events[e].data.u32];
            if (c->dead) continue;
            /* Finish writing a request the socket buffer could not take at once. */
            while (c->sent < request_len) {
                ssize_t w = write(c->fd, request + c->sent, request_len - c->sent);
                if (w < 0) {
                    if (errno == EAGAIN) break;
                    goto fail;
                }
                c->sent += (size_t)w;
            }
            /* Read as much of the reply as is there (edge-triggered: until EAGAIN). */
            for (;;) {
                /* A whole reply, or a whole refusal (a prefix of both counts as the reply). */
                size_t whole = c->which == 2 ? refusal_len : reply_len;
                if (c->got == whole && c->sent == request_len) {
                    uint64_t done_at = now_ns();
                    int was_refused = c->which == 2;
                    c->which = 0;
                    if (hold > 0) {
                        if (!c->replied) {
                            c->replied = 1;
                            ready++;
                        }
                        c->got = 0;
                        break; /* no further requests: the connection stays idle */
                    }
                    if (was_refused) {
                        if (!measuring) warm_refused++;
                        else if (done_at <= measure_end) refused++;
                    } else if (measuring) {
                        if (done_at <= measure_end) {
                            uint64_t lat = done_at - c->start;
                            hist[bucket_of(lat)]++;
                            double us = (double)lat / 1000.0;
                            sum_us += us;
                            if (us > max_us) max_us = us;
                            requests++;
                        }
                    } else {
                        warm_requests++;
                    }
                    c->got = 0;
                    if (rate > 0) {
                        /* Wait for its turn; nothing more to read until it has sent. */
                        c->sent = request_len;
                        turns[(turns_head + turns_len) % nconns] = (int)(c - conns);
                        turns_len++;
                        break;
                    }
                    c->start = done_at;
                    c->sent = 0;
                    ssize_t w = write(c->fd, request, request_len);
                    if (w < 0) {
                        if (errno != EAGAIN) goto fail;
                        w = 0;
                    }
                    c->sent = (size_t)w;
                    if (c->sent < request_len) break; /* EPOLLOUT will tell when to go on */
                }
                /* Never past the end of a reply it may still be: the next one follows. */
                size_t want = c->which == 2 ? refusal_len : reply_len;
                if (c->which == 0 && refusal_len && refusal_len < want) want = refusal_len;
                if (want <= c->got) {
                    /* Matched a whole refusal that is a prefix of the reply: a reply. */
                    c->which = 1;
                    want = reply_len;
                }
                ssize_t r = read(c->fd, scratch + c->got, want - c->got);
                if (r == 0) goto fail;
                if (r < 0) {
                    if (errno == EAGAIN) break;
                    goto fail;
                }
                int as_reply = c->which != 2 && c->got + (size_t)r <= reply_len &&
                               memcmp(scratch + c->got, reply + c->got, (size_t)r) == 0;
                int as_refusal = c->which != 1 && refusal_len &&
                                 c->got + (size_t)r <= refusal_len &&
                                 memcmp(scratch + c->got, refusal + c->got, (size_t)r) == 0;
                if (!as_reply && !as_refusal) {
                    mismatches++;
                    goto fail;
                }
                if (!as_refusal) c->which = 1;
                else if (!as_reply) c->which = 2;
                c->got += (size_t)r;
            }
            continue;
        fail:
            c->dead = 1;
            alive--;
            errors++;
            close(c->fd);
        }
    }
done:;
    uint64_t end = now_ns();
    if (hold > 0) {
        printf("{\"done\": true, \"ready\": %d, \"errors\": %llu}\n", ready, (unsigned long long)errors);
        return errors ? 1 : 0;
    }
    uint64_t stop = end < measure_end ? end : measure_end;
    double elapsed = measuring && stop > measure_start ? (double)(stop - measure_start) / 1e9 : 0.0;
    double cpu = measuring ? cpu_seconds() - cpu_at_start : 0.0;
    printf("{\"conns\": %d, \"requests\": %llu, \"warmup_requests\": %llu, \"errors\": %llu, "
           "\"refused\": %llu, \"warmup_refused\": %llu, \"refused_rps\": %.1f, "
           "\"mismatches\": %llu, \"connect_failures\": %d, \"connect_s\": %.3f, "
           "\"elapsed\": %.6f, \"rps\": %.1f, \"mean_us\": %.1f, \"p50_us\": %.1f, "
           "\"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f, "
           "\"cpu_s\": %.3f, \"cpu_util\": %.3f, \"rate\": %.1f}\n",
           nconns, (unsigned long long)requests, (unsigned long long)warm_requests,
           (unsigned long long)errors, (unsigned long long)refused,
           (unsigned long long)warm_refused, elapsed > 0 ? (double)refused / elapsed : 0.0, (unsigned long long)mismatches,
           connect_failures, connect_s,
           elapsed, elapsed > 0 ? (double)requests / elapsed : 0.0,
           requests ? sum_us / (double)requests : 0.0, percentile_ns(requests, 0.50) / 1000.0,
           percentile_ns(requests, 0.90) / 1000.0, percentile_ns(requests, 0.99) / 1000.0,
           percentile_ns(requests, 0.999) / 1000.0, max_us, cpu,
           elapsed > 0 ? cpu / ((double)(end - measure_start) / 1e9) : 0.0, rate);
    free(turns);
    return 0;
}
