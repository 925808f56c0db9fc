//! Embeds the BPF object built by `cargo xtask build-ebpf`, and refuses to embed one that is
//! older than the sources it was built from (a stale datapath would be silently wrong).
use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("dataplane-ebpf.o");
    println!("cargo:rerun-if-env-changed=DATAPLANE_SKIP_EBPF");
    println!("cargo:rustc-env=DATAPLANE_EBPF_OBJECT={}", out.display());

    if std::env::var_os("DATAPLANE_SKIP_EBPF").is_some() {
        // `cargo check`/`clippy` without a BPF toolchain: the agent will refuse to load.
        std::fs::write(&out, b"").unwrap();
        return;
    }

    let sources = [
        root.join("dataplane-ebpf/src"),
        root.join("dataplane-ebpf/Cargo.toml"),
        root.join("dataplane-common/src"),
    ];
    let objects = ["release", "debug"].map(|profile| {
        root.join("target/ebpf/bpfel-unknown-none")
            .join(profile)
            .join("dataplane-ebpf")
    });
    for path in sources.iter().chain(objects.iter()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let newest_source = sources.iter().filter_map(|p| newest_mtime(p)).max();
    let Some((object, built)) = objects
        .iter()
        .filter_map(|p| Some((p, std::fs::metadata(p).ok()?.modified().ok()?)))
        .max_by_key(|(_, t)| *t)
    else {
        panic!(
            "the BPF object is missing: run `cargo xtask build-ebpf` first \
             (or set DATAPLANE_SKIP_EBPF=1 for a check-only build)"
        );
    };
    if newest_source.is_some_and(|s| s > built) {
        panic!(
            "{} is older than the BPF sources: run `cargo xtask build-ebpf` to rebuild it",
            object.display()
        );
    }
    std::fs::copy(object, &out).unwrap();
}
