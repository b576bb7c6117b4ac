/* udpblast: paced UDP sender and counting sink for xlat's benchmarks.
 *
 *   udpblast send BIND_ADDR BIND_PORT RATE DURATION SIZE DEST_ADDR PORT[,PORT...]
 *       Sends SIZE-byte datagrams from BIND_ADDR:BIND_PORT (port 0: any) at RATE
 *       packets/s in total for DURATION seconds, round-robin over the destination
 *       ports (one stream per port), in sendmmsg batches of what is due, waking every
 *       0.5 ms at most (or per datagram below 2,000 pps). When done prints one JSON
 *       line: {"sent", "elapsed", "cpu_ns", "send_errors"}.
 *   udpblast frames IFNAME RATE DURATION HEXFRAME
 *       Paces copies of one Ethernet frame carrying IPv4 or IPv6 + UDP (hex, with
 *       complete checksums and udpblast's payload header zeroed) out of IFNAME through
 *       an AF_PACKET socket with PACKET_QDISC_BYPASS: no UDP socket, no IP output, no
 *       routing or neighbour lookup, no qdisc on the sending side, so the sender's core
 *       has more left for the path under test. Each copy gets its sequence number and
 *       send time in the header and its UDP checksum updated to match (RFC 1624). One
 *       stream; the same JSON line as send.
 *   udpblast sink BIND_ADDR PORT
 *       Receives with recvmmsg until SIGTERM/SIGINT, then prints one JSON line:
 *       {"received", "streams", "reordered", "jitter_us", "transit_us_p50",
 *        "transit_us_p99", "cpu_ns"}. Prints "ready" once bound.
 *
 * Payload: u32 stream index, u32 sequence number, u64 CLOCK_MONOTONIC send time (ns),
 * then zeros. Sender and sink share the machine's monotonic clock (network
 * namespaces do not change it), so transit = receive time - send time.
 * jitter_us is the mean over streams of the RFC 3550 §6.4.1 interarrival jitter.
 * cpu_ns is this process's user+system time (getrusage), which with tick accounting
 * and no IRQ time accounting includes the softirq work run in its context.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <linux/if_ether.h>
#include <unistd.h>

#define BATCH 64          /* datagrams per sendmmsg/recvmmsg call */
#define MAX_SIZE 1472     /* payload that fits a 1500-byte IPv4 MTU */
#define MAX_FRAME 1514    /* Ethernet header + 1500-byte MTU */
#define MAX_STREAMS 65536
#define TICK_S 0.0005     /* the sender wakes at most every 0.5 ms (bursts of rate/2000) */
#define HIST_US 100000    /* transit histogram: 1 µs buckets up to 100 ms, then one overflow */

struct header {
	uint32_t stream;
	uint32_t seq;
	uint64_t sent_ns;
};

static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

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
	fprintf(stderr, "udpblast: bad address %s\n", addr);
	exit(2);
}

static int bound_socket(const char *addr, int port, int bufsize)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int family = endpoint(addr, port, &ss, &len);
	int fd = socket(family, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	/* FORCE variants ignore net.core.[rw]mem_max (we run as root) */
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bufsize, sizeof(bufsize));
	setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bufsize, sizeof(bufsize));
	if (bind(fd, (struct sockaddr *)&ss, len) < 0)
		die("bind");
	return fd;
}

/* Pacing shared by send and frames: hand send_batch() what is due (at most BATCH),
 * waking every tick at most; then print the JSON line of the run. */
typedef unsigned (*batch_fn)(unsigned n, uint64_t stamp, void *arg);

static void pace(double rate, double duration, batch_fn send_batch, void *arg)
{
	uint64_t cpu0 = cpu_ns(), start = now_ns();
	uint64_t total = (uint64_t)(rate * duration), sent = 0, errors = 0;
	uint64_t tick = (uint64_t)(rate * TICK_S);
	tick = tick < 1 ? 1 : tick > BATCH ? BATCH : tick;
	while (sent < total) {
		uint64_t t = now_ns();
		uint64_t due = (uint64_t)((double)(t - start) * rate / 1e9) + 1;
		if (due > total)
			due = total;
		if (due <= sent) {
			/* sleep until a tick's worth is due: waking per datagram would cost the
			 * sender more than the relay it measures */
			uint64_t at = start + (uint64_t)((double)(sent + tick - 1) * 1e9 / rate);
			struct timespec ts = {(time_t)(at / 1000000000ull), (long)(at % 1000000000ull)};
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
			continue;
		}
		unsigned n = due - sent > BATCH ? BATCH : (unsigned)(due - sent);
		/* what the kernel refused still counts as sent: it is the relay path's loss */
		errors += n - send_batch(n, now_ns(), arg);
		sent += n;
	}
	double elapsed = (double)(now_ns() - start) / 1e9;
	printf("{\"sent\": %llu, \"elapsed\": %.6f, \"cpu_ns\": %llu, \"send_errors\": %llu}\n",
	       (unsigned long long)sent, elapsed, (unsigned long long)(cpu_ns() - cpu0),
	       (unsigned long long)errors);
}

/* sendmmsg of n prepared messages; how many the kernel took */
static unsigned send_mmsg(int fd, struct mmsghdr *msgs, unsigned n)
{
	int done = sendmmsg(fd, msgs, n, 0);
	if (done < 0) {
		if (errno != ENOBUFS && errno != EAGAIN && errno != ECONNREFUSED)
			die("sendmmsg");
		done = 0;
	}
	return (unsigned)done;
}

struct send_state {
	int fd;
	struct mmsghdr *msgs;
	char (*payload)[MAX_SIZE];
	struct sockaddr_storage *dests;
	uint32_t *seqs;
	uint32_t streams, next_stream;
};

static unsigned socket_batch(unsigned n, uint64_t stamp, void *arg)
{
	struct send_state *s = arg;
	for (unsigned i = 0; i < n; i++) {
		struct header h = {s->next_stream, s->seqs[s->next_stream]++, stamp};
		memcpy(s->payload[i], &h, sizeof(h));
		s->msgs[i].msg_hdr.msg_name = &s->dests[s->next_stream];
		s->next_stream = (s->next_stream + 1) % s->streams;
	}
	return send_mmsg(s->fd, s->msgs, n);
}

static int do_send(int argc, char **argv)
{
	if (argc != 9) {
		fprintf(stderr, "usage: udpblast send BIND_ADDR BIND_PORT RATE DURATION SIZE "
				"DEST_ADDR PORT[,PORT...]\n");
		return 2;
	}
	double rate = atof(argv[4]), duration = atof(argv[5]);
	int size = atoi(argv[6]);
	if (rate <= 0 || duration <= 0 || size < (int)sizeof(struct header) || size > MAX_SIZE) {
		fprintf(stderr, "udpblast: bad rate, duration or size\n");
		return 2;
	}
	int fd = bound_socket(argv[2], atoi(argv[3]), 4 << 20);

	static struct sockaddr_storage dests[MAX_STREAMS];
	socklen_t dest_len = 0;
	uint32_t streams = 0;
	for (char *p = strtok(argv[8], ","); p; p = strtok(NULL, ",")) {
		if (streams == MAX_STREAMS) {
			fprintf(stderr, "udpblast: too many ports\n");
			return 2;
		}
		endpoint(argv[7], atoi(p), &dests[streams++], &dest_len);
	}
	static uint32_t seqs[MAX_STREAMS];

	static char payload[BATCH][MAX_SIZE];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	memset(msgs, 0, sizeof(msgs));
	memset(payload, 0, sizeof(payload));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = payload[i];
		iov[i].iov_len = (size_t)size;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
		msgs[i].msg_hdr.msg_namelen = dest_len;
	}

	struct send_state s = {fd, msgs, payload, dests, seqs, streams, 0};
	pace(rate, duration, socket_batch, &s);
	return 0;
}

struct frame_state {
	int fd;
	struct mmsghdr *msgs;
	char (*frames)[MAX_FRAME];
	size_t l4;         /* offset of the UDP header */
	uint16_t csum;     /* the frame's UDP checksum with the payload header zeroed */
	uint32_t seq;
};

/* RFC 1624 eqn. 3: the checksum after 16-bit words that were zero became @p[0..len). */
static uint16_t csum_add(uint16_t csum, const unsigned char *p, size_t len)
{
	uint32_t sum = (uint16_t)~csum;
	for (size_t i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	uint16_t out = (uint16_t)~sum;
	return out ? out : 0xffff;  /* 0 means "no checksum" in UDP (RFC 768) */
}

static unsigned frame_batch(unsigned n, uint64_t stamp, void *arg)
{
	struct frame_state *s = arg;
	for (unsigned i = 0; i < n; i++) {
		unsigned char *udp = (unsigned char *)s->frames[i] + s->l4;
		struct header h = {0, s->seq++, stamp};
		memcpy(udp + 8, &h, sizeof(h));
		uint16_t c = htons(csum_add(s->csum, udp + 8, sizeof(h)));
		memcpy(udp + 6, &c, 2);
	}
	return send_mmsg(s->fd, s->msgs, n);
}

static int do_frames(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: udpblast frames IFNAME RATE DURATION HEXFRAME\n");
		return 2;
	}
	double rate = atof(argv[3]), duration = atof(argv[4]);
	static unsigned char frame[MAX_FRAME];
	size_t len = strlen(argv[5]) / 2;
	if (rate <= 0 || duration <= 0 || len > MAX_FRAME || len < 14) {
		fprintf(stderr, "udpblast: bad rate, duration or frame\n");
		return 2;
	}
	for (size_t i = 0; i < len; i++)
		sscanf(argv[5] + 2 * i, "%2hhx", &frame[i]);
	uint16_t ethertype = (uint16_t)(frame[12] << 8 | frame[13]);
	size_t l4 = ethertype == ETH_P_IP ? 14 + (size_t)(frame[14] & 0x0f) * 4
		  : ethertype == ETH_P_IPV6 ? 14 + 40 : 0;
	if (!l4 || l4 + 8 + sizeof(struct header) > len) {
		fprintf(stderr, "udpblast: the frame is not IPv4/IPv6 + UDP + payload\n");
		return 2;
	}
	int ifindex = (int)if_nametoindex(argv[2]);
	if (!ifindex)
		die(argv[2]);
	int fd = socket(AF_PACKET, SOCK_RAW, 0);  /* protocol 0: this socket receives nothing */
	if (fd < 0)
		die("socket");
	int one = 1, bufsize = 4 << 20;
	setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bufsize, sizeof(bufsize));
	struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_ifindex = ifindex};
	if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
		die("bind");

	static char frames[BATCH][MAX_FRAME];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		memcpy(frames[i], frame, len);
		iov[i].iov_base = frames[i];
		iov[i].iov_len = len;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	struct frame_state s = {fd, msgs, frames, l4, (uint16_t)(frame[l4 + 6] << 8 | frame[l4 + 7]),
				0};
	pace(rate, duration, frame_batch, &s);
	return 0;
}

struct stream_state {
	uint32_t next_seq;  /* highest sequence seen + 1 */
	int64_t last_transit;
	double jitter;      /* RFC 3550 J, in ns */
	int seen;
};

static double percentile(const uint32_t *hist, uint64_t count, double q)
{
	uint64_t rank = (uint64_t)(q * (double)count), acc = 0;
	for (int i = 0; i <= HIST_US; i++) {
		acc += hist[i];
		if (acc > rank)
			return i;
	}
	return HIST_US;
}

static int do_sink(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: udpblast sink BIND_ADDR PORT\n");
		return 2;
	}
	int fd = bound_socket(argv[2], atoi(argv[3]), 32 << 20);
	struct timeval tv = {0, 100000};  /* wake up to check for the stop signal */
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	struct sigaction sa = {0};
	sa.sa_handler = on_signal;  /* no SA_RESTART: recvmmsg returns EINTR */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	static struct stream_state st[MAX_STREAMS];
	static uint32_t hist[HIST_US + 1];
	static char bufs[BATCH][MAX_SIZE];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = MAX_SIZE;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	uint64_t cpu0 = cpu_ns(), received = 0, reordered = 0;
	uint32_t streams = 0;
	printf("ready\n");
	fflush(stdout);
	while (!stop) {
		int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("recvmmsg");
		}
		uint64_t t = now_ns();
		for (int i = 0; i < n; i++) {
			struct header h;
			if (msgs[i].msg_len < sizeof(h))
				continue;
			memcpy(&h, bufs[i], sizeof(h));
			if (h.stream >= MAX_STREAMS)
				continue;
			received++;
			int64_t transit = (int64_t)(t - h.sent_ns);
			uint64_t us = transit > 0 ? (uint64_t)transit / 1000 : 0;
			hist[us > HIST_US ? HIST_US : us]++;
			struct stream_state *s = &st[h.stream];
			if (!s->seen) {
				s->seen = 1;
				streams++;
			} else {
				int64_t d = transit - s->last_transit;
				s->jitter += ((double)(d < 0 ? -d : d) - s->jitter) / 16.0;
			}
			s->last_transit = transit;
			if (h.seq < s->next_seq)
				reordered++;
			else
				s->next_seq = h.seq + 1;
		}
	}
	double jitter = 0;
	for (int i = 0; i < MAX_STREAMS; i++)
		jitter += st[i].jitter;
	printf("{\"received\": %llu, \"streams\": %u, \"reordered\": %llu, \"jitter_us\": %.3f, "
	       "\"transit_us_p50\": %.0f, \"transit_us_p99\": %.0f, \"cpu_ns\": %llu}\n",
	       (unsigned long long)received, streams, (unsigned long long)reordered,
	       streams ? jitter / streams / 1000.0 : 0.0, percentile(hist, received, 0.5),
	       percentile(hist, received, 0.99), (unsigned long long)(cpu_ns() - cpu0));
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "send") == 0)
		return do_send(argc, argv);
	if (argc >= 2 && strcmp(argv[1], "frames") == 0)
		return do_frames(argc, argv);
	if (argc >= 2 && strcmp(argv[1], "sink") == 0)
		return do_sink(argc, argv);
	fprintf(stderr, "usage: udpblast send|frames|sink ...\n");
	return 2;
}
