//! Everything the bench creates is removed by `Drop` on the normal path. This registry is the
//! second line: if the bench is interrupted (SIGINT, SIGTERM, SIGHUP), a signal thread stops
//! every registered process and removes every registered namespace, pin directory and work
//! directory before exiting.
use std::{
    path::PathBuf,
    process::Command,
    sync::{Mutex, OnceLock},
};

#[derive(Default)]
struct Registry {
    pids: Vec<u32>,
    namespaces: Vec<String>,
    /// Agent bpffs directories: `dataplane-agent cleanup` (links), then removed.
    agent_dirs: Vec<(PathBuf, PathBuf)>,
    /// Directories removed recursively (pin directories on bpffs, work directories).
    dirs: Vec<PathBuf>,
    /// Directories kept for the whole run (the private binaries), removed at exit only.
    exit_dirs: Vec<PathBuf>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn with<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut guard = registry().lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

pub fn pid(pid: u32) {
    with(|r| r.pids.push(pid));
}

pub fn forget_pid(pid: u32) {
    with(|r| r.pids.retain(|p| *p != pid));
}

pub fn namespace(name: &str) {
    with(|r| r.namespaces.push(name.to_string()));
}

pub fn agent_dir(binary: PathBuf, bpffs_dir: PathBuf) {
    with(|r| r.agent_dirs.push((binary, bpffs_dir)));
}

pub fn dir(path: PathBuf) {
    with(|r| r.dirs.push(path));
}

pub fn exit_dir(path: PathBuf) {
    with(|r| r.exit_dirs.push(path));
}

/// Removes whatever is still registered, except the exit directories (idempotent:
/// already-removed things are skipped).
pub fn teardown() {
    let registry = with(|r| {
        let exit_dirs = std::mem::take(&mut r.exit_dirs);
        let taken = std::mem::take(r);
        r.exit_dirs = exit_dirs;
        taken
    });
    for pid in &registry.pids {
        // SAFETY: signalling processes this bench started.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    for (binary, dir) in &registry.agent_dirs {
        if dir.exists() {
            let _ = Command::new(binary)
                .arg("cleanup")
                .arg("--bpffs-dir")
                .arg(dir)
                .output();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    for dir in &registry.dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    for ns in &registry.namespaces {
        if std::path::Path::new("/run/netns").join(ns).exists() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// `teardown`, then the exit directories too.
pub fn teardown_all() {
    teardown();
    for dir in with(|r| std::mem::take(&mut r.exit_dirs)) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (call before any other thread starts, so every
/// thread inherits the mask) and handles them in a dedicated thread: teardown, then exit.
/// Child processes do not inherit the mask: std resets it before exec.
pub fn install_signal_thread() {
    // SAFETY: plain libc signal-set manipulation on local storage.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            libc::sigwait(&set, &mut sig);
            eprintln!("\nbench: signal {sig}: removing namespaces, pins and processes");
            teardown_all();
            std::process::exit(128 + sig);
        });
    }
}
