//! `cargo xtask setup`: installs what the build and the tests need and is missing. Each step
//! says what it checks and what it does; nothing is done twice.
use std::{path::Path, process::Command};

use crate::{build::BpfToolchain, run};

/// Debian packages for the tests and the demo (clients, servers, network tools).
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "curl",
    "socat",
    "python3",
    "iperf3",
    "iptables",
    "nftables",
    // sysctl, for the nodes' settings (reverse-path filtering, forwarding).
    "procps",
    "util-linux",
    "graphviz",
];
/// Debian's compiler with its library source (for `-Z build-std=core`), used when no rustup
/// nightly with rust-src exists; and LLVM 22 to build bpf-linker against.
const DEBIAN_RUST_PACKAGES: &[&str] = &["rustc-web", "rust-web-src", "cargo-web"];
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];

use testbed::is_root;

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

pub fn setup() -> anyhow::Result<()> {
    eprintln!("setup: checking packages, BPF toolchain, bpf-linker and bpffs");
    let nightly = BpfToolchain::rustup_nightly_with_src();
    let mut wanted: Vec<&str> = TEST_PACKAGES.iter().chain(LLVM_PACKAGES).copied().collect();
    if !nightly {
        wanted.extend(DEBIAN_RUST_PACKAGES);
    }
    let missing: Vec<&str> = wanted.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("setup: packages: all present");
    } else if is_root() && Path::new("/usr/bin/apt-get").exists() {
        eprintln!("setup: packages: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
    } else {
        anyhow::bail!(
            "missing packages; install them with:\n  sudo apt-get update && sudo apt-get install -y {}",
            missing.join(" ")
        );
    }

    if nightly {
        eprintln!("setup: BPF compiler: rustup nightly with rust-src");
    } else {
        BpfToolchain::link_debian_rust()?;
        eprintln!("setup: BPF compiler: Debian rustc-web (toolchain `debian-rust`)");
    }

    if succeeds(Command::new("bpf-linker").arg("--version")) {
        eprintln!("setup: bpf-linker: present");
    } else {
        eprintln!("setup: bpf-linker: building against LLVM 22 (about 75 s)");
        run(Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker", "--no-default-features", "--features", "llvm-22"]))
        .map_err(|e| {
            e.context("building bpf-linker; run: LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22")
        })?;
    }

    ensure_bpffs()?;
    eprintln!("setup: done");
    Ok(())
}

fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        eprintln!("setup: bpffs: mounted at /sys/fs/bpf");
        return Ok(());
    }
    if !is_root() {
        eprintln!("setup: bpffs: not mounted; as root run: mount -t bpf bpf /sys/fs/bpf");
        return Ok(());
    }
    eprintln!("setup: bpffs: mounting at /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
