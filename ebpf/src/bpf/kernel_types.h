/* SPDX-License-Identifier: Apache-2.0 OR GPL-2.0 */
/*
 * The few kernel types the programs read, hand-written instead of a
 * 5 MB vmlinux.h. preserve_access_index makes every field access a CO-RE
 * relocation: the loader finds each field by name in the running kernel's
 * BTF, so only names and types matter here, not order or offsets.
 * Fields that sit in anonymous unions in the kernel are declared flat;
 * the relocation searches anonymous members. A field the running kernel
 * lacks makes the loader poison the access, and the verifier then rejects
 * the program with "invalid func unknown#195896080" (0xbad2310).
 */
#ifndef ZERODROP_KERNEL_TYPES_H
#define ZERODROP_KERNEL_TYPES_H

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common {
	__be32 skc_rcv_saddr;
	__u16 skc_num;
	unsigned short skc_family;
	struct in6_addr skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct sk_buff {
	unsigned char *head;
	unsigned char *data;
	int skb_iif;
	__be16 protocol;
	__u16 transport_header;
	__u16 network_header;
	__u16 mac_header;
} __attribute__((preserve_access_index));

/* Wire formats (not kernel structs: no relocation). */
struct zd_iphdr {
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

struct zd_ipv6hdr {
	__be32 ver_tc_flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

#endif
