//! The Rust mirror of `src/bpf/drop_key.h`: map key and value structs and the
//! constants both sides agree on. `tests::layout_matches_c_header` compares
//! them with what the C compiler made of the header.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `ZD_HOOK_UDP_FAIL`: counted by `udp:udp_fail_queue_rcv_skb`.
pub const HOOK_UDP_FAIL: u8 = 1;
/// `ZD_HOOK_KFREE_SKB`: counted by `skb:kfree_skb`.
pub const HOOK_KFREE_SKB: u8 = 2;
/// `ZD_MAX_KEYS`: entries in the `zd_drops` hash.
pub const MAX_KEYS: u32 = 16384;
/// `ZD_MAX_REASONS`: length of the `zd_reasons` filter array.
pub const MAX_REASONS: u32 = 1024;
/// `ZD_CONFIG_REASON_RCVBUFF`: index of SKB_DROP_REASON_SOCKET_RCVBUFF in `zd_config`.
pub const CONFIG_REASON_RCVBUFF: u32 = 0;
/// `ZD_CONFIG_REASON_PROTO_MEM`: index of SKB_DROP_REASON_PROTO_MEM in `zd_config`.
pub const CONFIG_REASON_PROTO_MEM: u32 = 1;
/// `ZD_CONFIG_LEN`.
pub const CONFIG_LEN: u32 = 2;
/// `ZD_ERR_MAP_FULL`: index in `zd_errors` of drops not counted because the hash was full.
pub const ERR_MAP_FULL: u32 = 0;
/// `ZD_ERR_LEN`.
pub const ERR_LEN: u32 = 1;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// `struct zd_drop_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    /// Local (destination) address; IPv4 stored as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Local (destination) UDP port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// `HOOK_UDP_FAIL` or `HOOK_KFREE_SKB`.
    pub hook: u8,
    /// `enum skb_drop_reason` value on the running kernel.
    pub reason: u32,
}

/// `struct zd_drop_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropValue {
    pub packets: u64,
}

// SAFETY: plain-old-data: fixed-size integers and arrays, no padding
// (24 and 8 bytes, checked against the C header by the layout test).
unsafe impl aya::Pod for DropKey {}
// SAFETY: as above.
unsafe impl aya::Pod for DropValue {}

impl DropKey {
    /// The local address as an `IpAddr`: IPv4 for `AF_INET` keys.
    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.addr);
        if self.family == AF_INET {
            let [.., a, b, c, d] = self.addr;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        } else {
            IpAddr::V6(v6)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[cfg(zerodrop_ebpf_object)]
    mod c {
        include!(concat!(env!("OUT_DIR"), "/drop_key_layout.rs"));
    }

    #[cfg(zerodrop_ebpf_object)]
    #[test]
    fn layout_matches_c_header() {
        use std::mem::offset_of;
        assert_eq!(size_of::<DropKey>(), c::C_DROP_KEY_SIZE);
        assert_eq!(offset_of!(DropKey, addr), c::C_DROP_KEY_ADDR);
        assert_eq!(offset_of!(DropKey, port), c::C_DROP_KEY_PORT);
        assert_eq!(offset_of!(DropKey, family), c::C_DROP_KEY_FAMILY);
        assert_eq!(offset_of!(DropKey, hook), c::C_DROP_KEY_HOOK);
        assert_eq!(offset_of!(DropKey, reason), c::C_DROP_KEY_REASON);
        assert_eq!(size_of::<DropValue>(), c::C_DROP_VALUE_SIZE);
        assert_eq!(offset_of!(DropValue, packets), c::C_DROP_VALUE_PACKETS);
        assert_eq!(u32::from(HOOK_UDP_FAIL), c::ZD_HOOK_UDP_FAIL);
        assert_eq!(u32::from(HOOK_KFREE_SKB), c::ZD_HOOK_KFREE_SKB);
        assert_eq!(MAX_KEYS, c::ZD_MAX_KEYS);
        assert_eq!(MAX_REASONS, c::ZD_MAX_REASONS);
        assert_eq!(CONFIG_REASON_RCVBUFF, c::ZD_CONFIG_REASON_RCVBUFF);
        assert_eq!(CONFIG_REASON_PROTO_MEM, c::ZD_CONFIG_REASON_PROTO_MEM);
        assert_eq!(CONFIG_LEN, c::ZD_CONFIG_LEN);
        assert_eq!(ERR_MAP_FULL, c::ZD_ERR_MAP_FULL);
        assert_eq!(ERR_LEN, c::ZD_ERR_LEN);
    }

    #[test]
    fn key_has_no_padding() {
        assert_eq!(size_of::<DropKey>(), 16 + 2 + 1 + 1 + 4);
    }

    #[test]
    fn ipv4_keys_read_back_as_ipv4() {
        let mut key = DropKey { family: AF_INET, ..Default::default() };
        key.addr[10] = 0xff;
        key.addr[11] = 0xff;
        key.addr[12..].copy_from_slice(&[127, 1, 2, 3]);
        assert_eq!(key.ip(), IpAddr::V4(Ipv4Addr::new(127, 1, 2, 3)));
        let v6 = DropKey { family: AF_INET6, addr: Ipv6Addr::LOCALHOST.octets(), ..Default::default() };
        assert_eq!(v6.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
}
