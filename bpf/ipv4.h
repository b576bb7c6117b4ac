/* SPDX-License-Identifier: MIT */
/* xlat — IPv4: parse (direct packet access) and build a fresh header. */
#ifndef XLAT_IPV4_H
#define XLAT_IPV4_H

#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
#include "csum.h"
#include "maps.h"
#include "pkt.h"
#include "reasons.h"

/* frag_off word (RFC 791 §3.1), host order:
 *   bit 15 reserved | bit 14 DF | bit 13 MF | bits 12..0 fragment offset (8-byte units) */
#define IPV4_DF		0x4000
#define IPV4_MF_OFFSET	0x3fff	/* MF or a non-zero offset: a fragment */

/* RFC 7915 §5.1 (Flags): DF is set only when the translated packet exceeds 1260 bytes. */
#define IPV4_DF_THRESHOLD 1260

/* The header xlat writes, in wire order (no bitfields). */
struct ipv4_wire {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__be16 check;
	__be32 saddr;
	__be32 daddr;
};

/* ipv4_parse — read the IPv4 + UDP headers at ETH_HLEN_ into @pkt.
 * Refuses what it does not translate: IHL != 5 (options), fragments, non-UDP,
 * inconsistent lengths. The first 42 bytes must be linear (caller pulls).
 * Returns 0, or the REASON_* to pass the packet to the stack with. No side effects.
 */
static __always_inline int ipv4_parse(struct __sk_buff *skb, struct xlat_pkt *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN_;
	struct udphdr *udp = (void *)(ip + 1);
	__u16 tot_len;

	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
		return REASON_MALFORMED;
	if (ip->protocol != XLAT_IPPROTO_UDP)
		return REASON_NOT_UDP;
	if (ip->ihl != 5)
		return REASON_IP_OPTIONS;
	if (ip->frag_off & pkt_bswap16(IPV4_MF_OFFSET))
		return REASON_FRAGMENT;
	if ((void *)(udp + 1) > data_end)
		return REASON_MALFORMED;
	tot_len = pkt_bswap16(ip->tot_len);
	if (tot_len < IPV4_HLEN + UDP_HLEN || pkt_bswap16(udp->len) != tot_len - IPV4_HLEN)
		return REASON_MALFORMED;

	pkt->family = 4;
	pkt->saddr4 = ip->saddr;
	pkt->daddr4 = ip->daddr;
	/* v4-mapped: ::ffff:a.b.c.d */
	pkt->saddr[10] = pkt->saddr[11] = 0xff;
	pkt->daddr[10] = pkt->daddr[11] = 0xff;
	__builtin_memcpy(&pkt->saddr[12], &ip->saddr, 4);
	__builtin_memcpy(&pkt->daddr[12], &ip->daddr, 4);
	pkt->tos = ip->tos;
	pkt->ttl = ip->ttl;
	pkt->ip_id = ip->id;
	pkt->ip_frag = ip->frag_off;
	pkt->l3_len = tot_len;
	pkt->udp_len = tot_len - IPV4_HLEN;
	pkt->sport = udp->source;
	pkt->dport = udp->dest;
	pkt->udp_check = udp->check;
	return 0;
}

/* ipv4_fill — a fresh 20-byte IPv4 header (RFC 7915 §5.1 field by field when
 * translating from IPv6; the same fields when anchoring IPv4 to IPv4).
 * @ip: where to write it (the packet). @flow: gives the addresses (v4-mapped, last 4 bytes used).
 * @id, @frag_off: network order; the caller chooses (copied, or RFC 7915 §5.1 values).
 * The header checksum is computed here (inline, value, read back from @ip).
 */
static __always_inline void ipv4_fill(struct ipv4_wire *ip, const struct flow_value *flow,
				      __u8 tos, __u8 ttl, __be16 id, __be16 frag_off,
				      __u16 udp_len)
{
	ip->ver_ihl = 0x45;			/* version 4, IHL 5: no options */
	ip->tos = tos;				/* §5.1: copied from the Traffic Class */
	ip->tot_len = pkt_bswap16(IPV4_HLEN + udp_len);
	ip->id = id;
	ip->frag_off = frag_off;
	ip->ttl = ttl;				/* already decremented by the caller */
	ip->protocol = XLAT_IPPROTO_UDP;
	ip->check = 0;				/* computed below */
	__builtin_memcpy(&ip->saddr, &flow->src_addr[12], 4);
	__builtin_memcpy(&ip->daddr, &flow->dst_addr[12], 4);
	ip->check = csum_fold16(csum_unfolded(csum_add_words(0, (const __u32 *)ip, 5)));
}

#endif /* XLAT_IPV4_H */
