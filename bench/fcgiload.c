/*
 * fcgiload — a small FastCGI load generator for the fcgispawn benchmarks.
 *
 * Why it exists: wrk through nginx measures nginx as much as the backend (on a 2-core machine
 * nginx saturates a core first). This drives the FastCGI socket directly, the way nginx does
 * by default: one new connection per request, BEGIN_REQUEST with flags 0 (the application
 * closes the connection), the PARAMS nginx's stock fastcgi_params produce for `GET /`, an empty
 * PARAMS record and an empty STDIN record (or a body, with -b). It reads records until
 * END_REQUEST, checks the protocol status and (optionally) that the stdout stream contains an
 * expected string, closes and starts again, for a fixed duration.
 *
 * One thread, epoll, N non-blocking connections: the generator itself must stay cheap on a
 * 2-core machine, and one thread per connection would cost context switches the backend pays for.
 *
 * Output (last line is machine-readable, parsed by bench.py):
 *   requests=N errors=E elapsed=S rps=R stdout_bytes=B mean_latency_us=L
 *
 * Usage: fcgiload (-s SOCKET | -a HOST:PORT) [-c CONNS] [-d SECONDS] [-n MAX_REQUESTS]
 *                 [-e EXPECT] [-u URI] [-b BODY_BYTES] [-k] [-q]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum {
    T_BEGIN_REQUEST = 1, T_END_REQUEST = 3, T_PARAMS = 4, T_STDIN = 5,
    T_STDOUT = 6, T_STDERR = 7
};

#define HEAD_KEEP 4096 /* bytes of stdout kept per request for the -e check */
#define MAX_CONNS 4096

struct conn {
    int fd;
    size_t woff;              /* bytes of the request already written */
    unsigned char hdr[8];     /* record header being assembled */
    int hdr_have;
    int rtype;
    size_t content_left, pad_left;
    unsigned char endbody[8];
    int end_have;
    char head[HEAD_KEEP + 1]; /* first bytes of stdout, for the -e check */
    size_t head_len;
    int done;                 /* END_REQUEST seen */
    int reuse;                /* keep-conn mode: connection stays open */
    struct timespec started;
};

static struct sockaddr_storage g_addr;
static socklen_t g_addrlen;
static int g_family;
static unsigned char *g_req;
static size_t g_reqlen;
static const char *g_expect = "Hello, World!";
static int g_keep;
static unsigned long long g_requests, g_errors, g_stdout_bytes;
static double g_latency_sum;
static int g_quiet;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

/* ---- request encoding ---------------------------------------------------------------- */

struct buf { unsigned char *p; size_t len, cap; };

static void buf_put(struct buf *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n) cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p) die("realloc");
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void put_record(struct buf *b, int type, const unsigned char *content, size_t n) {
    static const unsigned char zeros[8];
    unsigned char h[8];
    size_t pad = (8 - (n % 8)) % 8;
    h[0] = 1; h[1] = (unsigned char)type; h[2] = 0; h[3] = 1; /* request id 1, like nginx */
    h[4] = (unsigned char)(n >> 8); h[5] = (unsigned char)(n & 0xff);
    h[6] = (unsigned char)pad; h[7] = 0;
    buf_put(b, h, 8);
    if (n) buf_put(b, content, n);
    if (pad) buf_put(b, zeros, pad);
}

static void put_len(struct buf *b, size_t n) {
    unsigned char l[4];
    if (n < 128) {
        l[0] = (unsigned char)n;
        buf_put(b, l, 1);
    } else {
        l[0] = (unsigned char)(0x80 | (n >> 24)); l[1] = (unsigned char)(n >> 16);
        l[2] = (unsigned char)(n >> 8); l[3] = (unsigned char)n;
        buf_put(b, l, 4);
    }
}

static void put_pair(struct buf *b, const char *name, const char *value) {
    size_t nl = strlen(name), vl = strlen(value);
    put_len(b, nl);
    put_len(b, vl);
    buf_put(b, name, nl);
    buf_put(b, value, vl);
}

static void build_request(const char *uri, size_t body, const char *host, const char *port) {
    struct buf pairs = {0}, req = {0};
    char clen[32], *path, *query;
    unsigned char begin[8] = {0, 1, (unsigned char)(g_keep ? 1 : 0), 0, 0, 0, 0, 0};
    static unsigned char chunk[32768];

    path = strdup(uri);
    if (!path) die("strdup");
    query = strchr(path, '?');
    if (query) *query++ = '\0';
    snprintf(clen, sizeof clen, "%zu", body);
    /* What nginx 1.22 sends with Debian's fastcgi_params for `GET URI` from wrk. */
    put_pair(&pairs, "QUERY_STRING", query ? query : "");
    put_pair(&pairs, "REQUEST_METHOD", body ? "POST" : "GET");
    put_pair(&pairs, "CONTENT_TYPE", body ? "application/octet-stream" : "");
    put_pair(&pairs, "CONTENT_LENGTH", body ? clen : "");
    put_pair(&pairs, "SCRIPT_NAME", path);
    put_pair(&pairs, "REQUEST_URI", uri);
    put_pair(&pairs, "DOCUMENT_URI", path);
    put_pair(&pairs, "DOCUMENT_ROOT", "/usr/share/nginx/html");
    put_pair(&pairs, "SERVER_PROTOCOL", "HTTP/1.1");
    put_pair(&pairs, "REQUEST_SCHEME", "http");
    put_pair(&pairs, "GATEWAY_INTERFACE", "CGI/1.1");
    put_pair(&pairs, "SERVER_SOFTWARE", "nginx/1.22.1");
    put_pair(&pairs, "REMOTE_ADDR", "127.0.0.1");
    put_pair(&pairs, "REMOTE_PORT", "54321");
    put_pair(&pairs, "REMOTE_USER", "");
    put_pair(&pairs, "SERVER_ADDR", host);
    put_pair(&pairs, "SERVER_PORT", port);
    put_pair(&pairs, "SERVER_NAME", "localhost");
    put_pair(&pairs, "REDIRECT_STATUS", "200");
    put_pair(&pairs, "HTTP_HOST", host);
    if (pairs.len > 65535) {
        fprintf(stderr, "fcgiload: PARAMS too long\n");
        exit(2);
    }
    put_record(&req, T_BEGIN_REQUEST, begin, 8);
    put_record(&req, T_PARAMS, pairs.p, pairs.len);
    put_record(&req, T_PARAMS, NULL, 0);
    while (body) {
        size_t n = body < sizeof chunk ? body : sizeof chunk;
        put_record(&req, T_STDIN, chunk, n);
        body -= n;
    }
    put_record(&req, T_STDIN, NULL, 0);
    g_req = req.p;
    g_reqlen = req.len;
    free(pairs.p);
    free(path);
}

/* ---- address ------------------------------------------------------------------------- */

static void set_unix(const char *path) {
    struct sockaddr_un *sun = (struct sockaddr_un *)&g_addr;
    if (strlen(path) >= sizeof sun->sun_path) {
        fprintf(stderr, "fcgiload: socket path too long: %s\n", path);
        exit(2);
    }
    memset(&g_addr, 0, sizeof g_addr);
    sun->sun_family = AF_UNIX;
    strcpy(sun->sun_path, path);
    g_addrlen = (socklen_t)sizeof *sun;
    g_family = AF_UNIX;
}

static void set_tcp(const char *spec) {
    char *host = strdup(spec), *port;
    struct addrinfo hints = {0}, *res;
    int rc;
    if (!host) die("strdup");
    port = strrchr(host, ':');
    if (!port) {
        fprintf(stderr, "fcgiload: -a wants HOST:PORT, got %s\n", spec);
        exit(2);
    }
    *port++ = '\0';
    if (host[0] == '[') { /* [::1]:9000 */
        host++;
        host[strlen(host) - 1] = '\0';
    }
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "fcgiload: %s: %s\n", spec, gai_strerror(rc));
        exit(2);
    }
    memcpy(&g_addr, res->ai_addr, res->ai_addrlen);
    g_addrlen = res->ai_addrlen;
    g_family = res->ai_family;
    freeaddrinfo(res);
}

/* ---- connections --------------------------------------------------------------------- */

static void conn_reset(struct conn *c) {
    c->woff = 0;
    c->hdr_have = 0;
    c->content_left = c->pad_left = 0;
    c->end_have = 0;
    c->head_len = 0;
    c->done = 0;
    clock_gettime(CLOCK_MONOTONIC, &c->started);
}

/* Opens a connection. A blocking connect on purpose: with a full listen backlog it waits for
 * the backend to accept, which is back-pressure, not an error. Returns 0 or -1. */
static int conn_open(struct conn *c, int ep) {
    struct epoll_event ev;
    int fd = socket(g_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) != 0) {
        close(fd);
        return -1;
    }
    if (g_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    c->fd = fd;
    conn_reset(c);
    ev.events = EPOLLIN | EPOLLOUT;
    ev.data.ptr = c;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl");
    return 0;
}

static void conn_close(struct conn *c) {
    if (c->fd >= 0) close(c->fd); /* close removes it from the epoll set */
    c->fd = -1;
}

/* Feeds received bytes to the record parser. Returns 1 when END_REQUEST completed, 0 if more
 * is needed, -1 on a malformed stream. */
static int conn_feed(struct conn *c, const unsigned char *p, size_t n) {
    const unsigned char *end = p + n;
    while (p < end) {
        if (c->hdr_have < 8) {
            size_t k = (size_t)(end - p) < (size_t)(8 - c->hdr_have) ? (size_t)(end - p)
                                                                     : (size_t)(8 - c->hdr_have);
            memcpy(c->hdr + c->hdr_have, p, k);
            c->hdr_have += (int)k;
            p += k;
            if (c->hdr_have < 8) return 0;
            if (c->hdr[0] != 1) return -1;
            c->rtype = c->hdr[1];
            c->content_left = ((size_t)c->hdr[4] << 8) | c->hdr[5];
            c->pad_left = c->hdr[6];
            c->end_have = 0;
        } else if (c->content_left) {
            size_t k = (size_t)(end - p) < c->content_left ? (size_t)(end - p) : c->content_left;
            if (c->rtype == T_STDOUT) {
                size_t room = HEAD_KEEP - c->head_len;
                size_t cp = k < room ? k : room;
                memcpy(c->head + c->head_len, p, cp);
                c->head_len += cp;
                g_stdout_bytes += k;
            } else if (c->rtype == T_END_REQUEST) {
                size_t cp = k < (size_t)(8 - c->end_have) ? k : (size_t)(8 - c->end_have);
                memcpy(c->endbody + c->end_have, p, cp);
                c->end_have += (int)cp;
            }
            c->content_left -= k;
            p += k;
        } else {
            size_t k = (size_t)(end - p) < c->pad_left ? (size_t)(end - p) : c->pad_left;
            c->pad_left -= k;
            p += k;
        }
        if (c->hdr_have == 8 && c->content_left == 0 && c->pad_left == 0) {
            c->hdr_have = 0;
            if (c->rtype == T_END_REQUEST) {
                if (c->end_have < 8) return -1;
                return 1;
            }
        }
    }
    return 0;
}

static int response_ok(struct conn *c) {
    uint32_t app_status = ((uint32_t)c->endbody[0] << 24) | ((uint32_t)c->endbody[1] << 16) |
                          ((uint32_t)c->endbody[2] << 8) | c->endbody[3];
    if (c->endbody[4] != 0 || app_status != 0) return 0;
    if (g_expect && *g_expect) {
        c->head[c->head_len] = '\0';
        if (!memmem(c->head, c->head_len, g_expect, strlen(g_expect))) return 0;
    }
    return 1;
}

static void finish(struct conn *c, int ok) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    if (ok) {
        g_requests++;
        g_latency_sum += (double)(t.tv_sec - c->started.tv_sec) +
                         (double)(t.tv_nsec - c->started.tv_nsec) / 1e9;
    } else {
        g_errors++;
        if (!g_quiet && g_errors <= 5) {
            c->head[c->head_len] = '\0';
            fprintf(stderr, "fcgiload: bad response (protocol status %d): %.200s\n",
                    c->endbody[4], c->head);
        }
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: fcgiload (-s SOCKET | -a HOST:PORT) [-c CONNS] [-d SECONDS] [-n MAX]\n"
            "                [-e EXPECT] [-u URI] [-b BODY_BYTES] [-k] [-q]\n"
            "  -c  concurrent connections (32)      -d  duration in seconds (10)\n"
            "  -n  exactly MAX requests              -e  string stdout must contain ('' = none)\n"
            "  -u  request URI (/)                   -b  upload a body of that many bytes (POST)\n"
            "  -k  set FCGI_KEEP_CONN and reuse connections (default: flags 0, like nginx)\n"
            "  -q  quiet (only the summary line)\n");
    exit(2);
}

int main(int argc, char **argv) {
    int conns = 32, opt, ep, i, active;
    double duration = 10.0, t0, deadline, elapsed;
    unsigned long long max_requests = 0, started;
    const char *sock_path = NULL, *tcp = NULL, *uri = "/";
    size_t body = 0;
    struct conn *cs;
    static unsigned char rbuf[1 << 16];
    struct epoll_event evs[256];

    while ((opt = getopt(argc, argv, "s:a:c:d:n:e:u:b:kqh")) != -1) {
        switch (opt) {
        case 's': sock_path = optarg; break;
        case 'a': tcp = optarg; break;
        case 'c': conns = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'n': max_requests = strtoull(optarg, NULL, 10); break;
        case 'e': g_expect = optarg; break;
        case 'u': uri = optarg; break;
        case 'b': body = (size_t)strtoull(optarg, NULL, 10); break;
        case 'k': g_keep = 1; break;
        case 'q': g_quiet = 1; break;
        default: usage();
        }
    }
    if ((!sock_path) == (!tcp) || conns < 1 || conns > MAX_CONNS || duration <= 0) usage();
    /* -n is exact: no more than MAX requests are started, and the ones in flight are finished
     * (a request left unanswered would still cost the backend work that no count shows). */
    if (max_requests && max_requests < (unsigned long long)conns) conns = (int)max_requests;
    signal(SIGPIPE, SIG_IGN);
    if (sock_path) {
        set_unix(sock_path);
        build_request(uri, body, "127.0.0.1", "80");
    } else {
        char host[256];
        const char *colon = strrchr(tcp, ':');
        set_tcp(tcp);
        snprintf(host, sizeof host, "%.*s", (int)(colon - tcp), tcp);
        build_request(uri, body, host, colon + 1);
    }

    cs = calloc((size_t)conns, sizeof *cs);
    if (!cs) die("calloc");
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");

    t0 = now_s();
    deadline = t0 + duration;
    for (i = 0; i < conns; i++) {
        cs[i].fd = -1;
        if (conn_open(&cs[i], ep) != 0) {
            g_errors++;
            if (!g_quiet) perror("fcgiload: connect");
            if (g_errors > 100) {
                fprintf(stderr, "fcgiload: cannot connect, giving up\n");
                return 1;
            }
            i--; /* retry this slot */
            usleep(1000);
        }
    }

    started = (unsigned long long)conns;
    active = conns;
    for (;;) {
        int n, timeout_ms;
        double now = now_s();
        if (now >= deadline || active == 0) break;
        timeout_ms = (int)((deadline - now) * 1000) + 1;
        n = epoll_wait(ep, evs, 256, timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            int failed = 0, complete = 0;
            if (c->woff < g_reqlen && (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
                ssize_t w = write(c->fd, g_req + c->woff, g_reqlen - c->woff);
                if (w > 0) {
                    c->woff += (size_t)w;
                    if (c->woff == g_reqlen) {
                        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    }
                } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                    failed = 1;
                }
            }
            if (!failed && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
                for (;;) {
                    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
                    if (r > 0) {
                        int st = conn_feed(c, rbuf, (size_t)r);
                        if (st < 0) { failed = 1; break; }
                        if (st > 0) { complete = 1; break; }
                        continue;
                    }
                    if (r == 0) { failed = 1; break; } /* EOF before END_REQUEST */
                    if (errno == EAGAIN) break;
                    if (errno == EINTR) continue;
                    failed = 1;
                    break;
                }
            }
            if (complete) {
                finish(c, response_ok(c));
                if (g_keep && !(max_requests && started >= max_requests)) {
                    started++;
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                    conn_reset(c);
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    continue;
                }
                conn_close(c);
            } else if (failed) {
                finish(c, 0);
                conn_close(c);
            } else {
                continue;
            }
            if (now_s() >= deadline) continue;
            if (max_requests && started >= max_requests) {
                active--;
                continue;
            }
            started++;
            while (conn_open(c, ep) != 0) {
                g_errors++;
                if (now_s() >= deadline) break;
                usleep(1000); /* backend gone or refusing: do not spin */
            }
        }
    }
    elapsed = now_s() - t0;
    for (i = 0; i < conns; i++) conn_close(&cs[i]);
    if (!g_quiet)
        fprintf(stderr, "fcgiload: %d connections, %.2f s, %llu requests, %llu errors\n", conns,
                elapsed, g_requests, g_errors);
    printf("requests=%llu errors=%llu elapsed=%.6f rps=%.1f stdout_bytes=%llu "
           "mean_latency_us=%.1f\n",
           g_requests, g_errors, elapsed, (double)g_requests / elapsed, g_stdout_bytes,
           g_requests ? g_latency_sum / (double)g_requests * 1e6 : 0.0);
    return g_requests > 0 ? 0 : 1;
}
