/* SPDX-License-Identifier: MIT */
/* xlat — why a packet was (or was not) forwarded, by every datapath.
 *
 * One list: the C enum below (the index into the per-CPU `reasons` counter array, never a
 * TC_ACT_* value), the eBPF program's verdict per reason, and, read by
 * xlat/media/reasons.py, the Python names (REASON_NO_FLOW -> "no_flow"), the userspace
 * relay's reasons, the nftables drop counters and the meaning `xlat stats` prints.
 *
 * X(NAME, EBPF, USERSPACE, NFT, "meaning"): what each datapath does with a packet it counts
 * under NAME, or `none` when that datapath never counts it. Keep one entry per line.
 *   stack: passed to the kernel stack untouched (TC_ACT_OK); the userspace relay bound on
 *          the relay port or nftables deals with it.
 *   drop:  dropped (TC_ACT_SHOT in eBPF).
 *   sent:  left us translated (redirected, or handed to the stack to route).
 * The EBPF column's entries, in this order, make the enum: FORWARDED stays first (slot 0).
 * NFT entries are the names of the ruleset's drop counters (nft/xlat.nft).
 */
#ifndef XLAT_REASONS_H
#define XLAT_REASONS_H

#define XLAT_REASONS(X) \
	X(FORWARDED,        sent,  none, none, "translated and redirected to the next hop") \
	X(NOT_UDP,          stack, none, none, "not an IPv4/IPv6 UDP packet") \
	X(MALFORMED,        stack, none, none, "truncated, inconsistent lengths; IPv6 UDP csum 0") \
	X(FRAGMENT,         stack, none, none, "IPv4 fragment or IPv6 fragment header") \
	X(IP_OPTIONS,       stack, none, none, "IPv4 header with options (IHL > 5)") \
	X(EXT_HEADER,       stack, none, none, "IPv6 extension header before UDP") \
	X(GSO,              stack, none, none, "GRO/GSO aggregate: too big to translate per packet") \
	X(NO_FLOW,          stack, none, none, "UDP to an address:port without a flow") \
	X(EXPIRED,          stack, drop, none, "flow idle for longer than its idle timeout") \
	X(TTL_EXCEEDED,     stack, none, none, "TTL/hop limit would reach 0 here") \
	X(CSUM_TOO_BIG,     stack, none, none, "IPv4 UDP checksum 0 and too long to compute for IPv6") \
	X(NO_PEER,          drop,  drop, none, "flow whose peer is not known yet (port 0)") \
	X(STRICT_MISMATCH,  drop,  drop, none, "strict latching: source is not the negotiated one") \
	X(RATE_LIMITED,     drop,  drop, none, "over the flow's packet-rate cap") \
	X(REWRITE_FAIL,     drop,  none, none, "a rewrite helper failed half way: packet is mangled") \
	X(FIB_FAIL,         sent,  none, none, "translated; no route (FIB lookup failed): to the stack") \
	X(MTU_EXCEEDED,     sent,  none, none, "translated; over the route MTU: to the stack") \
	X(UNALLOCATED,      none,  drop, drop, "UDP to a relay port no flow is installed for: no session holds it, or eBPF alone forwards and passed it up (nftables)") \
	X(SEND_FAILED,      none,  drop, none, "the kernel refused the userspace relay's onward sendto") \
	X(SIP_RATE_LIMITED, none,  none, drop, "SIP to a listen address over the per-source rate: IPv4 address or IPv6 /64; route targets and --trusted exempt (nftables)") \
	X(SIP_STRANGERS_LIMITED, none, none, drop, "SIP to a listen address from strangers (not trusted, no known peer) over their shared rate, 10x the per-source rate per family (nftables)")

/* The enum: one slot per entry the eBPF program counts. */
#define XLAT_EBPF_SLOT_sent(name) REASON_##name,
#define XLAT_EBPF_SLOT_stack(name) REASON_##name,
#define XLAT_EBPF_SLOT_drop(name) REASON_##name,
#define XLAT_EBPF_SLOT_none(name)
#define XLAT_EBPF_SLOT(name, ebpf, userspace, nft, meaning) XLAT_EBPF_SLOT_##ebpf(name)

enum xlat_reason {
	XLAT_REASONS(XLAT_EBPF_SLOT)
	__REASON_MAX,
};

/* `case REASON_X:` for each reason the eBPF program drops (see verdict() in xlat.c). */
#define XLAT_EBPF_DROP_sent(name)
#define XLAT_EBPF_DROP_stack(name)
#define XLAT_EBPF_DROP_drop(name) case REASON_##name:
#define XLAT_EBPF_DROP_none(name)
#define XLAT_EBPF_DROP(name, ebpf, userspace, nft, meaning) XLAT_EBPF_DROP_##ebpf(name)

#endif /* XLAT_REASONS_H */
