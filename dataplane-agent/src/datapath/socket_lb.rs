//! Socket-level load balancing (`--socket-lb`): the cgroup programs that translate a service
//! address at `connect()`/`sendmsg()` (see `dataplane-ebpf/src/sock.rs`), attached at the
//! agent's `--cgroup-root` through links pinned under `links/cgroup/`, one per program. A
//! restarted agent swaps its programs into the pinned links atomically (BPF_LINK_UPDATE), as
//! it does for the tc links, so no socket call goes untranslated in between.
//!
//! Connected UDP sockets whose backend left the service are terminated (SOCK_DESTROY over
//! sock_diag), so the application reconnects and gets a current backend: the socket-level
//! counterpart of kube-proxy flushing a gone endpoint's UDP conntrack entries. Unconnected
//! UDP sockets are never destroyed (that would silently change their source port); the
//! datapath moves their next datagram to a current backend.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::Context;
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, links::FdLink};
use dataplane_common::{
    IPPROTO_UDP, PROG_SOCK_RELEASE, SOCK_REVERSE, SOCKET_LB_ALL, SOCKET_LB_HOST, SOCKET_LB_OFF,
    SOCKET_PROGRAMS, SockEntry, SockKey, SocketLbConfig,
};
use tracing::{info, warn};

use super::{BpffsLayout, loader::LoadedDatapath, maps::PinnedMaps, sock_diag};

/// Which sockets are translated at the socket (`--socket-lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLbMode {
    /// The node's own processes (the agent's network namespace): host-network pods and node
    /// daemons. Pods keep the per-packet path, so service meshes see the service address.
    Host,
    /// The node's processes and every pod under the cgroup root.
    All,
    /// Nothing is attached (and hooks a previous agent attached are removed).
    Off,
}

impl SocketLbMode {
    fn code(self) -> u32 {
        match self {
            Self::Host => SOCKET_LB_HOST,
            Self::All => SOCKET_LB_ALL,
            Self::Off => SOCKET_LB_OFF,
        }
    }
}

/// The cgroup v2 mount the hooks attach to by default: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub fn default_cgroup_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup");
    if is_cgroup2(unified) {
        unified.to_path_buf()
    } else {
        unified.join("unified")
    }
}

fn is_cgroup2(path: &Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and an out-parameter of the right type.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// The mode and cgroup directory to use, checked before anything is loaded or pinned: an
/// explicit `--cgroup-root` must be a cgroup v2 directory; without one, a host with no cgroup
/// v2 mount runs without socket hooks (logged) rather than not at all.
pub fn resolve(
    mode: SocketLbMode,
    cgroup_root: Option<&Path>,
) -> anyhow::Result<(SocketLbMode, PathBuf)> {
    let root = cgroup_root.map_or_else(default_cgroup_root, Path::to_path_buf);
    if mode == SocketLbMode::Off || is_cgroup2(&root) {
        return Ok((mode, root));
    }
    anyhow::ensure!(
        cgroup_root.is_none(),
        "--cgroup-root {} is not a cgroup v2 directory (the socket hooks need one; point \
         --cgroup-root at the cgroup2 mount, or use --socket-lb off)",
        root.display()
    );
    warn!(
        cgroup_root = %root.display(),
        "no cgroup v2 mount: host processes cannot reach services (socket-level load balancing off)"
    );
    Ok((SocketLbMode::Off, root))
}

/// The cookie of this thread's network namespace (SO_NETNS_COOKIE), as the programs'
/// `bpf_get_netns_cookie` names it.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a socket this function owns, and a getsockopt into a u64 of the right size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _owned = OwnedFd::from_raw_fd(fd);
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

/// Writes the mode, then attaches (or takes over) every hook; with `Off`, detaches them.
pub fn attach(
    datapath: &mut LoadedDatapath,
    maps: &mut PinnedMaps,
    mode: SocketLbMode,
    root: &Path,
) -> anyhow::Result<()> {
    let config = SocketLbConfig {
        mode: mode.code(),
        _pad: 0,
        netns_cookie: own_netns_cookie().context("reading this network namespace's cookie")?,
    };
    maps.socket_config
        .set(0, config, 0)
        .context("writing dp_sockcfg_v1")?;
    if mode == SocketLbMode::Off {
        for link in detach_all(&datapath.layout) {
            info!(link, "socket hook detached (--socket-lb off)");
        }
        return Ok(());
    }
    let cgroup = std::fs::File::open(root)
        .with_context(|| format!("opening --cgroup-root {}", root.display()))?;
    let cgroup_id = cgroup_id(root)?;
    std::fs::create_dir_all(datapath.layout.cgroup_links_dir())?;
    for name in SOCKET_PROGRAMS {
        let pin = datapath.layout.cgroup_link(name);
        let how = attach_one(datapath, name, &pin, &cgroup, cgroup_id)
            .with_context(|| format!("attaching {name} at {}", root.display()))?;
        info!(program = name, cgroup = %root.display(), how, mode = ?mode, "socket hook attached");
    }
    Ok(())
}

fn attach_one(
    datapath: &mut LoadedDatapath,
    name: &str,
    pin: &Path,
    cgroup: &std::fs::File,
    cgroup_id: u64,
) -> anyhow::Result<&'static str> {
    if pin.exists() {
        match take_over(datapath, name, pin, cgroup_id) {
            Ok(()) => return Ok("replaced program in pinned link"),
            Err(e) => {
                // Another cgroup (a changed --cgroup-root), or a link gone defunct.
                info!(program = name, reason = %format!("{e:#}"), "pinned socket hook not reusable, attaching anew");
                let _ = aya::programs::links::PinnedLink::from_pin(pin).map(|l| l.unpin());
                std::fs::remove_file(pin).ok();
            }
        }
    }
    // aya's errors print their cause only in Debug form. `Single` means no flags: cgroup
    // links always coexist with other programs (the kernel refuses the multi flag on them).
    let debug = |e: aya::programs::ProgramError| anyhow::anyhow!("{e:?}");
    let link: FdLink = if name == PROG_SOCK_RELEASE {
        let program: &mut CgroupSock = program_mut(datapath, name)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(debug)?;
        program.take_link(id).map_err(debug)?.try_into()?
    } else {
        let program: &mut CgroupSockAddr = program_mut(datapath, name)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(debug)?;
        program.take_link(id).map_err(debug)?.try_into()?
    };
    link.pin(pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok("attached")
}

fn program_mut<'a, T>(datapath: &'a mut LoadedDatapath, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = datapath
        .ebpf
        .program_mut(name)
        .with_context(|| format!("the BPF object has no {name} program"))?;
    Ok(program.try_into()?)
}

/// Swaps the loaded program into the pinned link, if the link is attached at `cgroup_id`.
fn take_over(
    datapath: &mut LoadedDatapath,
    name: &str,
    pin: &Path,
    cgroup_id: u64,
) -> anyhow::Result<()> {
    let link = bpf_sys::obj_get(pin)?;
    let attached_at = bpf_sys::link_cgroup_id(link.as_fd())?;
    anyhow::ensure!(
        attached_at == cgroup_id,
        "attached at cgroup {attached_at}, not {cgroup_id}"
    );
    let program = datapath
        .ebpf
        .program(name)
        .with_context(|| format!("the BPF object has no {name} program"))?;
    let fd = program.fd()?;
    bpf_sys::link_update(link.as_fd(), fd.as_fd())?;
    Ok(())
}

/// A cgroup v2 directory's id: its inode number.
fn cgroup_id(root: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(root)
        .with_context(|| format!("reading {}", root.display()))?
        .ino())
}

/// Detaches every pinned socket hook (`cleanup`, and `--socket-lb off`).
pub fn detach_all(layout: &BpffsLayout) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(layout.cgroup_links_dir()) else {
        return removed;
    };
    for path in entries.flatten().map(|e| e.path()) {
        match aya::programs::links::PinnedLink::from_pin(&path).map(|l| l.unpin()) {
            // Dropping the last reference to the link detaches it.
            Ok(Ok(link)) => drop(link),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
        removed.push(path.display().to_string());
    }
    let _ = std::fs::remove_dir(layout.cgroup_links_dir());
    removed
}

/// Every endpoint (address, port) of each UDP frontend (address, port), in any condition.
pub type UdpEndpoints = BTreeMap<([u8; 4], u16), BTreeSet<([u8; 4], u16)>>;

/// The translations of UDP sockets to a backend that is no longer an endpoint (in any
/// condition) of the frontend they asked for. `endpoints` maps each UDP frontend to every
/// endpoint it still has.
pub fn stale_udp_translations(
    entries: impl IntoIterator<Item = (SockKey, SockEntry)>,
    endpoints: &UdpEndpoints,
) -> Vec<SockKey> {
    entries
        .into_iter()
        .filter(|(key, _)| key.proto == IPPROTO_UDP && key.kind == SOCK_REVERSE)
        .filter(|(key, entry)| {
            !endpoints
                .get(&(entry.addr, entry.port))
                .is_some_and(|set| set.contains(&(key.addr, key.port)))
        })
        .map(|(key, _)| key)
        .collect()
}

/// Ends `stale` translations: the connected sockets among them are terminated (in this
/// network namespace, and with `--socket-lb all` in every pod's); unconnected ones only lose
/// the translation (as kube-proxy flushes a gone endpoint's UDP conntrack entries), their
/// next datagram picks a current backend. Returns how many sockets were terminated.
pub fn end_stale_udp_translations(
    maps: &mut PinnedMaps,
    stale: &[SockKey],
    mode: SocketLbMode,
) -> usize {
    if stale.is_empty() {
        return 0;
    }
    let cookies: BTreeSet<u64> = stale.iter().map(|k| k.cookie).collect();
    let destroyed = match mode {
        SocketLbMode::All => sock_diag::destroy_udp_in_every_namespace(&cookies),
        _ => sock_diag::destroy_udp(&cookies),
    };
    let destroyed = destroyed.unwrap_or_else(|e| {
        warn!(error = %format!("{e:#}"), "cannot terminate UDP sockets whose backend left");
        BTreeSet::new()
    });
    for key in stale {
        let _ = maps.sockets.remove(key);
    }
    destroyed.len()
}

/// The few raw bpf(2) commands aya does not offer for cgroup links.
mod bpf_sys {
    use super::*;

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_UPDATE: libc::c_long = 29;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
        // SAFETY: `attr` is a zero-padded bpf_attr large enough for every command used here.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr),
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// Opens a pinned object.
    pub fn obj_get(pin: &Path) -> anyhow::Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
        let mut attr = [0u64; 16];
        attr[0] = path.as_ptr() as u64; // pathname
        let fd =
            bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {}", pin.display()))?;
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// The cgroup a cgroup link is attached at (bpf_link_info.cgroup.cgroup_id).
    pub fn link_cgroup_id(link: BorrowedFd<'_>) -> anyhow::Result<u64> {
        const BPF_LINK_TYPE_CGROUP: u32 = 3;
        let mut info = [0u64; 8];
        let mut attr = [0u64; 16];
        // bpf_fd (u32), info_len (u32), info (u64)
        attr[0] = link.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
        let link_type = info[0] as u32;
        anyhow::ensure!(
            link_type == BPF_LINK_TYPE_CGROUP,
            "not a cgroup link (type {link_type})"
        );
        // type, id, prog_id, then the 8-aligned union: cgroup { cgroup_id, attach_type }.
        Ok(info[2])
    }

    /// Replaces the program of a link, atomically.
    pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> anyhow::Result<()> {
        let mut attr = [0u64; 16];
        // link_fd (u32), new_prog_fd (u32), flags, old_prog_fd
        attr[0] = link.as_raw_fd() as u64 | ((program.as_raw_fd() as u64) << 32);
        bpf(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
        Ok(())
    }
}
