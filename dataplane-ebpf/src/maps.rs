//! The maps, declared with BTF so bpftool prints their fields. Names must match
//! `dataplane_common::map_names` (the agent checks every one at load time).
use core::marker::PhantomData;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use dataplane_common::{
    AffinityKey, AffinityKey6, AffinityValue, Backend, Backend6, CtEntry, CtEntry6, CtKey, CtKey6,
    DatapathConfig, DatapathConfig6, FragmentKey, FragmentKey6, FragmentPorts, FrontendName,
    HostFlowKey, HostFlowKey6, IPPROTO_TCP, Ipv4, Ipv6, MaglevTable, ServiceKey, ServiceKey6,
    ServiceValue, SockEntry, SockEntry6, SockKey, SockKey6, SocketLbConfig, SourceRangeKey,
    SourceRangeKey6, TrafficStats, capacity,
};
use dataplane_common::{CtEntryOf, CtKeyOf};

use crate::family::{KvMap, PacketFamily};

#[btf_map(name = "dp_svc_v2")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { capacity::SERVICES as usize }> =
    HashMap::new();

/// Indexed by backend id; unused ids hold zeroes. An array, so the per-packet lookup is inlined.
#[btf_map(name = "dp_backends_v2")]
pub static BACKENDS: Array<Backend, { capacity::BACKENDS as usize }> = Array::new();

/// TCP flows: a preallocated hash. Its free elements sit on per-CPU lists, so opening a flow
/// takes one from this CPU's list (and deleting returns it). An LRU hash, as v3 had, refills
/// a CPU's free list from the shared one under a lock every 64th insert (kernel
/// `bpf_lru_list.c`): a tail on the new-connection path. A hash never evicts: the agent's
/// collection removes idle flows, and while the table is full new flows go to the overflow.
#[btf_map(name = "dp_ct_tcp_v4")]
pub static CONNTRACK_TCP: HashMap<CtKey, CtEntry, { capacity::CONNTRACK_TCP as usize }> =
    HashMap::new();

/// TCP flows opened while `CONNTRACK_TCP` is full (the agent behind on collection, or down):
/// an LRU hash, so a full table never refuses a connection; its oldest flows are evicted
/// instead. Looked up only while `CONNTRACK_OVERFLOW_IN_USE` says it may hold flows. One LRU
/// list shared by every CPU, not `BPF_F_NO_COMMON_LRU`: per-CPU lists would split the
/// capacity evenly between CPUs, so a node whose new flows land on a few CPUs (one NIC queue)
/// would evict live flows long before the map is full.
#[btf_map(name = "dp_ct_ovf_v4")]
pub static CONNTRACK_TCP_OVERFLOW: LruHashMap<
    CtKey,
    CtEntry,
    { capacity::CONNTRACK_TCP_OVERFLOW as usize },
> = LruHashMap::new();

/// Non-zero while the overflow may hold flows. An array: the verifier inlines its lookup, so
/// a lookup that misses the TCP table (every packet to no service) costs no second hash
/// lookup while the overflow is unused.
#[btf_map(name = "dp_ct_ovfon_v1")]
pub static CONNTRACK_OVERFLOW_IN_USE: Array<u32, 1> = Array::new();

/// UDP (every protocol but TCP): a table of its own, so that a burst of short flows (DNS)
/// evicts other short flows, never idle TCP connections. An LRU hash (one list for every CPU,
/// as above).
#[btf_map(name = "dp_ct_any_v3")]
pub static CONNTRACK_ANY: LruHashMap<CtKey, CtEntry, { capacity::CONNTRACK_ANY as usize }> =
    LruHashMap::new();

const E2BIG: i32 = 7;
const EEXIST: i32 = 17;

/// Conntrack of one family as one map for lookups and removals: each goes to the table of
/// the key's protocol (TCP: the hash, then the overflow while it is in use). A new flow
/// inserts into the `CtTable` `lb::open_flow` is given.
pub struct Conntrack<F>(PhantomData<F>);

impl<F: PacketFamily> Conntrack<F> {
    /// Non-zero while the overflow may hold flows. An array: the verifier inlines its
    /// lookup, so a lookup that misses the TCP table (every packet to no service) costs no
    /// second hash lookup while the overflow is unused.
    #[inline(always)]
    fn overflow_in_use() -> bool {
        match F::ct_overflow_in_use().get_ptr(0) {
            // SAFETY: a value from a lookup in this run.
            Some(flag) => unsafe { *flag != 0 },
            None => false,
        }
    }

    #[inline(always)]
    pub fn get_ptr(key: &CtKeyOf<F::Addr>) -> Option<*const CtEntryOf<F::Addr>> {
        Self::get_ptr_mut(key).map(|p| p.cast_const())
    }

    #[inline(always)]
    pub fn get_ptr_mut(key: &CtKeyOf<F::Addr>) -> Option<*mut CtEntryOf<F::Addr>> {
        if key.proto == IPPROTO_TCP {
            match F::ct_tcp().get_ptr_mut(key) {
                Some(entry) => Some(entry),
                None if Self::overflow_in_use() => F::ct_overflow().get_ptr_mut(key),
                None => None,
            }
        } else {
            F::ct_any().get_ptr_mut(key)
        }
    }

    #[inline(always)]
    pub fn remove(key: &CtKeyOf<F::Addr>) -> Result<(), i32> {
        if key.proto == IPPROTO_TCP {
            TcpTables::<F>::NEW.remove(key)
        } else {
            F::ct_any().remove(key)
        }
    }
}

/// Where a new flow's entries go: `TcpTables` or `AnyTable`.
pub trait CtTable<A> {
    /// `bpf_map_update_elem`'s flags (`BPF_ANY`, `BPF_NOEXIST`) and result.
    fn insert(&self, key: &CtKeyOf<A>, entry: &CtEntryOf<A>, flags: u64) -> Result<(), i32>;
    fn remove(&self, key: &CtKeyOf<A>) -> Result<(), i32>;
}

/// The TCP hash, with its overflow.
pub struct TcpTables<F>(PhantomData<F>);

impl<F> TcpTables<F> {
    pub const NEW: Self = Self(PhantomData);
}

impl<F: PacketFamily> CtTable<F::Addr> for TcpTables<F> {
    #[inline(always)]
    fn insert(
        &self,
        key: &CtKeyOf<F::Addr>,
        entry: &CtEntryOf<F::Addr>,
        flags: u64,
    ) -> Result<(), i32> {
        let in_use = Conntrack::<F>::overflow_in_use();
        let overflow = F::ct_overflow();
        // A tuple the overflow holds is taken: a SNAT port claim must not reuse it.
        if in_use && flags == BPF_NOEXIST as u64 && overflow.get_ptr_mut(key).is_some() {
            return Err(-EEXIST);
        }
        match F::ct_tcp().insert(key, entry, flags) {
            Ok(()) => {
                if in_use {
                    // An older entry under this key there would only be shadowed.
                    let _ = overflow.remove(key);
                }
                Ok(())
            }
            Err(e) if e == -E2BIG => {
                overflow.insert(key, entry, flags)?;
                // After the insert, and always: the agent clears the flag only when it finds
                // the overflow empty after clearing it, so a flow inserted here is never
                // missed (see `Conntrack::release_overflow` in the agent).
                if let Some(flag) = F::ct_overflow_in_use().get_ptr_mut(0) {
                    // SAFETY: a value from a lookup in this run.
                    unsafe { *flag = 1 };
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    #[inline(always)]
    fn remove(&self, key: &CtKeyOf<F::Addr>) -> Result<(), i32> {
        match F::ct_tcp().remove(key) {
            Err(_) if Conntrack::<F>::overflow_in_use() => F::ct_overflow().remove(key),
            removed => removed,
        }
    }
}

/// The table of every other protocol.
pub struct AnyTable<F>(PhantomData<F>);

impl<F> AnyTable<F> {
    pub const NEW: Self = Self(PhantomData);
}

impl<F: PacketFamily> CtTable<F::Addr> for AnyTable<F> {
    #[inline(always)]
    fn insert(
        &self,
        key: &CtKeyOf<F::Addr>,
        entry: &CtEntryOf<F::Addr>,
        flags: u64,
    ) -> Result<(), i32> {
        F::ct_any().insert(key, entry, flags)
    }

    #[inline(always)]
    fn remove(&self, key: &CtKeyOf<F::Addr>) -> Result<(), i32> {
        F::ct_any().remove(key)
    }
}

#[btf_map(name = "dp_svc_stats_v2")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats, { capacity::FRONTENDS as usize }> =
    PerCpuArray::new();

#[btf_map(name = "dp_be_stats_v2")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats, { capacity::BACKENDS as usize }> =
    PerCpuArray::new();

#[btf_map(name = "dp_drops_v1")]
pub static DROPS: Array<u64, { capacity::DROP_REASONS as usize }> = Array::new();

#[btf_map(name = "dp_affinity_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { capacity::AFFINITY as usize }> =
    LruHashMap::new();

#[btf_map(name = "dp_srcrange_v1")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Not preallocated: tables are large and only frontends using Maglev have one.
#[btf_map(name = "dp_maglev_v1")]
pub static MAGLEV: HashMap<
    u32,
    MaglevTable,
    { capacity::MAGLEV_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Written by the agent for the inspection tools; the programs never read it.
#[btf_map(name = "dp_names_v1")]
pub static NAMES: HashMap<u32, FrontendName, { capacity::FRONTENDS as usize }> = HashMap::new();

#[btf_map(name = "dp_config_v1")]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

/// The ports of fragmented datagrams being translated, from their first fragment.
#[btf_map(name = "dp_frag_v1")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

/// The node's own UDP flows from a frontend's address and port (see `host_flows`): reply
/// tuple -> when the node last sent on it.
/// The host ends of the pods' veths, by ifindex (the value is unused): `forward` hands a
/// packet for a pod behind one straight to the pod's namespace. Written by the agent as it
/// attaches to the interfaces.
#[btf_map(name = "dp_podif_v1")]
pub static POD_INTERFACES: HashMap<u32, u32, { capacity::POD_INTERFACES as usize }> =
    HashMap::new();

#[btf_map(name = "dp_hostflow_v1")]
pub static HOST_FLOWS: LruHashMap<HostFlowKey, u64, { capacity::HOST_FLOWS as usize }> =
    LruHashMap::new();

/// Socket-level load balancing (see `sock`): the translations of sockets, by socket cookie.
#[btf_map(name = "dp_sock_v1")]
pub static SOCKETS: LruHashMap<SockKey, SockEntry, { capacity::SOCKETS as usize }> =
    LruHashMap::new();

#[btf_map(name = "dp_sockcfg_v1")]
pub static SOCKET_CONFIG: Array<SocketLbConfig, 1> = Array::new();

/// Connections translated at the socket, by frontend id and by backend id.
#[btf_map(name = "dp_svc_sock_v1")]
pub static SOCKET_SERVICE_STATS: PerCpuArray<u64, { capacity::FRONTENDS as usize }> =
    PerCpuArray::new();

#[btf_map(name = "dp_be_sock_v1")]
pub static SOCKET_BACKEND_STATS: PerCpuArray<u64, { capacity::BACKENDS as usize }> =
    PerCpuArray::new();

// IPv6: the same roles as the IPv4 maps above (see `dataplane_common::map_names`).

#[btf_map(name = "dp_svc6_v1")]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue, { capacity::SERVICES6 as usize }> =
    HashMap::new();

#[btf_map(name = "dp_be6_v1")]
pub static BACKENDS6: Array<Backend6, { capacity::BACKENDS as usize }> = Array::new();

#[btf_map(name = "dp_ct6_tcp_v1")]
pub static CONNTRACK6_TCP: HashMap<CtKey6, CtEntry6, { capacity::CONNTRACK6_TCP as usize }> =
    HashMap::new();

#[btf_map(name = "dp_ct6_ovf_v1")]
pub static CONNTRACK6_TCP_OVERFLOW: LruHashMap<
    CtKey6,
    CtEntry6,
    { capacity::CONNTRACK6_TCP_OVERFLOW as usize },
> = LruHashMap::new();

#[btf_map(name = "dp_ct6_ovfon_v1")]
pub static CONNTRACK6_OVERFLOW_IN_USE: Array<u32, 1> = Array::new();

#[btf_map(name = "dp_ct6_any_v1")]
pub static CONNTRACK6_ANY: LruHashMap<CtKey6, CtEntry6, { capacity::CONNTRACK6_ANY as usize }> =
    LruHashMap::new();

#[btf_map(name = "dp_aff6_v1")]
pub static AFFINITY6: LruHashMap<AffinityKey6, AffinityValue, { capacity::AFFINITY6 as usize }> =
    LruHashMap::new();

#[btf_map(name = "dp_srcrange6_v1")]
pub static SOURCE_RANGES6: LpmTrie<SourceRangeKey6, u8, { capacity::SOURCE_RANGES6 as usize }> =
    LpmTrie::new();

#[btf_map(name = "dp_config6_v1")]
pub static CONFIG6: Array<DatapathConfig6, 1> = Array::new();

#[btf_map(name = "dp_frag6_v1")]
pub static FRAGMENTS6: LruHashMap<FragmentKey6, FragmentPorts, { capacity::FRAGMENTS6 as usize }> =
    LruHashMap::new();

#[btf_map(name = "dp_hostflow6_v1")]
pub static HOST_FLOWS6: LruHashMap<HostFlowKey6, u64, { capacity::HOST_FLOWS6 as usize }> =
    LruHashMap::new();

#[btf_map(name = "dp_sock6_v1")]
pub static SOCKETS6: LruHashMap<SockKey6, SockEntry6, { capacity::SOCKETS6 as usize }> =
    LruHashMap::new();

/// Per-CPU working memory of a new flow (`lb::FlowScratch`), not pinned: nothing outlives
/// one program run.
#[btf_map(name = "dp_scratch")]
pub static FLOW_SCRATCH: PerCpuArray<crate::lb::FlowScratch<Ipv4>, 1> = PerCpuArray::new();

#[btf_map(name = "dp_scratch6")]
pub static FLOW_SCRATCH6: PerCpuArray<crate::lb::FlowScratch<Ipv6>, 1> = PerCpuArray::new();

/// The IPv6 packet being handled (see `packet::parse6`), per CPU, not pinned.
#[btf_map(name = "dp_packet6")]
pub static PACKET6: PerCpuArray<crate::packet::Packet<Ipv6>, 1> = PerCpuArray::new();

/// Where an ICMPv6 error the datapath answers with is assembled (`refuse::Icmp6Answer`), per
/// CPU, not pinned.
#[btf_map(name = "dp_answer6")]
pub static ANSWER6: PerCpuArray<crate::refuse::Icmp6Answer, 1> = PerCpuArray::new();
