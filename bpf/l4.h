/* SPDX-License-Identifier: MIT */
/* xlat — UDP: the checksum after the L3 header and the ports were rewritten.
 *
 * Checksum strategy, per RFC 7915 §4.5 / §5.5 ("the translator MUST update the UDP
 * checksum"), RFC 768 and RFC 8200 §8.1:
 *  - incremental, with one unfolded diff computed inline for the addresses (a
 *    pseudo-header change) and the ports together. The rest of the pseudo-header is
 *    equal in both families (the protocol and length words sum the same in the 12-byte
 *    IPv4 and 40-byte IPv6 forms).
 *  - The field is a checksum, except under CHECKSUM_PARTIAL (a local sender with tx
 *    offload, e.g. a container on a veth): there it holds the pseudo-header sum and the
 *    payload, ports included, is summed later, so it must take the address diff only.
 *    The program cannot read skb->ip_summed, but a PARTIAL field always equals the
 *    pseudo-header sum of the packet as received (else the final checksum would be
 *    wrong), so a field that does not is a checksum: updated inline (RFC 1624), no
 *    helper call. A field that does (PARTIAL, or 1 checksum in 65535) goes to
 *    bpf_l4_csum_replace(BPF_F_PSEUDO_HDR), which knows ip_summed: given the whole diff,
 *    it makes a checksum old - diff but a PARTIAL field old + diff; reading the field
 *    back tells which, and a PARTIAL field gets the port diff taken back out
 *    (l4_csum_settle). A zero diff leaves nothing to tell: then two calls, addresses as
 *    a pseudo-header change and ports as a payload change, which PARTIAL skips.
 *  - A result of 0 is sent as 0xffff (inline, or BPF_F_MARK_MANGLED_0), and an IPv4
 *    "no checksum" 0 stays 0 (legal on IPv4, RFC 768).
 *  - IPv4 checksum 0 towards IPv6: computed in full (§4.5: "the translator SHOULD
 *    compute the missing UDP checksum"), up to CSUM_MAX_LEN bytes; longer datagrams
 *    are refused before any rewrite (REASON_CSUM_TOO_BIG) and go to the stack.
 *  - skb->csum of CHECKSUM_COMPLETE packets is not maintained for the header and
 *    checksum stores: redirected packets leave through a transmit path that ignores it.
 *    On the fib-failure path the stack either forwards (skb_forward_csum() discards the
 *    value) or, for a local destination, finds that it disagrees and verifies in
 *    software (the kernel may log "hw csum failure").
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

/* l4_old_addrs — unfolded sum of the pseudo-header addresses of the packet as received:
 * 8 bytes for IPv4 (saddr4, daddr4), 32 for IPv6. No side effects. */
static __always_inline __u32 l4_old_addrs(const struct xlat_pkt *pkt)
{
	if (pkt->family == 4)
		return csum_unfolded(csum_add_words(0, (const __u32 *)&pkt->saddr4, 2));
	return csum_unfolded(csum_add_words(0, (const __u32 *)pkt->saddr, 8));
}

/* l4_new_addrs — unfolded sum of the flow's new pseudo-header addresses. No side effects. */
static __always_inline __u32 l4_new_addrs(const struct flow_value *flow)
{
	__u64 acc;

	if (flow->family == 6)	/* src_addr and dst_addr are adjacent: 32 bytes, wire order */
		return csum_unfolded(csum_add_words(0, (const __u32 *)flow->src_addr, 8));
	acc = csum_add_words(0, (const __u32 *)&flow->src_addr[12], 1);
	return csum_unfolded(csum_add_words(acc, (const __u32 *)&flow->dst_addr[12], 1));
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

/* l4_csum_settle — after one bpf_l4_csum_replace(BPF_F_PSEUDO_HDR) of @diff (addresses
 * and ports, not zero) on the field at @check_off that held @old: if the helper treated
 * the field as the CHECKSUM_PARTIAL pseudo-header sum (old + diff instead of old - diff),
 * take @port_diff back out of it. Both diffs unfolded.
 * Returns 0 or a negative errno. Side effect: may store the field (direct access).
 */
static __always_inline int l4_csum_settle(struct __sk_buff *skb, __u32 check_off, __u16 old,
					  __u32 diff, __u32 port_diff)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u16 *check = data + check_off;

	if ((void *)(check + 1) > data_end)
		return -14; /* -EFAULT */
	if (csum_equal16(*check, csum_replace16(old, diff)))
		return 0;	/* old - diff: a checksum, now complete */
	/* old + diff: a pseudo-header sum, which must be old + address diff (the same
	 * subtraction; not 0, as BPF_F_MARK_MANGLED_0 would not leave it either) */
	*check = csum_udp_nonzero(csum_replace16(*check, port_diff));
	return 0;
}

/* l4_csum_update — fix the UDP checksum at @udp (@l4_off in @skb) for the new
 * pseudo-header and the new ports, which the caller has already stored (strategy in the
 * file comment). @pkt: the packet as received (old addresses, ports, checksum).
 * Returns 0 or a negative errno. Side effect: stores the field, or calls helpers that
 * invalidate direct packet access.
 */
static __always_inline int l4_csum_update(struct __sk_buff *skb, __u32 l4_off,
					  struct udphdr *udp, const struct xlat_pkt *pkt,
					  const struct flow_value *flow)
{
	union udp_ports old = { .port = { pkt->sport, pkt->dport } };
	union udp_ports new = { .port = { flow->src_port, flow->dst_port } };
	__u32 check_off = l4_off + UDP_CHECK_OFF;
	__u32 old_addrs, addr_diff, port_diff, diff;
	__u16 partial_seed;
	int ret;

	if (!pkt->udp_check) {	/* IPv4 only: ipv6_parse() refuses 0 */
		if (flow->family == 6)
			return l4_csum_full6(skb, l4_off, flow, pkt->udp_len);
		return 0;	/* IPv4 to IPv4: "no checksum" stays legal */
	}
	old_addrs = l4_old_addrs(pkt);
	addr_diff = csum_unfolded((__u64)l4_new_addrs(flow) + (__u32)~old_addrs);
	port_diff = csum_unfolded((__u64)(__u32)~old.word + new.word);
	diff = csum_unfolded((__u64)addr_diff + port_diff);
	/* what a CHECKSUM_PARTIAL field holds: the pseudo-header sum of the packet as
	 * received, folded to 16 bits, not complemented */
	partial_seed = ~csum_fold16(csum_unfolded((__u64)old_addrs + pkt_bswap16(pkt->udp_len) +
						   pkt_bswap16(XLAT_IPPROTO_UDP)));
	if (!csum_equal16(pkt->udp_check, partial_seed)) {
		udp->check = csum_udp_nonzero(csum_replace16(pkt->udp_check, diff));
		return 0;
	}
	if (csum_equal16(csum_fold16(diff), 0)) {
		ret = bpf_l4_csum_replace(skb, check_off, 0, addr_diff,
					  BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
		if (ret < 0)
			return ret;
		return bpf_l4_csum_replace(skb, check_off, 0, port_diff, BPF_F_MARK_MANGLED_0);
	}
	ret = bpf_l4_csum_replace(skb, check_off, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
	if (ret < 0)
		return ret;
	return l4_csum_settle(skb, check_off, pkt->udp_check, diff, port_diff);
}

#endif /* XLAT_L4_H */
