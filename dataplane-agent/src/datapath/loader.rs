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
    /// The traffic counter maps were created by this load (no pins of an earlier run): every
    /// counter starts at zero, so ids handed out for the first time need no reset.
    pub fresh_counters: bool,
}

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
        migrate_old_conntrack(layout, &mut ebpf)?;
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
            fresh_counters,
        })
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
/// current tables (by protocol) before the new programs take over the links, so open
/// connections keep their backends; the old map is then unpinned. `dp_ct_v2` held every
/// protocol in one table; `dp_ct_v1`'s keys also carried a direction byte (1 = reply) at
/// offset 13. Flows the old program opens in the moment between this copy and the swap start
/// anew.
fn migrate_old_conntrack(layout: &BpffsLayout, ebpf: &mut Ebpf) -> anyhow::Result<()> {
    use aya::maps::{HashMap, MapData};
    use dataplane_common::{CT_FLAG_REPLY, CtEntry, CtKey, IPPROTO_TCP};
    type OldKey = [u8; 16];
    const DIRECTION_OFFSET: usize = 13;

    for (name, has_direction) in [
        (map_names::CONNTRACK_V1, true),
        (map_names::CONNTRACK_V2, false),
    ] {
        let path = layout.map(name);
        if !path.exists() {
            continue;
        }
        let old = MapData::from_pin(&path)
            .and_then(aya::maps::Map::from_map_data)
            .with_context(|| format!("opening {name}"))?;
        let old: HashMap<MapData, OldKey, CtEntry> =
            HashMap::try_from(old).with_context(|| format!("{name} does not have its layout"))?;
        let entries: Vec<_> = old.iter().collect();
        let (mut moved, mut failed) = (0usize, 0usize);
        for table in [map_names::CONNTRACK_TCP, map_names::CONNTRACK_ANY] {
            let mut new: HashMap<&mut MapData, CtKey, CtEntry> =
                HashMap::try_from(ebpf.map_mut(table).expect("checked at load"))?;
            for entry in &entries {
                let Ok((old_key, value)) = entry else {
                    if table == map_names::CONNTRACK_TCP {
                        failed += 1; // counted once, not per table
                    }
                    continue;
                };
                let (mut key_bytes, mut value) = (*old_key, *value);
                if has_direction {
                    if key_bytes[DIRECTION_OFFSET] == 1 {
                        value.flags |= CT_FLAG_REPLY;
                    }
                    key_bytes[DIRECTION_OFFSET] = 0;
                }
                let key: CtKey = bytemuck::pod_read_unaligned(&key_bytes);
                if (key.proto == IPPROTO_TCP) != (table == map_names::CONNTRACK_TCP) {
                    continue;
                }
                match new.insert(key, value, 0) {
                    Ok(()) => moved += 1,
                    Err(_) => failed += 1,
                }
            }
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        tracing::info!(
            moved,
            failed,
            from = name,
            "conntrack moved to the current tables"
        );
    }
    Ok(())
}
