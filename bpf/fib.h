/* SPDX-License-Identifier: MIT */
/* xlat — next hop: bpf_fib_lookup() on the new header, then bpf_redirect_neigh(). */
#ifndef XLAT_FIB_H
#define XLAT_FIB_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "maps.h"
#include "pkt.h"
#include "reasons.h"

#define XLAT_AF_INET 2
#define XLAT_AF_INET6 10

/* bcc 0.26 declares a 2-argument form; the kernel helper (5.10+) takes 4:
 * long bpf_redirect_neigh(u32 ifindex, struct bpf_redir_neigh *params, int plen, u64 flags) */
static long (*xlat_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				   __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

/* A route or MTU change reaches an active flow within this time (next-hop cache
 * lifetime); installing a flow or latching its peer empties its cache at once.
 * bpf_fib_lookup() is the most expensive step of a translated packet (about 200 ns for
 * IPv4, 450 ns for IPv6 measured with BPF_PROG_TEST_RUN here), and RTP sends 50 packets
 * a second per stream to one next hop. */
#define NH_CACHE_NS 1000000000ULL

/* fib_lookup_cached — next hop of @flow's new header: from the flow's cache while it is
 * fresh, was filled in the current link @epoch (xlat/media/ebpf.py bumps the epoch when
 * an interface vanishes or appears, so no cached answer names a gone ifindex) and
 * @l3_len is no longer than what a lookup admitted (so the lookup's MTU check still
 * holds), else from bpf_fib_lookup(), whose answer refills the cache.
 * A missing neighbour is not a failure: bpf_redirect_neigh() resolves it.
 * Returns 0 with @nh and the egress ifindex in *@ifindex, or the REASON_* why there is
 * no usable route (MTU exceeded, or anything else the lookup refused: unreachable,
 * blackhole, forwarding off...). Side effect: writes flow->nh_*.
 */
static __always_inline int fib_lookup_cached(struct __sk_buff *skb, struct flow_value *flow,
					     __u8 tos, __u16 l3_len, __u64 now, __u8 epoch,
					     struct bpf_redir_neigh *nh, __u32 *ifindex)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	if (flow->nh_ifindex && now < flow->nh_expires_ns && flow->nh_epoch == epoch &&
	    l3_len <= flow->nh_max_len) {
		nh->nh_family = flow->nh_family;
		__builtin_memcpy(nh->ipv6_nh, flow->nh_addr, 16);
		*ifindex = flow->nh_ifindex;
		return 0;
	}
	fib.ifindex = skb->ifindex;	/* at ingress: the arrival device (also under test_run) */
	fib.l4_protocol = XLAT_IPPROTO_UDP;
	fib.sport = flow->src_port;
	fib.dport = flow->dst_port;
	fib.tot_len = l3_len;
	if (flow->family == 4) {
		fib.family = XLAT_AF_INET;
		fib.tos = tos;
		__builtin_memcpy(&fib.ipv4_src, &flow->src_addr[12], 4);
		__builtin_memcpy(&fib.ipv4_dst, &flow->dst_addr[12], 4);
	} else {
		fib.family = XLAT_AF_INET6;
		__builtin_memcpy(fib.ipv6_src, flow->src_addr, 16);
		__builtin_memcpy(fib.ipv6_dst, flow->dst_addr, 16);
	}
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return REASON_MTU_EXCEEDED;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return REASON_FIB_FAIL;
	/* the next hop's family may differ from the packet's (RFC 5549 routes);
	 * ipv4_dst shares its first 4 bytes with ipv6_dst */
	nh->nh_family = fib.family;
	__builtin_memcpy(nh->ipv6_nh, fib.ipv6_dst, 16);
	*ifindex = fib.ifindex;

	if (now >= flow->nh_expires_ns || flow->nh_epoch != epoch || l3_len > flow->nh_max_len)
		flow->nh_max_len = l3_len;
	flow->nh_epoch = epoch;
	flow->nh_family = fib.family;
	__builtin_memcpy(flow->nh_addr, fib.ipv6_dst, 16);
	flow->nh_ifindex = fib.ifindex;
	flow->nh_expires_ns = now + NH_CACHE_NS;
	return 0;
}

/* fib_redirect — route the rewritten packet and send it out through the neighbour layer.
 * @flow: family, new addresses/ports (the lookup key) and the next-hop cache.
 * @l3_len: new L3 length, for the MTU check. @epoch: see fib_lookup_cached().
 * Returns TC_ACT_REDIRECT with *@reason = REASON_FORWARDED, or TC_ACT_OK (the stack
 * routes the already translated packet) with *@reason saying why.
 */
static __always_inline int fib_redirect(struct __sk_buff *skb, struct flow_value *flow,
					__u8 tos, __u16 l3_len, __u64 now, __u8 epoch,
					__u32 *reason)
{
	struct bpf_redir_neigh nh = {};
	__u32 ifindex;

	*reason = fib_lookup_cached(skb, flow, tos, l3_len, now, epoch, &nh, &ifindex);
	if (*reason)
		return TC_ACT_OK;
	return xlat_redirect_neigh(ifindex, &nh, sizeof(nh), 0);
}

#endif /* XLAT_FIB_H */
