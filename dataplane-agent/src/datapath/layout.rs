//! Where the agent pins things under `--bpffs-dir`. Maps sit at the top (so that
//! `bpftool map dump pinned <dir>/<map>` works), the program beside them, links in `links/`.
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

    pub fn link(&self, interface: &str) -> PathBuf {
        self.links_dir().join(interface)
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
        std::fs::create_dir_all(self.links_dir())?;
        Ok(())
    }
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
