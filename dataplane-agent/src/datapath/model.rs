//! A model of the maps the programmer writes, for tests: it takes the programmer's writes
//! one element at a time (as the kernel applies a batch) and, after every single write,
//! checks what a packet arriving at that moment could find.
use std::collections::HashSet;

use dataplane_common::{
    BackendOf, FrontendName, Ipv4, Ipv6, SVC_FLAG_MAGLEV, SVC_FLAG_SOURCE_RANGES, ServiceKeyOf,
    ServiceValue, SourceRangeKeyOf,
};

use super::{
    family::Family,
    programmer::{FamilyWrites, MapWrites},
    translate::MapContents,
};

#[derive(Debug, Default)]
pub struct MapModel {
    pub contents: MapContents,
    /// Every write, in order.
    pub log: Vec<String>,
    /// What was wrong after a write: a frontend reachable from its slot 0 pointed at
    /// something missing.
    pub violations: Vec<String>,
}

/// What a new flow to each frontend could need and not find, with the maps as `c` holds them.
pub fn check(c: &MapContents) -> Result<(), String> {
    check_family::<Ipv4>(c)?;
    check_family::<Ipv6>(c)
}

fn check_family<A: Family>(c: &MapContents) -> Result<(), String> {
    let family = A::contents(c);
    for (key, value) in family.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        let frontend = format!(
            "{}/{} scope {}",
            std::net::SocketAddr::new(key.addr.ip(), key.port),
            key.proto,
            key.scope
        );
        // A backend of the frontend's own family: the other family's array at that id is
        // never read for it.
        let backend_ok = |id: u32| family.backends.contains_key(&id);
        for slot in 1..=value.count {
            let slot_key = ServiceKeyOf {
                backend_slot: slot,
                ..*key
            };
            match family.services.get(&slot_key) {
                None => return Err(format!("{frontend}: slot {slot} missing")),
                Some(s) if !backend_ok(s.backend_id) => {
                    return Err(format!(
                        "{frontend}: slot {slot} names missing backend {}",
                        s.backend_id
                    ));
                }
                Some(_) => {}
            }
        }
        if value.flags & SVC_FLAG_MAGLEV != 0 && value.count > 0 {
            match c.maglev.get(&value.rev_nat_id) {
                None => return Err(format!("{frontend}: Maglev table missing")),
                Some(table) => {
                    if let Some(id) = table.iter().find(|id| !backend_ok(**id)) {
                        return Err(format!(
                            "{frontend}: Maglev table names missing backend {id}"
                        ));
                    }
                }
            }
        }
        if value.flags & SVC_FLAG_SOURCE_RANGES != 0
            && !family
                .source_ranges
                .iter()
                .any(|(_, r)| u32::from_be(r.rev_nat_id_be) == value.rev_nat_id)
        {
            return Err(format!(
                "{frontend}: no source range (every source dropped)"
            ));
        }
    }
    Ok(())
}

impl MapModel {
    fn wrote(&mut self, what: String) {
        if let Err(e) = check(&self.contents) {
            self.violations
                .push(format!("after write {} ({what}): {e}", self.log.len() + 1));
        }
        self.log.push(what);
    }
}

impl<A: Family> FamilyWrites<A> for MapModel {
    fn update_services(
        &mut self,
        keys: &[ServiceKeyOf<A>],
        values: &[ServiceValue],
    ) -> Result<(), (usize, String)> {
        for (k, v) in keys.iter().zip(values) {
            A::contents_mut(&mut self.contents).services.insert(*k, *v);
            self.wrote(format!("service {k:?} = {v:?}"));
        }
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKeyOf<A>) {
        A::contents_mut(&mut self.contents).services.remove(key);
        self.wrote(format!("delete service {key:?}"));
    }

    fn update_backends(
        &mut self,
        ids: &[u32],
        values: &[BackendOf<A>],
    ) -> Result<(), (usize, String)> {
        for (id, b) in ids.iter().zip(values) {
            let backends = &mut A::contents_mut(&mut self.contents).backends;
            if b.addr.is_unspecified() {
                backends.remove(id);
            } else {
                backends.insert(*id, *b);
            }
            self.wrote(format!("backend {id} = {b:?}"));
        }
        Ok(())
    }

    fn add_source_range(&mut self, range: (u32, SourceRangeKeyOf<A>)) -> Result<(), String> {
        A::contents_mut(&mut self.contents)
            .source_ranges
            .insert(range);
        self.wrote(format!("source range {range:?}"));
        Ok(())
    }

    fn remove_source_range(&mut self, range: (u32, SourceRangeKeyOf<A>)) {
        A::contents_mut(&mut self.contents)
            .source_ranges
            .remove(&range);
        self.wrote(format!("delete source range {range:?}"));
    }

    fn forget_affinity(&mut self, _lost: &HashSet<(u32, u32)>) {}
}

impl MapWrites for MapModel {
    fn reset_frontend_stats(&mut self, _ids: &[u32]) -> Result<(), (usize, String)> {
        Ok(())
    }

    fn reset_backend_stats(&mut self, _ids: &[u32]) -> Result<(), (usize, String)> {
        Ok(())
    }

    fn update_names(&mut self, ids: &[u32], names: &[FrontendName]) -> Result<(), (usize, String)> {
        for (id, name) in ids.iter().zip(names) {
            self.contents.names.insert(*id, *name);
        }
        Ok(())
    }

    fn remove_name(&mut self, id: u32) {
        self.contents.names.remove(&id);
    }

    fn set_maglev(&mut self, id: u32, table: &[u32]) -> Result<(), String> {
        self.contents.maglev.insert(id, table.to_vec());
        self.wrote(format!("Maglev table {id}"));
        Ok(())
    }

    fn remove_maglev(&mut self, id: u32) {
        self.contents.maglev.remove(&id);
        self.wrote(format!("delete Maglev table {id}"));
    }
}
