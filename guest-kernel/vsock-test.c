// Guest-side traffic tool for the device tests (packed as /bin/vsock-test in
// devtest-initramfs.img by build.sh). Speaks AF_VSOCK and TCP (IPv4).
//
//   vsock-test gen BYTES SEED
//       writes BYTES of the deterministic stream SEED to stdout; prints the line
//       `vsock-test: gen bytes=B sum=S` on stderr.
//   vsock-test listen vsock|tcp PORT [N [sink|echo|send BYTES]]
//       listens on PORT (any address), prints `vsock-test: listening FAMILY PORT`, accepts N
//       connections (default 1), each served by its own process so that all can be open at
//       once. sink: reads to EOF. echo: writes back what it reads, half-closes at EOF.
//       send: writes BYTES of the stream whose seed is the connection's index (0-based, in
//       accept order) and closes. Each connection prints
//       `vsock-test: conn K recv=B sum=S sent=B2 sum_sent=S2`; then `vsock-test: listen done
//       ok=N_OK`.
//   vsock-test connect vsock CID PORT BYTES SEED [N]
//   vsock-test connect tcp IPV4 PORT BYTES SEED [N]
//       opens N connections (default 1) in parallel, connection K sends BYTES of stream
//       SEED+K, half-closes and reads to EOF; each prints
//       `vsock-test: conn K sent=B sum_sent=S recv=B2 sum=S2`, then `vsock-test: connect done
//       ok=N_OK`.
//
// The stream SEED: 64-bit words x_i of xorshift64* seeded with SEED*2654435761+1 (little
// endian), truncated to BYTES. The checksum (the tests compute the same on the host): over
// the bytes taken as little-endian 64-bit words (the last one zero-padded),
// h = (rotl(h, 5) ^ w) * 0x9E3779B97F4A7C15 from h = 0x6A09E667F3BCC908, then h ^= byte count,
// printed as 16 hex digits. Exit status 0 when every connection worked.
//
// Built with `gcc -static -Os`.
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define BUF (64 * 1024)

struct gen {
  uint64_t x;
};
static void gen_init(struct gen *g, uint64_t seed) { g->x = seed * 2654435761u + 1; }
static uint64_t gen_next(struct gen *g) {
  g->x ^= g->x >> 12;
  g->x ^= g->x << 25;
  g->x ^= g->x >> 27;
  return g->x * 0x2545F4914F6CDD1DULL;
}
// Fills buf (a multiple of 8 bytes long) with the next words.
static void gen_fill(struct gen *g, unsigned char *buf, size_t len) {
  for (size_t i = 0; i < len; i += 8) {
    uint64_t w = gen_next(g);
    memcpy(buf + i, &w, 8);
  }
}

struct sum {
  uint64_t h, n;
  unsigned char part[8];
  unsigned plen;
};
static void sum_init(struct sum *s) { memset(s, 0, sizeof *s), s->h = 0x6A09E667F3BCC908ULL; }
static inline void sum_word(struct sum *s, uint64_t w) {
  s->h = (((s->h << 5) | (s->h >> 59)) ^ w) * 0x9E3779B97F4A7C15ULL;
}
static void sum_update(struct sum *s, const unsigned char *p, size_t len) {
  s->n += len;
  while (len && s->plen) {
    s->part[s->plen++] = *p++, len--;
    if (s->plen == 8) {
      uint64_t w;
      memcpy(&w, s->part, 8);
      sum_word(s, w);
      s->plen = 0;
    }
  }
  for (; len >= 8; p += 8, len -= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    sum_word(s, w);
  }
  while (len--) s->part[s->plen++] = *p++;
}
static uint64_t sum_final(struct sum *s) {
  if (s->plen) {
    memset(s->part + s->plen, 0, 8 - s->plen);
    uint64_t w;
    memcpy(&w, s->part, 8);
    sum_word(s, w);
    s->plen = 0;
  }
  return s->h ^ s->n;
}

static int write_all(int fd, const unsigned char *p, size_t len) {
  while (len) {
    ssize_t n = write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += n, len -= (size_t)n;
  }
  return 0;
}

// Sends `bytes` of stream `seed`; accumulates the checksum of what was sent.
static int send_stream(int fd, uint64_t bytes, uint64_t seed, struct sum *s) {
  static unsigned char buf[BUF];
  struct gen g;
  gen_init(&g, seed);
  while (bytes) {
    size_t n = bytes < BUF ? (size_t)bytes : BUF;
    gen_fill(&g, buf, (n + 7) & ~(size_t)7);
    sum_update(s, buf, n);
    if (write_all(fd, buf, n) < 0) return -1;
    bytes -= n;
  }
  return 0;
}

// Reads to EOF; with echo_fd >= 0 writes everything back there.
static int recv_stream(int fd, int echo_fd, struct sum *s) {
  static unsigned char buf[BUF];
  for (;;) {
    ssize_t n = read(fd, buf, BUF);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (n == 0) return 0;
    sum_update(s, buf, (size_t)n);
    if (echo_fd >= 0 && write_all(echo_fd, buf, (size_t)n) < 0) return -1;
  }
}

static void die(const char *what) {
  dprintf(2, "vsock-test: %s: %s\n", what, strerror(errno));
  exit(1);
}

static uint64_t num(const char *s) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 0);
  if (errno || *end || end == s) {
    dprintf(2, "vsock-test: bad number %s\n", s);
    exit(2);
  }
  return v;
}

static int usage(void) {
  dprintf(2,
          "usage: vsock-test gen BYTES SEED\n"
          "       vsock-test listen vsock|tcp PORT [N [sink|echo|send BYTES]]\n"
          "       vsock-test connect vsock CID PORT BYTES SEED [N]\n"
          "       vsock-test connect tcp IPV4 PORT BYTES SEED [N]\n");
  return 2;
}

// Waits for n children; returns how many exited with status 0.
static int reap(int n) {
  int ok = 0;
  for (int i = 0; i < n; i++) {
    int st;
    while (wait(&st) < 0)
      if (errno != EINTR) return ok;
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) ok++;
  }
  return ok;
}

static int cmd_gen(int argc, char **argv) {
  if (argc != 4) return usage();
  struct sum s;
  sum_init(&s);
  if (send_stream(1, num(argv[2]), num(argv[3]), &s) < 0) die("write");
  dprintf(2, "vsock-test: gen bytes=%" PRIu64 " sum=%016" PRIx64 "\n", s.n, sum_final(&s));
  return 0;
}

static int cmd_listen(int argc, char **argv) {
  if (argc < 4 || argc > 7) return usage();
  int vsock = strcmp(argv[2], "vsock") == 0;
  if (!vsock && strcmp(argv[2], "tcp") != 0) return usage();
  uint64_t port = num(argv[3]);
  int n = argc > 4 ? (int)num(argv[4]) : 1;
  const char *mode = argc > 5 ? argv[5] : "sink";
  uint64_t send_bytes = 0;
  if (strcmp(mode, "send") == 0) {
    if (argc != 7) return usage();
    send_bytes = num(argv[6]);
  } else if (argc > 6 || (strcmp(mode, "sink") && strcmp(mode, "echo"))) {
    return usage();
  }

  int lfd = socket(vsock ? AF_VSOCK : AF_INET, SOCK_STREAM, 0);
  if (lfd < 0) die("socket");
  int one = 1;
  if (!vsock) setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_vm vm = {.svm_family = AF_VSOCK, .svm_port = (unsigned)port,
                           .svm_cid = VMADDR_CID_ANY};
  struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                           .sin_addr.s_addr = htonl(INADDR_ANY)};
  struct sockaddr *sa = vsock ? (struct sockaddr *)&vm : (struct sockaddr *)&in;
  socklen_t salen = vsock ? sizeof vm : sizeof in;
  if (bind(lfd, sa, salen) < 0) die("bind");
  if (listen(lfd, 128) < 0) die("listen");
  dprintf(1, "vsock-test: listening %s %" PRIu64 "\n", argv[2], port);

  for (int k = 0; k < n; k++) {
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0) {
      if (errno == EINTR) {
        k--;
        continue;
      }
      die("accept");
    }
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid > 0) {
      close(fd);
      continue;
    }
    close(lfd);
    struct sum r, t;
    sum_init(&r), sum_init(&t);
    int rc = 0;
    if (strcmp(mode, "send") == 0) {
      rc = send_stream(fd, send_bytes, (uint64_t)k, &t);
      shutdown(fd, SHUT_WR);
      if (rc == 0) rc = recv_stream(fd, -1, &r);
    } else {
      rc = recv_stream(fd, strcmp(mode, "echo") == 0 ? fd : -1, &r);
      if (strcmp(mode, "echo") == 0) t = r;
      shutdown(fd, SHUT_WR);
    }
    int err = errno;
    uint64_t rs = sum_final(&r), ts = sum_final(&t);
    if (rc < 0)
      dprintf(1, "vsock-test: conn %d error: %s (recv=%" PRIu64 ")\n", k, strerror(err), r.n);
    else
      dprintf(1,
              "vsock-test: conn %d recv=%" PRIu64 " sum=%016" PRIx64 " sent=%" PRIu64
              " sum_sent=%016" PRIx64 "\n",
              k, r.n, rs, t.n, ts);
    close(fd);
    _exit(rc < 0);
  }
  close(lfd);
  int ok = reap(n);
  dprintf(1, "vsock-test: listen done ok=%d\n", ok);
  return ok == n ? 0 : 1;
}

static int cmd_connect(int argc, char **argv) {
  if (argc < 7 || argc > 8) return usage();
  int vsock = strcmp(argv[2], "vsock") == 0;
  if (!vsock && strcmp(argv[2], "tcp") != 0) return usage();
  struct sockaddr_vm vm = {.svm_family = AF_VSOCK};
  struct sockaddr_in in = {.sin_family = AF_INET};
  uint64_t port = num(argv[4]);
  if (vsock) {
    vm.svm_cid = (unsigned)num(argv[3]);
    vm.svm_port = (unsigned)port;
  } else {
    in.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, argv[3], &in.sin_addr) != 1) return usage();
  }
  struct sockaddr *sa = vsock ? (struct sockaddr *)&vm : (struct sockaddr *)&in;
  socklen_t salen = vsock ? sizeof vm : sizeof in;
  uint64_t bytes = num(argv[5]), seed = num(argv[6]);
  int n = argc > 7 ? (int)num(argv[7]) : 1;

  for (int k = 0; k < n; k++) {
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid > 0) continue;
    struct sum r, t;
    sum_init(&r), sum_init(&t);
    int fd = socket(vsock ? AF_VSOCK : AF_INET, SOCK_STREAM, 0);
    int rc = fd < 0 ? -1 : connect(fd, sa, salen);
    if (rc == 0) rc = send_stream(fd, bytes, seed + (uint64_t)k, &t);
    if (rc == 0) rc = shutdown(fd, SHUT_WR);
    if (rc == 0) rc = recv_stream(fd, -1, &r);
    int err = errno;
    uint64_t rs = sum_final(&r), ts = sum_final(&t);
    if (rc < 0)
      dprintf(1, "vsock-test: conn %d error: %s (sent=%" PRIu64 ")\n", k, strerror(err), t.n);
    else
      dprintf(1,
              "vsock-test: conn %d sent=%" PRIu64 " sum_sent=%016" PRIx64 " recv=%" PRIu64
              " sum=%016" PRIx64 "\n",
              k, t.n, ts, r.n, rs);
    _exit(rc < 0);
  }
  int ok = reap(n);
  dprintf(1, "vsock-test: connect done ok=%d\n", ok);
  return ok == n ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc < 2) return usage();
  if (strcmp(argv[1], "gen") == 0) return cmd_gen(argc, argv);
  if (strcmp(argv[1], "listen") == 0) return cmd_listen(argc, argv);
  if (strcmp(argv[1], "connect") == 0) return cmd_connect(argc, argv);
  return usage();
}
