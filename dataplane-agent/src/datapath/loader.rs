//! Loads the embedded BPF object with every map pinned by name under the bpffs directory
//! (reusing pins that exist, so a restarted or upgraded agent keeps conntrack and services),
//! and pins the programs so tools can find the live ones: the tc programs and the socket
//! hooks (`socket_lb`).
use anyhow::Context;
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSock, CgroupSockAddr, SchedClassifier},
};
use dataplane_common::{PROG_SOCK_RELEASE, PROGRAMS, SOCKET_PROGRAMS, map_names};

use super::{BpffsLayout, maps::check_pinned_layout};

/// The datapath object, built by `cargo xtask build-ebpf` and embedded at compile time.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("DATAPLANE_EBPF_OBJECT"));

pub struct LoadedDatapath {
    pub ebpf: Ebpf,
    pub layout: BpffsLayout,
    /// Conntrack maps of an earlier layout, copied at load and still pinned: their flows
    /// opened after the copy are moved by `finish_upgrade` (the keys copied already, which
    /// the new programs may have removed since, are not copied again).
    old_conntrack: Vec<(&'static str, OldKeys)>,
    /// The traffic counter maps were created by this load (no pins of an earlier run): every
    /// counter starts at zero, so ids handed out for the first time need no reset.
    pub fresh_counters: bool,
}

/// Keys of an old conntrack map (16 bytes in every earlier layout).
type OldKeys = std::collections::HashSet<[u8; 16]>;

/// Map capacities that differ from the object's defaults, by map name. They apply when a map
/// is created; a map already pinned keeps its size.
pub type MapSizes = std::collections::BTreeMap<String, u32>;

impl LoadedDatapath {
    pub fn load(layout: &BpffsLayout, sizes: &MapSizes) -> anyhow::Result<Self> {
        if BPF_OBJECT.is_empty() {
            anyhow::bail!("this binary was built with DATAPLANE_SKIP_EBPF and carries no datapath");
        }
        layout.create()?;
        for name in map_names::ALL {
            check_pinned_layout(layout, name)?;
        }
        let fresh_counters = [
            map_names::SERVICE_STATS,
            map_names::BACKEND_STATS,
            map_names::SOCKET_SERVICE_STATS,
            map_names::SOCKET_BACKEND_STATS,
        ]
        .iter()
        .all(|name| !layout.map(name).exists());
        let mut loader = EbpfLoader::new();
        let pins: Vec<_> = map_names::ALL
            .iter()
            .map(|name| (*name, layout.map(name)))
            .collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, entries) in sizes {
            anyhow::ensure!(
                map_names::ALL.contains(&name.as_str()),
                "--map-size names an unknown map {name:?} (maps: {})",
                map_names::ALL.join(", ")
            );
            loader.map_max_entries(name, *entries);
        }
        let mut ebpf = loader.load(BPF_OBJECT).context("loading the BPF object")?;
        for name in map_names::ALL {
            anyhow::ensure!(ebpf.map(name).is_some(), "the BPF object has no map {name}");
        }
        let old_conntrack = migrate_old_conntrack(layout)?;
        for name in map_names::RETIRED {
            let _ = std::fs::remove_file(layout.map(name));
        }
        for name in PROGRAMS.into_iter().chain(SOCKET_PROGRAMS) {
            let program = ebpf
                .program_mut(name)
                .with_context(|| format!("the BPF object has no {name} program"))?;
            let loaded = if PROGRAMS.contains(&name) {
                <&mut SchedClassifier>::try_from(program)?.load()
            } else if name == PROG_SOCK_RELEASE {
                <&mut CgroupSock>::try_from(program)?.load()
            } else {
                <&mut CgroupSockAddr>::try_from(program)?.load()
            };
            loaded.with_context(|| format!("the kernel rejected the {name} program"))?;
            // Replace the pin of a previous run: the pin always names the program links run.
            let program = ebpf.program_mut(name).expect("found above");
            let _ = std::fs::remove_file(layout.program(name));
            program
                .pin(layout.program(name))
                .with_context(|| format!("pinning {name}"))?;
        }
        Ok(Self {
            ebpf,
            layout: layout.clone(),
            old_conntrack,
            fresh_counters,
        })
    }

    /// After the new programs took over every link: the flows the old programs opened in
    /// an earlier conntrack layout since the copy at load move too, and the old maps are
    /// unpinned. (Without this, a connection whose SYN the old program translated in that
    /// moment would lose its SYN-ACK's translation.)
    pub fn finish_upgrade(&mut self) -> anyhow::Result<()> {
        for (name, copied) in std::mem::take(&mut self.old_conntrack) {
            let (moved, failed) = copy_old_conntrack(&self.layout, name, Some(&copied))?.1;
            let path = self.layout.map(name);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            tracing::info!(
                moved,
                failed,
                from = name,
                "conntrack: flows opened during the upgrade moved; old table removed"
            );
        }
        Ok(())
    }

    /// One of `dataplane_common::PROGRAMS`.
    pub fn program(&mut self, name: &str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load")
    }
}

/// An upgrade from an agent with an earlier conntrack layout: its flows move into the
/// current tables (by protocol; TCP into the hash, or its overflow should the hash be full)
/// before the new programs take over the links, so open connections keep their backends.
/// `dp_ct_tcp_v3` held TCP flows in an LRU hash (same key and value; `dp_ct_any_v3` is still
/// current); `dp_ct_v2` held every protocol in one table; `dp_ct_v1`'s keys also carried a
/// direction byte (1 = reply) at offset 13. The old maps stay pinned until
/// `LoadedDatapath::finish_upgrade`, which moves what the old programs opened meanwhile.
/// Returns the old maps found, with the keys copied from each.
fn migrate_old_conntrack(layout: &BpffsLayout) -> anyhow::Result<Vec<(&'static str, OldKeys)>> {
    let mut found = Vec::new();
    for name in [
        map_names::CONNTRACK_V1,
        map_names::CONNTRACK_V2,
        map_names::CONNTRACK_TCP_V3,
    ] {
        if !layout.map(name).exists() {
            continue;
        }
        let (copied, (moved, failed)) = copy_old_conntrack(layout, name, None)?;
        tracing::info!(
            moved,
            failed,
            from = name,
            "conntrack moved to the current tables"
        );
        found.push((name, copied));
    }
    Ok(found)
}

/// Copies the flows of the old conntrack map `name` into the current tables, except the
/// keys in `skip`. Returns the keys read, and how many entries moved and failed.
fn copy_old_conntrack(
    layout: &BpffsLayout,
    name: &'static str,
    skip: Option<&OldKeys>,
) -> anyhow::Result<(OldKeys, (usize, usize))> {
    use aya::maps::{HashMap, MapData};
    use dataplane_common::{CT_FLAG_REPLY, CtEntry, CtKey};
    type OldKey = [u8; 16];
    const DIRECTION_OFFSET: usize = 13;
    let has_direction = name == map_names::CONNTRACK_V1;

    let path = layout.map(name);
    let old = MapData::from_pin(&path)
        .and_then(aya::maps::Map::from_map_data)
        .with_context(|| format!("opening {name}"))?;
    let old: HashMap<MapData, OldKey, CtEntry> =
        HashMap::try_from(old).with_context(|| format!("{name} does not have its layout"))?;
    let mut current = super::maps::Conntrack::open(layout)?;
    let mut read = OldKeys::new();
    let (mut moved, mut failed) = (0usize, 0usize);
    for entry in old.iter() {
        let Ok((old_key, value)) = entry else {
            failed += 1;
            continue;
        };
        read.insert(old_key);
        if skip.is_some_and(|skip| skip.contains(&old_key)) {
            continue;
        }
        let (mut key_bytes, mut value) = (old_key, value);
        if has_direction {
            if key_bytes[DIRECTION_OFFSET] == 1 {
                value.flags |= CT_FLAG_REPLY;
            }
            key_bytes[DIRECTION_OFFSET] = 0;
        }
        let key: CtKey = bytemuck::pod_read_unaligned(&key_bytes);
        // After the load, never over a flow the new programs track already.
        let flags = if skip.is_some() { 1 } else { 0 };
        match current.insert(key, value, flags) {
            Ok(()) => moved += 1,
            Err(_) if skip.is_some() => {}
            Err(_) => failed += 1,
        }
    }
    Ok((read, (moved, failed)))
}
