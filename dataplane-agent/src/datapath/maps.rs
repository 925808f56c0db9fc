//! Typed handles on the pinned maps, for the agent and for the inspection commands (which
//! work while the agent is stopped: everything they show is read from these pins).
use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
};
use dataplane_common::{
    AffinityKey, AffinityKey6, AffinityKeyOf, AffinityValue, Backend, Backend6, BackendOf, CtEntry,
    CtEntry6, CtEntryOf, CtKey, CtKey6, CtKeyOf, DatapathConfig, DatapathConfig6, FragmentKey,
    FragmentKey6, FragmentPorts, FrontendName, HostFlowKey, HostFlowKey6, Ipv4, Ipv6, MaglevTable,
    ServiceKey, ServiceKey6, ServiceKeyOf, ServiceValue, SockEntry, SockEntry6, SockKey, SockKey6,
    SocketLbConfig, SourceRangeKey, SourceRangeKey6, SourceRangeKeyOf, TrafficStats, map_names,
};

use super::{BpffsLayout, family::Family};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is not pinned at {path} (is the agent running with this --bpffs-dir?)")]
    Missing { name: &'static str, path: String },
    #[error(
        "map {name} at {path} has key/value sizes {found:?}, this build expects {expected:?}; \
             run `dataplane-agent cleanup` to remove the old layout"
    )]
    Layout {
        name: &'static str,
        path: String,
        found: (u32, u32),
        expected: (u32, u32),
    },
    #[error("map {name}: {source}")]
    Aya {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

pub struct PinnedMaps {
    /// The maps whose keys or values hold IPv4 addresses...
    pub v4: FamilyMaps<Ipv4>,
    /// ...and their IPv6 peers. Everything below serves both (ids are one space).
    pub v6: FamilyMaps<Ipv6>,
    pub service_stats: PerCpuArray<MapData, TrafficStats>,
    pub backend_stats: PerCpuArray<MapData, TrafficStats>,
    pub drops: Array<MapData, u64>,
    pub maglev: HashMap<MapData, u32, MaglevTable>,
    pub config: Array<MapData, DatapathConfig>,
    pub config6: Array<MapData, DatapathConfig6>,
    pub names: HashMap<MapData, u32, FrontendName>,
    /// Socket-level load balancing: translated sockets, which sockets, and connections
    /// translated per frontend id and per backend id.
    pub sockets: HashMap<MapData, SockKey, SockEntry>,
    pub socket_config: Array<MapData, SocketLbConfig>,
    pub socket_service_stats: PerCpuArray<MapData, u64>,
    pub socket_backend_stats: PerCpuArray<MapData, u64>,
    /// `max_entries` of each map, by name.
    pub capacities: std::collections::BTreeMap<&'static str, u32>,
}

/// Key and value sizes of each map, as this build lays them out.
pub fn expected_sizes(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let sizes = match name {
        map_names::SERVICES => (size_of::<ServiceKey>(), size_of::<ServiceValue>()),
        map_names::BACKENDS => (4, size_of::<Backend>()),
        map_names::CONNTRACK_TCP | map_names::CONNTRACK_TCP_OVERFLOW | map_names::CONNTRACK_ANY => {
            (size_of::<CtKey>(), size_of::<CtEntry>())
        }
        map_names::CONNTRACK_OVERFLOW_IN_USE => (4, 4),
        map_names::SERVICE_STATS | map_names::BACKEND_STATS => (4, size_of::<TrafficStats>()),
        map_names::DROPS => (4, 8),
        map_names::AFFINITY => (size_of::<AffinityKey>(), size_of::<AffinityValue>()),
        // The trie's key is its prefix length (u32) and the data.
        map_names::SOURCE_RANGES => (4 + size_of::<SourceRangeKey>(), 1),
        map_names::MAGLEV => (4, size_of::<MaglevTable>()),
        map_names::CONFIG => (4, size_of::<DatapathConfig>()),
        map_names::NAMES => (4, size_of::<FrontendName>()),
        map_names::FRAGMENTS => (size_of::<FragmentKey>(), size_of::<FragmentPorts>()),
        map_names::HOST_FLOWS => (size_of::<HostFlowKey>(), 8),
        map_names::SOCKETS => (size_of::<SockKey>(), size_of::<SockEntry>()),
        map_names::SOCKET_CONFIG => (4, size_of::<SocketLbConfig>()),
        map_names::SOCKET_SERVICE_STATS | map_names::SOCKET_BACKEND_STATS => (4, 8),
        map_names::POD_INTERFACES => (4, 4),
        map_names::SERVICES6 => (size_of::<ServiceKey6>(), size_of::<ServiceValue>()),
        map_names::BACKENDS6 => (4, size_of::<Backend6>()),
        map_names::CONNTRACK6_TCP
        | map_names::CONNTRACK6_TCP_OVERFLOW
        | map_names::CONNTRACK6_ANY => (size_of::<CtKey6>(), size_of::<CtEntry6>()),
        map_names::CONNTRACK6_OVERFLOW_IN_USE => (4, 4),
        map_names::AFFINITY6 => (size_of::<AffinityKey6>(), size_of::<AffinityValue>()),
        map_names::SOURCE_RANGES6 => (4 + size_of::<SourceRangeKey6>(), 1),
        map_names::CONFIG6 => (4, size_of::<DatapathConfig6>()),
        map_names::FRAGMENTS6 => (size_of::<FragmentKey6>(), size_of::<FragmentPorts>()),
        map_names::HOST_FLOWS6 => (size_of::<HostFlowKey6>(), 8),
        map_names::SOCKETS6 => (size_of::<SockKey6>(), size_of::<SockEntry6>()),
        _ => return None,
    };
    Some((sizes.0 as u32, sizes.1 as u32))
}

/// Checks that an existing pin has this build's layout; returns its capacity, or `None` when
/// nothing is pinned.
pub fn check_pinned_layout(
    layout: &BpffsLayout,
    name: &'static str,
) -> Result<Option<u32>, MapsError> {
    let path = layout.map(name);
    if !path.exists() {
        return Ok(None);
    }
    let aya_err = |source| MapsError::Aya { name, source };
    let info = MapData::from_pin(&path)
        .and_then(|m| m.info())
        .map_err(aya_err)?;
    let found = (info.key_size(), info.value_size());
    let expected = expected_sizes(name).expect("every map name has sizes");
    if found != expected {
        return Err(MapsError::Layout {
            name,
            path: path.display().to_string(),
            found,
            expected,
        });
    }
    Ok(Some(info.max_entries()))
}

fn open(
    layout: &BpffsLayout,
    name: &'static str,
    capacities: &mut std::collections::BTreeMap<&'static str, u32>,
) -> Result<Map, MapsError> {
    let path = layout.map(name);
    let Some(capacity) = check_pinned_layout(layout, name)? else {
        return Err(MapsError::Missing {
            name,
            path: path.display().to_string(),
        });
    };
    capacities.insert(name, capacity);
    MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .map_err(|source| MapsError::Aya { name, source })
}

/// The map pinned as `name`, as its typed handle; its capacity goes into `capacities`.
fn typed<T>(
    layout: &BpffsLayout,
    name: &'static str,
    capacities: &mut std::collections::BTreeMap<&'static str, u32>,
) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(open(layout, name, capacities)?).map_err(|source| MapsError::Aya { name, source })
}

/// One family's maps: those whose keys or values hold its addresses.
pub struct FamilyMaps<A: Family>
where
    BackendOf<A>: Pod,
{
    pub services: HashMap<MapData, ServiceKeyOf<A>, ServiceValue>,
    /// Indexed by backend id; unused ids hold zeroes (an id is in use in one family's array).
    pub backends: Array<MapData, BackendOf<A>>,
    pub conntrack: Conntrack<A>,
    pub affinity: HashMap<MapData, AffinityKeyOf<A>, AffinityValue>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKeyOf<A>, u8>,
}

/// The names of one family's maps.
pub struct FamilyMapNames {
    pub services: &'static str,
    pub backends: &'static str,
    pub conntrack_tcp: &'static str,
    pub conntrack_tcp_overflow: &'static str,
    pub conntrack_overflow_in_use: &'static str,
    pub conntrack_any: &'static str,
    pub affinity: &'static str,
    pub source_ranges: &'static str,
}

pub const MAP_NAMES_V4: FamilyMapNames = FamilyMapNames {
    services: map_names::SERVICES,
    backends: map_names::BACKENDS,
    conntrack_tcp: map_names::CONNTRACK_TCP,
    conntrack_tcp_overflow: map_names::CONNTRACK_TCP_OVERFLOW,
    conntrack_overflow_in_use: map_names::CONNTRACK_OVERFLOW_IN_USE,
    conntrack_any: map_names::CONNTRACK_ANY,
    affinity: map_names::AFFINITY,
    source_ranges: map_names::SOURCE_RANGES,
};

pub const MAP_NAMES_V6: FamilyMapNames = FamilyMapNames {
    services: map_names::SERVICES6,
    backends: map_names::BACKENDS6,
    conntrack_tcp: map_names::CONNTRACK6_TCP,
    conntrack_tcp_overflow: map_names::CONNTRACK6_TCP_OVERFLOW,
    conntrack_overflow_in_use: map_names::CONNTRACK6_OVERFLOW_IN_USE,
    conntrack_any: map_names::CONNTRACK6_ANY,
    affinity: map_names::AFFINITY6,
    source_ranges: map_names::SOURCE_RANGES6,
};

impl<A: Family> FamilyMaps<A>
where
    ServiceKeyOf<A>: Pod,
    BackendOf<A>: Pod,
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
    AffinityKeyOf<A>: Pod,
    SourceRangeKeyOf<A>: Pod,
{
    fn open(
        layout: &BpffsLayout,
        capacities: &mut std::collections::BTreeMap<&'static str, u32>,
    ) -> Result<Self, MapsError> {
        let names = A::MAP_NAMES;
        Ok(Self {
            services: typed(layout, names.services, capacities)?,
            backends: typed(layout, names.backends, capacities)?,
            conntrack: Conntrack::open_recording(layout, capacities)?,
            affinity: typed(layout, names.affinity, capacities)?,
            source_ranges: typed(layout, names.source_ranges, capacities)?,
        })
    }

    /// What the agent programmed in this family's maps (for `translate`'s decoders).
    fn read_into(
        &self,
        out: &mut super::translate::FamilyContents<A>,
    ) -> Result<(), aya::maps::MapError> {
        out.backends = backends_in_use(&self.backends).into_iter().collect();
        for entry in self.services.iter() {
            let (key, value) = entry?;
            out.services.insert(key, value);
        }
        for key in self.source_ranges.keys() {
            let key = key?;
            out.source_ranges.insert((key.prefix_len(), key.data()));
        }
        Ok(())
    }
}

impl<A: Family> Conntrack<A>
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    /// The pinned conntrack tables alone (the loader's migration, before the rest is read).
    pub fn open(layout: &BpffsLayout) -> Result<Self, MapsError> {
        Self::open_recording(layout, &mut std::collections::BTreeMap::new())
    }

    fn open_recording(
        layout: &BpffsLayout,
        capacities: &mut std::collections::BTreeMap<&'static str, u32>,
    ) -> Result<Self, MapsError> {
        let names = A::MAP_NAMES;
        Ok(Self {
            tcp: typed(layout, names.conntrack_tcp, capacities)?,
            tcp_overflow: typed(layout, names.conntrack_tcp_overflow, capacities)?,
            overflow_in_use: typed(layout, names.conntrack_overflow_in_use, capacities)?,
            any: typed(layout, names.conntrack_any, capacities)?,
        })
    }
}

impl PinnedMaps {
    /// Exclusive upper bounds for (backend ids, frontend ids): ids index the stats arrays and
    /// both families' backend arrays.
    pub fn id_limits(&self) -> (u32, u32) {
        let max = |name: &str| self.capacities.get(name).copied().unwrap_or(0);
        (
            max(map_names::BACKEND_STATS)
                .min(max(map_names::BACKENDS))
                .min(max(map_names::BACKENDS6))
                .min(max(map_names::SOCKET_BACKEND_STATS)),
            max(map_names::SERVICE_STATS).min(max(map_names::SOCKET_SERVICE_STATS)),
        )
    }

    pub fn open(layout: &BpffsLayout) -> Result<Self, MapsError> {
        let mut capacities = std::collections::BTreeMap::new();
        let c = &mut capacities;
        Ok(Self {
            v4: FamilyMaps::open(layout, c)?,
            v6: FamilyMaps::open(layout, c)?,
            service_stats: typed(layout, map_names::SERVICE_STATS, c)?,
            backend_stats: typed(layout, map_names::BACKEND_STATS, c)?,
            drops: typed(layout, map_names::DROPS, c)?,
            maglev: typed(layout, map_names::MAGLEV, c)?,
            config: typed(layout, map_names::CONFIG, c)?,
            config6: typed(layout, map_names::CONFIG6, c)?,
            names: typed(layout, map_names::NAMES, c)?,
            sockets: typed(layout, map_names::SOCKETS, c)?,
            socket_config: typed(layout, map_names::SOCKET_CONFIG, c)?,
            socket_service_stats: typed(layout, map_names::SOCKET_SERVICE_STATS, c)?,
            socket_backend_stats: typed(layout, map_names::SOCKET_BACKEND_STATS, c)?,
            capacities,
        })
    }
}

/// Conntrack as one map, as the datapath sees it: each key goes to the table of its protocol
/// (TCP: the hash, or its overflow while the hash is full; any other), iteration walks all
/// three.
pub struct Conntrack<A: Family = Ipv4> {
    pub tcp: HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
    pub tcp_overflow: HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
    /// Index 0: non-zero while the overflow may hold flows (the datapath then looks there
    /// when the hash misses).
    pub overflow_in_use: Array<MapData, u32>,
    pub any: HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
}

/// Which of the conntrack tables an entry is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CtTable {
    Tcp,
    TcpOverflow,
    Any,
}

const E2BIG: i32 = 7;

fn is_full(error: &aya::maps::MapError) -> bool {
    matches!(error, aya::maps::MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(E2BIG))
}

impl<A: Family> Conntrack<A>
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    fn map(&self, table: CtTable) -> &HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>> {
        match table {
            CtTable::Tcp => &self.tcp,
            CtTable::TcpOverflow => &self.tcp_overflow,
            CtTable::Any => &self.any,
        }
    }

    fn map_mut(&mut self, table: CtTable) -> &mut HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>> {
        match table {
            CtTable::Tcp => &mut self.tcp,
            CtTable::TcpOverflow => &mut self.tcp_overflow,
            CtTable::Any => &mut self.any,
        }
    }

    pub fn overflow_in_use(&self) -> bool {
        self.overflow_in_use.get(&0, 0).is_ok_and(|flag| flag != 0)
    }

    fn set_overflow_in_use(&mut self, in_use: bool) -> Result<(), aya::maps::MapError> {
        self.overflow_in_use.set(0, u32::from(in_use), 0)
    }

    /// The entry under `key`, and the table it is in.
    pub fn get_in(&self, key: &CtKeyOf<A>) -> Option<(CtTable, CtEntryOf<A>)> {
        if key.proto != dataplane_common::IPPROTO_TCP {
            return self.any.get(key, 0).ok().map(|e| (CtTable::Any, e));
        }
        // The overflow without looking at the flag: the agent also reads while the flag is
        // being cleared.
        [CtTable::Tcp, CtTable::TcpOverflow]
            .into_iter()
            .find_map(|table| self.map(table).get(key, 0).ok().map(|e| (table, e)))
    }

    pub fn get(&self, key: &CtKeyOf<A>, _flags: u64) -> Result<CtEntryOf<A>, aya::maps::MapError> {
        self.get_in(key)
            .map(|(_, entry)| entry)
            .ok_or(aya::maps::MapError::KeyNotFound)
    }

    /// As the datapath inserts: a TCP flow goes to the hash, or to the overflow (which is
    /// then marked in use) when the hash is full.
    pub fn insert(
        &mut self,
        key: CtKeyOf<A>,
        value: CtEntryOf<A>,
        flags: u64,
    ) -> Result<(), aya::maps::MapError> {
        const BPF_NOEXIST: u64 = 1;
        if key.proto != dataplane_common::IPPROTO_TCP {
            return self.any.insert(key, value, flags);
        }
        let in_overflow = self.tcp_overflow.get(&key, 0).is_ok();
        if in_overflow && flags == BPF_NOEXIST {
            return Err(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(libc::EEXIST),
            }));
        }
        match self.tcp.insert(key, value, flags) {
            Ok(()) => {
                if in_overflow {
                    let _ = self.tcp_overflow.remove(&key);
                }
                Ok(())
            }
            Err(e) if is_full(&e) => {
                self.tcp_overflow.insert(key, value, flags)?;
                self.set_overflow_in_use(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes `key` from whichever table holds it.
    pub fn remove(&mut self, key: &CtKeyOf<A>) -> Result<(), aya::maps::MapError> {
        match self.get_in(key) {
            Some((table, _)) => self.remove_from(table, key),
            None => Err(aya::maps::MapError::KeyNotFound),
        }
    }

    pub fn remove_from(
        &mut self,
        table: CtTable,
        key: &CtKeyOf<A>,
    ) -> Result<(), aya::maps::MapError> {
        self.map_mut(table).remove(key)
    }

    /// Every entry of every table.
    pub fn iter(
        &self,
    ) -> impl Iterator<Item = Result<(CtKeyOf<A>, CtEntryOf<A>), aya::maps::MapError>> {
        self.tcp
            .iter()
            .chain(self.tcp_overflow.iter())
            .chain(self.any.iter())
    }

    /// Every entry of every table, with the table it is in.
    pub fn iter_in(&self) -> impl Iterator<Item = (CtTable, CtKeyOf<A>, CtEntryOf<A>)> {
        [CtTable::Tcp, CtTable::TcpOverflow, CtTable::Any]
            .into_iter()
            .flat_map(move |table| {
                self.map(table)
                    .iter()
                    .filter_map(move |e| e.ok().map(|(k, v)| (table, k, v)))
            })
    }

    pub fn keys(&self) -> impl Iterator<Item = Result<CtKeyOf<A>, aya::maps::MapError>> {
        self.tcp
            .keys()
            .chain(self.tcp_overflow.keys())
            .chain(self.any.keys())
    }

    /// Moves the overflow's flows back into the TCP hash while it has room, and once the
    /// overflow is empty, marks it unused (the datapath then stops looking there). Returns
    /// how many flows moved. Called after the collection, which makes room.
    ///
    /// The flag is cleared first and the overflow checked again after: the datapath sets it
    /// after each insert there, so a flow inserted in between is either seen by the check
    /// (and the flag set again) or sets the flag itself.
    pub fn release_overflow(&mut self) -> usize {
        const BPF_NOEXIST: u64 = 1;
        let entries: Vec<(CtKeyOf<A>, CtEntryOf<A>)> =
            self.tcp_overflow.iter().filter_map(Result::ok).collect();
        let mut moved = 0;
        for (key, value) in entries {
            match self.tcp.insert(key, value, BPF_NOEXIST) {
                Ok(()) => {
                    // Flags the datapath set on the overflow's copy meanwhile (a FIN): kept.
                    // (Packet counts of that moment are not.)
                    if let Ok(latest) = self.tcp_overflow.get(&key, 0)
                        && latest.flags != value.flags
                        && let Ok(mut current) = self.tcp.get(&key, 0)
                    {
                        current.flags |= latest.flags;
                        let _ = self.tcp.insert(key, current, 0);
                    }
                    let _ = self.tcp_overflow.remove(&key);
                    moved += 1;
                }
                Err(e) if is_full(&e) => break,
                // Already in the hash (opened again there): the overflow's copy is stale.
                Err(_) => {
                    let _ = self.tcp_overflow.remove(&key);
                }
            }
        }
        let empty = |c: &Self| c.tcp_overflow.keys().next().is_none();
        if self.overflow_in_use() && empty(self) {
            let _ = self.set_overflow_in_use(false);
            if !empty(self) {
                let _ = self.set_overflow_in_use(true);
            }
        }
        moved
    }
}

/// Sums a per-CPU stats entry over the CPUs (zero when unreadable).
pub fn stats_sum(array: &PerCpuArray<MapData, TrafficStats>, id: u32) -> TrafficStats {
    let mut total = TrafficStats::default();
    if let Ok(values) = array.get(&id, 0) {
        for v in values.iter() {
            total.packets += v.packets;
            total.bytes += v.bytes;
            total.connections += v.connections;
        }
    }
    total
}

/// A per-CPU counter summed over the CPUs (0 for an id out of range).
pub fn counter_sum(array: &PerCpuArray<MapData, u64>, id: u32) -> u64 {
    array.get(&id, 0).map_or(0, |values| values.iter().sum())
}

/// Zeroes per-CPU stats entries on every CPU (ids handed to new frontends or backends), a
/// few thousand per syscall. On failure, says how many were zeroed first.
pub fn stats_reset<V: aya::Pod + Default>(
    array: &PerCpuArray<MapData, V>,
    ids: &[u32],
) -> Result<(), (usize, aya::maps::MapError)> {
    use aya::maps::IterableMap;
    // The kernel reads each CPU's value 8-byte aligned: no padding between them.
    assert!(std::mem::size_of::<V>().is_multiple_of(8));
    const CHUNK: usize = 4096;
    let cpus = aya::util::nr_cpus().map_or(1, |n| n);
    let zeros = vec![V::default(); ids.len().min(CHUNK) * cpus];
    for (i, chunk) in ids.chunks(CHUNK).enumerate() {
        let values = &zeros[..chunk.len() * cpus];
        update_batch(array.map(), chunk, values).map_err(|(n, e)| (i * CHUNK + n, e))?;
    }
    Ok(())
}

/// The backends in use, by id (the array's non-zero entries).
pub fn backends_in_use<A: Family>(array: &Array<MapData, BackendOf<A>>) -> Vec<(u32, BackendOf<A>)>
where
    BackendOf<A>: Pod,
{
    array
        .iter()
        .enumerate()
        .filter_map(|(id, b)| (b.ok().filter(|b| !b.addr.is_unspecified())).map(|b| (id as u32, b)))
        .collect()
}

/// Writes `keys[i] -> values[i]` for every key with one syscall: BPF_MAP_UPDATE_BATCH, which
/// aya 0.14 does not wrap (hash and array maps support it). In a per-CPU map each key has
/// one `V` per possible CPU. On failure, says how many entries were written first.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, aya::maps::MapError)> {
    use std::os::fd::{AsFd, AsRawFd};
    /// The `batch` member of the kernel's `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    if keys.is_empty() {
        return Ok(());
    }
    debug_assert_eq!(values.len() % keys.len(), 0);
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` points at `keys.len()` keys and their values, which outlive the call;
    // the kernel writes back only `attr.count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        let io_error = std::io::Error::last_os_error();
        let error = aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_batch",
            io_error,
        });
        return Err((attr.count as usize, error));
    }
    Ok(())
}

/// What the agent programmed, as the pinned maps hold it (for `translate`'s decoders).
pub fn read_contents(
    maps: &PinnedMaps,
) -> Result<super::translate::MapContents, aya::maps::MapError> {
    let mut contents = super::translate::MapContents::default();
    maps.v4.read_into(&mut contents.v4)?;
    maps.v6.read_into(&mut contents.v6)?;
    for entry in maps.names.iter() {
        let (id, name) = entry?;
        contents.names.insert(id, name);
    }
    for entry in maps.maglev.iter() {
        let (id, table) = entry?;
        contents.maglev.insert(id, table.backend_ids.to_vec());
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restarted agent checks every pinned map's layout against these sizes.
    #[test]
    fn every_map_has_its_key_and_value_sizes() {
        for name in map_names::ALL {
            assert!(
                expected_sizes(name).is_some(),
                "{name} has no expected sizes"
            );
        }
    }
}
