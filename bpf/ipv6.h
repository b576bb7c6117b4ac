/* SPDX-License-Identifier: MIT */
/* xlat — IPv6: parse (direct packet access) and build a fresh header. */
#ifndef XLAT_IPV6_H
#define XLAT_IPV6_H

#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>
#include "maps.h"
#include "pkt.h"
#include "reasons.h"

#define IPV6_NEXTHDR_FRAGMENT 44
#define IPV6_FLOWLABEL_MASK 0x000fffff

/* The header xlat writes, in wire order (no bitfields). */
struct ipv6_wire {
	__be32 ver_tc_flow;	/* version 4 bits | traffic class 8 | flow label 20 */
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* ipv6_is_ext_header — RFC 8200 §4 (+ RFC 7045 list): next-header values that are
 * extension headers rather than an upper layer. */
static __always_inline int ipv6_is_ext_header(__u8 nexthdr)
{
	switch (nexthdr) {
	case 0:		/* Hop-by-Hop Options */
	case 43:	/* Routing */
	case 44:	/* Fragment */
	case 50:	/* ESP */
	case 51:	/* AH */
	case 60:	/* Destination Options */
	case 135:	/* Mobility */
	case 139:	/* HIP */
	case 140:	/* Shim6 */
	case 253:	/* experimental */
	case 254:
		return 1;
	}
	return 0;
}

/* ipv6_parse — read the IPv6 + UDP headers at ETH_HLEN_ into @pkt.
 * Refuses extension headers (a fragment header gets its own reason), non-UDP,
 * inconsistent lengths (jumbograms included) and a zero UDP checksum, which RFC 8200
 * §8.1 forbids. The first 62 bytes must be linear (caller pulls).
 * Returns 0, or the REASON_* to pass the packet to the stack with. No side effects.
 */
static __always_inline int ipv6_parse(struct __sk_buff *skb, struct xlat_pkt *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN_;
	struct udphdr *udp = (void *)(ip6 + 1);
	__u32 first;
	__u16 payload_len;

	if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
		return REASON_MALFORMED;
	if (ip6->nexthdr != XLAT_IPPROTO_UDP) {
		if (ip6->nexthdr == IPV6_NEXTHDR_FRAGMENT)
			return REASON_FRAGMENT;
		return ipv6_is_ext_header(ip6->nexthdr) ? REASON_EXT_HEADER : REASON_NOT_UDP;
	}
	if ((void *)(udp + 1) > data_end)
		return REASON_MALFORMED;
	payload_len = pkt_bswap16(ip6->payload_len);
	if (payload_len < UDP_HLEN || pkt_bswap16(udp->len) != payload_len || !udp->check)
		return REASON_MALFORMED;

	pkt->family = 6;
	__builtin_memcpy(pkt->saddr, &ip6->saddr, 16);
	__builtin_memcpy(pkt->daddr, &ip6->daddr, 16);
	first = __builtin_bswap32(*(__be32 *)ip6);
	pkt->tos = (first >> 20) & 0xff;
	pkt->flow_lbl = first & IPV6_FLOWLABEL_MASK;
	pkt->ttl = ip6->hop_limit;
	pkt->l3_len = IPV6_HLEN + payload_len;
	pkt->udp_len = payload_len;
	pkt->sport = udp->source;
	pkt->dport = udp->dest;
	pkt->udp_check = udp->check;
	return 0;
}

/* ipv6_fill — a fresh 40-byte IPv6 header (RFC 7915 §4.1 field by field when
 * translating from IPv4; the same fields when anchoring IPv6 to IPv6).
 * @flow: gives the addresses. @flow_lbl: host order, 20 bits (0 from IPv4, §4.1).
 * No side effects.
 */
static __always_inline void ipv6_fill(struct ipv6_wire *ip6, const struct flow_value *flow,
				      __u8 tclass, __u8 hop_limit, __u32 flow_lbl,
				      __u16 udp_len)
{
	/* §4.1: Traffic Class copied from the IPv4 TOS octet; Flow Label 0 */
	ip6->ver_tc_flow = __builtin_bswap32((6u << 28) | ((__u32)tclass << 20) |
					     (flow_lbl & IPV6_FLOWLABEL_MASK));
	ip6->payload_len = pkt_bswap16(udp_len);	/* §4.1: no extension headers */
	ip6->nexthdr = XLAT_IPPROTO_UDP;
	ip6->hop_limit = hop_limit;		/* already decremented by the caller */
	__builtin_memcpy(ip6->saddr, flow->src_addr, 16);
	__builtin_memcpy(ip6->daddr, flow->dst_addr, 16);
}

#endif /* XLAT_IPV6_H */
