/* SPDX-License-Identifier: MIT */
/* xlat — the datapath's clock: CLOCK_MONOTONIC nanoseconds at tick resolution, read
 * through a per-CPU copy that is refreshed once per tick.
 *
 * Why not bpf_ktime_get_ns() per packet: it was one of the costliest helpers of a
 * translated packet here (it reads the clocksource through an indirect call: about 60 of
 * 340 ns, measured with BPF_PROG_TEST_RUN), and nothing needs better than a tick: idle
 * timeouts are seconds, the next-hop cache (fib.h) lives a second, and the rate cap
 * tolerates a second's burst. bpf_jiffies64() is inlined by the verifier into a load;
 * only when it has moved since this CPU's last packet is bpf_ktime_get_coarse_ns() called
 * (CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC as of the last tick).
 * The maps keep nanoseconds of time.monotonic_ns()'s clock, so Python converts nothing
 * (Cilium's bpf_mono_now(), bpf/lib/mono.h, keeps scaled jiffies in its maps instead and
 * its agent converts them with the kernel's HZ).
 * Precision: the value lags CLOCK_MONOTONIC by at most two ticks (8 ms at HZ=250): one
 * of coarse resolution, one when this CPU sees jiffies move before the timekeeping
 * update that follows it (tick_do_update_jiffies64()) has run. A CPU coming out of idle
 * updates jiffies on interrupt entry, before the packet's softirq runs.
 */
#ifndef XLAT_CLOCK_H
#define XLAT_CLOCK_H

#include <linux/types.h>

/* This CPU's copy: the clock as of the jiffy it was read in. */
struct clock_copy {
	__u64 jiffies;
	__u64 ns;
};

/* clock_now — CLOCK_MONOTONIC in ns, at most two ticks late (see above).
 * @c: this CPU's copy (xlat.c's clock_copies map); NULL reads the clock every time.
 * Side effect: refreshes *@c once per tick. */
static __always_inline __u64 clock_now(struct clock_copy *c)
{
	__u64 jiffies = bpf_jiffies64();
	__u64 now;

	if (c && c->jiffies == jiffies)
		return c->ns;
	now = bpf_ktime_get_coarse_ns();
	if (c) {
		c->jiffies = jiffies;
		c->ns = now;
	}
	return now;
}

#endif /* XLAT_CLOCK_H */
