//! Ethernet + IPv4 + TCP/UDP frames with every checksum computed from scratch: the synthetic
//! packets `trace` runs through the live program, and the packet tests' and the bench's
//! fixtures (one builder for all three).
use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};

/// The Internet checksum (RFC 1071) over `chunks`, as they follow each other.
pub fn checksum(chunks: &[&[u8]]) -> [u8; 2] {
    let mut sum = 0u64;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u64;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

/// The transport part of a frame.
#[derive(Clone, Copy, Debug)]
pub enum L4<'a> {
    /// A 20-byte TCP header, no payload.
    Tcp { flags: u8, seq: u32, ack: u32 },
    /// A UDP datagram; `zero_checksum` leaves its checksum 0 ("none", as IPv4 allows).
    Udp {
        payload: &'a [u8],
        zero_checksum: bool,
    },
}

/// The IPv4 header fields a fixture may choose.
#[derive(Clone, Copy, Debug)]
pub struct IpFields {
    pub ttl: u8,
    pub id: u16,
    /// The flags byte (`0x40`: don't fragment).
    pub flags: u8,
}

impl Default for IpFields {
    fn default() -> Self {
        Self {
            ttl: 64,
            id: 0x1234,
            flags: 0,
        }
    }
}

/// The source and destination MAC addresses of the fixtures: (destination, source).
pub type Macs = ([u8; 6], [u8; 6]);

/// Client and node MAC addresses the fixtures use: a frame from the client to the node.
pub const TO_NODE: Macs = ([0x02, 0, 0, 0, 0, 0xfe], [0x02, 0, 0, 0, 0, 0x01]);

/// A 20-byte IPv4 header (no options) with its checksum.
pub fn ipv4_header(
    proto: u8,
    total: u16,
    (src, dst): (Ipv4Addr, Ipv4Addr),
    fields: IpFields,
) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&fields.id.to_be_bytes());
    ip.extend_from_slice(&[fields.flags, 0, fields.ttl, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c);
    ip
}

/// An Ethernet + IPv4 + TCP/UDP frame from `src` to `dst`.
pub fn frame(macs: Macs, src: SocketAddrV4, dst: SocketAddrV4, l4: L4, ip: IpFields) -> Vec<u8> {
    let (proto, l4_bytes) = segment(
        &l4,
        (src.port(), dst.port()),
        (&src.ip().octets(), &dst.ip().octets()),
        |len, proto| [&[0, proto][..], &len.to_be_bytes()].concat(),
    );
    let header = ipv4_header(
        proto,
        20 + l4_bytes.len() as u16,
        (*src.ip(), *dst.ip()),
        ip,
    );
    [&macs.0[..], &macs.1, &[0x08, 0x00], &header, &l4_bytes].concat()
}

/// An Ethernet + IPv6 + TCP/UDP frame from `src` to `dst` (hop limit 64), with `extensions`
/// (encoded, the first one a hop-by-hop header, its next-header byte set by the caller)
/// between the fixed header and the segment. A UDP checksum is always computed (IPv6 has no
/// "none").
pub fn frame6(
    macs: Macs,
    src: SocketAddrV6,
    dst: SocketAddrV6,
    extensions: &[u8],
    l4: L4,
) -> Vec<u8> {
    let l4 = match l4 {
        L4::Udp { payload, .. } => L4::Udp {
            payload,
            zero_checksum: false,
        },
        tcp => tcp,
    };
    let (proto, l4_bytes) = segment(
        &l4,
        (src.port(), dst.port()),
        (&src.ip().octets(), &dst.ip().octets()),
        |len, proto| [&(len as u32).to_be_bytes()[..], &[0, 0, 0, proto]].concat(),
    );
    let next = if extensions.is_empty() { proto } else { 0 };
    let payload_len = (extensions.len() + l4_bytes.len()) as u16;
    let mut header = vec![0x60, 0, 0, 0];
    header.extend_from_slice(&payload_len.to_be_bytes());
    header.extend_from_slice(&[next, 64]);
    header.extend_from_slice(&src.ip().octets());
    header.extend_from_slice(&dst.ip().octets());
    [
        &macs.0[..],
        &macs.1,
        &[0x86, 0xdd],
        &header,
        extensions,
        &l4_bytes,
    ]
    .concat()
}

/// The TCP (20-byte header) or UDP segment between `ports`, its checksum over the family's
/// pseudo-header: the addresses, then what `pseudo_tail` makes of the length and protocol.
fn segment(
    l4: &L4,
    (sport, dport): (u16, u16),
    (src, dst): (&[u8], &[u8]),
    pseudo_tail: impl Fn(u16, u8) -> Vec<u8>,
) -> (u8, Vec<u8>) {
    let (proto, mut l4_bytes) = match *l4 {
        L4::Tcp { flags, seq, ack } => {
            let mut t = vec![0u8; 20];
            t[4..8].copy_from_slice(&seq.to_be_bytes());
            t[8..12].copy_from_slice(&ack.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = flags;
            t[14..16].copy_from_slice(&64240u16.to_be_bytes());
            (6u8, t)
        }
        L4::Udp { payload, .. } => {
            let mut u = vec![0u8; 8];
            u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            u.extend_from_slice(payload);
            (17u8, u)
        }
    };
    l4_bytes[0..2].copy_from_slice(&sport.to_be_bytes());
    l4_bytes[2..4].copy_from_slice(&dport.to_be_bytes());
    let len = l4_bytes.len() as u16;
    let zero_checksum = matches!(
        l4,
        L4::Udp {
            zero_checksum: true,
            ..
        }
    );
    if !zero_checksum {
        let pseudo = [src, dst, &pseudo_tail(len, proto)].concat();
        let at = if proto == 6 { 16 } else { 6 };
        let c = checksum(&[&pseudo, &l4_bytes]);
        l4_bytes[at..at + 2].copy_from_slice(&c);
    }
    (proto, l4_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let f = frame(
            TO_NODE,
            "10.0.1.5:40000".parse().unwrap(),
            "10.96.0.10:80".parse().unwrap(),
            L4::Tcp {
                flags: 0x02,
                seq: 1,
                ack: 0,
            },
            IpFields::default(),
        );
        assert_eq!(checksum(&[&f[14..34]]), [0, 0], "IPv4 header");
        let pseudo = [&f[26..34], &[0, 6], &20u16.to_be_bytes()[..]].concat();
        assert_eq!(checksum(&[&pseudo, &f[34..]]), [0, 0], "TCP");
    }
}
