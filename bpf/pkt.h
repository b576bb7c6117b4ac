/* SPDX-License-Identifier: MIT */
/* xlat — the parsed view of one UDP packet, filled by ipv4.h/ipv6.h parsers. */
#ifndef XLAT_PKT_H
#define XLAT_PKT_H

#include <linux/types.h>

#define ETH_HLEN_ 14
#define ETH_PROTO_OFF 12	/* offsetof(struct ethhdr, h_proto) */
#define XLAT_ETH_P_IP 0x0800
#define XLAT_ETH_P_IPV6 0x86DD
#define XLAT_IPPROTO_UDP 17
#define UDP_HLEN 8
#define IPV4_HLEN 20
#define IPV6_HLEN 40

/* xlat_pkt — everything the rewrite needs, read once with direct packet access.
 * The four address fields are laid out so that `saddr, daddr` (IPv6: 32 bytes) and
 * `saddr4, daddr4` (IPv4: 8 bytes) are the address part of the UDP pseudo-header in
 * wire order (RFC 768, RFC 8200 §8.1), ready for the checksum diff of l4.h.
 */
struct xlat_pkt {
	__u8 saddr[16];		/* source, IPv4 v4-mapped */
	__u8 daddr[16];		/* destination, IPv4 v4-mapped */
	__be32 saddr4;		/* IPv4 only */
	__be32 daddr4;		/* IPv4 only */
	__u32 flow_lbl;		/* IPv6 only: flow label, host order */
	__be16 sport;
	__be16 dport;
	__be16 udp_check;	/* as received; IPv4 may be 0 = none */
	__be16 ip_id;		/* IPv4 only */
	__be16 ip_frag;		/* IPv4 only: flags/offset word (DF at most, checked) */
	__u16 l3_len;		/* L3 packet length: header + UDP datagram */
	__u16 udp_len;		/* UDP header + payload */
	__u8 family;		/* 4 or 6 */
	__u8 tos;		/* IPv4 TOS / IPv6 traffic class (DSCP + ECN) */
	__u8 ttl;		/* IPv4 TTL / IPv6 hop limit */
	__u8 pad;
};

/* pkt_bswap16 — htons/ntohs: bcc 0.26 has no htons in BPF programs. */
#define pkt_bswap16(x) __builtin_bswap16(x)

#endif /* XLAT_PKT_H */
