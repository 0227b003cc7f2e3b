/*
 * keel-xfer: a checked bulk transfer over TCP, vsock or a Unix socket, used
 * on both ends of Keel's network and vsock end-to-end tests (in the guest's
 * initramfs as /bin/keel-xfer, and on the host).
 *
 * usage: keel-xfer [-t SECS] send  ADDR BYTES SEED
 *        keel-xfer [-t SECS] serve ADDR BYTES SEED
 *
 *   ADDR   tcp:IPV4:PORT | vsock:CID:PORT | unix:PATH
 *          (serve with tcp port 0 picks a free port)
 *   BYTES  length of each direction's stream (decimal, 0 .. 2^40)
 *   SEED   the client's stream seed (decimal or 0x hex, 64-bit)
 *   -t     timeout in seconds for connect, accept and every read or write
 *          (default 60), so nothing waits forever
 *
 * The protocol: the client connects and sends BYTES bytes of stream(SEED),
 * then shutdown(SHUT_WR). The server reads until EOF, checks what it got
 * against stream(SEED) of length BYTES, then sends BYTES bytes of
 * stream(SEED + 1) (wrapping) and closes. The client reads until EOF and
 * checks that against stream(SEED + 1). So both directions are checked,
 * each end against its own expectation.
 *
 * The stream: xorshift64* (Vigna). State x0 = SEED XOR 0x9E3779B97F4A7C15,
 * or 1 if that is 0. Each step: x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
 * out = x * 0x2545F4914F6CDD1D (mod 2^64); the 8 bytes of out follow in
 * little-endian order. stream(SEED) of length N is the first N bytes.
 *
 * The checksum: FNV-1a 64 over the bytes (offset basis
 * 0xcbf29ce484222325, prime 0x100000001b3), printed as 16 hex digits.
 *
 * Output: `serve` first prints `keel-xfer: listening on ADDR` (the actual
 * port for tcp port 0). Both ends finish with one line on stdout
 *   keel-xfer: sent=N sum=HEX recv=M sum=HEX ok
 * or `... MISMATCH at byte K` (K: the first byte that differs, or where the
 * received stream ended early or ran long), and exit 0 only for `ok`. Any
 * other failure is one line `keel-xfer: error: ...` on stderr naming the
 * address or the bad value, and exit status 1 (2 for bad usage).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_BYTES (1ULL << 40)

static const char *addr_text = "";

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	va_list ap;
	char msg[512];

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fprintf(stderr, "keel-xfer: error: %s\n", msg);
	exit(1);
}

static void usage(const char *why) __attribute__((noreturn));
static void usage(const char *why)
{
	fprintf(stderr,
		"keel-xfer: error: %s\n"
		"usage: keel-xfer [-t SECS] send|serve ADDR BYTES SEED\n"
		"  ADDR: tcp:IPV4:PORT | vsock:CID:PORT | unix:PATH\n",
		why);
	exit(2);
}

/* --- the stream and the checksum --------------------------------------- */

struct stream {
	uint64_t x;
	unsigned char block[8];
	unsigned used; /* bytes of block already handed out */
};

static void stream_init(struct stream *s, uint64_t seed)
{
	s->x = seed ^ 0x9E3779B97F4A7C15ULL;
	if (s->x == 0)
		s->x = 1;
	s->used = 8;
}

static void stream_fill(struct stream *s, unsigned char *buf, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (s->used == 8) {
			uint64_t x = s->x;
			x ^= x >> 12;
			x ^= x << 25;
			x ^= x >> 27;
			s->x = x;
			uint64_t out = x * 0x2545F4914F6CDD1DULL;
			for (unsigned b = 0; b < 8; b++)
				s->block[b] = (unsigned char)(out >> (8 * b));
			s->used = 0;
		}
		buf[i] = s->block[s->used++];
	}
}

static uint64_t fnv1a(uint64_t h, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

#define FNV_BASIS 0xcbf29ce484222325ULL

/* --- numbers and addresses ---------------------------------------------- */

static uint64_t parse_u64(const char *what, const char *s, uint64_t max)
{
	const char *digits = s;
	int base = 10;
	char *end;
	unsigned long long v;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		digits = s + 2;
		base = 16;
	}
	if (!(base == 16 ? isxdigit((unsigned char)*digits) : isdigit((unsigned char)*digits)))
		die("%s: not a number: '%s'", what, s);
	errno = 0;
	v = strtoull(digits, &end, base);
	if (errno != 0 || *end != '\0' || v > max)
		die("%s: not a number in 0..%" PRIu64 ": '%s'", what, max, s);
	return v;
}

union any_addr {
	struct sockaddr sa;
	struct sockaddr_in in;
	struct sockaddr_vm vm;
	struct sockaddr_un un;
};

struct endpoint {
	int family;
	union any_addr a;
	socklen_t len;
};

static void parse_addr(const char *text, struct endpoint *ep)
{
	char what[300];

	memset(ep, 0, sizeof(*ep));
	if (strncmp(text, "tcp:", 4) == 0) {
		const char *host = text + 4;
		const char *colon = strrchr(host, ':');
		char ip[64];

		if (!colon || (size_t)(colon - host) >= sizeof(ip))
			die("bad address '%s': expected tcp:IPV4:PORT", text);
		memcpy(ip, host, (size_t)(colon - host));
		ip[colon - host] = '\0';
		ep->family = AF_INET;
		ep->a.in.sin_family = AF_INET;
		if (inet_pton(AF_INET, ip, &ep->a.in.sin_addr) != 1)
			die("bad address '%s': '%s' is not an IPv4 address", text, ip);
		snprintf(what, sizeof(what), "bad address '%s': port", text);
		ep->a.in.sin_port = htons((uint16_t)parse_u64(what, colon + 1, 65535));
		ep->len = sizeof(ep->a.in);
	} else if (strncmp(text, "vsock:", 6) == 0) {
		const char *cid = text + 6;
		const char *colon = strchr(cid, ':');
		char cidbuf[32];

		if (!colon || (size_t)(colon - cid) >= sizeof(cidbuf))
			die("bad address '%s': expected vsock:CID:PORT", text);
		memcpy(cidbuf, cid, (size_t)(colon - cid));
		cidbuf[colon - cid] = '\0';
		ep->family = AF_VSOCK;
		ep->a.vm.svm_family = AF_VSOCK;
		snprintf(what, sizeof(what), "bad address '%s': CID", text);
		ep->a.vm.svm_cid = (unsigned)parse_u64(what, cidbuf, UINT32_MAX);
		snprintf(what, sizeof(what), "bad address '%s': port", text);
		ep->a.vm.svm_port = (unsigned)parse_u64(what, colon + 1, UINT32_MAX);
		ep->len = sizeof(ep->a.vm);
	} else if (strncmp(text, "unix:", 5) == 0) {
		const char *path = text + 5;

		if (*path == '\0')
			die("bad address '%s': empty path", text);
		if (strlen(path) >= sizeof(ep->a.un.sun_path))
			die("bad address '%s': path longer than %zu bytes", text,
			    sizeof(ep->a.un.sun_path) - 1);
		ep->family = AF_UNIX;
		ep->a.un.sun_family = AF_UNIX;
		strcpy(ep->a.un.sun_path, path);
		ep->len = sizeof(ep->a.un);
	} else {
		die("bad address '%s': expected tcp:IPV4:PORT, vsock:CID:PORT or unix:PATH", text);
	}
}

static void set_timeouts(int fd, unsigned secs)
{
	struct timeval tv = { .tv_sec = secs, .tv_usec = 0 };

	if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0)
		die("%s: setting a %u s timeout: %s", addr_text, secs, strerror(errno));
}

static const char *errtext(int e, unsigned secs)
{
	static char buf[64];

	if (e == EAGAIN || e == EWOULDBLOCK || e == EINPROGRESS) {
		snprintf(buf, sizeof(buf), "timed out after %u s", secs);
		return buf;
	}
	return strerror(e);
}

/* --- the transfer --------------------------------------------------------- */

struct result {
	uint64_t sent, sent_sum;
	uint64_t recv, recv_sum;
	int mismatch; /* 0: matched */
	uint64_t mismatch_at;
	const char *mismatch_why;
};

static void send_stream(int fd, uint64_t bytes, uint64_t seed, struct result *r, unsigned secs)
{
	static unsigned char buf[BUF_SIZE];
	struct stream s;
	uint64_t left = bytes;

	stream_init(&s, seed);
	r->sent = 0;
	r->sent_sum = FNV_BASIS;
	while (left > 0) {
		size_t n = left < BUF_SIZE ? (size_t)left : BUF_SIZE;
		size_t off = 0;

		stream_fill(&s, buf, n);
		r->sent_sum = fnv1a(r->sent_sum, buf, n);
		while (off < n) {
			ssize_t w = send(fd, buf + off, n - off, MSG_NOSIGNAL);

			if (w < 0 && errno == EINTR)
				continue;
			if (w < 0)
				die("%s: send after %" PRIu64 " bytes: %s", addr_text,
				    r->sent + off, errtext(errno, secs));
			off += (size_t)w;
		}
		r->sent += n;
		left -= n;
	}
}

static void recv_stream(int fd, uint64_t bytes, uint64_t seed, struct result *r, unsigned secs)
{
	static unsigned char buf[BUF_SIZE], want[BUF_SIZE];
	struct stream s;

	stream_init(&s, seed);
	r->recv = 0;
	r->recv_sum = FNV_BASIS;
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("%s: receive after %" PRIu64 " bytes: %s", addr_text, r->recv,
			    errtext(errno, secs));
		if (n == 0)
			break;
		r->recv_sum = fnv1a(r->recv_sum, buf, (size_t)n);
		if (!r->mismatch) {
			uint64_t expect_left = bytes - r->recv;
			size_t cmp = (uint64_t)n < expect_left ? (size_t)n : (size_t)expect_left;

			stream_fill(&s, want, cmp);
			for (size_t i = 0; i < cmp; i++) {
				if (buf[i] != want[i]) {
					r->mismatch = 1;
					r->mismatch_at = r->recv + i;
					r->mismatch_why = "content differs";
					break;
				}
			}
			if (!r->mismatch && (uint64_t)n > expect_left) {
				r->mismatch = 1;
				r->mismatch_at = bytes;
				r->mismatch_why = "more data than expected";
			}
		}
		r->recv += (uint64_t)n;
	}
	if (!r->mismatch && r->recv < bytes) {
		r->mismatch = 1;
		r->mismatch_at = r->recv;
		r->mismatch_why = "stream ended early";
	}
}

static int report(const struct result *r, uint64_t bytes)
{
	printf("keel-xfer: sent=%" PRIu64 " sum=%016" PRIx64 " recv=%" PRIu64 " sum=%016" PRIx64,
	       r->sent, r->sent_sum, r->recv, r->recv_sum);
	if (r->mismatch)
		printf(" MISMATCH at byte %" PRIu64 " (%s; expected %" PRIu64 " bytes)\n",
		       r->mismatch_at, r->mismatch_why, bytes);
	else
		printf(" ok\n");
	fflush(stdout);
	return r->mismatch ? 1 : 0;
}

static int do_send(const struct endpoint *ep, uint64_t bytes, uint64_t seed, unsigned secs)
{
	struct result r = { 0 };
	int fd = socket(ep->family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		die("%s: socket: %s", addr_text, strerror(errno));
	set_timeouts(fd, secs);
	while (connect(fd, &ep->a.sa, ep->len) != 0) {
		if (errno == EINTR)
			continue;
		die("connect %s: %s", addr_text, errtext(errno, secs));
	}
	send_stream(fd, bytes, seed, &r, secs);
	if (shutdown(fd, SHUT_WR) != 0)
		die("%s: shutdown: %s", addr_text, strerror(errno));
	recv_stream(fd, bytes, seed + 1, &r, secs);
	close(fd);
	return report(&r, bytes);
}

static void print_listening(const struct endpoint *ep, int fd)
{
	if (ep->family == AF_INET) {
		struct sockaddr_in in;
		socklen_t len = sizeof(in);
		char ip[INET_ADDRSTRLEN];

		if (getsockname(fd, (struct sockaddr *)&in, &len) != 0)
			die("%s: getsockname: %s", addr_text, strerror(errno));
		inet_ntop(AF_INET, &in.sin_addr, ip, sizeof(ip));
		printf("keel-xfer: listening on tcp:%s:%u\n", ip, (unsigned)ntohs(in.sin_port));
	} else {
		printf("keel-xfer: listening on %s\n", addr_text);
	}
	fflush(stdout);
}

static int do_serve(const struct endpoint *ep, uint64_t bytes, uint64_t seed, unsigned secs)
{
	struct result r = { 0 };
	int one = 1, fd, conn, rc;
	int lfd = socket(ep->family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (lfd < 0)
		die("%s: socket: %s", addr_text, strerror(errno));
	if (ep->family == AF_INET)
		setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, &ep->a.sa, ep->len) != 0)
		die("bind %s: %s", addr_text, strerror(errno));
	if (listen(lfd, 1) != 0)
		die("listen %s: %s", addr_text, strerror(errno));
	/* SO_RCVTIMEO on the listening socket bounds accept(). */
	set_timeouts(lfd, secs);
	print_listening(ep, lfd);
	for (;;) {
		conn = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (conn >= 0)
			break;
		if (errno == EINTR || errno == ECONNABORTED)
			continue;
		if (ep->family == AF_UNIX)
			unlink(ep->a.un.sun_path);
		die("accept on %s: %s", addr_text, errtext(errno, secs));
	}
	close(lfd);
	if (ep->family == AF_UNIX)
		unlink(ep->a.un.sun_path);
	fd = conn;
	set_timeouts(fd, secs);
	recv_stream(fd, bytes, seed, &r, secs);
	/* Reply even after a mismatch, so the client's report is complete. */
	send_stream(fd, bytes, seed + 1, &r, secs);
	close(fd);
	rc = report(&r, bytes);
	return rc;
}

int main(int argc, char **argv)
{
	unsigned secs = 60;
	int i = 1;
	struct endpoint ep;
	uint64_t bytes, seed;

	if (i < argc && strcmp(argv[i], "-t") == 0) {
		if (i + 1 >= argc)
			usage("-t needs a number of seconds");
		secs = (unsigned)parse_u64("-t", argv[i + 1], 86400);
		if (secs == 0)
			usage("-t: the timeout must be at least 1 s");
		i += 2;
	}
	if (argc - i != 4)
		usage("expected a mode and three arguments");
	addr_text = argv[i + 1];
	parse_addr(argv[i + 1], &ep);
	bytes = parse_u64("BYTES", argv[i + 2], MAX_BYTES);
	seed = parse_u64("SEED", argv[i + 3], UINT64_MAX);
	signal(SIGPIPE, SIG_IGN);
	if (strcmp(argv[i], "send") == 0)
		return do_send(&ep, bytes, seed, secs);
	if (strcmp(argv[i], "serve") == 0)
		return do_serve(&ep, bytes, seed, secs);
	usage("the mode must be send or serve");
}
