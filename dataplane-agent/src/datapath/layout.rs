//! Where the agent pins things under `--bpffs-dir`. Maps sit at the top (so that
//! `bpftool map dump pinned <dir>/<map>` works), the programs beside them, ingress links in
//! `links/`, egress links in `links/egress/`, one pin per interface; the socket hooks' links
//! in `links/cgroup/`, one per program.
use std::path::{Path, PathBuf};

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/dataplane";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Clone, Debug)]
pub struct BpffsLayout {
    dir: PathBuf,
}

impl BpffsLayout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    /// The pin of an interface's ingress link.
    pub fn link(&self, interface: &str) -> PathBuf {
        self.links_dir().join(pin_name(interface))
    }

    pub fn egress_links_dir(&self) -> PathBuf {
        self.links_dir().join("egress")
    }

    /// The pin of an interface's egress link.
    pub fn egress_link(&self, interface: &str) -> PathBuf {
        self.egress_links_dir().join(pin_name(interface))
    }

    /// Links of the socket-level hooks at the cgroup root, one per program.
    pub fn cgroup_links_dir(&self) -> PathBuf {
        self.links_dir().join("cgroup")
    }

    pub fn cgroup_link(&self, program: &str) -> PathBuf {
        self.cgroup_links_dir().join(program)
    }

    /// Creates the directories, after checking they live on a bpf filesystem (pins anywhere
    /// else fail with an obscure error).
    pub fn create(&self) -> anyhow::Result<()> {
        let parent = self
            .dir
            .ancestors()
            .skip(1)
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(parent) {
            anyhow::bail!(
                "{} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` \
                 or choose --bpffs-dir under a bpffs mount",
                self.dir.display()
            );
        }
        std::fs::create_dir_all(self.egress_links_dir())?;
        Ok(())
    }
}

/// This agent's hold on a bpffs directory (an exclusive `flock` on it), released when the
/// process exits, however it exits.
pub struct DirLock(#[allow(dead_code)] std::fs::File);

impl BpffsLayout {
    /// Takes the directory for this process: one agent per `--bpffs-dir`. Two would fight over
    /// every map and link; the second fails here, before it touches any of them.
    pub fn lock(&self) -> anyhow::Result<DirLock> {
        use std::os::fd::AsRawFd;
        self.create()?;
        let dir = std::fs::File::open(&self.dir)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            anyhow::ensure!(
                error.kind() != std::io::ErrorKind::WouldBlock,
                "another dataplane-agent holds --bpffs-dir {}: one agent per directory \
                 (stop it first, or give this one a directory of its own)",
                self.dir.display()
            );
            return Err(anyhow::Error::new(error)
                .context(format!("locking --bpffs-dir {}", self.dir.display())));
        }
        Ok(DirLock(dir))
    }
}

/// bpffs refuses names with a dot ("reserved for future extensions"), and overlay devices
/// have them (`vxlan.calico`, `flannel.1`): a dot is pinned as `:`, which no interface name
/// may contain.
fn pin_name(interface: &str) -> String {
    interface.replace('.', ":")
}

/// The interface a link pin is named after (`pin_name` undone).
pub fn interface_of_pin(pin: &str) -> String {
    pin.replace(':', ".")
}

pub fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and an out-parameter of the right type.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}
