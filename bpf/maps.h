/* SPDX-License-Identifier: MIT */
/* xlat — map key/value layouts shared with xlat/media/ebpf.py.
 *
 * Python builds keys and values from the ctypes classes bcc generates from these
 * structs (table.Key / table.Leaf), so there is no second copy of the layout. When the
 * layout changes, the sizes change and ebpf.py refuses to adopt old pinned maps.
 * Addresses are 16 bytes; IPv4 is stored v4-mapped (::ffff:a.b.c.d, RFC 4291 §2.5.5.2).
 * Ports are in network byte order.
 */
#ifndef XLAT_MAPS_H
#define XLAT_MAPS_H

#include <linux/types.h>

/* Flow map size: must hold 400k flows (100k calls x RTP+RTCP x 2 directions) with slack.
 * The map is BPF_F_NO_PREALLOC so memory follows the number of flows installed. */
#define FLOW_MAX_ENTRIES (1 << 19)

/* flow_value.flags */
#define FLOW_F_LEARN	0x01	/* latch: the first source seen becomes the reverse flow's `to` */
#define FLOW_F_STRICT	0x02	/* latch: forward only from expect_addr/expect_port */
#define FLOW_F_LEARNED	0x04	/* LEARN done (set by the datapath) */

/* Key: where the packet is going (our relay address:port). */
struct flow_key {
	__u8 addr[16];		/* destination address, IPv4 v4-mapped */
	__be16 port;		/* destination UDP port */
	__u16 pad;		/* always 0 (hash input) */
};

/* Value: what to do with it, and what happened so far.
 * Written by Python on install (counters carried over on replace). The datapath writes:
 * packets/bytes (atomic adds), last_seen_ns and tb_tat_ns (plain stores: a racing CPU
 * may lose one update, which only makes the soft state and the rate cap approximate),
 * on LEARN the reverse flow's dst_addr/dst_port and this flow's FLOW_F_LEARNED, and the
 * nh_* next-hop cache (CPUs racing there write the same lookup result).
 */
struct flow_value {
	__u8 src_addr[16];	/* new source: our relay address on the output leg */
	__u8 dst_addr[16];	/* new destination: the peer (latched by LEARN) */
	__u8 expect_addr[16];	/* STRICT: the only accepted source address */
	struct flow_key reverse;	/* LEARN: key of the opposite flow; port 0 = none */
	__be16 src_port;	/* new source port */
	__be16 dst_port;	/* new destination port; 0 = peer not known yet (drop) */
	__be16 expect_port;	/* STRICT: the only accepted source port */
	__u8 family;		/* output family: 4 or 6 */
	__u8 flags;		/* FLOW_F_* */
	__u32 rate_pps;		/* packet-rate cap; 0 = none */
	__u64 idle_timeout_ns;	/* 0 = never expires */
	__u64 installed_ns;	/* CLOCK_MONOTONIC at install: a never-used flow expires too */
	__u64 last_seen_ns;	/* CLOCK_MONOTONIC (to a tick, clock.h) of the last forwarded
				 * packet; 0 = never */
	__u64 packets;		/* forwarded, including hand-offs to the stack (reasons.h) */
	__u64 bytes;		/* L3 bytes as received */
	__u64 tb_tat_ns;	/* rate cap: GCRA theoretical arrival time */
	/* next-hop cache, filled by fib.h from bpf_fib_lookup() (Python writes zeros) */
	__u32 nh_ifindex;	/* egress device; 0 = empty */
	__u16 nh_max_len;	/* largest L3 length a lookup admitted (its MTU check) */
	__u8 nh_family;		/* AF_INET / AF_INET6: family of nh_addr */
	__u8 nh_epoch;		/* link epoch (xlat.c link_epoch) the lookup was made in */
	__u8 nh_addr[16];	/* next hop; IPv4 in the first 4 bytes */
	__u64 nh_expires_ns;	/* CLOCK_MONOTONIC after which the lookup is redone */
};

/* One slot of the per-CPU `reasons` array (index: enum xlat_reason). */
struct reason_counter {
	__u64 packets;
	__u64 bytes;
};

#endif /* XLAT_MAPS_H */
