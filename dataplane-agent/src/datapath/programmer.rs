//! Writes a [`Plan`] into the maps as a diff against what they hold, in an order that never
//! lets a packet see a half-built service: backends first, then backend slots, then the
//! frontend entry (slot 0) that makes them reachable; removals in the reverse order.
//!
//! Ids are taken from the maps at start-up, so a restarted agent keeps every backend and
//! frontend id, and with them every established connection.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::maps::MapError;
use dataplane_common::{
    BACKEND_STATE_ACTIVE, Backend, RevNat, SVC_FLAG_DROP_WHEN_EMPTY, ServiceKey, ServiceValue,
    TrafficStats,
};
use tracing::{debug, warn};

use super::maps::PinnedMaps;
use crate::plan::{BackendAddr, FrontendAddr, Plan, Protocol};

/// Hands out small integer ids (never 0), reusing released ones oldest first, so an id is
/// not given to a new object while conntrack still remembers its previous owner.
#[derive(Debug)]
struct IdAllocator {
    free: VecDeque<u32>,
    /// Every id above this is unused and not in `free`.
    high: u32,
    limit: u32,
}

impl IdAllocator {
    fn new(limit: u32, in_use: &HashSet<u32>) -> Self {
        let high = in_use.iter().copied().max().unwrap_or(0);
        let free = (1..=high).filter(|id| !in_use.contains(id)).collect();
        Self { free, high, limit }
    }

    fn allocate(&mut self) -> Option<u32> {
        if self.high + 1 < self.limit {
            self.high += 1;
            return Some(self.high);
        }
        self.free.pop_front()
    }

    fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProgrammedFrontend {
    rev_nat_id: u32,
    flags: u16,
    /// Backend id in each slot, slot 1 first.
    slots: Vec<u32>,
}

/// What one `apply` changed, and what it could not do.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub writes: usize,
    pub deletes: usize,
    /// Objects that did not fit or could not be written; the rest was programmed.
    pub failures: Vec<String>,
}

pub struct Programmer {
    maps: PinnedMaps,
    backends: HashMap<BackendAddr, u32>,
    backend_ids: IdAllocator,
    frontends: HashMap<FrontendAddr, ProgrammedFrontend>,
    frontend_ids: IdAllocator,
}

fn ipv4(addr: SocketAddrV4) -> [u8; 4] {
    addr.ip().octets()
}

fn frontend_key(f: &FrontendAddr, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: ipv4(f.addr),
        port: f.addr.port(),
        backend_slot: slot,
        proto: f.protocol.number(),
        ..Default::default()
    }
}

impl Programmer {
    /// Reads back what earlier runs programmed.
    pub fn restore(maps: PinnedMaps) -> Result<Self, MapError> {
        let mut backends = HashMap::new();
        for entry in maps.backends.iter() {
            let (id, b) = entry?;
            let Some(protocol) = Protocol::from_number(b.proto) else {
                continue;
            };
            let addr = SocketAddrV4::new(Ipv4Addr::from(b.addr), b.port);
            backends.insert(BackendAddr { addr, protocol }, id);
        }
        let mut frontends: HashMap<FrontendAddr, ProgrammedFrontend> = HashMap::new();
        let mut slots: HashMap<FrontendAddr, Vec<(u16, u32)>> = HashMap::new();
        for entry in maps.services.iter() {
            let (key, value) = entry?;
            let Some(protocol) = Protocol::from_number(key.proto) else {
                continue;
            };
            let f = FrontendAddr {
                addr: SocketAddrV4::new(Ipv4Addr::from(key.addr), key.port),
                protocol,
            };
            if key.backend_slot == 0 {
                frontends.insert(
                    f,
                    ProgrammedFrontend {
                        rev_nat_id: value.rev_nat_id,
                        flags: value.flags,
                        slots: vec![],
                    },
                );
            } else {
                slots
                    .entry(f)
                    .or_default()
                    .push((key.backend_slot, value.backend_id));
            }
        }
        for (f, programmed) in frontends.iter_mut() {
            let mut list = slots.remove(f).unwrap_or_default();
            list.sort();
            // Slots are dense from 1; anything else is repaired by the next apply.
            programmed.slots = list
                .iter()
                .enumerate()
                .take_while(|(i, (slot, _))| *slot as usize == i + 1)
                .map(|(_, (_, id))| *id)
                .collect();
        }
        // Slots whose frontend entry is gone (a removal cut short): delete them.
        let orphans: Vec<ServiceKey> = slots
            .iter()
            .flat_map(|(f, list)| list.iter().map(|(slot, _)| frontend_key(f, *slot)))
            .collect();
        // Ids index the stats arrays and must fit the id-keyed maps, whatever their sizes.
        let id_limits = maps.id_limits();
        let backend_in_use: HashSet<u32> = backends.values().copied().collect();
        let frontend_in_use: HashSet<u32> = frontends.values().map(|f| f.rev_nat_id).collect();
        let mut programmer = Self {
            maps,
            backends,
            backend_ids: IdAllocator::new(id_limits.0, &backend_in_use),
            frontends,
            frontend_ids: IdAllocator::new(id_limits.1, &frontend_in_use),
        };
        for key in orphans {
            let _ = programmer.maps.services.remove(&key);
        }
        debug!(
            backends = programmer.backends.len(),
            frontends = programmer.frontends.len(),
            "restored datapath state from pinned maps"
        );
        Ok(programmer)
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn apply(&mut self, plan: &Plan) -> ApplyReport {
        let mut report = ApplyReport::default();
        let wanted_frontends: HashSet<FrontendAddr> =
            plan.frontends.iter().map(|f| f.frontend).collect();
        // 1. Frontends that are gone, first so their room serves new ones; slot 0 first, so no
        // new flow picks a slot being removed.
        let gone: Vec<FrontendAddr> = self
            .frontends
            .keys()
            .filter(|f| !wanted_frontends.contains(f))
            .copied()
            .collect();
        for f in gone {
            let programmed = self.frontends.remove(&f).expect("listed above");
            let _ = self.maps.services.remove(&frontend_key(&f, 0));
            for slot in 1..=programmed.slots.len() {
                let _ = self.maps.services.remove(&frontend_key(&f, slot as u16));
            }
            let _ = self.maps.rev_nat.remove(&programmed.rev_nat_id);
            self.frontend_ids.release(programmed.rev_nat_id);
            report.deletes += 1;
        }

        // 2. Backends that are new.
        let wanted_backends: HashSet<BackendAddr> = plan
            .frontends
            .iter()
            .flat_map(|f| {
                f.backends.iter().map(|b| BackendAddr {
                    addr: *b,
                    protocol: f.frontend.protocol,
                })
            })
            .collect();
        let mut new_backends: Vec<&BackendAddr> = wanted_backends
            .iter()
            .filter(|b| !self.backends.contains_key(b))
            .collect();
        new_backends.sort();
        for backend in new_backends {
            match self.add_backend(backend) {
                Ok(id) => {
                    self.backends.insert(*backend, id);
                    report.writes += 1;
                }
                Err(e) => report.failures.push(format!(
                    "backend {} {}: {e}",
                    backend.addr, backend.protocol
                )),
            }
        }

        // 3. Frontends: slots, then slot 0.
        for frontend in &plan.frontends {
            let ids: Vec<u32> = frontend
                .backends
                .iter()
                .filter_map(|b| {
                    self.backends.get(&BackendAddr {
                        addr: *b,
                        protocol: frontend.frontend.protocol,
                    })
                })
                .copied()
                .collect();
            let flags = if frontend.drop_when_empty {
                SVC_FLAG_DROP_WHEN_EMPTY
            } else {
                0
            };
            if let Err(e) = self.program_frontend(&frontend.frontend, ids, flags, &mut report) {
                report.failures.push(format!(
                    "frontend {} {} of {}: {e}",
                    frontend.frontend.addr, frontend.frontend.protocol, frontend.service
                ));
            }
        }

        // 4. Backends no frontend uses any more. Conntrack entries still naming them see the
        // backend gone on their next packet (UDP moves, TCP is reset).
        let gone: Vec<(BackendAddr, u32)> = self
            .backends
            .iter()
            .filter(|(b, _)| !wanted_backends.contains(b))
            .map(|(b, id)| (*b, *id))
            .collect();
        for (backend, id) in gone {
            let _ = self.maps.backends.remove(&id);
            self.backends.remove(&backend);
            self.backend_ids.release(id);
            report.deletes += 1;
        }
        for failure in &report.failures {
            warn!(failure, "could not program");
        }
        report
    }

    fn add_backend(&mut self, backend: &BackendAddr) -> Result<u32, String> {
        let id = self
            .backend_ids
            .allocate()
            .ok_or("no free backend id (capacity reached)")?;
        let value = Backend {
            addr: ipv4(backend.addr),
            port: backend.addr.port(),
            proto: backend.protocol.number(),
            state: BACKEND_STATE_ACTIVE,
        };
        // A reused id starts its counters from zero.
        let written = self
            .maps
            .backend_stats
            .set(id, TrafficStats::default(), 0)
            .and_then(|()| self.maps.backends.insert(id, value, 0));
        written.map(|()| id).map_err(|e| {
            self.backend_ids.release(id);
            map_error(e)
        })
    }

    fn program_frontend(
        &mut self,
        f: &FrontendAddr,
        mut ids: Vec<u32>,
        flags: u16,
        report: &mut ApplyReport,
    ) -> Result<(), String> {
        let current = self.frontends.get(f).cloned();
        let rev_nat_id = match &current {
            Some(c) => c.rev_nat_id,
            None => {
                let id = self
                    .frontend_ids
                    .allocate()
                    .ok_or("no free frontend id (capacity reached)")?;
                let rev_nat = RevNat {
                    addr: ipv4(f.addr),
                    port: f.addr.port(),
                    _pad: [0; 2],
                };
                let written = self
                    .maps
                    .service_stats
                    .set(id, TrafficStats::default(), 0)
                    .and_then(|()| self.maps.rev_nat.insert(id, rev_nat, 0));
                if let Err(e) = written {
                    self.frontend_ids.release(id);
                    return Err(map_error(e));
                }
                report.writes += 1;
                id
            }
        };
        let old_slots = current.as_ref().map(|c| c.slots.as_slice()).unwrap_or(&[]);
        if ids.len() > u16::MAX as usize {
            ids.truncate(u16::MAX as usize);
        }
        // Slots: only those that change. If the map fills up, the frontend keeps the slots
        // that were written; the rest are reported.
        let mut written = ids.len();
        let mut short = None;
        for (i, id) in ids.iter().enumerate() {
            if old_slots.get(i) == Some(id) {
                continue;
            }
            let value = ServiceValue {
                backend_id: *id,
                ..Default::default()
            };
            let key = frontend_key(f, i as u16 + 1);
            if let Err(e) = self.maps.services.insert(key, value, 0) {
                short = Some(format!(
                    "{}; serving {i} of {} backends",
                    map_error(e),
                    ids.len()
                ));
                written = i;
                break;
            }
            report.writes += 1;
        }
        ids.truncate(written);
        if current.as_ref().map(|c| (c.slots.len(), c.flags)) != Some((ids.len(), flags)) {
            let value = ServiceValue {
                rev_nat_id,
                count: ids.len() as u16,
                flags,
                ..Default::default()
            };
            if let Err(e) = self.maps.services.insert(frontend_key(f, 0), value, 0) {
                // Leave the slots written; the next apply retries slot 0.
                if current.is_none() {
                    let _ = self.maps.rev_nat.remove(&rev_nat_id);
                    self.frontend_ids.release(rev_nat_id);
                }
                return Err(map_error(e));
            }
            report.writes += 1;
        }
        for slot in ids.len() + 1..=old_slots.len() {
            let _ = self.maps.services.remove(&frontend_key(f, slot as u16));
            report.deletes += 1;
        }
        if let Some(short) = short {
            report
                .failures
                .push(format!("frontend {} {}: {short}", f.addr, f.protocol));
        }
        self.frontends.insert(
            *f,
            ProgrammedFrontend {
                rev_nat_id,
                flags,
                slots: ids,
            },
        );
        Ok(())
    }
}

fn map_error(e: MapError) -> String {
    match e {
        MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
            "map is full".to_string()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_zero_and_reused_oldest_first() {
        let mut ids = IdAllocator::new(4, &HashSet::new());
        assert_eq!(
            (ids.allocate(), ids.allocate(), ids.allocate()),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(ids.allocate(), None, "limit 4 allows ids 1..=3");
        ids.release(2);
        ids.release(1);
        assert_eq!((ids.allocate(), ids.allocate()), (Some(2), Some(1)));
    }

    #[test]
    fn restored_ids_are_not_handed_out_again() {
        let in_use: HashSet<u32> = [1, 3, 4].into();
        let mut ids = IdAllocator::new(10, &in_use);
        let got: Vec<_> = std::iter::from_fn(|| ids.allocate()).collect();
        assert_eq!(got, vec![5, 6, 7, 8, 9, 2]);
    }
}
