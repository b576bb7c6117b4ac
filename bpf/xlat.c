/* SPDX-License-Identifier: MIT */
/* xlat — TC ingress media relay: IPv4 <-> IPv6 (RFC 7915 header translation, stateful
 * addressing from the flow map) and same-family anchoring, for RTP/RTCP over UDP.
 *
 * Per packet: parse (ipv4.h/ipv6.h) -> flow lookup by destination address:port ->
 * admission (soft state, TTL, strict latching, rate cap, learning, peer known) ->
 * translate (bpf_skb_change_proto, fresh L3 header, l4.h checksum) -> fib.h redirect.
 * Every path that does not forward counts one REASON_* (reasons.h) and returns
 * TC_ACT_OK (to the stack, packet untouched) or TC_ACT_SHOT (dropped); the exceptions,
 * REASON_FIB_FAIL and REASON_MTU_EXCEEDED, hand the translated packet to the stack.
 *
 * Helper calls per translated packet (each one costs more than the inline code around
 * it): bpf_skb_change_proto (families differ) and bpf_redirect_neigh; besides them,
 * bpf_l4_csum_replace only for CHECKSUM_PARTIAL packets (l4.h), bpf_ktime_get_coarse_ns
 * once per tick per CPU (clock.h) and bpf_fib_lookup about once a second per flow (fib.h
 * next-hop cache). Headers and checksums are written with direct packet access; the
 * verifier inlines the array lookups and bpf_jiffies64().
 *
 * Built by xlat/media/ebpf.py with bcc. -DXLAT_PIN_DIR="/path" pins `flows` and `reasons`
 * there (a restarted daemon adopts them); without it they are private (xlat check).
 * `clock_copies` (clock.h's per-CPU cache) and `link_epoch` (fib.h) are always private.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "reasons.h"
#include "maps.h"
#include "clock.h"
#include "pkt.h"
#include "csum.h"
#include "ipv4.h"
#include "ipv6.h"
#include "l4.h"
#include "fib.h"

#define XLAT_NSEC_PER_SEC 1000000000ULL

/* ---- maps ----------------------------------------------------------------------- */

#ifdef XLAT_PIN_DIR
#define XLAT_MAP(type, key, leaf, name, entries, flags) \
	BPF_TABLE_PINNED7(type, key, leaf, name, entries, XLAT_PIN_DIR "/" #name, flags)
#else
#define XLAT_MAP(type, key, leaf, name, entries, flags) \
	BPF_F_TABLE(type, key, leaf, name, entries, flags)
#endif

XLAT_MAP("hash", struct flow_key, struct flow_value, flows, FLOW_MAX_ENTRIES, BPF_F_NO_PREALLOC);
XLAT_MAP("percpu_array", u32, struct reason_counter, reasons, __REASON_MAX, 0);
/* private (not pinned): a cache that the first packet on each CPU fills */
BPF_PERCPU_ARRAY(clock_copies, struct clock_copy, 1);
/* private: bumped by ebpf.py on every interface that vanishes or appears; a next hop
 * cached in another epoch is looked up again (fib.h). A fresh program starts at 0, and
 * an adopted flow cached by the previous one at most re-does one lookup. */
BPF_ARRAY(link_epoch, __u32, 1);

/* ---- clock ------------------------------------------------------------------------ */

/* clock_read — the datapath's clock (clock.h) through this CPU's copy. */
static __always_inline __u64 clock_read(void)
{
	__u32 zero = 0;

	return clock_now(clock_copies.lookup(&zero));
}

/* ---- reasons ---------------------------------------------------------------------- */

/* count — add one packet of @bytes to @reason's per-CPU counter. */
static __always_inline void count(__u32 reason, __u32 bytes)
{
	struct reason_counter *c = reasons.lookup(&reason);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

/* verdict — count a packet we do not forward and say what happens to it.
 * Returns TC_ACT_SHOT for the reasons whose EBPF column in reasons.h is `drop`, TC_ACT_OK for
 * the others.
 */
static __always_inline int verdict(__u32 reason, __u32 bytes)
{
	count(reason, bytes);
	switch (reason) {
	XLAT_REASONS(XLAT_EBPF_DROP)
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

/* ---- admission -------------------------------------------------------------------- */

/* rate_admit — GCRA (virtual scheduling) cap of flow->rate_pps packets per second with
 * a burst tolerance of one second's worth. Side effect: advances flow->tb_tat_ns.
 * Returns 1 to admit, 0 to drop.
 */
static __always_inline int rate_admit(struct flow_value *flow, __u64 now)
{
	__u64 interval = XLAT_NSEC_PER_SEC / flow->rate_pps;
	__u64 tat = flow->tb_tat_ns;

	if (tat < now)
		tat = now;
	if (tat - now > XLAT_NSEC_PER_SEC - interval)
		return 0;
	flow->tb_tat_ns = tat + interval;
	return 1;
}

/* flow_learn — symmetric RTP: this packet's source becomes where the reverse flow
 * sends, if the reverse flow sends in this packet's family. A reverse flow that is not
 * installed yet is retried on the next packet. Side effect: writes the reverse flow's
 * destination (and empties its next-hop cache) and this flow's FLOW_F_LEARNED.
 */
static __always_inline void flow_learn(const struct xlat_pkt *pkt, struct flow_value *flow)
{
	struct flow_key rkey;
	struct flow_value *rev;

	if (flow->reverse.port) {
		__builtin_memcpy(&rkey, &flow->reverse, sizeof(rkey));
		rev = flows.lookup(&rkey);
		if (!rev)
			return;
		if (rev->family == pkt->family) {
			__builtin_memcpy(rev->dst_addr, pkt->saddr, 16);
			rev->dst_port = pkt->sport;
			rev->nh_expires_ns = 0;	/* its cached next hop was for the old peer */
		}
	}
	flow->flags |= FLOW_F_LEARNED;
}

/* source_is — does the packet come from @addr (v4-mapped for IPv4) port @port? */
static __always_inline int source_is(const struct xlat_pkt *pkt, const __u8 *addr, __be16 port)
{
	const __u64 *a = (const __u64 *)pkt->saddr;
	const __u64 *b = (const __u64 *)addr;

	return pkt->sport == port && a[0] == b[0] && a[1] == b[1];
}

/* flow_admit — may this packet be forwarded on @flow now?
 * Order: soft state first (an expired flow does nothing, not even learning), then what
 * the packet itself prevents, then the latching and rate policies.
 * Returns 0, or the REASON_* to hand to verdict(). Side effects: rate_admit(),
 * flow_learn().
 */
static __always_inline int flow_admit(const struct xlat_pkt *pkt, struct flow_value *flow,
				      __u64 now)
{
	__u64 active = flow->last_seen_ns > flow->installed_ns ? flow->last_seen_ns
							     : flow->installed_ns;

	if (flow->idle_timeout_ns && now > active && now - active > flow->idle_timeout_ns)
		return REASON_EXPIRED;
	if (pkt->ttl <= 1)
		return REASON_TTL_EXCEEDED;	/* addressed to us: the stack delivers it */
	if (flow->family == 4 && pkt->udp_len > 0xffff - IPV4_HLEN)
		return REASON_MALFORMED;	/* an IPv6 datagram too long for IPv4's tot_len */
	if (pkt->family == 4 && flow->family == 6 && !pkt->udp_check &&
	    pkt->udp_len > CSUM_MAX_LEN)
		return REASON_CSUM_TOO_BIG;
	if ((flow->flags & FLOW_F_STRICT) &&
	    !source_is(pkt, flow->expect_addr, flow->expect_port))
		return REASON_STRICT_MISMATCH;
	if (flow->rate_pps && !rate_admit(flow, now))
		return REASON_RATE_LIMITED;
	if ((flow->flags & (FLOW_F_LEARN | FLOW_F_LEARNED)) == FLOW_F_LEARN)
		flow_learn(pkt, flow);
	if (!flow->dst_port)
		return REASON_NO_PEER;
	return 0;
}

/* ---- translation ------------------------------------------------------------------ */

/* translate — rewrite the packet for @flow: family (bpf_skb_change_proto keeps the L4
 * header in place and makes room for the new L3 header), then h_proto, a fresh L3 header
 * and the new UDP ports written with direct packet access, then the UDP checksum (l4.h).
 * TTL/hop limit is decremented here: we forward, the stack does not.
 * Returns 0 or a negative errno (the packet may be half rewritten: drop it).
 * Side effect: invalidates direct packet access.
 */
static __always_inline int translate(struct __sk_buff *skb, const struct xlat_pkt *pkt,
				     const struct flow_value *flow)
{
	void *data, *data_end;
	struct udphdr *udp;
	__u32 l4_off;

	if (flow->family != pkt->family &&
	    bpf_skb_change_proto(skb, pkt_bswap16(flow->family == 4 ? XLAT_ETH_P_IP
									: XLAT_ETH_P_IPV6), 0) < 0)
		return -1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;

	if (flow->family == 6) {
		struct ipv6_wire *ip6 = data + ETH_HLEN_;

		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > data_end)
			return -1;
		*(__be16 *)(data + ETH_PROTO_OFF) = pkt_bswap16(XLAT_ETH_P_IPV6);
		/* RFC 7915 §4.1: flow label 0 from IPv4; anchoring IPv6 keeps it */
		ipv6_fill(ip6, flow, pkt->tos, pkt->ttl - 1, pkt->family == 6 ? pkt->flow_lbl : 0,
			  pkt->udp_len);
		l4_off = ETH_HLEN_ + IPV6_HLEN;
	} else {
		struct ipv4_wire *ip = data + ETH_HLEN_;
		__be16 id = pkt->ip_id, frag_off = pkt->ip_frag;

		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return -1;
		if (pkt->family == 6) {
			/* RFC 7915 §5.1: Identification "set according to a Fragment
			 * Identification generator at the translator": the flow's packet count,
			 * i.e. a counter per source/destination/protocol, which is all RFC 6864
			 * asks of IDs. MF 0; DF set only above 1260 bytes. Anchoring IPv4 keeps
			 * ID and flags. */
			id = pkt_bswap16((__u16)flow->packets);
			frag_off = IPV4_HLEN + pkt->udp_len > IPV4_DF_THRESHOLD ?
					   pkt_bswap16(IPV4_DF) : 0;
		}
		*(__be16 *)(data + ETH_PROTO_OFF) = pkt_bswap16(XLAT_ETH_P_IP);
		ipv4_fill(ip, flow, pkt->tos, pkt->ttl - 1, id, frag_off, pkt->udp_len);
		l4_off = ETH_HLEN_ + IPV4_HLEN;
	}
	udp->source = flow->src_port;
	udp->dest = flow->dst_port;
	return l4_csum_update(skb, l4_off, udp, pkt, flow);
}

/* ---- entry ------------------------------------------------------------------------ */

/* parse — make the headers linear and parse them. Returns 0 or a REASON_*. */
static __always_inline int parse(struct __sk_buff *skb, struct xlat_pkt *pkt)
{
	__u32 need;

	if (skb->protocol == pkt_bswap16(XLAT_ETH_P_IP))
		need = ETH_HLEN_ + IPV4_HLEN + UDP_HLEN;
	else if (skb->protocol == pkt_bswap16(XLAT_ETH_P_IPV6))
		need = ETH_HLEN_ + IPV6_HLEN + UDP_HLEN;
	else
		return REASON_NOT_UDP;
	/* a failed pull leaves the headers short: the parsers then say REASON_MALFORMED */
	if ((long)skb->data + need > (long)skb->data_end && skb->len >= need)
		bpf_skb_pull_data(skb, need);
	if (need == ETH_HLEN_ + IPV4_HLEN + UDP_HLEN)
		return ipv4_parse(skb, pkt);
	return ipv6_parse(skb, pkt);
}

int xlat(struct __sk_buff *skb)
{
	struct xlat_pkt pkt = {};
	struct flow_key key = {};
	struct flow_value *flow;
	__u32 bytes = skb->len > ETH_HLEN_ ? skb->len - ETH_HLEN_ : 0;
	__u32 fib_reason, zero = 0, *epoch;
	__u16 out_len;
	__u64 now;
	int reason, ret;

	reason = parse(skb, &pkt);
	if (reason)
		return verdict(reason, bytes);
	bytes = pkt.l3_len;
	if (skb->gso_size)
		return verdict(REASON_GSO, bytes);

	__builtin_memcpy(key.addr, pkt.daddr, 16);
	key.port = pkt.dport;
	flow = flows.lookup(&key);
	if (!flow)
		return verdict(REASON_NO_FLOW, bytes);

	now = clock_read();
	reason = flow_admit(&pkt, flow, now);
	if (reason)
		return verdict(reason, bytes);
	if (translate(skb, &pkt, flow) < 0)
		return verdict(REASON_REWRITE_FAIL, bytes);

	/* per-flow counters: atomic adds (several CPUs may serve one flow); last_seen is a
	 * plain store, any CPU's recent value will do */
	__sync_fetch_and_add(&flow->packets, 1);
	__sync_fetch_and_add(&flow->bytes, bytes);
	flow->last_seen_ns = now;

	out_len = (flow->family == 4 ? IPV4_HLEN : IPV6_HLEN) + pkt.udp_len;
	epoch = link_epoch.lookup(&zero);
	ret = fib_redirect(skb, flow, pkt.tos, out_len, now, epoch ? (__u8)*epoch : 0,
			   &fib_reason);
	count(fib_reason, bytes);
	return ret;
}
