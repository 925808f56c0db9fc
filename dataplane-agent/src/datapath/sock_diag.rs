//! Terminating sockets from user space: a sock_diag dump of the network namespace's IPv4 UDP
//! sockets finds those with the given cookies, and SOCK_DESTROY aborts each (the application
//! sees ECONNABORTED and reconnects). sock_diag works in the caller's network namespace only;
//! pods' namespaces are entered from a thread of their own.
use std::{
    collections::BTreeSet,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::Context;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, sockid.
const REQ_LEN: usize = 8 + SOCKID_LEN;

/// A netlink request carrying an `inet_diag_req_v2` for IPv4 UDP with the given socket id.
fn request(kind: u16, flags: u16, sockid: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    out.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    out.push(libc::AF_INET as u8);
    out.push(libc::IPPROTO_UDP as u8);
    out.extend_from_slice(&[0, 0]); // extensions, pad
    out.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    out.extend_from_slice(sockid);
    out
}

fn netlink_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: a plain socket call; the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, message: &[u8]) -> std::io::Result<()> {
    // SAFETY: a send of a buffer we own on a descriptor we own.
    if unsafe { libc::send(fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The socket ids (as the kernel reports them) of this namespace's connected IPv4 UDP sockets
/// whose cookie is in `cookies`. Unconnected ones (no destination) are never returned:
/// destroying one would silently change its source port.
fn find_udp(fd: &OwnedFd, cookies: &BTreeSet<u64>) -> anyhow::Result<Vec<[u8; SOCKID_LEN]>> {
    send(
        fd,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: a receive into a buffer we own.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("sock_diag dump");
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < NLMSG_HDRLEN || len > rest.len() {
                anyhow::bail!("sock_diag: malformed message");
            }
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let error = i32::from_ne_bytes(rest[16..20].try_into().unwrap());
                    return Err(std::io::Error::from_raw_os_error(-error))
                        .context("sock_diag dump");
                }
                SOCK_DIAG_BY_FAMILY => {
                    // inet_diag_msg: family, state, timer, retrans, then the socket id.
                    let body = &rest[NLMSG_HDRLEN..len];
                    if body.len() >= 4 + SOCKID_LEN {
                        let sockid: [u8; SOCKID_LEN] = body[4..4 + SOCKID_LEN].try_into().unwrap();
                        let cookie = u64::from_ne_bytes(sockid[40..48].try_into().unwrap());
                        let connected = sockid[20..24] != [0; 4];
                        if connected && cookies.contains(&cookie) {
                            found.push(sockid);
                        }
                    }
                }
                _ => {}
            }
            rest = &rest[(len + 3) & !3..];
        }
    }
}

/// Destroys this namespace's connected IPv4 UDP sockets whose cookie is in `cookies`;
/// returns the cookies of those destroyed.
pub fn destroy_udp(cookies: &BTreeSet<u64>) -> anyhow::Result<BTreeSet<u64>> {
    let fd = netlink_socket().context("opening a sock_diag socket")?;
    let mut destroyed = BTreeSet::new();
    for sockid in find_udp(&fd, cookies)? {
        let cookie = u64::from_ne_bytes(sockid[40..48].try_into().unwrap());
        send(
            &fd,
            &request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &sockid),
        )?;
        let mut reply = [0u8; 256];
        // SAFETY: a receive into a buffer we own.
        let n = unsafe { libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR {
            match i32::from_ne_bytes(reply[16..20].try_into().unwrap()) {
                0 => {
                    destroyed.insert(cookie);
                }
                // Closed meanwhile.
                e if -e == libc::ENOENT => {}
                e => {
                    return Err(std::io::Error::from_raw_os_error(-e)).context("SOCK_DESTROY");
                }
            }
        }
    }
    Ok(destroyed)
}

/// `destroy_udp` in every network namespace a process on the node lives in (the node's and
/// each pod's), each entered from a short-lived thread (a namespace switch is per thread).
pub fn destroy_udp_in_every_namespace(cookies: &BTreeSet<u64>) -> anyhow::Result<BTreeSet<u64>> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = BTreeSet::new();
    let mut destroyed = destroy_udp(cookies)?;
    if let Ok(own) = std::fs::metadata("/proc/thread-self/ns/net") {
        seen.insert(own.ino());
    }
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let path = entry.path().join("ns/net");
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert(meta.ino()) {
            continue;
        }
        let Ok(namespace) = std::fs::File::open(&path) else {
            continue;
        };
        let cookies = cookies.clone();
        let result = std::thread::spawn(move || {
            // SAFETY: setns on a namespace descriptor we own, in this thread only.
            if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("entering a namespace");
            }
            destroy_udp(&cookies)
        })
        .join();
        match result {
            Ok(Ok(more)) => destroyed.extend(more),
            Ok(Err(e)) => {
                tracing::debug!(namespace = %path.display(), error = %format!("{e:#}"), "cannot look for UDP sockets")
            }
            Err(_) => {}
        }
    }
    Ok(destroyed)
}
