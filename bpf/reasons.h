/* SPDX-License-Identifier: MIT */
/* xlat — why a packet was (or was not) forwarded.
 *
 * One list. Each entry is an index into the per-CPU `reasons` counter array and
 * never a TC_ACT_* value. The comment after each entry is its meaning; xlat/media/ebpf.py
 * reads this file for the names (REASON_NO_FLOW -> "no_flow") and explanations, so keep
 * one entry per line in the form `REASON_X, /+ (stack|drop|sent) text +/`.
 *   stack: passed to the kernel stack untouched (TC_ACT_OK); the userspace relay bound on
 *          the relay port or nftables deals with it.
 *   drop:  TC_ACT_SHOT.
 *   sent:  left us translated (redirected, or handed to the stack to route).
 */
#ifndef XLAT_REASONS_H
#define XLAT_REASONS_H

enum xlat_reason {
	REASON_FORWARDED = 0,	/* (sent) translated and redirected to the next hop */
	REASON_NOT_UDP,		/* (stack) not an IPv4/IPv6 UDP packet */
	REASON_MALFORMED,	/* (stack) truncated, inconsistent lengths; IPv6 UDP csum 0 */
	REASON_FRAGMENT,	/* (stack) IPv4 fragment or IPv6 fragment header */
	REASON_IP_OPTIONS,	/* (stack) IPv4 header with options (IHL > 5) */
	REASON_EXT_HEADER,	/* (stack) IPv6 extension header before UDP */
	REASON_GSO,		/* (stack) GRO/GSO aggregate: too big to translate per packet */
	REASON_NO_FLOW,		/* (stack) UDP to an address:port without a flow */
	REASON_EXPIRED,		/* (stack) flow idle for longer than its idle timeout */
	REASON_TTL_EXCEEDED,	/* (stack) TTL/hop limit would reach 0 here */
	REASON_CSUM_TOO_BIG,	/* (stack) IPv4 UDP checksum 0 and too long to compute for IPv6 */
	REASON_NO_PEER,		/* (drop) flow whose peer is not known yet (port 0) */
	REASON_STRICT_MISMATCH,	/* (drop) strict latching: source is not the negotiated one */
	REASON_RATE_LIMITED,	/* (drop) over the flow's packet-rate cap */
	REASON_REWRITE_FAIL,	/* (drop) a rewrite helper failed half way: packet is mangled */
	REASON_FIB_FAIL,	/* (sent) translated; no route (FIB lookup failed): to the stack */
	REASON_MTU_EXCEEDED,	/* (sent) translated; over the route MTU: to the stack */
	__REASON_MAX,
};

#endif /* XLAT_REASONS_H */
