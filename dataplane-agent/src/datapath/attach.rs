//! Attaching the programs (tcx): `pod_ingress` at ingress of pod-facing interfaces;
//! `external_ingress` at ingress and `external_egress` at egress of the node's external
//! interfaces (their `_l3` builds on devices without an Ethernet header: WireGuard, IPIP);
//! and keeping them there across agent restarts: each link is pinned per interface and
//! direction; a restarted agent swaps its new program into the pinned link atomically, so no
//! packet passes unprocessed.
use std::collections::BTreeMap;

use anyhow::Context;
use aya::programs::{
    TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::SchedClassifierLink,
};
use dataplane_common::{
    PROG_EXTERNAL_EGRESS, PROG_EXTERNAL_EGRESS_L3, PROG_EXTERNAL_INGRESS, PROG_EXTERNAL_INGRESS_L3,
    PROG_POD_INGRESS,
};
use tracing::{info, warn};

use super::loader::LoadedDatapath;

/// What an interface is to the datapath.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Pod,
    External,
}

/// Interfaces the programs are attached to, by name, with the ifindex they were attached at.
pub struct Attachments {
    attached: BTreeMap<String, u32>,
    /// Link pins of interfaces that no longer exist have been looked for since start.
    pruned: bool,
    /// (interface globs, role) in priority order: pod globs first.
    rules: Vec<(Vec<glob::Pattern>, Role)>,
}

fn patterns(globs: &[String]) -> anyhow::Result<Vec<glob::Pattern>> {
    globs
        .iter()
        .map(|g| glob::Pattern::new(g).with_context(|| format!("invalid interface glob {g:?}")))
        .collect()
}

impl Attachments {
    pub fn new(pod_globs: &[String], external_globs: &[String]) -> anyhow::Result<Self> {
        Ok(Self {
            attached: BTreeMap::new(),
            pruned: false,
            rules: vec![
                (patterns(pod_globs)?, Role::Pod),
                (patterns(external_globs)?, Role::External),
            ],
        })
    }

    fn role_of(&self, interface: &str) -> Option<Role> {
        self.rules
            .iter()
            .find(|(globs, _)| globs.iter().any(|p| p.matches(interface)))
            .map(|(_, role)| *role)
    }

    /// Attaches to every matching interface not yet attached (or recreated since).
    pub fn sync(&mut self, datapath: &mut LoadedDatapath) {
        let interfaces = match list_interfaces() {
            Ok(list) => list,
            Err(e) => {
                warn!(error = %e, "cannot list interfaces");
                return;
            }
        };
        let before = self.attached.len();
        self.attached
            .retain(|name, index| interfaces.get(name) == Some(index));
        if !self.pruned || self.attached.len() != before {
            prune_vanished_links(&datapath.layout, &interfaces);
            self.pruned = true;
        }
        for (name, index) in interfaces {
            if self.attached.contains_key(&name) {
                continue;
            }
            let Some(role) = self.role_of(&name) else {
                continue;
            };
            if let Err(e) = accept_local(index) {
                // Traffic NATed to or from the node's own address needs it; the rest works.
                warn!(interface = %name, error = %e, "cannot set accept_local");
            }
            let layer3 = match has_ethernet_header(&name) {
                Ok(ethernet) => !ethernet,
                Err(e) => {
                    warn!(interface = %name, error = %e, "cannot read the link type");
                    continue;
                }
            };
            let links = match role {
                Role::Pod => vec![(PROG_POD_INGRESS, Direction::Ingress)],
                Role::External if layer3 => vec![
                    (PROG_EXTERNAL_INGRESS_L3, Direction::Ingress),
                    (PROG_EXTERNAL_EGRESS_L3, Direction::Egress),
                ],
                Role::External => vec![
                    (PROG_EXTERNAL_INGRESS, Direction::Ingress),
                    (PROG_EXTERNAL_EGRESS, Direction::Egress),
                ],
            };
            let attached = links.into_iter().try_for_each(|(program, direction)| {
                let how = attach(datapath, program, direction, &name)?;
                info!(interface = %name, ifindex = index, program, how, "datapath attached");
                anyhow::Ok(())
            });
            match attached {
                Ok(()) => {
                    self.attached.insert(name, index);
                }
                // Interfaces come and go (a pod deleted mid-attach); retried next round.
                Err(e) => {
                    warn!(interface = %name, error = format!("{e:#}"), "cannot attach datapath")
                }
            }
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }
}

/// Lets the interface take packets whose source is one of the node's own addresses. After
/// SNAT to the node (external traffic) or reverse NAT to a node port (replies), such packets
/// still go through the node's routing, which drops a local source arriving from outside
/// ("martian source") unless `accept_local` is set. Set over rtnetlink (RTM_SETLINK, the
/// interface's IPv4 devconf), which needs CAP_NET_ADMIN but not a writable /proc/sys — a
/// container's /proc/sys is read-only.
pub fn accept_local(ifindex: u32) -> std::io::Result<()> {
    const RTM_SETLINK: u16 = 19;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLMSG_ERROR: u16 = 2;
    const IFLA_AF_SPEC: u16 = 26;
    const IFLA_INET_CONF: u16 = 1;
    const IPV4_DEVCONF_ACCEPT_LOCAL: u16 = 23;
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + payload.len());
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out
    }
    let devconf = attr(IPV4_DEVCONF_ACCEPT_LOCAL, &1u32.to_ne_bytes());
    let af_spec = attr(
        IFLA_AF_SPEC,
        &attr(libc::AF_INET as u16, &attr(IFLA_INET_CONF, &devconf)),
    );
    let mut ifinfo = [0u8; 16]; // family AF_UNSPEC, type 0, index, flags 0, change 0
    ifinfo[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    let len = (16 + ifinfo.len() + af_spec.len()) as u32;
    let mut message = Vec::with_capacity(len as usize);
    message.extend_from_slice(&len.to_ne_bytes());
    message.extend_from_slice(&RTM_SETLINK.to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    message.extend_from_slice(&ifinfo);
    message.extend_from_slice(&af_spec);

    // SAFETY: plain socket calls on a descriptor this function owns (closed on return).
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let owned = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        if libc::send(fd, message.as_ptr().cast(), message.len(), 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut reply = [0u8; 256];
        let n = libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0);
        drop(owned);
        if n < 20 {
            return Err(std::io::Error::last_os_error());
        }
        let kind = u16::from_ne_bytes([reply[4], reply[5]]);
        let error = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
        if kind != NLMSG_ERROR || error != 0 {
            return Err(std::io::Error::from_raw_os_error(-error));
        }
    }
    Ok(())
}

/// Is this a device with an Ethernet header (ARPHRD_ETHER: veths, bridges, VXLAN), rather than
/// a Layer-3 one (WireGuard, IPIP, TUN)? Asked with SIOCGIFHWADDR, in this network namespace.
pub fn has_ethernet_header(interface: &str) -> std::io::Result<bool> {
    const ARPHRD_ETHER: u16 = 1;
    // SAFETY: an ioctl on a socket this function owns, with a zeroed ifreq holding the name.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _owned = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(interface.bytes().take(15)) {
            *dst = src as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(request.ifr_ifru.ifru_hwaddr.sa_family == ARPHRD_ETHER)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Ingress,
    Egress,
}

fn attach(
    datapath: &mut LoadedDatapath,
    program: &str,
    direction: Direction,
    interface: &str,
) -> anyhow::Result<&'static str> {
    let (pin, attach_type) = match direction {
        Direction::Ingress => (datapath.layout.link(interface), TcAttachType::Ingress),
        Direction::Egress => (datapath.layout.egress_link(interface), TcAttachType::Egress),
    };
    if pin.exists() {
        match replace_program(datapath, program, &pin) {
            Ok(()) => return Ok("replaced program in pinned link"),
            Err(e) => {
                // The interface was recreated: the old link is defunct.
                info!(interface, reason = %e, "pinned link not reusable, attaching anew");
                std::fs::remove_file(&pin).ok();
            }
        }
    }
    let program = datapath.program(program);
    let id = program.attach(interface, attach_type)?;
    let link: FdLink = program.take_link(id)?.try_into()?;
    link.pin(&pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok("attached")
}

fn replace_program(
    datapath: &mut LoadedDatapath,
    program: &str,
    pin: &std::path::Path,
) -> anyhow::Result<()> {
    let link = PinnedLink::from_pin(pin)?;
    let link = SchedClassifierLink::try_from(FdLink::from(link))
        .map_err(|e: LinkError| anyhow::anyhow!(e))?;
    let program = datapath.program(program);
    let id = program.attach_to_link(link)?;
    // The pin keeps the link; the program need not hold it.
    drop(program.take_link(id)?);
    Ok(())
}

/// Interfaces of this network namespace (by netlink, not /sys, which may show another one).
pub fn list_interfaces() -> std::io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = BTreeMap::new();
        let mut entry = head;
        while (*entry).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            out.insert(name, (*entry).if_index);
            entry = entry.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

/// Addresses configured in this network namespace, by interface name: IPv4, and IPv6 but for
/// link-local ones (which name no node port: they need an interface to mean anything).
pub fn local_addresses() -> std::io::Result<Vec<(String, std::net::IpAddr)>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a list we walk read-only and free with freeifaddrs.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut entry = head;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            let ip: Option<std::net::IpAddr> = match addr.as_ref().map(|a| a.sa_family as i32) {
                Some(libc::AF_INET) => {
                    let sin = &*(addr as *const libc::sockaddr_in);
                    Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into())
                }
                Some(libc::AF_INET6) => {
                    let sin6 = &*(addr as *const libc::sockaddr_in6);
                    Some(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                        .filter(|ip| !ip.is_unicast_link_local())
                        .map(Into::into)
                }
                _ => None,
            };
            if let Some(ip) = ip {
                let name = std::ffi::CStr::from_ptr((*entry).ifa_name)
                    .to_string_lossy()
                    .into_owned();
                out.push((name, ip));
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// Removes the link pins of interfaces that no longer exist (a deleted pod's veth, here or
/// while no agent ran): their links are defunct, and the pins would pile up.
fn prune_vanished_links(layout: &super::BpffsLayout, interfaces: &BTreeMap<String, u32>) {
    for dir in [layout.links_dir(), layout.egress_links_dir()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            let name = super::layout::interface_of_pin(&entry.file_name().to_string_lossy());
            if interfaces.contains_key(&name) {
                continue;
            }
            let _ = PinnedLink::from_pin(&path).map(|l| l.unpin());
            if std::fs::remove_file(&path).is_ok() || !path.exists() {
                info!(interface = %name, pin = %path.display(), "removed the link pin of a vanished interface");
            }
        }
    }
}

/// Detaches every pinned link under the layout (used by `cleanup`).
pub fn detach_all(layout: &super::BpffsLayout) -> Vec<String> {
    let mut removed = Vec::new();
    let pins = [layout.links_dir(), layout.egress_links_dir()]
        .into_iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|path| !path.is_dir());
    for path in pins {
        match PinnedLink::from_pin(&path).map(|l| l.unpin()) {
            // Dropping the last reference to the link detaches it.
            Ok(Ok(link)) => {
                drop(link);
                removed.push(path.display().to_string());
            }
            _ => {
                if std::fs::remove_file(&path).is_ok() {
                    removed.push(path.display().to_string());
                }
            }
        }
    }
    removed
}
