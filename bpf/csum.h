/* SPDX-License-Identifier: MIT */
/* xlat — Internet checksum helpers (RFC 1071 ones' complement arithmetic).
 *
 * Vocabulary used in every doc block here:
 *   accumulator: a 64-bit sum of 32-bit words, not yet folded;
 *   unfolded: a 32-bit partial sum (__wsum) as bpf_csum_diff() returns it;
 *   folded:   the 16-bit ones' complement of the folded sum, i.e. what goes on the wire;
 *   value:    `to` is the new field content; diff: `to` is an unfolded difference.
 * Sums are taken over words as they lie in memory (network order): RFC 1071 §2(B), the
 * result is stored as is, no byte swapping.
 * Inline arithmetic is preferred to bpf_csum_diff() for a few words: each helper call
 * costs more than the adds it saves.
 */
#ifndef XLAT_CSUM_H
#define XLAT_CSUM_H

#include <uapi/linux/bpf.h>

/* csum_add_words — add @n 32-bit words at @w (4-byte aligned) to accumulator @acc.
 * Returns the accumulator. @n is a constant after inlining: the loop unrolls. */
static __always_inline __u64 csum_add_words(__u64 acc, const __u32 *w, int n)
{
	int i;

#pragma clang loop unroll(full)
	for (i = 0; i < n; i++)
		acc += w[i];
	return acc;
}

/* csum_unfolded — reduce an accumulator to an unfolded 32-bit sum (end-around carry).
 * Returns a value usable as a diff for bpf_l4_csum_replace(). */
static __always_inline __u32 csum_unfolded(__u64 acc)
{
	acc = (acc & 0xffffffff) + (acc >> 32);
	acc = (acc & 0xffffffff) + (acc >> 32);
	return (__u32)acc;
}

/* csum_fold16 — fold an unfolded 32-bit sum to 16 bits and complement it.
 * @sum: unfolded sum.
 * Returns the folded checksum (wire value, may be 0: callers decide about 0xffff).
 */
static __always_inline __u16 csum_fold16(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* csum_replace16 — RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'): the checksum after a change.
 * @check: folded checksum (value). @diff: unfolded m' - m (sum of the new words plus the
 * complements of the old ones). Returns the folded checksum (may be 0): @check - @diff in
 * ones' complement arithmetic, so it also takes @diff out of a 16-bit sum that is not
 * complemented (a CHECKSUM_PARTIAL field, l4.h).
 */
static __always_inline __u16 csum_replace16(__u16 check, __u32 diff)
{
	return csum_fold16(csum_unfolded((__u64)diff + (__u16)~check));
}

/* csum_equal16 — are two 16-bit ones' complement numbers equal, i.e. equal modulo
 * 0xffff? 0x0000 and 0xffff are the two zeros (+0 and -0, RFC 1624 §3). For folded
 * checksums and for 16-bit sums (not complemented) alike. */
static __always_inline int csum_equal16(__u16 a, __u16 b)
{
	return a == b || ((__u16)(a + 1) <= 1 && (__u16)(b + 1) <= 1);
}

/* csum_udp_nonzero — RFC 768: "If the computed checksum is zero, it is transmitted as
 * all ones"; RFC 8200 §8.1 makes 0 illegal on IPv6.
 * @folded: folded checksum. Returns @folded, or 0xffff instead of 0.
 */
static __always_inline __u16 csum_udp_nonzero(__u16 folded)
{
	return folded ? folded : 0xffff;
}

/* Longest stretch csum_pkt_range() sums: three 512-byte blocks (bpf_csum_diff's limit)
 * plus a < 512-byte rest, i.e. a 1500-byte MTU with room to spare. */
#define CSUM_BLOCK 512
#define CSUM_MAX_LEN (3 * CSUM_BLOCK + CSUM_BLOCK - 1)

/* CSUM_STEP — sum @n bytes at *@p if at least @n of @len remain; advance both.
 * Straight-line code with constant sizes: the verifier needs no loop analysis. */
#define CSUM_STEP(n)							\
	if (len >= (n)) {						\
		if (p + (n) > end)					\
			return -14; /* -EFAULT */			\
		sum = bpf_csum_diff(0, 0, (__be32 *)p, (n), (__u32)sum);	\
		p += (n);						\
		len -= (n);						\
	}

/* csum_pkt_range — sum @len bytes of packet data at offset @off onto @seed.
 * Pulls the range into the linear area first. Used only for the rare IPv4 UDP
 * datagram sent without a checksum: about ten helper calls for 1500 bytes.
 * @len must be <= CSUM_MAX_LEN (-E2BIG otherwise; callers check before rewriting).
 * Returns the unfolded sum, or a negative errno.
 * Side effect: bpf_skb_pull_data() invalidates direct packet access.
 */
static __always_inline __s64 csum_pkt_range(struct __sk_buff *skb, __u32 off, __u32 len,
					    __u32 seed)
{
	__u8 *p, *end;
	__u8 tail[4] = {};
	__s64 sum = seed;

	if (len > CSUM_MAX_LEN || off > 128)	/* off: bounded for the verifier */
		return -7; /* -E2BIG */
	if (bpf_skb_pull_data(skb, off + len) < 0)
		return -14;
	p = (__u8 *)(long)skb->data + off;
	end = (__u8 *)(long)skb->data_end;
	CSUM_STEP(CSUM_BLOCK)
	CSUM_STEP(CSUM_BLOCK)
	CSUM_STEP(CSUM_BLOCK)
	CSUM_STEP(256)
	CSUM_STEP(128)
	CSUM_STEP(64)
	CSUM_STEP(32)
	CSUM_STEP(16)
	CSUM_STEP(8)
	CSUM_STEP(4)
	/* 0..3 bytes left: zero-padded on the right, as RFC 1071 pads an odd byte */
	if (len >= 1) {
		if (p + 1 > end)
			return -14;
		tail[0] = p[0];
	}
	if (len >= 2) {
		if (p + 2 > end)
			return -14;
		tail[1] = p[1];
	}
	if (len >= 3) {
		if (p + 3 > end)
			return -14;
		tail[2] = p[2];
	}
	if (len)
		sum = bpf_csum_diff(0, 0, (__be32 *)tail, 4, (__u32)sum);
	return sum;
}
#undef CSUM_STEP

#endif /* XLAT_CSUM_H */
