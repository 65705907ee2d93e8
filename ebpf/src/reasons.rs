//! Names of the kernel's drop reasons (`enum skb_drop_reason`), resolved on
//! the running kernel: the numbering changes between kernel versions.
//!
//! The first source is the kernel's BTF (`/sys/kernel/btf/vmlinux`), which
//! needs no tracefs; the second is the symbolic list in the `skb:kfree_skb`
//! tracepoint format.

use std::collections::BTreeMap;
use std::path::Path;

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
pub const TRACEFS_FORMATS: [&str; 2] = [
    "/sys/kernel/tracing/events/skb/kfree_skb/format",
    "/sys/kernel/debug/tracing/events/skb/kfree_skb/format",
];

const ENUM_NAME: &str = "skb_drop_reason";
const PREFIX: &str = "SKB_DROP_REASON_";

/// Drop reason numbers and names of one kernel. Names are the enum's without
/// `SKB_DROP_REASON_`, as the kernel prints them: `NETFILTER_DROP`,
/// `SOCKET_RCVBUFF`, `NO_SOCKET`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropReasons {
    by_value: BTreeMap<u32, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReasonsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {what}")]
    Parse { path: String, what: String },
    #[error("enum {ENUM_NAME} not found in {path}")]
    NotFound { path: String },
}

impl DropReasons {
    /// Reads the kernel's BTF, then the tracepoint format if that fails.
    pub fn load() -> Result<Self, ReasonsError> {
        let btf_err = match Self::from_btf_file(Path::new(BTF_PATH)) {
            Ok(reasons) => return Ok(reasons),
            Err(err) => err,
        };
        for path in TRACEFS_FORMATS {
            if let Ok(text) = std::fs::read_to_string(path) {
                return Self::from_tracepoint_format(&text).ok_or_else(|| ReasonsError::Parse {
                    path: path.to_owned(),
                    what: "no __print_symbolic list for reason".to_owned(),
                });
            }
        }
        Err(btf_err)
    }

    pub fn from_btf_file(path: &Path) -> Result<Self, ReasonsError> {
        let data = std::fs::read(path).map_err(|source| ReasonsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_btf(&data).map_err(|err| match err {
            BtfError::NotFound => ReasonsError::NotFound { path: path.display().to_string() },
            BtfError::Malformed(what) => ReasonsError::Parse { path: path.display().to_string(), what },
        })
    }

    /// Finds `enum skb_drop_reason` in raw BTF data.
    pub fn from_btf(data: &[u8]) -> Result<Self, BtfError> {
        let members = btf_enum_members(data, ENUM_NAME)?;
        let by_value = members
            .into_iter()
            .map(|(name, value)| (value, name.strip_prefix(PREFIX).unwrap_or(&name).to_owned()))
            .collect();
        Ok(Self { by_value })
    }

    /// Parses the `__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, ...)`
    /// list of the kfree_skb tracepoint format.
    pub fn from_tracepoint_format(text: &str) -> Option<Self> {
        let start = text.find("__print_symbolic(REC->reason")?;
        let mut by_value = BTreeMap::new();
        let mut rest = &text[start..];
        while let Some(open) = rest.find('{') {
            rest = &rest[open + 1..];
            let close = rest.find('}')?;
            let entry = &rest[..close];
            rest = &rest[close + 1..];
            let Some((num, name)) = entry.split_once(',') else { continue };
            let num = num.trim();
            let value = match num.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => num.parse().ok(),
            };
            let name = name.trim().trim_matches('"');
            if let Some(value) = value {
                by_value.insert(value, name.to_owned());
            }
        }
        (!by_value.is_empty()).then_some(Self { by_value })
    }

    pub fn name(&self, value: u32) -> Option<&str> {
        self.by_value.get(&value).map(String::as_str)
    }

    /// The name, or `REASON_<n>` for a number this kernel does not list.
    pub fn label(&self, value: u32) -> String {
        self.name(value).map_or_else(|| format!("REASON_{value}"), str::to_owned)
    }

    pub fn value(&self, name: &str) -> Option<u32> {
        self.by_value.iter().find(|(_, n)| *n == name).map(|(v, _)| *v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.by_value.iter().map(|(v, n)| (*v, n.as_str()))
    }

    pub fn len(&self) -> usize {
        self.by_value.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_value.is_empty()
    }

    /// Whether `kfree_skb` should count this reason by default: every real
    /// drop except TCP's own reasons (a UDP datagram never carries them and
    /// they are frequent on busy nodes, so filtering them first is cheap).
    pub fn counted_by_default(name: &str) -> bool {
        !matches!(name, "NOT_DROPPED_YET" | "CONSUMED") && !name.starts_with("TCP_")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("enum not found")]
    NotFound,
    #[error("malformed BTF: {0}")]
    Malformed(String),
}

/// Walks the type section of raw BTF (the format of /sys/kernel/btf/vmlinux,
/// see the kernel's Documentation/bpf/btf.rst) and returns the members of
/// the named enum. Only enough of the format is decoded to skip every kind.
fn btf_enum_members(data: &[u8], wanted: &str) -> Result<Vec<(String, u32)>, BtfError> {
    let bad = |what: &str| BtfError::Malformed(what.to_owned());
    let u16_at = |off: usize| data.get(off..off + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |off: usize| data.get(off..off + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));

    if u16_at(0) != Some(0xeb9f) {
        return Err(bad("bad magic (not little-endian BTF)"));
    }
    let hdr_len = u32_at(4).ok_or_else(|| bad("short header"))? as usize;
    let type_off = u32_at(8).ok_or_else(|| bad("short header"))? as usize;
    let type_len = u32_at(12).ok_or_else(|| bad("short header"))? as usize;
    let str_off = u32_at(16).ok_or_else(|| bad("short header"))? as usize;
    let str_len = u32_at(20).ok_or_else(|| bad("short header"))? as usize;
    let types_start = hdr_len + type_off;
    let types_end = types_start + type_len;
    let strings = data
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .ok_or_else(|| bad("string section out of bounds"))?;
    if data.len() < types_end {
        return Err(bad("type section out of bounds"));
    }
    let string_at = |off: u32| -> Result<&str, BtfError> {
        let tail = strings.get(off as usize..).ok_or_else(|| bad("string offset out of bounds"))?;
        let end = tail.iter().position(|&b| b == 0).ok_or_else(|| bad("unterminated string"))?;
        std::str::from_utf8(&tail[..end]).map_err(|_| bad("string is not UTF-8"))
    };

    let mut off = types_start;
    while off + 12 <= types_end {
        let name_off = u32_at(off).ok_or_else(|| bad("truncated type"))?;
        let info = u32_at(off + 4).ok_or_else(|| bad("truncated type"))?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let body = off + 12;
        let body_len = match kind {
            1 | 14 | 17 => 4,           // INT, VAR, DECL_TAG
            3 => 12,                     // ARRAY
            4 | 5 => vlen * 12,          // STRUCT, UNION
            6 | 13 => vlen * 8,          // ENUM, FUNC_PROTO
            15 | 19 => vlen * 12,        // DATASEC, ENUM64
            2 | 7..=12 | 16 | 18 => 0,   // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            other => return Err(BtfError::Malformed(format!("unknown BTF kind {other}"))),
        };
        if (kind == 6 || kind == 19) && vlen > 0 && string_at(name_off)? == wanted {
            let stride = if kind == 6 { 8 } else { 12 };
            let mut members = Vec::with_capacity(vlen);
            for i in 0..vlen {
                let m = body + i * stride;
                let name = string_at(u32_at(m).ok_or_else(|| bad("truncated enum"))?)?;
                // ENUM64 keeps the low 32 bits first; drop reasons fit in them.
                let value = u32_at(m + 4).ok_or_else(|| bad("truncated enum"))?;
                members.push((name.to_owned(), value));
            }
            return Ok(members);
        }
        off = body + body_len;
    }
    Err(BtfError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracepoint_format_list_is_parsed() {
        let text = r#"print fmt: "skbaddr=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->protocol, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 12, "NETFILTER_DROP" }, { 0x10000, "SUBSYS_X" })"#;
        let reasons = DropReasons::from_tracepoint_format(text).expect("list parsed");
        assert_eq!(reasons.name(12), Some("NETFILTER_DROP"));
        assert_eq!(reasons.value("NO_SOCKET"), Some(3));
        assert_eq!(reasons.name(0x10000), Some("SUBSYS_X"));
        assert_eq!(reasons.label(99), "REASON_99");
    }

    #[test]
    fn format_without_symbolic_list_is_rejected() {
        assert_eq!(DropReasons::from_tracepoint_format("print fmt: \"x\""), None);
    }

    #[test]
    fn btf_with_bad_magic_is_rejected() {
        assert!(matches!(DropReasons::from_btf(&[0u8; 32]), Err(BtfError::Malformed(_))));
    }

    /// A hand-built BTF blob: an INT, then `enum skb_drop_reason`.
    #[test]
    fn enum_is_found_in_synthetic_btf() {
        let strings = b"\0int\0skb_drop_reason\0SKB_DROP_REASON_NO_SOCKET\0SKB_DROP_REASON_NETFILTER_DROP\0";
        let mut types = Vec::new();
        // INT "int": name_off 1, kind 1, size 4, + 4 bytes encoding
        types.extend_from_slice(&1u32.to_le_bytes());
        types.extend_from_slice(&(1u32 << 24).to_le_bytes());
        types.extend_from_slice(&4u32.to_le_bytes());
        types.extend_from_slice(&32u32.to_le_bytes());
        // ENUM with 2 members
        types.extend_from_slice(&5u32.to_le_bytes());
        types.extend_from_slice(&((6u32 << 24) | 2).to_le_bytes());
        types.extend_from_slice(&4u32.to_le_bytes());
        types.extend_from_slice(&21u32.to_le_bytes());
        types.extend_from_slice(&3u32.to_le_bytes());
        types.extend_from_slice(&47u32.to_le_bytes());
        types.extend_from_slice(&12u32.to_le_bytes());
        let mut blob = Vec::new();
        blob.extend_from_slice(&0xeb9fu16.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        blob.extend_from_slice(&24u32.to_le_bytes());
        blob.extend_from_slice(&0u32.to_le_bytes());
        blob.extend_from_slice(&(types.len() as u32).to_le_bytes());
        blob.extend_from_slice(&(types.len() as u32).to_le_bytes());
        blob.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        let reasons = DropReasons::from_btf(&blob).expect("enum found");
        assert_eq!(reasons.name(3), Some("NO_SOCKET"));
        assert_eq!(reasons.name(12), Some("NETFILTER_DROP"));
        assert_eq!(reasons.len(), 2);
    }

    #[test]
    fn running_kernel_btf_lists_the_reasons_the_agent_needs() {
        let path = Path::new(BTF_PATH);
        if !path.exists() {
            crate::testenv::skip("no kernel BTF at /sys/kernel/btf/vmlinux");
            return;
        }
        let reasons = DropReasons::from_btf_file(path).expect("kernel BTF parses");
        for name in ["SOCKET_RCVBUFF", "PROTO_MEM", "NETFILTER_DROP", "NO_SOCKET", "UDP_CSUM"] {
            assert!(reasons.value(name).is_some(), "{name} missing from the kernel's enum skb_drop_reason");
        }
    }

    #[test]
    fn tcp_and_non_drops_are_not_counted_by_default() {
        assert!(!DropReasons::counted_by_default("CONSUMED"));
        assert!(!DropReasons::counted_by_default("TCP_CSUM"));
        assert!(DropReasons::counted_by_default("NETFILTER_DROP"));
        assert!(DropReasons::counted_by_default("UDP_CSUM"));
    }
}
