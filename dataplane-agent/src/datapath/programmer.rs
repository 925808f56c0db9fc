//! Writes a [`Plan`] into the maps as a diff against what they hold, in an order that never
//! lets a packet see a half-built service: removed frontends go first (slot 0 before its
//! slots, so their room serves new ones), then new backends, then each frontend's new Maglev
//! table, new source ranges and backend slots, then the frontend entry (slot 0) that makes
//! them reachable, and only then the table and ranges slot 0 no longer points at; backends
//! nothing uses any more go last. (`no_write_exposes_a_half_built_frontend` checks this
//! after every single write.)
//!
//! What the entries hold is [`translate`]'s business; this module decides what changed and
//! in which order it is written, through [`MapWrites`] (the pinned maps, or a model of them
//! in tests).
//!
//! Ids are taken from the maps at start-up (both families'), so a restarted agent keeps every
//! backend and frontend id, and with them every established connection.
//!
//! IPv4 and IPv6 entries go to their own family's maps ([`FamilyWrites`]), with the same
//! order and the same rules; frontend and backend ids are one space for both (an IPv6
//! backend's id is unused in the IPv4 array, and the reverse), so the id allocators, the
//! stats, the names and the Maglev tables know no families.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use aya::{
    Pod,
    maps::{IterableMap, MapError, lpm_trie::Key},
};
use dataplane_common::{
    AffinityKeyOf, BackendOf, CtEntry, CtEntryOf, CtKey, CtKeyOf, DatapathConfig, DatapathConfig6,
    FrontendName, Ipv4, Ipv6, MAGLEV_TABLE_SIZE, MaglevTable, SCOPE_DEFAULT, SCOPE_INTERNAL,
    SVC_FLAG_AFFINITY, SVC_FLAG_MAGLEV, ServiceKeyOf, ServiceValue, SourceRangeKeyOf,
};
use tracing::{debug, warn};

use super::{
    family::{Family, by_family},
    maps::{Conntrack, PinnedMaps, stats_reset, update_batch},
    translate::{
        self, EntryKey, EntrySettings, IdAllocator, MAX_SLOTS, MapContents, WantedEntry,
        service_key,
    },
};
use crate::plan::{BackendAddr, Cidr, Frontend, FrontendAddr, Plan, Protocol};

/// The writes to one family's maps (`A`: its addresses). Batches are written in order, one
/// element after the other (as `BPF_MAP_UPDATE_BATCH` does), and on failure say how many went
/// in first.
pub trait FamilyWrites<A: Family> {
    fn update_services(
        &mut self,
        keys: &[ServiceKeyOf<A>],
        values: &[ServiceValue],
    ) -> Result<(), (usize, String)>;
    fn remove_service(&mut self, key: &ServiceKeyOf<A>);
    /// A zeroed value frees the id.
    fn update_backends(
        &mut self,
        ids: &[u32],
        values: &[BackendOf<A>],
    ) -> Result<(), (usize, String)>;
    fn add_source_range(&mut self, range: (u32, SourceRangeKeyOf<A>)) -> Result<(), String>;
    fn remove_source_range(&mut self, range: (u32, SourceRangeKeyOf<A>));
    /// Removes the session-affinity entries naming a (service-port id, backend id) of `lost`.
    fn forget_affinity(&mut self, lost: &HashSet<(u32, u32)>);
}

/// The map writes the programmer makes: each family's, and those of the maps both share
/// (ids are one space for both families).
pub trait MapWrites: FamilyWrites<Ipv4> + FamilyWrites<Ipv6> {
    /// Zeroes the traffic counters of ids handed to new frontends.
    fn reset_frontend_stats(&mut self, ids: &[u32]) -> Result<(), (usize, String)>;
    /// Zeroes the traffic counters of ids handed to new backends.
    fn reset_backend_stats(&mut self, ids: &[u32]) -> Result<(), (usize, String)>;
    fn update_names(&mut self, ids: &[u32], names: &[FrontendName]) -> Result<(), (usize, String)>;
    fn remove_name(&mut self, id: u32);
    fn set_maglev(&mut self, id: u32, table: &[u32]) -> Result<(), String>;
    fn remove_maglev(&mut self, id: u32);
}

fn batch_error((n, e): (usize, MapError)) -> (usize, String) {
    (n, map_error(e))
}

impl<A: Family> FamilyWrites<A> for PinnedMaps
where
    ServiceKeyOf<A>: Pod,
    BackendOf<A>: Pod,
    SourceRangeKeyOf<A>: Pod,
    AffinityKeyOf<A>: Pod,
{
    fn update_services(
        &mut self,
        keys: &[ServiceKeyOf<A>],
        values: &[ServiceValue],
    ) -> Result<(), (usize, String)> {
        update_batch(A::maps(self).services.map(), keys, values).map_err(batch_error)
    }

    fn remove_service(&mut self, key: &ServiceKeyOf<A>) {
        let _ = A::maps_mut(self).services.remove(key);
    }

    fn update_backends(
        &mut self,
        ids: &[u32],
        values: &[BackendOf<A>],
    ) -> Result<(), (usize, String)> {
        update_batch(A::maps(self).backends.map(), ids, values).map_err(batch_error)
    }

    fn add_source_range(
        &mut self,
        (prefix, data): (u32, SourceRangeKeyOf<A>),
    ) -> Result<(), String> {
        let key = Key::new(prefix, data);
        (A::maps_mut(self).source_ranges)
            .insert(&key, 1, 0)
            .map_err(map_error)
    }

    fn remove_source_range(&mut self, (prefix, data): (u32, SourceRangeKeyOf<A>)) {
        let _ = A::maps_mut(self)
            .source_ranges
            .remove(&Key::new(prefix, data));
    }

    fn forget_affinity(&mut self, lost: &HashSet<(u32, u32)>) {
        let affinity = &mut A::maps_mut(self).affinity;
        let stale: Vec<AffinityKeyOf<A>> = affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, value)| lost.contains(&(key.service_port_id, value.backend_id)))
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            let _ = affinity.remove(&key);
        }
    }
}

impl MapWrites for PinnedMaps {
    /// Traffic counters and counters of connections translated at the socket.
    fn reset_frontend_stats(&mut self, ids: &[u32]) -> Result<(), (usize, String)> {
        stats_reset(&self.service_stats, ids)
            .and_then(|()| stats_reset(&self.socket_service_stats, ids))
            .map_err(batch_error)
    }

    fn reset_backend_stats(&mut self, ids: &[u32]) -> Result<(), (usize, String)> {
        stats_reset(&self.backend_stats, ids)
            .and_then(|()| stats_reset(&self.socket_backend_stats, ids))
            .map_err(batch_error)
    }

    fn update_names(&mut self, ids: &[u32], names: &[FrontendName]) -> Result<(), (usize, String)> {
        update_batch(self.names.map(), ids, names).map_err(batch_error)
    }

    fn remove_name(&mut self, id: u32) {
        let _ = self.names.remove(&id);
    }

    fn set_maglev(&mut self, id: u32, table: &[u32]) -> Result<(), String> {
        let mut value = MaglevTable {
            backend_ids: [0; MAGLEV_TABLE_SIZE],
        };
        value.backend_ids.copy_from_slice(table);
        self.maglev.insert(id, value, 0).map_err(map_error)
    }

    fn remove_maglev(&mut self, id: u32) {
        let _ = self.maglev.remove(&id);
    }
}

/// Resets the counters of the new `ids` that may have been used before (those up to
/// `dirty_upto`, which then covers all of `ids`); on failure, says how many of `ids` are
/// ready (those before the first that could not be reset).
fn reset_dirty(
    ids: &[u32],
    dirty_upto: &mut u32,
    reset: impl FnOnce(&[u32]) -> Result<(), (usize, String)>,
) -> Result<(), (usize, String)> {
    let dirty: Vec<u32> = ids.iter().copied().filter(|id| id <= dirty_upto).collect();
    *dirty_upto = ids.iter().copied().fold(*dirty_upto, u32::max);
    reset(&dirty).map_err(|(n, e)| {
        let ready = dirty
            .get(n)
            .and_then(|failed| ids.iter().position(|id| id == failed))
            .unwrap_or(ids.len());
        (ready, e)
    })
}

/// Each backend id's address and how many entries use it, by id: ids are small and handed
/// out densely, so a vector indexed by id is smaller and faster than a map (a bulk load counts
/// millions of uses).
#[derive(Debug, Default)]
struct BackendUses(Vec<Option<(BackendAddr, u32)>>);

impl BackendUses {
    fn get(&self, id: &u32) -> Option<&(BackendAddr, u32)> {
        self.0.get(*id as usize)?.as_ref()
    }

    fn get_mut(&mut self, id: &u32) -> Option<&mut (BackendAddr, u32)> {
        self.0.get_mut(*id as usize)?.as_mut()
    }

    fn insert(&mut self, id: u32, value: (BackendAddr, u32)) {
        let index = id as usize;
        if self.0.len() <= index {
            self.0.resize(index + 1, None);
        }
        self.0[index] = Some(value);
    }

    /// Room for ids up to `id` at once (a bulk load hands out 100,000s).
    fn reserve_upto(&mut self, id: u32) {
        let more = (id as usize + 1).saturating_sub(self.0.len());
        self.0.reserve_exact(more);
    }

    fn remove(&mut self, id: &u32) -> Option<(BackendAddr, u32)> {
        self.0.get_mut(*id as usize)?.take()
    }
}

/// The backends one family's array holds, with their ids.
fn decoded_backends<A: Family>(
    contents: &translate::FamilyContents<A>,
) -> impl Iterator<Item = (BackendAddr, u32)> + '_ {
    (contents.backends.iter()).filter_map(|(id, b)| Some((translate::decode_backend(b)?, *id)))
}

/// The source ranges one family's trie holds, with their frontend ids.
fn decoded_ranges<A: Family>(
    contents: &translate::FamilyContents<A>,
) -> impl Iterator<Item = (u32, Cidr)> + '_ {
    (contents.source_ranges.iter())
        .map(|(prefix, key)| translate::decode_source_range(*prefix, key))
}

/// Writes the backends `new` (IPv4 ones first, as `BackendAddr`'s order has them) into their
/// family's array at `ids`; on failure, says how many went in first.
fn write_backends<M: MapWrites>(
    maps: &mut M,
    new: &[BackendAddr],
    ids: &[u32],
) -> Result<(), (usize, String)> {
    fn write<A: Family>(
        maps: &mut impl FamilyWrites<A>,
        new: &[BackendAddr],
        ids: &[u32],
    ) -> Result<(), (usize, String)> {
        let values: Vec<BackendOf<A>> = new.iter().map(translate::backend::<A>).collect();
        maps.update_backends(ids, &values)
    }
    debug_assert!(new.is_sorted());
    let split = new.partition_point(|b| b.addr.is_ipv4());
    write::<Ipv4>(maps, &new[..split], &ids[..split])?;
    write::<Ipv6>(maps, &new[split..], &ids[split..]).map_err(|(n, e)| (split + n, e))
}

/// Zeroes the backend ids `ids` of family `A`: they are free.
fn free_backends<A: Family, M: FamilyWrites<A>>(maps: &mut M, ids: &[u32]) {
    let zeros = vec![BackendOf::<A>::default(); ids.len()];
    let _ = maps.update_backends(ids, &zeros);
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProgrammedEntry {
    settings: EntrySettings,
    /// Every backend id the entry uses (its slots, and its Maglev table), slot 1 first...
    backends: Vec<u32>,
    /// ...of which this many are in slots (fewer only when the map ran full).
    written: usize,
    /// Backend ids kept for flows already on them (`Frontend::retained`), in no slot.
    retained: Vec<u32>,
}

/// What one `apply` changed, and what it could not do.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub writes: usize,
    pub deletes: usize,
    /// Objects that did not fit or could not be written; the rest was programmed.
    pub failures: Vec<String>,
}

pub struct Programmer<M: MapWrites = PinnedMaps> {
    maps: M,
    backends: HashMap<BackendAddr, u32>,
    /// Each backend id's address and how many entries use it: the last user gone, it goes.
    backend_uses: BackendUses,
    backend_ids: IdAllocator,
    /// Frontend id of each frontend address, shared by its scopes.
    frontend_ids: HashMap<FrontendAddr, u32>,
    frontend_id_allocator: IdAllocator,
    entries: HashMap<EntryKey, ProgrammedEntry>,
    source_ranges: HashMap<u32, BTreeSet<Cidr>>,
    maglev: HashMap<u32, Vec<u32>>,
    /// The (backend, id) list each Maglev table was built from.
    maglev_inputs: HashMap<u32, Vec<(SocketAddr, u32)>>,
    names: HashMap<u32, FrontendName>,
    failures_total: u64,
    conntrack_timeouts: ConntrackTimeouts,
    /// (service-port id, backend id) pairs whose backend left the slots of a frontend with
    /// session affinity during this apply: their affinity entries go at its end.
    affinity_lost: HashSet<(u32, u32)>,
    /// Reused for each entry's backend ids, so an unchanged entry costs no allocation.
    scratch: Vec<u32>,
    /// (backend, frontend) ids above these were never handed out since the counter maps were
    /// created, so their counters are zero and need no reset (a bulk load of 100,000s of
    /// backends would otherwise write every counter of each). `u32::MAX`: not known.
    counters_dirty_upto: (u32, u32),
}

impl Programmer<PinnedMaps> {
    /// Reads back what earlier runs programmed.
    pub fn restore(maps: PinnedMaps) -> Result<Self, MapError> {
        let contents = super::maps::read_contents(&maps)?;
        let limits = maps.id_limits();
        Ok(Self::from_contents(maps, &contents, limits))
    }
}

impl<M: MapWrites> Programmer<M> {
    /// Takes over what `maps` hold (`contents`, as read from them); ids stay below `limits`
    /// (backends, frontends).
    pub fn from_contents(maps: M, contents: &MapContents, limits: (u32, u32)) -> Self {
        let backends: HashMap<BackendAddr, u32> = decoded_backends(&contents.v4)
            .chain(decoded_backends(&contents.v6))
            .collect();
        let decoded4 =
            translate::decode_services(contents.v4.services.iter().map(|(k, v)| (*k, *v)));
        let decoded6 =
            translate::decode_services(contents.v6.services.iter().map(|(k, v)| (*k, *v)));
        let mut entries = HashMap::new();
        let mut frontend_ids = HashMap::new();
        for (key, entry) in decoded4.entries.into_iter().chain(decoded6.entries) {
            frontend_ids.insert(key.frontend, entry.rev_nat_id);
            let programmed = ProgrammedEntry {
                settings: entry.settings,
                written: entry.slots.len(),
                backends: entry.slots,
                // Not in the maps: the first apply counts them again.
                retained: vec![],
            };
            entries.insert(key, programmed);
        }
        let mut source_ranges: HashMap<u32, BTreeSet<Cidr>> = HashMap::new();
        for (id, cidr) in decoded_ranges(&contents.v4).chain(decoded_ranges(&contents.v6)) {
            source_ranges.entry(id).or_default().insert(cidr);
        }
        let names = contents.names.iter().map(|(id, n)| (*id, *n)).collect();
        let maglev = contents
            .maglev
            .iter()
            .map(|(id, t)| (*id, t.clone()))
            .collect();
        let (backend_limit, frontend_limit) = limits;
        let backend_in_use: HashSet<u32> = backends.values().copied().collect();
        let frontend_in_use: HashSet<u32> = frontend_ids.values().copied().collect();
        let mut backend_uses = BackendUses::default();
        for (b, id) in &backends {
            backend_uses.insert(*id, (*b, 0));
        }
        for id in entries.values().flat_map(|e: &ProgrammedEntry| &e.backends) {
            if let Some((_, users)) = backend_uses.get_mut(id) {
                *users += 1;
            }
        }
        let mut programmer = Self {
            maps,
            backends,
            backend_uses,
            backend_ids: IdAllocator::new(backend_limit, &backend_in_use),
            frontend_ids,
            frontend_id_allocator: IdAllocator::new(frontend_limit, &frontend_in_use),
            entries,
            source_ranges,
            maglev,
            maglev_inputs: HashMap::new(),
            names,
            failures_total: 0,
            conntrack_timeouts: ConntrackTimeouts::default(),
            affinity_lost: HashSet::new(),
            scratch: vec![],
            counters_dirty_upto: (u32::MAX, u32::MAX),
        };
        // Slots whose frontend entry is gone (a removal cut short): delete them.
        for key in decoded4.orphans {
            FamilyWrites::<Ipv4>::remove_service(&mut programmer.maps, &key);
        }
        for key in decoded6.orphans {
            FamilyWrites::<Ipv6>::remove_service(&mut programmer.maps, &key);
        }
        debug!(
            backends = programmer.backends.len(),
            frontends = programmer.frontend_ids.len(),
            "restored datapath state from pinned maps"
        );
        programmer
    }

    /// The counter maps were created empty by this run: ids not handed out yet have zero
    /// counters.
    pub fn counters_start_at_zero(&mut self) {
        self.counters_dirty_upto = (
            self.backend_ids.highest(),
            self.frontend_id_allocator.highest(),
        );
    }

    pub fn frontend_count(&self) -> usize {
        self.frontend_ids.len()
    }

    /// Everything `apply` could not program since start-up.
    pub fn failures_total(&self) -> u64 {
        self.failures_total
    }

    /// The maps written to.
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Makes the maps hold exactly `plan`.
    pub fn apply(&mut self, plan: &Plan) -> ApplyReport {
        let frontends: Vec<&Frontend> = plan.frontends.iter().collect();
        self.apply_all(&frontends)
    }

    /// Makes the maps hold exactly `frontends`: whatever else is programmed goes, backends
    /// included (the start-up sync and the periodic resync).
    pub fn apply_all(&mut self, frontends: &[&Frontend]) -> ApplyReport {
        let wanted: HashSet<FrontendAddr> = frontends.iter().map(|f| f.frontend).collect();
        let mut removed: Vec<FrontendAddr> = self
            .frontend_ids
            .keys()
            .chain(self.entries.keys().map(|k| &k.frontend))
            .filter(|f| !wanted.contains(f))
            .copied()
            .collect();
        removed.sort();
        removed.dedup();
        // Every backend is a candidate: those no entry uses (left by an earlier run) go too.
        let unused = self.backends.values().copied().collect();
        self.apply_changes_with(frontends, &removed, unused)
    }

    /// Programs `frontends` and removes the frontends `removed`; everything else stays as it
    /// is. `frontends` must hold all frontends of each service port it names (they share a
    /// service-port id).
    pub fn apply_changes(
        &mut self,
        frontends: &[&Frontend],
        removed: &[FrontendAddr],
    ) -> ApplyReport {
        self.apply_changes_with(frontends, removed, vec![])
    }

    /// `unused`: backend ids to delete at the end unless an entry uses them; ids whose last
    /// user goes during this apply are added.
    fn apply_changes_with(
        &mut self,
        frontends: &[&Frontend],
        removed: &[FrontendAddr],
        mut unused: Vec<u32>,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();

        // 1. Entries and frontends that are gone: slot 0 first, so no new flow picks a slot
        // being removed; first of all, so their room serves new ones.
        for frontend in removed {
            for scope in [SCOPE_DEFAULT, SCOPE_INTERNAL] {
                self.remove_entry(
                    EntryKey {
                        frontend: *frontend,
                        scope,
                    },
                    &mut unused,
                    &mut report,
                );
            }
            let Some(id) = self.frontend_ids.remove(frontend) else {
                continue;
            };
            self.sync_maglev(id, None, &mut report);
            self.remove_source_ranges(id, &[], &mut report);
            if self.names.remove(&id).is_some() {
                self.maps.remove_name(id);
            }
            self.frontend_id_allocator.release(id);
        }
        for frontend in frontends.iter().filter(|f| f.internal_backends.is_none()) {
            let key = EntryKey {
                frontend: frontend.frontend,
                scope: SCOPE_INTERNAL,
            };
            self.remove_entry(key, &mut unused, &mut report);
        }

        // 2. Ids of new frontends, then backends that are new.
        self.add_frontends(frontends, &mut report);
        let frontend_ids = &self.frontend_ids;
        let wanted = translate::wanted_entries(frontends, |f| frontend_ids.get(f).copied());
        let mut new_backends: Vec<BackendAddr> = wanted
            .iter()
            .flat_map(|w| {
                w.backends.iter().chain(w.retained).map(|b| BackendAddr {
                    addr: *b,
                    protocol: w.key.frontend.protocol,
                })
            })
            .filter(|b| !self.backends.contains_key(b))
            .collect();
        new_backends.sort();
        new_backends.dedup();
        self.add_backends(&new_backends, &mut unused, &mut report);

        // Names, for the inspection tools (the datapath does not read them).
        self.sync_names(frontends, &mut report);

        // 3. Frontends: Maglev table, source ranges, slots, then slot 0.
        self.entries
            .reserve(wanted.len().saturating_sub(self.entries.len()));
        for entry in &wanted {
            if let Err(e) = self.program_entry(entry, &mut unused, &mut report) {
                report.failures.push(format!(
                    "{:?} frontend {} {} of {}: {e}",
                    entry.frontend.kind,
                    entry.key.frontend.addr,
                    entry.key.frontend.protocol,
                    entry.frontend.service
                ));
            }
        }

        // Session affinity must not send a client back to a backend that left the service.
        if !self.affinity_lost.is_empty() {
            let lost = std::mem::take(&mut self.affinity_lost);
            FamilyWrites::<Ipv4>::forget_affinity(&mut self.maps, &lost);
            FamilyWrites::<Ipv6>::forget_affinity(&mut self.maps, &lost);
        }

        // 4. Backends no frontend uses any more. Conntrack entries still naming them see the
        // backend gone on their next packet (UDP moves; TCP keeps going to the address).
        unused.sort();
        unused.dedup();
        unused.retain(|id| {
            self.backend_uses
                .get(id)
                .is_some_and(|(_, users)| *users == 0)
        });
        let (unused6, unused4): (Vec<u32>, Vec<u32>) = unused
            .iter()
            .partition(|id| (self.backend_uses.get(id)).is_some_and(|(b, _)| b.addr.is_ipv6()));
        free_backends::<Ipv4, M>(&mut self.maps, &unused4);
        free_backends::<Ipv6, M>(&mut self.maps, &unused6);
        for id in unused {
            if let Some((backend, _)) = self.backend_uses.remove(&id) {
                self.backends.remove(&backend);
            }
            self.backend_ids.release(id);
            report.deletes += 1;
        }
        self.failures_total += report.failures.len() as u64;
        for failure in &report.failures {
            warn!(failure, "could not program");
        }
        report
    }

    /// Deletes an entry from the map (slot 0 first) and forgets it.
    fn remove_entry(&mut self, key: EntryKey, unused: &mut Vec<u32>, report: &mut ApplyReport) {
        let Some(programmed) = self.entries.remove(&key) else {
            return;
        };
        // Slot 0 first.
        by_family!(key.frontend.addr.ip(), A => {
            for slot in 0..=programmed.written {
                let slot_key = service_key::<A>(&key, slot as u16);
                FamilyWrites::<A>::remove_service(&mut self.maps, &slot_key);
            }
        });
        self.release(&programmed.backends, unused);
        self.release(&programmed.retained, unused);
        report.deletes += 1;
    }

    /// Records what an entry now holds, counting the backends it uses.
    fn set_entry(&mut self, key: EntryKey, entry: ProgrammedEntry, unused: &mut Vec<u32>) {
        for id in entry.backends.iter().chain(&entry.retained) {
            if let Some((_, users)) = self.backend_uses.get_mut(id) {
                *users += 1;
            }
        }
        if let Some(old) = self.entries.insert(key, entry) {
            self.release(&old.backends, unused);
            self.release(&old.retained, unused);
        }
    }

    /// One user fewer for each of `ids`; those left without any are noted in `unused`.
    fn release(&mut self, ids: &[u32], unused: &mut Vec<u32>) {
        for id in ids {
            if let Some((_, users)) = self.backend_uses.get_mut(id) {
                *users -= 1;
                if *users == 0 {
                    unused.push(*id);
                }
            }
        }
    }

    /// Gives each new backend an id and writes them all, counters first (from zero: an id
    /// may have been used before), with one syscall per map: a bulk load adds 100,000s.
    fn add_backends(
        &mut self,
        new: &[BackendAddr],
        unused: &mut Vec<u32>,
        report: &mut ApplyReport,
    ) {
        let mut ids = Vec::with_capacity(new.len());
        for backend in new {
            match self.backend_ids.allocate() {
                Some(id) => ids.push(id),
                None => report.failures.push(format!(
                    "backend {} {}: no free backend id (capacity reached)",
                    backend.addr, backend.protocol
                )),
            }
        }
        let (mut written, mut error) = (ids.len(), None);
        let upto = &mut self.counters_dirty_upto.0;
        if let Err((n, e)) = reset_dirty(&ids, upto, |dirty| self.maps.reset_backend_stats(dirty)) {
            (written, error) = (n, Some(e));
        }
        if let Err((n, e)) = write_backends(&mut self.maps, &new[..written], &ids[..written]) {
            (written, error) = (n, Some(e));
        }
        self.backends.reserve(written);
        if let Some(highest) = ids[..written].iter().max() {
            self.backend_uses.reserve_upto(*highest);
        }
        for (i, (backend, id)) in new.iter().zip(&ids).enumerate() {
            if i < written {
                self.backends.insert(*backend, *id);
                self.backend_uses.insert(*id, (*backend, 0));
                unused.push(*id); // in case no entry ends up using it
                report.writes += 1;
            } else {
                self.backend_ids.release(*id);
                report.failures.push(format!(
                    "backend {} {}: {}",
                    backend.addr,
                    backend.protocol,
                    error.as_deref().unwrap_or("not written")
                ));
            }
        }
    }

    /// Ids (counters from zero) for the frontends that have none, with one syscall.
    /// `frontends` names each frontend once.
    fn add_frontends(&mut self, frontends: &[&Frontend], report: &mut ApplyReport) {
        let failure = |f: &Frontend, e: &str| {
            format!(
                "{:?} frontend {} {} of {}: {e}",
                f.kind, f.frontend.addr, f.frontend.protocol, f.service
            )
        };
        let mut new = Vec::new();
        for f in frontends {
            if self.frontend_ids.contains_key(&f.frontend) {
                continue;
            }
            match self.frontend_id_allocator.allocate() {
                Some(id) => new.push((*f, id)),
                None => report
                    .failures
                    .push(failure(f, "no free frontend id (capacity reached)")),
            }
        }
        let ids: Vec<u32> = new.iter().map(|(_, id)| *id).collect();
        let upto = &mut self.counters_dirty_upto.1;
        let reset = reset_dirty(&ids, upto, |dirty| self.maps.reset_frontend_stats(dirty));
        let (written, error) = match reset {
            Ok(()) => (ids.len(), None),
            Err((n, e)) => (n, Some(e)),
        };
        self.frontend_ids.reserve(written);
        for (i, (f, id)) in new.into_iter().enumerate() {
            if i < written {
                self.frontend_ids.insert(f.frontend, id);
                report.writes += 1;
            } else {
                self.frontend_id_allocator.release(id);
                let e = error.as_deref().unwrap_or("not written");
                report.failures.push(failure(f, e));
            }
        }
    }

    /// Writes the name records that changed, with one syscall.
    fn sync_names(&mut self, frontends: &[&Frontend], report: &mut ApplyReport) {
        let changed: Vec<(u32, FrontendName, FrontendAddr)> = frontends
            .iter()
            .filter_map(|f| {
                let id = *self.frontend_ids.get(&f.frontend)?;
                let name = translate::frontend_name(f);
                (self.names.get(&id) != Some(&name)).then_some((id, name, f.frontend))
            })
            .collect();
        let ids: Vec<u32> = changed.iter().map(|(id, _, _)| *id).collect();
        let names: Vec<FrontendName> = changed.iter().map(|(_, name, _)| *name).collect();
        let (written, error) = match self.maps.update_names(&ids, &names) {
            Ok(()) => (ids.len(), None),
            Err((n, e)) => (n, Some(e)),
        };
        self.names.reserve(written);
        for (i, (id, name, frontend)) in changed.into_iter().enumerate() {
            if i < written {
                self.names.insert(id, name);
            } else {
                report.failures.push(format!(
                    "name of frontend {}: {}",
                    frontend.addr,
                    error.as_deref().unwrap_or("not written")
                ));
            }
        }
    }

    /// Programs one entry: what slot 0 will point at first (a new Maglev table, new source
    /// ranges), then the slots and slot 0, then, once slot 0 no longer points at them, the
    /// table and ranges it stopped using.
    fn program_entry(
        &mut self,
        entry: &WantedEntry,
        unused: &mut Vec<u32>,
        report: &mut ApplyReport,
    ) -> Result<(), String> {
        let Some(&rev_nat_id) = self.frontend_ids.get(&entry.key.frontend) else {
            return Ok(()); // no id: reported when it was refused
        };
        let mut settings = entry.settings;
        let protocol = entry.key.frontend.protocol;
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        let backends = &self.backends;
        let resolved = entry
            .backends
            .iter()
            .filter_map(|b| Some((*b, *backends.get(&BackendAddr { addr: *b, protocol })?)))
            .take(MAX_SLOTS);
        ids.extend(resolved.clone().map(|(_, id)| id));
        let default_scope = entry.key.scope == SCOPE_DEFAULT;
        let maglev = default_scope && settings.flags & SVC_FLAG_MAGLEV != 0 && !ids.is_empty();
        if maglev {
            // Building a table is the costliest step of a sync: only when its inputs change.
            let inputs_unchanged = self
                .maglev_inputs
                .get(&rev_nat_id)
                .is_some_and(|inputs| inputs.iter().copied().eq(resolved.clone()));
            let written = inputs_unchanged || {
                let backends: Vec<(SocketAddr, u32)> = resolved.collect();
                let table = translate::maglev_table(&backends);
                self.maglev_inputs.insert(rev_nat_id, backends);
                self.sync_maglev(rev_nat_id, Some(table), report)
            };
            if !written {
                settings.flags &= !SVC_FLAG_MAGLEV; // no table: fall back to random slots
            }
        }
        if default_scope {
            self.add_source_ranges(rev_nat_id, &entry.frontend.source_ranges, report);
        }
        by_family!(entry.key.frontend.addr.ip(), A => {
            self.write_entry::<A>(entry, rev_nat_id, settings, ids, unused, report)
        })?;
        if default_scope {
            if !maglev {
                self.sync_maglev(rev_nat_id, None, report);
            }
            self.remove_source_ranges(rev_nat_id, &entry.frontend.source_ranges, report);
        }
        Ok(())
    }

    /// Writes an entry's slots, then its slot 0 (`ids`: its backend ids, in slot order), in
    /// the service map of its frontend's family `A`.
    fn write_entry<A: Family>(
        &mut self,
        entry: &WantedEntry,
        rev_nat_id: u32,
        settings: EntrySettings,
        ids: Vec<u32>,
        unused: &mut Vec<u32>,
        report: &mut ApplyReport,
    ) -> Result<(), String>
    where
        M: FamilyWrites<A>,
    {
        let protocol = entry.key.frontend.protocol;
        let retained: Vec<u32> = entry
            .retained
            .iter()
            .filter_map(|b| {
                self.backends
                    .get(&BackendAddr { addr: *b, protocol })
                    .copied()
            })
            .collect();
        let current = self.entries.get(&entry.key);
        if settings.flags & SVC_FLAG_AFFINITY != 0
            && let Some(c) = current
        {
            let lost = c.backends[..c.written]
                .iter()
                .filter(|id| !ids.contains(id));
            self.affinity_lost
                .extend(lost.map(|id| (settings.service_port_id, *id)));
        }
        if current.is_some_and(|c| {
            c.settings == settings
                && c.backends == ids
                && c.written == ids.len()
                && c.retained == retained
        }) {
            self.scratch = ids;
            return Ok(());
        }
        let old_slots = current.map(|c| &c.backends[..c.written]).unwrap_or(&[]);
        // Slots that change, then slot 0 (when it changes), in one syscall: the kernel writes
        // them in order. If the map fills up, the frontend keeps the slots that were written
        // and slot 0 counts only those; the rest are reported.
        let slot0 = |count: usize| translate::slot0(rev_nat_id, count, settings);
        let slot0_unchanged = |written: usize| {
            current.is_some_and(|c| c.written == written && c.settings == settings)
        };
        let key = |slot: usize| service_key::<A>(&entry.key, slot as u16);
        let (mut keys, mut values): (Vec<ServiceKeyOf<A>>, Vec<ServiceValue>) = ids
            .iter()
            .enumerate()
            .filter(|(i, id)| old_slots.get(*i) != Some(id))
            .map(|(i, id)| (key(i + 1), translate::slot(*id)))
            .unzip();
        let slots = keys.len();
        if !slot0_unchanged(ids.len()) {
            keys.push(key(0));
            values.push(slot0(ids.len()));
        }
        let mut written = ids.len();
        let mut short = None;
        let result = FamilyWrites::<A>::update_services(&mut self.maps, &keys, &values);
        report.writes += result.as_ref().map_or_else(|(n, _)| *n, |()| keys.len());
        match result {
            Ok(()) => {}
            // On failure at slot 0 the slots stay written; the next apply retries slot 0.
            Err((n, e)) if n == slots => {
                self.scratch = ids;
                return Err(e);
            }
            Err((n, e)) => {
                written = keys[n].backend_slot as usize - 1;
                short = Some(format!("{e}; serving {written} of {} backends", ids.len()));
                if !slot0_unchanged(written) {
                    let slot0 = [slot0(written)];
                    if let Err((_, e)) =
                        FamilyWrites::<A>::update_services(&mut self.maps, &[key(0)], &slot0)
                    {
                        self.scratch = ids;
                        return Err(e);
                    }
                    report.writes += 1;
                }
            }
        }
        let old_written = old_slots.len();
        for slot in written + 1..=old_written {
            FamilyWrites::<A>::remove_service(&mut self.maps, &key(slot));
            report.deletes += 1;
        }
        if let Some(short) = short {
            report.failures.push(format!(
                "frontend {} {}: {short}",
                entry.key.frontend.addr, protocol
            ));
        }
        let programmed = ProgrammedEntry {
            settings,
            backends: ids,
            written,
            retained,
        };
        self.set_entry(entry.key, programmed, unused);
        Ok(())
    }

    /// Makes the frontend's Maglev table `table` (or removes it). False when the wanted table
    /// could not be written.
    fn sync_maglev(
        &mut self,
        rev_nat_id: u32,
        table: Option<Vec<u32>>,
        report: &mut ApplyReport,
    ) -> bool {
        match table {
            Some(table) if self.maglev.get(&rev_nat_id) != Some(&table) => {
                if let Err(e) = self.maps.set_maglev(rev_nat_id, &table) {
                    report
                        .failures
                        .push(format!("Maglev table of frontend id {rev_nat_id}: {e}"));
                    self.maglev.remove(&rev_nat_id);
                    self.maglev_inputs.remove(&rev_nat_id);
                    self.maps.remove_maglev(rev_nat_id);
                    return false;
                }
                self.maglev.insert(rev_nat_id, table);
                report.writes += 1;
                true
            }
            Some(_) => true,
            None => {
                self.maglev_inputs.remove(&rev_nat_id);
                if self.maglev.remove(&rev_nat_id).is_some() {
                    self.maps.remove_maglev(rev_nat_id);
                    report.deletes += 1;
                }
                true
            }
        }
    }

    /// Adds the frontend's source ranges it does not have yet.
    fn add_source_ranges(&mut self, rev_nat_id: u32, wanted: &[Cidr], report: &mut ApplyReport) {
        for cidr in wanted {
            let current = self.source_ranges.entry(rev_nat_id).or_default();
            if current.contains(cidr) {
                continue;
            }
            let added = by_family!(cidr.addr, A => {
                let range = translate::source_range::<A>(rev_nat_id, cidr);
                FamilyWrites::<A>::add_source_range(&mut self.maps, range)
            });
            match added {
                Ok(()) => {
                    current.insert(*cidr);
                    report.writes += 1;
                }
                Err(e) => report.failures.push(format!("source range {cidr}: {e}")),
            }
        }
        if self
            .source_ranges
            .get(&rev_nat_id)
            .is_some_and(BTreeSet::is_empty)
        {
            self.source_ranges.remove(&rev_nat_id);
        }
    }

    /// Removes the frontend's source ranges not in `wanted`.
    fn remove_source_ranges(&mut self, rev_nat_id: u32, wanted: &[Cidr], report: &mut ApplyReport) {
        let Some(mut current) = self.source_ranges.remove(&rev_nat_id) else {
            return;
        };
        current.retain(|cidr| {
            if wanted.contains(cidr) {
                return true;
            }
            by_family!(cidr.addr, A => {
                let range = translate::source_range::<A>(rev_nat_id, cidr);
                FamilyWrites::<A>::remove_source_range(&mut self.maps, range)
            });
            report.deletes += 1;
            false
        });
        if !current.is_empty() {
            self.source_ranges.insert(rev_nat_id, current);
        }
    }
}

impl Programmer<PinnedMaps> {
    /// The source address for SNATed external traffic of its family (`dp_config_v1` or
    /// `dp_config6_v1`), and the ports (both families take IPv4's setting).
    pub fn set_snat(&mut self, addr: IpAddr, (min, max): (u16, u16)) -> Result<(), MapError> {
        match addr {
            IpAddr::V4(addr) => {
                let config = DatapathConfig {
                    snat_addr: addr.octets(),
                    snat_port_min: min,
                    snat_port_max: max,
                };
                if self.maps.config.get(&0, 0).ok() != Some(config) {
                    self.maps.config.set(0, config, 0)?;
                }
            }
            IpAddr::V6(addr) => {
                let config = DatapathConfig6 {
                    snat_addr: addr.into(),
                };
                if self.maps.config6.get(&0, 0).ok() != Some(config) {
                    self.maps.config6.set(0, config, 0)?;
                }
            }
        }
        Ok(())
    }
}

fn map_error(e: MapError) -> String {
    match e {
        MapError::SyscallError(s)
            if matches!(
                s.io_error.raw_os_error(),
                Some(libc::E2BIG) | Some(libc::ENOSPC)
            ) =>
        {
            "map is full".to_string()
        }
        other => other.to_string(),
    }
}

/// How long an idle flow stays in conntrack: kube-proxy's `--conntrack-*` flags, with its
/// defaults (the UDP ones are Linux's `nf_conntrack_udp_timeout{,_stream}`). The LRU maps
/// (UDP, and the TCP overflow) evict on their own when full; these decide everything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    /// An open TCP connection (`--conntrack-tcp-timeout-established`, 24h).
    pub tcp_established: Duration,
    /// A TCP connection after a FIN, possibly half-closed and still carrying data the other
    /// way (`--conntrack-tcp-timeout-close-wait`, 1h).
    pub tcp_close_wait: Duration,
    /// A UDP (or other) flow that never saw a reply (`--conntrack-udp-timeout`, 30s).
    pub udp: Duration,
    /// A UDP flow that saw replies (`--conntrack-udp-timeout-stream`, 120s).
    pub udp_stream: Duration,
}

impl Default for ConntrackTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_close_wait: Duration::from_secs(3600),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

/// A TCP connection reset by either side, or closed with FINs both ways: late retransmits
/// and the last ACK still get translated, and the tuple (and a SNAT port) is free soon after.
/// (Linux keeps TIME_WAIT for 120 s; a SYN on a closed flow's tuple starts a new flow here
/// anyway, so the wait only holds SNAT ports.)
pub const TCP_CLOSED_TIMEOUT: Duration = Duration::from_secs(10);

impl ConntrackTimeouts {
    /// The idle time after which a flow goes: `flags` of both its entries, `answered` when its
    /// reply direction carried packets, `closed` when both directions sent a FIN.
    pub fn for_flow(&self, proto: u8, flags: u16, answered: bool, closed: bool) -> Duration {
        use dataplane_common::{CT_FLAG_CLOSING, CT_FLAG_RESET, IPPROTO_TCP};
        match proto {
            IPPROTO_TCP if flags & CT_FLAG_RESET != 0 || closed => TCP_CLOSED_TIMEOUT,
            IPPROTO_TCP if flags & CT_FLAG_CLOSING != 0 => self.tcp_close_wait,
            IPPROTO_TCP => self.tcp_established,
            _ if answered => self.udp_stream,
            _ => self.udp,
        }
    }

    /// The shortest idle time any flow of this protocol can have: below it nothing goes.
    fn shortest(&self, proto: u8) -> Duration {
        if proto == dataplane_common::IPPROTO_TCP {
            TCP_CLOSED_TIMEOUT
        } else {
            self.udp.min(self.udp_stream)
        }
    }
}

impl Programmer<PinnedMaps> {
    /// Seeds conntrack with flows taken over from the kernel's (`takeover::entries_for`),
    /// before their frontends are programmed; never over a flow of the datapath's own.
    /// Returns how many entries went in.
    pub fn adopt_flows(&mut self, entries: &[(CtKey, CtEntry)]) -> usize {
        const BPF_NOEXIST: u64 = 1;
        entries
            .iter()
            .filter(|(key, entry)| {
                self.maps
                    .v4
                    .conntrack
                    .insert(*key, *entry, BPF_NOEXIST)
                    .is_ok()
            })
            .count()
    }

    /// Once their frontends are programmed: the frontend and backend ids of adopted flows
    /// (counters and `flows` name them; UDP flows need the backend id to stay), where the
    /// entry is still the adopted one.
    pub fn label_adopted_flows(&mut self, entries: &[(CtKey, CtEntry)]) {
        use dataplane_common::{CT_FLAG_REPLY, IPPROTO_TCP};
        for (key, adopted) in entries {
            let protocol = if key.proto == IPPROTO_TCP {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            let socket = |addr: Ipv4, port| SocketAddr::new(addr.ip(), port);
            let (frontend, backend) = if adopted.flags & CT_FLAG_REPLY != 0 {
                (
                    socket(adopted.nat_addr, adopted.nat_port),
                    socket(key.saddr, key.sport),
                )
            } else {
                (
                    socket(key.daddr, key.dport),
                    socket(adopted.nat_addr, adopted.nat_port),
                )
            };
            let frontend_id = self.frontend_ids.get(&FrontendAddr {
                addr: frontend,
                protocol,
            });
            let backend_id = self.backends.get(&BackendAddr {
                addr: backend,
                protocol,
            });
            let conntrack = &mut self.maps.v4.conntrack;
            let Ok(mut entry) = conntrack.get(key, 0) else {
                continue;
            };
            if entry.nat_addr != adopted.nat_addr || entry.rev_nat_id != 0 {
                continue; // replaced meanwhile
            }
            entry.rev_nat_id = frontend_id.copied().unwrap_or(0);
            entry.backend_id = backend_id.copied().unwrap_or(0);
            let _ = conntrack.insert(*key, entry, 0);
        }
    }

    pub fn set_conntrack_timeouts(&mut self, timeouts: ConntrackTimeouts) {
        self.conntrack_timeouts = timeouts;
    }

    /// Removes flows idle longer than their timeout, in both families' tables (with the same
    /// timeouts). A flow's two entries live and expire as one: its idle time is that of its
    /// most recent packet in either direction (a UDP server silent for minutes while its
    /// client keeps sending keeps both). An entry whose other half is gone (evicted) goes by
    /// its own. Then TCP flows the datapath put in the overflow table while the TCP table was
    /// full move back into it (see `Conntrack::release_overflow`). Returns how many entries
    /// went.
    pub fn collect_conntrack(&mut self, now_ns: u64) -> usize {
        let timeouts = self.conntrack_timeouts;
        collect_in(&mut self.maps.v4.conntrack, timeouts, now_ns)
            + collect_in(&mut self.maps.v6.conntrack, timeouts, now_ns)
    }
}

/// `collect_conntrack` on one family's tables.
fn collect_in<A: Family>(
    conntrack: &mut Conntrack<A>,
    timeouts: ConntrackTimeouts,
    now_ns: u64,
) -> usize
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    use dataplane_common::{CT_FLAG_FIN, CT_FLAG_REPLY};
    let idle = |last_seen_ns: u64| Duration::from_nanos(now_ns.saturating_sub(last_seen_ns));
    let mut expired = HashSet::new();
    for (table, key, value) in conntrack.iter_in() {
        // Most entries are recent: only candidates cost a lookup of their other half.
        if idle(value.last_seen_ns) <= timeouts.shortest(key.proto) {
            continue;
        }
        let (other_key, is_reply) = if value.flags & CT_FLAG_REPLY != 0 {
            (key.forward_of(&value), true)
        } else {
            (key.reply_of(&value), false)
        };
        let other = conntrack.get_in(&other_key);
        let (flags, last_seen, answered, closed) = match &other {
            Some((_, o)) => {
                let reply_packets = if is_reply { value.packets } else { o.packets };
                (
                    value.flags | o.flags,
                    value.last_seen_ns.max(o.last_seen_ns),
                    reply_packets > 0,
                    value.flags & o.flags & CT_FLAG_FIN != 0,
                )
            }
            None => (value.flags, value.last_seen_ns, is_reply, false),
        };
        if idle(last_seen) > timeouts.for_flow(key.proto, flags, answered, closed) {
            expired.insert((table, key));
            if let Some((other_table, _)) = other {
                expired.insert((other_table, other_key));
            }
        }
    }
    let removed = expired
        .iter()
        .filter(|(table, key)| conntrack.remove_from(*table, key).is_ok())
        .count();
    let moved = conntrack.release_overflow();
    if moved > 0 {
        tracing::info!(moved, "conntrack: flows moved back from the overflow table");
    }
    removed
}

#[cfg(test)]
mod tests {
    use dataplane_common::capacity;

    use super::*;
    use crate::{
        datapath::{
            model::MapModel,
            translate::{Ids, translate},
        },
        plan::{NodeContext, compute, tests::plan_of},
    };

    #[test]
    fn counters_are_reset_only_for_ids_that_may_have_been_used() {
        let mut reset = Vec::new();
        // Not known: every id is reset.
        let mut upto = u32::MAX;
        reset_dirty(&[1, 2], &mut upto, |ids| {
            reset.extend_from_slice(ids);
            Ok(())
        })
        .unwrap();
        assert_eq!((reset.as_slice(), upto), (&[1, 2][..], u32::MAX));
        // Fresh maps with ids up to 3 handed out: ids above are clean, and now dirty.
        reset.clear();
        let mut upto = 3;
        reset_dirty(&[4, 2, 5], &mut upto, |ids| {
            reset.extend_from_slice(ids);
            Ok(())
        })
        .unwrap();
        assert_eq!((reset.as_slice(), upto), (&[2][..], 5));
        // A failure names how many of the ids are ready: those before the one not reset.
        let mut upto = 5;
        let failed = reset_dirty(&[9, 3, 4], &mut upto, |ids| {
            assert_eq!(ids, [3, 4]);
            Err((1, "full".to_string()))
        });
        assert_eq!(failed, Err((2, "full".to_string())));
    }

    fn on_model() -> Programmer<MapModel> {
        let limits = (capacity::BACKENDS, capacity::FRONTENDS);
        Programmer::from_contents(MapModel::default(), &MapContents::default(), limits)
    }

    /// A LoadBalancer service (Maglev, the default for external frontends) with a node port
    /// and a load-balancer IP, `extra` added to its spec, and `endpoints` in its slice.
    fn edge(extra: &str, endpoints: &str) -> String {
        format!(
            "apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: 192.0.2.11}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: edge, namespace: web}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.20.1
  ports: [{{name: http, port: 80, nodePort: 30080}}]
  {extra}
status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.10}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: edge-1, namespace: web, labels: {{kubernetes.io/service-name: edge}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: {endpoints}
"
        )
    }

    const TWO: &str =
        "[{addresses: [10.0.1.1], nodeName: node-a}, {addresses: [10.0.1.2], nodeName: node-b}]";

    /// Replays changes to a service through the programmer, one write at a time, and checks
    /// after every write that no frontend reachable from its slot 0 points at a backend,
    /// slot, Maglev table or source range that is not there.
    #[test]
    fn no_write_exposes_a_half_built_frontend() {
        let states = [
            edge("loadBalancerSourceRanges: [203.0.113.0/24]", TWO),
            // Another range: the old one goes, the new one comes.
            edge("loadBalancerSourceRanges: [192.0.2.0/24]", TWO),
            // No endpoints and no source ranges: no Maglev table, no ranges.
            edge("", "[]"),
            edge(
                "externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [203.0.113.0/24]",
                TWO,
            ),
            edge(
                "loadBalancerSourceRanges: [203.0.113.0/24]",
                "[{addresses: [10.0.1.3]}]",
            ),
            // Random instead of Maglev: the table goes.
            edge("", TWO).replace(
                "namespace: web}\nspec",
                "namespace: web, annotations: {dataplane.dev/lb-algorithm: random}}\nspec",
            ),
            String::new(),
        ];
        let mut programmer = on_model();
        for (i, yaml) in states.iter().enumerate() {
            apply_checked(&mut programmer, i, yaml);
        }
        assert_eq!(programmer.maps().contents, MapContents::default());
    }

    /// Plans `yaml` (state `i` of a sequence) and applies it on the model, which checks every
    /// single write: no failure, no half-built frontend ever visible.
    fn apply_checked(programmer: &mut Programmer<MapModel>, i: usize, yaml: &str) -> Plan {
        let plan = plan_of(yaml);
        let report = programmer.apply(&plan);
        assert!(
            report.failures.is_empty(),
            "state {i}: {:?}",
            report.failures
        );
        assert!(
            programmer.maps().violations.is_empty(),
            "state {i}:\n{}\nwrites:\n{}",
            programmer.maps().violations.join("\n"),
            programmer.maps().log.join("\n")
        );
        plan
    }

    /// The same for IPv6 frontends and backends: a dual-stack service whose ranges, endpoints
    /// and policy change, then goes.
    #[test]
    fn no_ipv6_write_exposes_a_half_built_frontend() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/dual-stack-edge/objects.yaml");
        let base = std::fs::read_to_string(path).unwrap();
        let states = [
            base.clone(),
            // Another IPv6 range: the old one goes, the new one comes.
            base.replace("2001:db8:100::/48", "2001:db8:101::/48"),
            // Other IPv6 endpoints (the local one ready now), Cluster policy.
            base.replace("fd00:10:244::2", "fd00:10:244::3")
                .replace(
                    "{ready: false, serving: true, terminating: true}",
                    "{ready: true}",
                )
                .replace(
                    "externalTrafficPolicy: Local",
                    "externalTrafficPolicy: Cluster",
                ),
            // No IPv6 endpoints at all.
            base.replace("addressType: IPv6", "addressType: FQDN"),
            base.clone(),
            String::new(),
        ];
        let mut programmer = on_model();
        for (i, yaml) in states.iter().enumerate() {
            let plan = apply_checked(&mut programmer, i, yaml);
            let frontends: Vec<&Frontend> = plan.frontends.iter().collect();
            let fresh = translate(&frontends, &mut Ids::fresh());
            assert_eq!(
                programmer.maps().contents.v6.services.len(),
                fresh.v6.services.len(),
                "state {i}"
            );
        }
        assert_eq!(programmer.maps().contents, MapContents::default());
    }

    /// Every golden case (`tests/golden`): on empty maps the programmer writes exactly what
    /// `translate` says (whose output the golden files pin), and going from each case to the
    /// next, and back to nothing, no write exposes a half-built frontend.
    #[test]
    fn golden_cases_program_their_translation_in_a_safe_order() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let mut cases: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        cases.sort();
        let mut plans: Vec<Plan> = cases
            .iter()
            .map(|case| {
                let mut dir = crate::source::manifests::ManifestDir::new(case);
                let (objects, _) = dir.load("node-a").unwrap();
                compute(&objects, &NodeContext::named("node-a"))
            })
            .collect();
        plans.push(Plan::default());
        let mut carried = on_model();
        for (case, plan) in cases.iter().zip(&plans) {
            let mut fresh = on_model();
            fresh.apply(plan);
            let frontends: Vec<&Frontend> = plan.frontends.iter().collect();
            let expected = translate(&frontends, &mut Ids::fresh());
            assert_eq!(fresh.maps().contents, expected, "{}", case.display());
        }
        for plan in &plans {
            carried.apply(plan);
            assert_eq!(carried.maps().violations, Vec::<String>::new());
        }
        assert_eq!(carried.maps().contents, MapContents::default());
    }

    /// An agent restarted on maps holding both families' entries takes every frontend and
    /// backend id over from them, and has nothing to write for the same plan.
    #[test]
    fn a_restart_restores_both_families_and_writes_nothing() {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dual-stack-edge");
        let mut dir = crate::source::manifests::ManifestDir::new(&root);
        let (objects, _) = dir.load("node-a").unwrap();
        let plan = compute(&objects, &NodeContext::named("node-a"));
        let mut first = on_model();
        first.apply(&plan);
        let contents = first.maps().contents.clone();
        assert!(!contents.v6.services.is_empty() && !contents.v6.source_ranges.is_empty());
        let limits = (capacity::BACKENDS, capacity::FRONTENDS);
        let model = MapModel {
            contents: contents.clone(),
            ..Default::default()
        };
        let mut restarted = Programmer::from_contents(model, &contents, limits);
        assert_eq!(restarted.frontend_count(), plan.frontends.len());
        let report = restarted.apply(&plan);
        // Only the Maglev tables are built again (their inputs are not in the maps): the
        // same tables, written over themselves.
        assert_eq!(restarted.maps().contents, contents);
        assert!(
            restarted
                .maps()
                .log
                .iter()
                .all(|w| w.starts_with("Maglev table")),
            "{:?}",
            restarted.maps().log
        );
        assert!(report.failures.is_empty(), "{:?}", report.failures);
    }

    /// The programmer, starting on empty maps, writes exactly what `translate` says.
    #[test]
    fn programmed_maps_are_the_translation() {
        let plan = plan_of(&edge(
            "externalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n  \
             loadBalancerSourceRanges: [203.0.113.0/24]",
            TWO,
        ));
        let mut programmer = on_model();
        programmer.apply(&plan);
        let frontends: Vec<&Frontend> = plan.frontends.iter().collect();
        let expected = translate(&frontends, &mut Ids::fresh());
        assert_eq!(programmer.maps().contents, expected);
        assert!(!expected.maglev.is_empty() && !expected.v4.source_ranges.is_empty());
    }
}
