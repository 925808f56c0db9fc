//! Building the BPF object. Two toolchains work: a rustup nightly with rust-src (the usual aya
//! route, preferred), or Debian's rustc-web with its library source, accepted as nightly
//! through RUSTC_BOOTSTRAP (the route on machines whose rustup has no rust-src).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{run, workspace_root};

pub enum BpfToolchain {
    RustupNightly,
    DebianRust,
}

const DEBIAN_SYSROOT_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";

impl BpfToolchain {
    pub fn rustup_nightly_with_src() -> bool {
        let Ok(out) = Command::new("rustup")
            .args(["run", "nightly", "rustc", "--print", "sysroot"])
            .output()
        else {
            return false;
        };
        let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
        out.status.success()
            && Path::new(&sysroot)
                .join("lib/rustlib/src/rust/library/core")
                .exists()
    }

    /// Gives Debian's /usr/bin/{rustc,cargo} a rustup name, so `cargo +debian-rust` works.
    pub fn link_debian_rust() -> anyhow::Result<()> {
        anyhow::ensure!(
            Path::new(DEBIAN_SYSROOT_SRC).exists(),
            "Debian's rust library source is missing: apt-get install rustc-web rust-web-src cargo-web"
        );
        let linked = Command::new("rustup")
            .args(["run", "debian-rust", "rustc", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !linked {
            run(Command::new("rustup").args(["toolchain", "link", "debian-rust", "/usr"]))?;
        }
        Ok(())
    }

    pub fn detect() -> anyhow::Result<Self> {
        if Self::rustup_nightly_with_src() {
            return Ok(Self::RustupNightly);
        }
        if Path::new(DEBIAN_SYSROOT_SRC).exists() {
            Self::link_debian_rust()?;
            return Ok(Self::DebianRust);
        }
        anyhow::bail!(
            "no compiler can build for bpfel-unknown-none here. Either\n  \
             rustup toolchain install nightly --component rust-src\nor (Debian)\n  \
             apt-get install rustc-web rust-web-src cargo-web\nor simply run `cargo xtask setup`"
        )
    }
}

/// Builds `dataplane-ebpf` and returns the object's path.
pub fn build_ebpf(release: bool) -> anyhow::Result<PathBuf> {
    let toolchain = BpfToolchain::detect()?;
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("dataplane-ebpf"));
    match toolchain {
        BpfToolchain::RustupNightly => {
            cmd.arg("+nightly");
        }
        BpfToolchain::DebianRust => {
            cmd.arg("+debian-rust").env("RUSTC_BOOTSTRAP", "1");
        }
    }
    // The rustup proxy sets these for the xtask's own toolchain; the inner cargo must choose.
    cmd.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    cmd.args([
        "build",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--target-dir",
    ])
    .arg(&target_dir)
    // BTF for the maps (bpftool prints named fields) needs full debug info.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\u{1f}"),
    );
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    let object = target_dir
        .join("bpfel-unknown-none")
        .join(profile)
        .join("dataplane-ebpf");
    anyhow::ensure!(
        object.exists(),
        "the build produced no {}",
        object.display()
    );
    eprintln!("build-ebpf: {}", object.display());
    Ok(object)
}
