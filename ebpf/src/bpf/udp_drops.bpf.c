// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Counts UDP packets the kernel drops on receive, by local address, local
 * port and drop reason, into a per-CPU hash that user space polls.
 *
 * - zd_udp_fail on udp:udp_fail_queue_rcv_skb sees receive-buffer and
 *   memory drops at the point the kernel counts RcvbufErrors/MemErrors.
 * - zd_kfree_skb on skb:kfree_skb sees every other drop with a reason
 *   (no socket, checksum, netfilter, backlog ...). The receive-buffer drop
 *   also reaches kfree_skb right after udp_fail_queue_rcv_skb, on the same
 *   CPU; zd_udp_fail leaves that skb's address in zd_last_skb so it is
 *   counted once.
 *
 * Both are BTF-typed raw tracepoints (tp_btf): they attach without tracefs,
 * and the verifier knows the argument types, so kernel struct fields are
 * read with plain (fault-safe) loads instead of bpf_probe_read_kernel calls.
 * Field offsets still come from CO-RE relocations (kernel_types.h).
 * Only packet bytes need bpf_probe_read_kernel.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "kernel_types.h"
#include "drop_key.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_UDP 17
#define AF_INET 2
#define AF_INET6 10
#define ENOMEM 12
#define NO_HEADER 0xffff

/* The probe-read helpers are GPL-only. */
char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, ZD_MAX_KEYS);
	__type(key, struct zd_drop_key);
	__type(value, struct zd_drop_value);
} zd_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ZD_MAX_REASONS);
	__type(key, __u32);
	__type(value, __u8);
} zd_reasons SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ZD_CONFIG_LEN);
	__type(key, __u32);
	__type(value, __u32);
} zd_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} zd_last_skb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZD_ERR_LEN);
	__type(key, __u32);
	__type(value, __u64);
} zd_errors SEC(".maps");

static __always_inline void count_drop(const struct zd_drop_key *key)
{
	struct zd_drop_value *value = bpf_map_lookup_elem(&zd_drops, key);
	if (value) {
		/* Per-CPU value and tracepoints do not nest on one CPU for
		 * the same skb: a plain increment is enough. */
		value->packets += 1;
		return;
	}
	struct zd_drop_value first = { .packets = 1 };
	long err = bpf_map_update_elem(&zd_drops, key, &first, BPF_NOEXIST);
	if (err == 0)
		return;
	/* Another CPU created the key between lookup and update. */
	value = bpf_map_lookup_elem(&zd_drops, key);
	if (value) {
		value->packets += 1;
		return;
	}
	__u32 idx = ZD_ERR_MAP_FULL;
	__u64 *errors = bpf_map_lookup_elem(&zd_errors, &idx);
	if (errors)
		*errors += 1;
}

/* Fills addr/port/family from the packet's IP and UDP headers.
 * Returns 0 when the skb holds a UDP datagram whose port is readable. */
static __always_inline int key_from_skb(struct sk_buff *skb, struct zd_drop_key *key)
{
	unsigned char *head = skb->head;
	__u16 proto = bpf_ntohs(skb->protocol);
	__u16 nh = skb->network_header;
	__u16 mh = skb->mac_header;

	/* Drops before the IP layer (CPU backlog, device) may not have a
	 * network header yet; skb->data then points at it. */
	if (nh == 0 || (mh != NO_HEADER && nh <= mh))
		nh = (__u16)(skb->data - head);

	if (proto == ETH_P_IP) {
		/* One read for the usual 20-byte IP header and the UDP ports. */
		struct {
			struct zd_iphdr ip;
			__be16 sport;
			__be16 dport;
		} hdr;
		if (bpf_probe_read_kernel(&hdr, sizeof(hdr), head + nh))
			return -1;
		if ((hdr.ip.ver_ihl >> 4) != 4 || hdr.ip.protocol != IPPROTO_UDP)
			return -1;
		/* Only the first fragment carries the UDP header. */
		if (hdr.ip.frag_off & bpf_htons(0x1fff))
			return -1;
		__u32 ihl = (hdr.ip.ver_ihl & 0x0f) * 4;
		if (ihl < sizeof(hdr.ip))
			return -1;
		if (ihl != sizeof(hdr.ip) &&
		    bpf_probe_read_kernel(&hdr.dport, sizeof(hdr.dport), head + nh + ihl + 2))
			return -1;
		key->addr[10] = 0xff;
		key->addr[11] = 0xff;
		__builtin_memcpy(&key->addr[12], &hdr.ip.daddr, 4);
		key->family = AF_INET;
		key->port = bpf_ntohs(hdr.dport);
	} else if (proto == ETH_P_IPV6) {
		struct {
			struct zd_ipv6hdr ip6;
			__be16 sport;
			__be16 dport;
		} hdr;
		if (bpf_probe_read_kernel(&hdr, sizeof(hdr), head + nh))
			return -1;
		/* Extension headers are not walked: media traffic has none. */
		if ((bpf_ntohl(hdr.ip6.ver_tc_flow) >> 28) != 6 || hdr.ip6.nexthdr != IPPROTO_UDP)
			return -1;
		__builtin_memcpy(key->addr, hdr.ip6.daddr, 16);
		key->family = AF_INET6;
		key->port = bpf_ntohs(hdr.dport);
	} else {
		return -1;
	}
	return 0;
}

/* The socket's bound address: used only when the packet cannot be parsed
 * (and on kernels before 6.10, whose tracepoint passes no skb). */
static __always_inline void key_from_sock(struct sock *sk, struct zd_drop_key *key)
{
	key->port = sk->__sk_common.skc_num;
	if (sk->__sk_common.skc_family == AF_INET6) {
		__builtin_memcpy(key->addr, sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8, 16);
		key->family = AF_INET6;
	} else {
		__be32 saddr = sk->__sk_common.skc_rcv_saddr;
		key->addr[10] = 0xff;
		key->addr[11] = 0xff;
		__builtin_memcpy(&key->addr[12], &saddr, 4);
		key->family = AF_INET;
	}
}

static __always_inline int fail_reason(int rc, __u32 *reason)
{
	/* Mirrors __udp_queue_rcv_skb: -ENOMEM is RcvbufErrors, anything
	 * else MemErrors. */
	__u32 idx = rc == -ENOMEM ? ZD_CONFIG_REASON_RCVBUFF : ZD_CONFIG_REASON_PROTO_MEM;
	__u32 *value = bpf_map_lookup_elem(&zd_config, &idx);
	if (!value)
		return -1;
	*reason = *value;
	return 0;
}

/* udp_fail_queue_rcv_skb(int rc, struct sock *sk, struct sk_buff *skb), 6.10+ */
SEC("tp_btf/udp_fail_queue_rcv_skb")
int zd_udp_fail(__u64 *ctx)
{
	int rc = (int)ctx[0];
	struct sock *sk = (struct sock *)ctx[1];
	struct sk_buff *skb = (struct sk_buff *)ctx[2];
	struct zd_drop_key key = {};

	if (fail_reason(rc, &key.reason))
		return 0;
	key.hook = ZD_HOOK_UDP_FAIL;
	if (key_from_skb(skb, &key))
		key_from_sock(sk, &key);
	count_drop(&key);

	__u32 zero = 0;
	__u64 *last = bpf_map_lookup_elem(&zd_last_skb, &zero);
	if (last)
		*last = (__u64)skb;
	return 0;
}

/* udp_fail_queue_rcv_skb(int rc, struct sock *sk), before 6.10: the
 * verifier refuses zd_udp_fail there, and the loader takes this one. */
SEC("tp_btf/udp_fail_queue_rcv_skb")
int zd_udp_fail_sk(__u64 *ctx)
{
	int rc = (int)ctx[0];
	struct sock *sk = (struct sock *)ctx[1];
	struct zd_drop_key key = {};

	if (fail_reason(rc, &key.reason))
		return 0;
	key.hook = ZD_HOOK_UDP_FAIL;
	key_from_sock(sk, &key);
	count_drop(&key);
	/* Without the skb there is nothing to match in kfree_skb; the loader
	 * then stops kfree_skb from counting these two reasons. */
	return 0;
}

/* kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...) */
SEC("tp_btf/kfree_skb")
int zd_kfree_skb(__u64 *ctx)
{
	struct sk_buff *skb = (struct sk_buff *)ctx[0];
	__u32 reason = (__u32)ctx[2];

	__u32 zero = 0;
	__u64 *last = bpf_map_lookup_elem(&zd_last_skb, &zero);
	if (last && *last) {
		__u64 counted = *last;
		*last = 0;
		if (counted == (__u64)skb)
			return 0;
	}

	__u8 *wanted = bpf_map_lookup_elem(&zd_reasons, &reason);
	if (!wanted || !*wanted)
		return 0;

	/* Receive path only: skb_iif is set when a device received the
	 * packet (loopback included) and is 0 for locally sent ones. */
	if (skb->skb_iif == 0)
		return 0;

	struct zd_drop_key key = {};
	if (key_from_skb(skb, &key))
		return 0;
	key.hook = ZD_HOOK_KFREE_SKB;
	key.reason = reason;
	count_drop(&key);
	return 0;
}

/* Does nothing: the benchmark attaches it next to zd_udp_fail to measure
 * what BPF statistics charge to every run (two clock reads). The agent
 * never loads it. */
SEC("tp_btf/udp_fail_queue_rcv_skb")
int zd_noop(__u64 *ctx)
{
	return 0;
}
