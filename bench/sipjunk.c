/* sipjunk: SIP junk at a paced rate from many source addresses, for xlat's flood figure
 * and test.
 *
 *   sipjunk RATE DURATION DEST_ADDR DEST_PORT SRC_ADDR[,SRC_ADDR...]
 *       Sends RATE datagrams/s in total for DURATION seconds to DEST_ADDR:DEST_PORT,
 *       one socket per source address, each sendmmsg batch from the next source in
 *       turn (so each source sends RATE / sources per second). Wakes every 0.5 ms at
 *       most and sends what is due. When done prints one JSON line:
 *       {"sent", "elapsed", "cpu_ns", "send_errors", "sources"}.
 *
 * The junk, in turn: random bytes, a request line and headers cut short, an INVITE with
 * no Via/From/To, a response with a bad status line, a header block with no end, and a
 * REGISTER whose Content-Length lies: what a fuzzer or a broken scanner sends, each
 * datagram different (a counter in it), so no cache can answer them.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64          /* datagrams per sendmmsg call */
#define MAX_SOURCES 1024
#define PAYLOAD 600       /* room for the longest junk below */
#define TICK_S 0.0005     /* wake at most every 0.5 ms */

static const char *const JUNK[] = {
	NULL, /* random bytes */
	"INVITE sip:bob@203.0.113.2 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.9;branch=z9hG4bK",
	"INVITE sip:%u@xlat.test SIP/2.0\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
	"SIP/2.0 2%u0 OK\r\nVia: nonsense\r\n\r\n",
	"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP [::1;branch=%u\r\nX: ",
	"REGISTER sip:xlat.test SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.9:5060;branch=z9hG4bK%u\r\n"
	"From: <sip:%u@xlat.test>;tag=1\r\nTo: <sip:x@xlat.test>\r\nCall-ID: %u\r\n"
	"CSeq: 1 REGISTER\r\nContent-Length: 99999\r\n\r\nv=0\r\n",
};
#define KINDS (sizeof(JUNK) / sizeof(JUNK[0]))

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_ns(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) * 1000000000ull +
	       ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000ull;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* Parse ADDR (IPv4 or IPv6 literal) and PORT into *ss; returns its family. */
static int endpoint(const char *addr, int port, struct sockaddr_storage *ss, socklen_t *len)
{
	memset(ss, 0, sizeof(*ss));
	struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
	if (inet_pton(AF_INET, addr, &in4->sin_addr) == 1) {
		in4->sin_family = AF_INET;
		in4->sin_port = htons((uint16_t)port);
		*len = sizeof(*in4);
		return AF_INET;
	}
	if (inet_pton(AF_INET6, addr, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons((uint16_t)port);
		*len = sizeof(*in6);
		return AF_INET6;
	}
	fprintf(stderr, "sipjunk: bad address %s\n", addr);
	exit(2);
}

/* One datagram of junk kind (n % KINDS) into buf; returns its length. */
static size_t junk(char *buf, uint64_t n, uint64_t *rng)
{
	const char *fmt = JUNK[n % KINDS];
	if (fmt == NULL) {
		size_t len = 40 + (size_t)(n % 400);
		for (size_t i = 0; i < len; i++) {
			*rng ^= *rng << 13, *rng ^= *rng >> 7, *rng ^= *rng << 17; /* xorshift64 */
			buf[i] = (char)*rng;
		}
		return len;
	}
	unsigned v = (unsigned)n;
	int len = snprintf(buf, PAYLOAD, fmt, v, v, v);
	return len < 0 ? 0 : (size_t)len;
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: sipjunk RATE DURATION DEST_ADDR DEST_PORT "
				"SRC_ADDR[,SRC_ADDR...]\n");
		return 2;
	}
	double rate = atof(argv[1]), duration = atof(argv[2]);
	if (rate <= 0 || duration <= 0) {
		fprintf(stderr, "sipjunk: bad rate or duration\n");
		return 2;
	}
	struct sockaddr_storage dest;
	socklen_t dest_len;
	int family = endpoint(argv[3], atoi(argv[4]), &dest, &dest_len);

	static int fds[MAX_SOURCES];
	int sources = 0;
	for (char *p = strtok(argv[5], ","); p; p = strtok(NULL, ",")) {
		if (sources == MAX_SOURCES) {
			fprintf(stderr, "sipjunk: more than %d sources\n", MAX_SOURCES);
			return 2;
		}
		struct sockaddr_storage src;
		socklen_t src_len;
		if (endpoint(p, 0, &src, &src_len) != family) {
			fprintf(stderr, "sipjunk: source %s is not of the destination's family\n", p);
			return 2;
		}
		int fd = socket(family, SOCK_DGRAM, 0);
		if (fd < 0)
			die("socket");
		int size = 1 << 20;
		setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size));
		if (bind(fd, (struct sockaddr *)&src, src_len) < 0)
			die("bind");
		fds[sources++] = fd;
	}

	static char payload[BATCH][PAYLOAD];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = payload[i];
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
		msgs[i].msg_hdr.msg_name = &dest;
		msgs[i].msg_hdr.msg_namelen = dest_len;
	}

	uint64_t cpu0 = cpu_ns(), start = now_ns(), rng = 0x9e3779b97f4a7c15ull;
	uint64_t total = (uint64_t)(rate * duration), sent = 0, errors = 0;
	uint64_t tick = (uint64_t)(rate * TICK_S);
	tick = tick < 1 ? 1 : tick > BATCH ? BATCH : tick;
	int next = 0;
	while (sent < total) {
		uint64_t t = now_ns();
		uint64_t due = (uint64_t)((double)(t - start) * rate / 1e9) + 1;
		if (due > total)
			due = total;
		if (due <= sent) {
			uint64_t at = start + (uint64_t)((double)(sent + tick - 1) * 1e9 / rate);
			struct timespec ts = {(time_t)(at / 1000000000ull), (long)(at % 1000000000ull)};
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
			continue;
		}
		unsigned n = due - sent > BATCH ? BATCH : (unsigned)(due - sent);
		/* a source's share of a tick: a batch per source in turn */
		unsigned per = (unsigned)(tick / (uint64_t)sources);
		if (per < 1)
			per = 1;
		if (n > per)
			n = per;
		for (unsigned i = 0; i < n; i++)
			iov[i].iov_len = junk(payload[i], sent + i, &rng);
		int done = sendmmsg(fds[next], msgs, n, 0);
		if (done < 0) {
			if (errno != ENOBUFS && errno != EAGAIN && errno != ECONNREFUSED)
				die("sendmmsg");
			done = 0;
		}
		errors += n - (unsigned)done;
		sent += n;
		next = (next + 1) % sources;
	}
	double elapsed = (double)(now_ns() - start) / 1e9;
	printf("{\"sent\": %llu, \"elapsed\": %.6f, \"cpu_ns\": %llu, \"send_errors\": %llu, "
	       "\"sources\": %d}\n",
	       (unsigned long long)sent, elapsed, (unsigned long long)(cpu_ns() - cpu0),
	       (unsigned long long)errors, sources);
	return 0;
}
