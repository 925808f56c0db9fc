//! Attaching the programs (tcx): `pod_ingress` at ingress of pod-facing interfaces;
//! `external_ingress` at ingress and `external_egress` at egress of the node's external
//! interfaces (their `_l3` builds on devices without an Ethernet header: WireGuard, IPIP);
//! and keeping them there across agent restarts: each link is pinned per interface and
//! direction; a restarted agent swaps its new program into the pinned link atomically, so no
//! packet passes unprocessed.
//!
//! Pod interfaces that are veths (or netkit devices) with the pod at the other end are also
//! listed in `dp_podif_v1`, so that translated packets for those pods go straight into the
//! pod's namespace (`forward` in the datapath).
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use aya::programs::{
    TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::SchedClassifierLink,
};
use dataplane_common::{
    PROG_EXTERNAL_EGRESS, PROG_EXTERNAL_EGRESS_L3, PROG_EXTERNAL_INGRESS, PROG_EXTERNAL_INGRESS_L3,
    PROG_POD_INGRESS, map_names,
};
use tracing::{info, warn};

use super::{loader::LoadedDatapath, netlink};

/// What an interface is to the datapath.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Pod,
    External,
}

/// Interfaces the programs are attached to, by name, with the ifindex they were attached at.
pub struct Attachments {
    attached: BTreeMap<String, u32>,
    /// The attached pod interfaces a packet can be handed through into the pod, by ifindex.
    pod_peers: BTreeSet<u32>,
    /// `pod_peers` as `dp_podif_v1` holds it (`None` until written once by this agent: the
    /// map may still list a previous run's interfaces).
    pod_peers_written: Option<BTreeSet<u32>>,
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
            pod_peers: BTreeSet::new(),
            pod_peers_written: None,
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
            if let Err(e) = netlink::set_accept_local(index) {
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
                    if role == Role::Pod {
                        self.note_pod_peer(&name, index);
                    }
                    self.attached.insert(name, index);
                }
                // Interfaces come and go (a pod deleted mid-attach); retried next round.
                Err(e) => {
                    warn!(interface = %name, error = format!("{e:#}"), "cannot attach datapath")
                }
            }
        }
        self.write_pod_peers(datapath);
    }

    /// Notes whether the pod interface `name` leads into its pod (a veth or netkit device
    /// whose other end is in another namespace): only then can `bpf_redirect_peer` hand a
    /// packet through it. Anything else matching the pod globs gets packets through its
    /// neighbour output, as every interface did before.
    fn note_pod_peer(&mut self, name: &str, index: u32) {
        match netlink::has_peer_in_other_namespace(index) {
            Ok(true) => {
                self.pod_peers.insert(index);
            }
            Ok(false) => {
                info!(interface = %name, "not a veth into a pod: packets for it leave through the neighbour output")
            }
            Err(e) => {
                warn!(interface = %name, error = %e, "cannot read the link kind: packets for it leave through the neighbour output")
            }
        }
    }

    /// Makes `dp_podif_v1` list exactly the attached pod interfaces that lead into pods:
    /// removed interfaces go (their ifindex may be given to another device), new ones come.
    fn write_pod_peers(&mut self, datapath: &mut LoadedDatapath) {
        let attached: BTreeSet<u32> = self.attached.values().copied().collect();
        self.pod_peers.retain(|index| attached.contains(index));
        if self.pod_peers_written.as_ref() == Some(&self.pod_peers) {
            return;
        }
        let written = (|| {
            let map = datapath
                .ebpf
                .map_mut(map_names::POD_INTERFACES)
                .context("no pod interface map")?;
            let mut map = aya::maps::HashMap::<_, u32, u32>::try_from(map)?;
            let listed: Vec<u32> = map.keys().collect::<Result<_, _>>()?;
            for index in listed.iter().filter(|i| !self.pod_peers.contains(i)) {
                map.remove(index)?;
            }
            for index in &self.pod_peers {
                map.insert(index, 1, 0)?;
            }
            anyhow::Ok(())
        })();
        match written {
            Ok(()) => self.pod_peers_written = Some(self.pod_peers.clone()),
            // Retried at the next sync; meanwhile packets still reach pods (the listed ones
            // straight, the rest through the neighbour output).
            Err(e) => warn!(
                error = format!("{e:#}"),
                "cannot write the pod interface map"
            ),
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }
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
