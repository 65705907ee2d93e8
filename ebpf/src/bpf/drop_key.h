/* SPDX-License-Identifier: Apache-2.0 OR GPL-2.0 */
/*
 * The one definition of the maps shared by the kernel programs
 * (udp_drops.bpf.c) and the Rust loader (src/layout.rs mirrors these
 * structs with #[repr(C)]; build.rs compiles layout_probe.c against this
 * header so a test can check that sizes and offsets agree).
 *
 * The includer provides __u8/__u16/__u32/__u64.
 */
#ifndef ZERODROP_DROP_KEY_H
#define ZERODROP_DROP_KEY_H

/* Which program counted a drop. */
#define ZD_HOOK_UDP_FAIL 1   /* udp:udp_fail_queue_rcv_skb (RcvbufErrors / MemErrors) */
#define ZD_HOOK_KFREE_SKB 2  /* skb:kfree_skb, everything else */

/* Entries in the zd_drops hash. When it is full new keys are not counted
 * and zd_errors[ZD_ERR_MAP_FULL] goes up instead. */
#define ZD_MAX_KEYS 16384

/* zd_reasons is an array indexed by enum skb_drop_reason: 1 = count it.
 * Reasons at or above this bound (subsystem reasons) are never counted. */
#define ZD_MAX_REASONS 1024

/* zd_config indices: enum skb_drop_reason values of the running kernel,
 * written by the loader (the numbering changes between kernels). */
#define ZD_CONFIG_REASON_RCVBUFF 0   /* SKB_DROP_REASON_SOCKET_RCVBUFF */
#define ZD_CONFIG_REASON_PROTO_MEM 1 /* SKB_DROP_REASON_PROTO_MEM */
#define ZD_CONFIG_LEN 2

/* zd_errors indices (per-CPU u64 counters). */
#define ZD_ERR_MAP_FULL 0
#define ZD_ERR_LEN 1

/* Key of zd_drops: one row per local socket address and drop reason. */
struct zd_drop_key {
	/* Local (destination) address of the dropped packet; IPv4 is stored
	 * IPv4-mapped (::ffff:a.b.c.d). */
	__u8 addr[16];
	/* Local (destination) UDP port, host byte order. */
	__u16 port;
	/* AF_INET (2) or AF_INET6 (10). */
	__u8 family;
	/* ZD_HOOK_UDP_FAIL or ZD_HOOK_KFREE_SKB. */
	__u8 hook;
	/* enum skb_drop_reason on the running kernel. */
	__u32 reason;
};

/* Value of zd_drops (per CPU; user space sums the CPUs). */
struct zd_drop_value {
	__u64 packets;
};

#endif
