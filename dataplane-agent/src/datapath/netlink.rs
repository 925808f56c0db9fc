//! The two rtnetlink requests the agent makes about an interface, written out by hand (a
//! netlink crate for two messages is not worth its weight): setting `accept_local`, and
//! asking whether a pod interface is a veth (or netkit) whose other end is in another
//! network namespace. Over netlink rather than /proc/sys or /sys: a container's /proc/sys is
//! read-only, and its /sys may show another network namespace.
use std::io;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_AF_SPEC: u16 = 26;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INET_CONF: u16 = 1;
const IPV4_DEVCONF_ACCEPT_LOCAL: u16 = 23;
/// Attribute types carry two flag bits (nested, network byte order) above the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Lets the interface take packets whose source is one of the node's own addresses. After
/// SNAT to the node (external traffic) or reverse NAT to a node port (replies), such packets
/// still go through the node's routing, which drops a local source arriving from outside
/// ("martian source") unless `accept_local` is set (RTM_SETLINK, the interface's IPv4
/// devconf; needs CAP_NET_ADMIN).
pub fn set_accept_local(ifindex: u32) -> io::Result<()> {
    let devconf = attribute(IPV4_DEVCONF_ACCEPT_LOCAL, &1u32.to_ne_bytes());
    let af_spec = attribute(
        IFLA_AF_SPEC,
        &attribute(libc::AF_INET as u16, &attribute(IFLA_INET_CONF, &devconf)),
    );
    let mut body = link_message(ifindex).to_vec();
    body.extend_from_slice(&af_spec);
    let mut reply = [0u8; 256];
    let reply = request(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, &body, &mut reply)?;
    match error_of(reply) {
        Some(0) => Ok(()),
        Some(error) => Err(io::Error::from_raw_os_error(-error)),
        None => Err(io::Error::other("no acknowledgement from rtnetlink")),
    }
}

/// Is the interface one end of a veth (or netkit) pair whose other end lives in another
/// network namespace: a pod's interface, which `bpf_redirect_peer` can hand packets
/// through into the pod?
pub fn has_peer_in_other_namespace(ifindex: u32) -> io::Result<bool> {
    let mut reply = vec![0u8; 32 * 1024];
    let reply = request(
        RTM_GETLINK,
        NLM_F_REQUEST,
        &link_message(ifindex),
        &mut reply,
    )?;
    if let Some(error) = error_of(reply) {
        return Err(io::Error::from_raw_os_error(-error));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != RTM_NEWLINK || reply.len() < NLMSG_HDRLEN + IFINFOMSG_LEN {
        return Err(io::Error::other("unexpected rtnetlink answer"));
    }
    let attributes = &reply[NLMSG_HDRLEN + IFINFOMSG_LEN..];
    let peer_elsewhere = attributes_of(attributes).any(|(kind, _)| kind == IFLA_LINK_NETNSID);
    let pair = attributes_of(attributes)
        .filter(|(kind, _)| *kind == IFLA_LINKINFO)
        .flat_map(|(_, info)| attributes_of(info))
        .any(|(kind, value)| {
            kind == IFLA_INFO_KIND && matches!(value, b"veth\0" | b"netkit\0" | b"veth" | b"netkit")
        });
    Ok(pair && peer_elsewhere)
}

/// An `ifinfomsg` naming one interface (family AF_UNSPEC, no flags to change).
fn link_message(ifindex: u32) -> [u8; IFINFOMSG_LEN] {
    let mut ifinfo = [0u8; IFINFOMSG_LEN];
    ifinfo[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    ifinfo
}

fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// The (type, payload) attributes packed in `bytes` (each padded to 4 bytes).
fn attributes_of(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let payload = &bytes[4..len];
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
        Some((kind, payload))
    })
}

/// The error code of an NLMSG_ERROR answer (0 acknowledges), `None` for any other answer.
fn error_of(reply: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    (kind == NLMSG_ERROR && reply.len() >= NLMSG_HDRLEN + 4)
        .then(|| i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]))
}

/// Sends one request to the kernel's rtnetlink and returns its first answer.
fn request<'a>(kind: u16, flags: u16, body: &[u8], reply: &'a mut [u8]) -> io::Result<&'a [u8]> {
    let len = (NLMSG_HDRLEN + body.len()) as u32;
    let mut message = Vec::with_capacity(len as usize);
    message.extend_from_slice(&len.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    message.extend_from_slice(body);
    // SAFETY: plain socket calls on a descriptor this function owns (closed on return), with
    // buffers of the lengths passed.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let _owned = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        if libc::send(fd, message.as_ptr().cast(), message.len(), 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < NLMSG_HDRLEN {
            return Err(io::Error::other("short rtnetlink answer"));
        }
        Ok(&reply[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_nesting() {
        let kind = attribute(IFLA_INFO_KIND, b"veth\0");
        let mut packed = attribute(IFLA_LINKINFO, &kind);
        packed.extend(attribute(IFLA_LINK_NETNSID, &3i32.to_ne_bytes()));
        let top: Vec<_> = attributes_of(&packed).map(|(k, _)| k).collect();
        assert_eq!(top, vec![IFLA_LINKINFO, IFLA_LINK_NETNSID]);
        let (_, info) = attributes_of(&packed).next().unwrap();
        assert_eq!(
            attributes_of(info).collect::<Vec<_>>(),
            vec![(IFLA_INFO_KIND, &b"veth\0"[..])]
        );
    }

    #[test]
    fn a_truncated_attribute_ends_the_walk() {
        let mut packed = attribute(IFLA_LINK_NETNSID, &3i32.to_ne_bytes());
        packed.extend_from_slice(&[200, 0, 1, 0]);
        assert_eq!(attributes_of(&packed).count(), 1);
    }
}
