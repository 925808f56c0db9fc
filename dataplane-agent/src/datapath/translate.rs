//! The plan as map entries, and map entries as the model: the one place that knows how a
//! [`Frontend`] is laid out in the datapath's maps (slot 0 and its flags, backend slots,
//! backends, Maglev tables, source ranges, names) and how to read those entries back.
//!
//! Pure: no syscall, no map handle. Ids come from an [`IdAllocator`] the caller passes in, so
//! the same plan with the same allocator always gives the same entries. The programmer
//! writes what this computes (a diff, in an order that never exposes a half-built service);
//! restore, the inspection commands, metrics and `trace` read the maps through the decoders
//! here.
//!
//! The encoders and decoders are generic over the address family `A` ([`Family`]): a
//! frontend's entries are of its own family, as are its backends and source ranges (the
//! planner never mixes them), and `by_family!` picks `A` from the address.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::SocketAddr,
};

use dataplane_common::{
    BACKEND_STATE_ACTIVE, BackendOf, FRONTEND_KIND_CLUSTER_IP, FRONTEND_KIND_EXTERNAL_IP,
    FRONTEND_KIND_LOAD_BALANCER, FRONTEND_KIND_NODE_PORT, FrontendName, Ipv4, Ipv6,
    MAGLEV_TABLE_SIZE, SCOPE_DEFAULT, SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_WHEN_EMPTY,
    SVC_FLAG_EXTERNAL, SVC_FLAG_EXTERNAL_LOCAL, SVC_FLAG_MAGLEV, SVC_FLAG_SOURCE_RANGES,
    SVC_FLAG_TWO_SCOPES, ServiceKeyOf, ServiceValue, SourceRangeKeyOf,
};

use crate::{
    datapath::{
        family::{Family, by_family},
        maglev,
    },
    plan::{Algorithm, BackendAddr, Cidr, Frontend, FrontendAddr, FrontendKind, Protocol},
};

/// Hands out small integer ids (never 0), preferring ids never used before and then the
/// longest-released, so an id is not given to a new object while conntrack still remembers
/// its previous owner.
#[derive(Debug, Clone)]
pub struct IdAllocator {
    free: VecDeque<u32>,
    /// Every id above this is unused and not in `free`.
    high: u32,
    limit: u32,
}

impl IdAllocator {
    /// Ids below `limit`, none of `in_use`.
    pub fn new(limit: u32, in_use: &HashSet<u32>) -> Self {
        let high = in_use.iter().copied().max().unwrap_or(0);
        let free = (1..=high).filter(|id| !in_use.contains(id)).collect();
        Self { free, high, limit }
    }

    pub fn allocate(&mut self) -> Option<u32> {
        if self.high + 1 < self.limit {
            self.high += 1;
            return Some(self.high);
        }
        self.free.pop_front()
    }

    pub fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }

    /// The highest id handed out or in use so far (0 if none).
    pub fn highest(&self) -> u32 {
        self.high
    }
}

/// One entry of the service map family: a frontend in one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKey {
    pub frontend: FrontendAddr,
    pub scope: u8,
}

/// What slot 0 of an entry says, besides its frontend id and slot count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntrySettings {
    /// `SVC_FLAG_*`.
    pub flags: u16,
    pub affinity_timeout: u32,
    pub service_port_id: u32,
}

/// A service-map entry as the plan wants it, before backend ids are known.
pub struct WantedEntry<'a> {
    pub frontend: &'a Frontend,
    pub key: EntryKey,
    pub backends: &'a [SocketAddr],
    /// Kept programmed, in no slot (the default-scope entry holds them for the frontend).
    pub retained: &'a [SocketAddr],
    /// `service_port_id` is 0 when no frontend of the service port has an id yet: the
    /// frontend's own id then serves (see [`slot0`]).
    pub settings: EntrySettings,
}

/// The slot-0 flags of a frontend's default-scope entry.
pub fn flags(frontend: &Frontend) -> u16 {
    let mut flags = 0;
    let mut set = |on: bool, flag: u16| {
        if on {
            flags |= flag;
        }
    };
    set(frontend.drop_when_empty, SVC_FLAG_DROP_WHEN_EMPTY);
    set(frontend.kind.is_external(), SVC_FLAG_EXTERNAL);
    set(frontend.external_local, SVC_FLAG_EXTERNAL_LOCAL);
    set(frontend.affinity_timeout.is_some(), SVC_FLAG_AFFINITY);
    set(!frontend.source_ranges.is_empty(), SVC_FLAG_SOURCE_RANGES);
    set(frontend.algorithm == Algorithm::Maglev, SVC_FLAG_MAGLEV);
    set(frontend.internal_backends.is_some(), SVC_FLAG_TWO_SCOPES);
    flags
}

/// Every service-map entry `frontends` need (the default scope, and the pods' view of a
/// two-scope frontend), with the settings of their slot 0. `frontend_id` gives the id of a
/// frontend that has one: the service-port id is the smallest frontend id among the
/// frontends of the service port (frontend ids survive restarts, so this one does too).
pub fn wanted_entries<'a>(
    frontends: &[&'a Frontend],
    frontend_id: impl Fn(&FrontendAddr) -> Option<u32>,
) -> Vec<WantedEntry<'a>> {
    let mut out = Vec::with_capacity(frontends.len());
    for &frontend in frontends {
        let flags = flags(frontend);
        let settings = EntrySettings {
            flags,
            affinity_timeout: frontend.affinity_timeout.unwrap_or(0),
            service_port_id: 0, // filled in below, once frontend ids are known
        };
        out.push(WantedEntry {
            frontend,
            key: EntryKey {
                frontend: frontend.frontend,
                scope: SCOPE_DEFAULT,
            },
            backends: &frontend.backends,
            retained: &frontend.retained,
            settings,
        });
        if let Some(internal) = &frontend.internal_backends {
            // The pods' view: every endpoint, chosen at random, never dropped for policy.
            out.push(WantedEntry {
                frontend,
                key: EntryKey {
                    frontend: frontend.frontend,
                    scope: SCOPE_INTERNAL,
                },
                backends: internal,
                retained: &[],
                settings: EntrySettings {
                    flags: flags & SVC_FLAG_AFFINITY,
                    ..settings
                },
            });
        }
    }
    let mut port_ids: HashMap<(&str, &str, Protocol), u32> = HashMap::new();
    for entry in &out {
        let f = entry.frontend;
        if let Some(id) = frontend_id(&f.frontend) {
            let slot = port_ids
                .entry((&f.service, &f.port_name, f.frontend.protocol))
                .or_insert(id);
            *slot = (*slot).min(id);
        }
    }
    for entry in &mut out {
        let f = entry.frontend;
        let key = (
            f.service.as_str(),
            f.port_name.as_str(),
            f.frontend.protocol,
        );
        entry.settings.service_port_id = port_ids.get(&key).copied().unwrap_or(0);
    }
    out
}

/// A key of the entry in its family's service map (`A`: the frontend's family).
pub fn service_key<A: Family>(entry: &EntryKey, slot: u16) -> ServiceKeyOf<A> {
    ServiceKeyOf {
        addr: A::octets(entry.frontend.addr.ip()),
        port: entry.frontend.addr.port(),
        backend_slot: slot,
        proto: entry.frontend.protocol.number(),
        scope: entry.scope,
        _pad: [0; 2],
    }
}

/// Slot 0 of an entry with `count` backend slots.
pub fn slot0(rev_nat_id: u32, count: usize, settings: EntrySettings) -> ServiceValue {
    ServiceValue {
        backend_id: 0,
        rev_nat_id,
        count: count as u16,
        flags: settings.flags,
        affinity_timeout: settings.affinity_timeout,
        service_port_id: if settings.service_port_id == 0 {
            rev_nat_id // a service port's first frontend
        } else {
            settings.service_port_id
        },
    }
}

/// A backend slot.
pub fn slot(backend_id: u32) -> ServiceValue {
    ServiceValue {
        backend_id,
        ..Default::default()
    }
}

/// Slots hold at most this many backends (`ServiceValue::count` is a `u16`).
pub const MAX_SLOTS: usize = u16::MAX as usize;

/// A backend array entry (`A`: the backend's family).
pub fn backend<A: Family>(backend: &BackendAddr) -> BackendOf<A> {
    BackendOf {
        addr: A::octets(backend.addr.ip()),
        port: backend.addr.port(),
        proto: backend.protocol.number(),
        state: BACKEND_STATE_ACTIVE,
    }
}

/// A source-range entry: the trie's prefix length (the 32 bits of the frontend id, then the
/// CIDR's) and its data (`A`: the CIDR's family, which is its frontend's).
pub fn source_range<A: Family>(rev_nat_id: u32, cidr: &Cidr) -> (u32, SourceRangeKeyOf<A>) {
    (
        32 + cidr.prefix as u32,
        SourceRangeKeyOf {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr: A::octets(cidr.addr),
        },
    )
}

/// A frontend's Maglev table from its backends and their ids (in slot order).
pub fn maglev_table(backends: &[(SocketAddr, u32)]) -> Vec<u32> {
    let addrs: Vec<SocketAddr> = backends.iter().map(|(a, _)| *a).collect();
    maglev::table(&addrs, MAGLEV_TABLE_SIZE)
        .into_iter()
        .map(|i| backends[i].1)
        .collect()
}

/// The name record of a frontend, strings cut to fit on a character boundary.
pub fn frontend_name(frontend: &Frontend) -> FrontendName {
    fn copy<const N: usize>(text: &str) -> [u8; N] {
        let mut out = [0u8; N];
        let mut end = text.len().min(N);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        out[..end].copy_from_slice(&text.as_bytes()[..end]);
        out
    }
    FrontendName {
        service: copy(&frontend.service),
        port: copy(&frontend.port_name),
        kind: match frontend.kind {
            FrontendKind::ClusterIP => FRONTEND_KIND_CLUSTER_IP,
            FrontendKind::NodePort => FRONTEND_KIND_NODE_PORT,
            FrontendKind::LoadBalancer => FRONTEND_KIND_LOAD_BALANCER,
            FrontendKind::ExternalIP => FRONTEND_KIND_EXTERNAL_IP,
        },
        _pad: [0; 7],
    }
}

/// Everything the agent programs, as map entries (the per-CPU stats, conntrack, affinity and
/// config maps are the datapath's or set elsewhere).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// The maps with IPv4 keys or values (`dp_svc_v2`, `dp_backends_v2`, `dp_srcrange_v1`)...
    pub v4: FamilyContents<Ipv4>,
    /// ...and their IPv6 peers (`dp_svc6_v1`, `dp_be6_v1`, `dp_srcrange6_v1`).
    pub v6: FamilyContents<Ipv6>,
    /// Frontend id → its table's backend ids (`MaglevTable::backend_ids`); ids are one space
    /// for both families.
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub names: BTreeMap<u32, FrontendName>,
}

/// The entries of one family's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FamilyContents<A: Family> {
    pub services: BTreeMap<ServiceKeyOf<A>, ServiceValue>,
    /// Backend ids in use (the array's other entries hold zeroes; an id is in use in one
    /// family's array only).
    pub backends: BTreeMap<u32, BackendOf<A>>,
    /// (prefix length, key) of each source-range entry.
    pub source_ranges: BTreeSet<(u32, SourceRangeKeyOf<A>)>,
}

/// The ids of a translation: frontend ids first (in the order of `frontends`), then backend
/// ids (in address order).
pub struct Ids {
    pub frontends: IdAllocator,
    pub backends: IdAllocator,
}

impl Ids {
    /// Fresh allocators with the maps' default capacities.
    pub fn fresh() -> Self {
        use dataplane_common::capacity;
        Self {
            frontends: IdAllocator::new(capacity::FRONTENDS, &HashSet::new()),
            backends: IdAllocator::new(capacity::BACKENDS, &HashSet::new()),
        }
    }
}

/// The whole map contents of `frontends`, as an agent starting on empty maps programs them
/// (with room for everything).
pub fn translate(frontends: &[&Frontend], ids: &mut Ids) -> MapContents {
    let mut out = MapContents::default();
    let mut frontend_ids = HashMap::new();
    for f in frontends {
        if let Some(id) = ids.frontends.allocate() {
            frontend_ids.insert(f.frontend, id);
            out.names.insert(id, frontend_name(f));
        }
    }
    let wanted = wanted_entries(frontends, |f| frontend_ids.get(f).copied());
    let mut backend_addrs: Vec<BackendAddr> = wanted
        .iter()
        .flat_map(|w| {
            let protocol = w.key.frontend.protocol;
            (w.backends.iter().chain(w.retained)).map(move |b| BackendAddr { addr: *b, protocol })
        })
        .collect();
    backend_addrs.sort();
    backend_addrs.dedup();
    let mut backend_ids = HashMap::new();
    for b in backend_addrs {
        if let Some(id) = ids.backends.allocate() {
            backend_ids.insert(b, id);
            by_family!(b.addr.ip(), A => {
                A::contents_mut(&mut out).backends.insert(id, backend::<A>(&b));
            });
        }
    }
    for entry in &wanted {
        let Some(&rev_nat_id) = frontend_ids.get(&entry.key.frontend) else {
            continue;
        };
        let protocol = entry.key.frontend.protocol;
        let resolved: Vec<(SocketAddr, u32)> = entry
            .backends
            .iter()
            .filter_map(|b| Some((*b, *backend_ids.get(&BackendAddr { addr: *b, protocol })?)))
            .take(MAX_SLOTS)
            .collect();
        if entry.key.scope == SCOPE_DEFAULT
            && entry.settings.flags & SVC_FLAG_MAGLEV != 0
            && !resolved.is_empty()
        {
            out.maglev.insert(rev_nat_id, maglev_table(&resolved));
        }
        by_family!(entry.key.frontend.addr.ip(), A => {
            let family = A::contents_mut(&mut out);
            if entry.key.scope == SCOPE_DEFAULT {
                for cidr in &entry.frontend.source_ranges {
                    family.source_ranges.insert(source_range::<A>(rev_nat_id, cidr));
                }
            }
            for (i, (_, id)) in resolved.iter().enumerate() {
                family
                    .services
                    .insert(service_key::<A>(&entry.key, i as u16 + 1), slot(*id));
            }
            family.services.insert(
                service_key::<A>(&entry.key, 0),
                slot0(rev_nat_id, resolved.len(), entry.settings),
            );
        });
    }
    out
}

// ---- Reading the maps back ----

/// A backend array entry as the model sees it; `None` for an unused id (zeroes) or a
/// protocol this agent does not program.
pub fn decode_backend<A: Family>(backend: &BackendOf<A>) -> Option<BackendAddr> {
    if backend.addr.is_unspecified() {
        return None;
    }
    Some(BackendAddr {
        addr: SocketAddr::new(backend.addr.ip(), backend.port),
        protocol: Protocol::from_number(backend.proto)?,
    })
}

/// The frontend and scope a service-map key belongs to (`None`: a protocol this agent does
/// not program).
pub fn decode_key<A: Family>(key: &ServiceKeyOf<A>) -> Option<EntryKey> {
    Some(EntryKey {
        frontend: FrontendAddr {
            addr: SocketAddr::new(key.addr.ip(), key.port),
            protocol: Protocol::from_number(key.proto)?,
        },
        scope: key.scope,
    })
}

/// Slot 0 of an entry (its slots not read).
pub fn decode_slot0(value: &ServiceValue) -> DecodedEntry {
    DecodedEntry {
        rev_nat_id: value.rev_nat_id,
        settings: EntrySettings {
            flags: value.flags,
            affinity_timeout: value.affinity_timeout,
            service_port_id: value.service_port_id,
        },
        count: value.count,
        slots: vec![],
    }
}

/// One entry of the service map, read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedEntry {
    pub rev_nat_id: u32,
    pub settings: EntrySettings,
    /// What slot 0 counts.
    pub count: u16,
    /// The backend ids of slots 1, 2... as long as they are dense from 1 (anything else is
    /// repaired by the next apply).
    pub slots: Vec<u32>,
}

/// One family's service map read back.
#[derive(Clone, Debug)]
pub struct DecodedServices<A: Family> {
    pub entries: BTreeMap<EntryKey, DecodedEntry>,
    /// Slots whose frontend entry is gone (a removal cut short).
    pub orphans: Vec<ServiceKeyOf<A>>,
}

pub fn decode_services<A: Family>(
    entries: impl IntoIterator<Item = (ServiceKeyOf<A>, ServiceValue)>,
) -> DecodedServices<A> {
    let mut out = DecodedServices {
        entries: BTreeMap::new(),
        orphans: vec![],
    };
    let mut slots: BTreeMap<EntryKey, Vec<(u16, u32, ServiceKeyOf<A>)>> = BTreeMap::new();
    for (key, value) in entries {
        let Some(entry_key) = decode_key(&key) else {
            continue;
        };
        if key.backend_slot == 0 {
            out.entries.insert(entry_key, decode_slot0(&value));
        } else {
            slots
                .entry(entry_key)
                .or_default()
                .push((key.backend_slot, value.backend_id, key));
        }
    }
    for (key, mut list) in slots {
        let Some(entry) = out.entries.get_mut(&key) else {
            out.orphans.extend(list.iter().map(|(_, _, k)| *k));
            continue;
        };
        list.sort();
        entry.slots = list
            .iter()
            .enumerate()
            .take_while(|(i, (slot, _, _))| *slot as usize == i + 1)
            .map(|(_, (_, id, _))| *id)
            .collect();
    }
    out
}

/// A source-range entry read back: the frontend id and the CIDR.
pub fn decode_source_range<A: Family>(prefix_len: u32, key: &SourceRangeKeyOf<A>) -> (u32, Cidr) {
    let prefix = prefix_len.saturating_sub(32).min(A::BITS.into()) as u8;
    (
        u32::from_be(key.rev_nat_id_be),
        Cidr {
            addr: key.addr.ip(),
            prefix,
        },
    )
}

/// Who a frontend belongs to, from its name record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedName {
    /// `namespace/name`.
    pub service: String,
    pub port: String,
    pub kind: FrontendKind,
}

pub fn decode_name(name: &FrontendName) -> DecodedName {
    fn text(bytes: &[u8]) -> String {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }
    DecodedName {
        service: text(&name.service),
        port: text(&name.port),
        kind: match name.kind {
            FRONTEND_KIND_NODE_PORT => FrontendKind::NodePort,
            FRONTEND_KIND_LOAD_BALANCER => FrontendKind::LoadBalancer,
            FRONTEND_KIND_EXTERNAL_IP => FrontendKind::ExternalIP,
            _ => FrontendKind::ClusterIP,
        },
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// What the encoders write, the decoders read back as the same model.
    #[test]
    fn decoding_inverts_encoding() {
        let plan = crate::plan::tests::plan_of(
            "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}], sessionAffinity: ClientIP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]
",
        );
        let frontends: Vec<&Frontend> = plan.frontends.iter().collect();
        let contents = translate(&frontends, &mut Ids::fresh());
        let decoded = decode_services(contents.v4.services.iter().map(|(k, v)| (*k, *v)));
        assert!(decoded.orphans.is_empty());
        let f = &plan.frontends[0];
        let key = EntryKey {
            frontend: f.frontend,
            scope: SCOPE_DEFAULT,
        };
        let entry = &decoded.entries[&key];
        assert_eq!(entry.rev_nat_id, 1);
        assert_eq!(entry.count, 2);
        assert_eq!(entry.settings.flags, flags(f));
        assert_eq!(entry.settings.affinity_timeout, 10_800);
        let backends: Vec<SocketAddr> = (entry.slots.iter())
            .map(|id| decode_backend(&contents.v4.backends[id]).unwrap().addr)
            .collect();
        assert_eq!(backends, f.backends);
        let name = decode_name(&contents.names[&1]);
        assert_eq!(
            (name.service.as_str(), name.port.as_str(), name.kind),
            ("shop/web", "http", FrontendKind::ClusterIP)
        );
        let cidr = Cidr::parse("203.0.113.0/24").unwrap();
        let (prefix, range) = source_range::<Ipv4>(7, &cidr);
        assert_eq!(decode_source_range(prefix, &range), (7, cidr));
    }

    /// An IPv6 frontend's entries, byte for byte as the datapath reads them: the address in
    /// network order, ports host order, ids shared with IPv4 (one id space).
    #[test]
    fn ipv6_entries_are_laid_out_byte_exact() {
        let plan = crate::plan::tests::plan_of(
            "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6, IPv4]
  clusterIPs: ['fd00:10:96::a', 10.96.0.10]
  loadBalancerSourceRanges: ['2001:db8:100::/48']
  ports: [{name: http, port: 80}]
status: {loadBalancer: {ingress: [{ip: '2001:db8:200::1'}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ['fd00:10:244::1']}]
",
        );
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        let frontends: Vec<&Frontend> = plan.frontends.iter().collect();
        let contents = translate(&frontends, &mut Ids::fresh());
        // The IPv4 cluster IP (no IPv4 endpoints) is the only IPv4 entry.
        assert_eq!(contents.v4.services.len(), 1);
        assert!(contents.v4.backends.is_empty() && contents.v4.source_ranges.is_empty());
        let bytes = |key: &ServiceKeyOf<Ipv6>| bytemuck::bytes_of(key).to_vec();
        let cluster_ip = [0xfd, 0, 0, 0x10, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
        let mut slot0 = cluster_ip.to_vec();
        // Port and slot in host order, then TCP, the default scope, padding.
        slot0.extend(80u16.to_ne_bytes().into_iter().chain([0, 0, 6, 0, 0, 0]));
        let mut slot1 = cluster_ip.to_vec();
        let slot = 1u16.to_ne_bytes();
        slot1.extend(
            80u16
                .to_ne_bytes()
                .into_iter()
                .chain(slot)
                .chain([6, 0, 0, 0]),
        );
        let keys: Vec<Vec<u8>> = contents.v6.services.keys().map(bytes).collect();
        assert!(keys.contains(&slot0) && keys.contains(&slot1), "{keys:x?}");
        // Frontend ids in address order: 1 the IPv4 cluster IP, 2 the load-balancer IP, 3 the
        // IPv6 cluster IP; the one backend takes id 1, in the IPv6 array.
        let backend = &contents.v6.backends[&1];
        let mut want = vec![0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        want.extend(8080u16.to_ne_bytes());
        want.extend([6, 0]);
        assert_eq!(bytemuck::bytes_of(backend), want.as_slice());
        let [(prefix, range)] = contents.v6.source_ranges.iter().collect::<Vec<_>>()[..] else {
            panic!("one range: {:?}", contents.v6.source_ranges);
        };
        assert_eq!(*prefix, 32 + 48);
        let mut want = 2u32.to_be_bytes().to_vec(); // the load-balancer frontend's id
        want.extend([
            0x20, 0x01, 0x0d, 0xb8, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        assert_eq!(bytemuck::bytes_of(range), want.as_slice());
        assert_eq!(
            decode_source_range(*prefix, range),
            (2, Cidr::parse("2001:db8:100::/48").unwrap())
        );
        let decoded = decode_services(contents.v6.services.iter().map(|(k, v)| (*k, *v)));
        let frontend: FrontendAddr = FrontendAddr {
            addr: "[fd00:10:96::a]:80".parse().unwrap(),
            protocol: Protocol::Tcp,
        };
        let key = EntryKey {
            frontend,
            scope: SCOPE_DEFAULT,
        };
        assert_eq!(decoded.entries[&key].slots, vec![1]);
        assert_eq!(
            decode_backend(backend).map(|b| b.addr.to_string()),
            Some("[fd00:10:244::1]:8080".into())
        );
    }

    #[test]
    fn slots_without_their_slot_0_are_orphans() {
        let key = EntryKey {
            frontend: FrontendAddr {
                addr: "10.96.0.1:80".parse().unwrap(),
                protocol: Protocol::Tcp,
            },
            scope: SCOPE_DEFAULT,
        };
        let decoded = decode_services([(service_key::<Ipv4>(&key, 1), slot(3))]);
        assert!(decoded.entries.is_empty());
        assert_eq!(decoded.orphans, vec![service_key(&key, 1)]);
    }

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
