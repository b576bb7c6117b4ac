/* SPDX-License-Identifier: MIT */
/* xlat — UDP: the checksum after the L3 header and the ports were rewritten.
 *
 * Checksum strategy, per RFC 7915 §4.5 / §5.5 ("the translator MUST update the UDP
 * checksum"), RFC 768 and RFC 8200 §8.1:
 *  - incremental, always two bpf_l4_csum_replace() calls with an unfolded diff
 *    (computed inline):
 *    the addresses as a pseudo-header change (BPF_F_PSEUDO_HDR) and the ports as a
 *    payload change. They must stay separate: with CHECKSUM_PARTIAL the field holds only
 *    the pseudo-header sum and the helper applies the first diff and ignores the second.
 *    The rest of the pseudo-header is equal in both families (the protocol and length
 *    words sum the same in the 12-byte IPv4 and 40-byte IPv6 forms).
 *  - BPF_F_MARK_MANGLED_0: a result of 0 is sent as 0xffff, and an IPv4 "no checksum"
 *    0 stays 0 (legal on IPv4, RFC 768).
 *  - IPv4 checksum 0 towards IPv6: computed in full (§4.5: "the translator SHOULD
 *    compute the missing UDP checksum"), up to CSUM_MAX_LEN bytes; longer datagrams
 *    are refused before any rewrite (REASON_CSUM_TOO_BIG) and go to the stack.
 *  - skb->csum of CHECKSUM_COMPLETE packets is not maintained for the header store:
 *    redirected packets leave through a transmit path that ignores it, and the stack,
 *    on the fib-failure path, falls back to verifying in software when it disagrees.
 */
#ifndef XLAT_L4_H
#define XLAT_L4_H

#include "csum.h"
#include "maps.h"
#include "pkt.h"

#define UDP_CHECK_OFF 6

/* The two UDP port fields as one 32-bit word, in memory order. */
union udp_ports {
	__be16 port[2];		/* source, destination */
	__u32 word;
};

/* IPv6 pseudo-header (RFC 8200 §8.1), wire order. */
struct ipv6_pseudo {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 len;
	__be32 nexthdr;
};

/* l4_addr_diff — unfolded diff of the pseudo-header addresses, old packet -> flow.
 * IPv4 sides contribute 8 bytes (saddr4, daddr4), IPv6 sides 32 bytes. No side effects.
 */
static __always_inline __u32 l4_addr_diff(const struct xlat_pkt *pkt,
					  const struct flow_value *flow)
{
	__u64 acc = 0;

	if (pkt->family == 4)
		acc = csum_sub_words(acc, (const __u32 *)&pkt->saddr4, 2);
	else
		acc = csum_sub_words(acc, (const __u32 *)pkt->saddr, 8);
	if (flow->family == 4) {
		acc = csum_add_words(acc, (const __u32 *)&flow->src_addr[12], 1);
		acc = csum_add_words(acc, (const __u32 *)&flow->dst_addr[12], 1);
	} else {
		/* flow_value keeps src_addr and dst_addr adjacent: 32 bytes in wire order */
		acc = csum_add_words(acc, (const __u32 *)flow->src_addr, 8);
	}
	return csum_unfolded(acc);
}

/* l4_csum_full6 — compute the UDP checksum of an IPv6 datagram from scratch.
 * Precondition: the new header and ports are stored and the checksum field is 0.
 * Returns 0 or a negative errno. Side effect: stores the checksum (value, folded,
 * never 0); invalidates direct packet access.
 */
static __always_inline int l4_csum_full6(struct __sk_buff *skb, __u32 l4_off,
					 const struct flow_value *flow, __u16 udp_len)
{
	struct ipv6_pseudo ph = {};
	__s64 sum;
	__u16 check;

	__builtin_memcpy(ph.saddr, flow->src_addr, 16);
	__builtin_memcpy(ph.daddr, flow->dst_addr, 16);
	ph.len = __builtin_bswap32(udp_len);
	ph.nexthdr = __builtin_bswap32(XLAT_IPPROTO_UDP);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (sum < 0)
		return sum;
	sum = csum_pkt_range(skb, l4_off, udp_len, (__u32)sum);
	if (sum < 0)
		return sum;
	check = csum_udp_nonzero(csum_fold16((__u32)sum));
	return bpf_skb_store_bytes(skb, l4_off + UDP_CHECK_OFF, &check, sizeof(check), 0);
}

/* l4_csum_update — fix the UDP checksum at @l4_off for the new pseudo-header and the
 * new ports, which the caller has already stored (strategy in the file comment).
 * @pkt: the packet as received (old addresses, ports, checksum).
 * Returns 0 or a negative errno. Side effect: invalidates direct packet access.
 */
static __always_inline int l4_csum_update(struct __sk_buff *skb, __u32 l4_off,
					  const struct xlat_pkt *pkt,
					  const struct flow_value *flow)
{
	union udp_ports old = { .port = { pkt->sport, pkt->dport } };
	union udp_ports new = { .port = { flow->src_port, flow->dst_port } };
	__u32 check_off = l4_off + UDP_CHECK_OFF;
	int ret;

	if (!pkt->udp_check) {
		if (flow->family == 4)
			return 0;	/* IPv4 to IPv4: "no checksum" stays legal */
		return l4_csum_full6(skb, l4_off, flow, pkt->udp_len);
	}
	ret = bpf_l4_csum_replace(skb, check_off, 0, l4_addr_diff(pkt, flow),
				  BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
	if (ret < 0)
		return ret;
	return bpf_l4_csum_replace(skb, check_off, 0,
				   csum_unfolded((__u64)(__u32)~old.word + new.word),
				   BPF_F_MARK_MANGLED_0);
}

#endif /* XLAT_L4_H */
