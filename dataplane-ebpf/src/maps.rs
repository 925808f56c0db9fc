//! The maps, declared with BTF so bpftool prints their fields. Names must match
//! `dataplane_common::map_names` (the agent checks every one at load time).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use dataplane_common::{
    AffinityKey, AffinityValue, Backend, CtEntry, CtKey, DatapathConfig, FragmentKey,
    FragmentPorts, FrontendName, HostFlowKey, IPPROTO_TCP, MaglevTable, ServiceKey, ServiceValue,
    SockEntry, SockKey, SocketLbConfig, SourceRangeKey, TrafficStats, capacity,
};

#[btf_map(name = "dp_svc_v2")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { capacity::SERVICES as usize }> =
    HashMap::new();

/// Indexed by backend id; unused ids hold zeroes. An array, so the per-packet lookup is inlined.
#[btf_map(name = "dp_backends_v2")]
pub static BACKENDS: Array<Backend, { capacity::BACKENDS as usize }> = Array::new();

/// One LRU list shared by every CPU, not `BPF_F_NO_COMMON_LRU`: per-CPU lists would split the
/// capacity evenly between CPUs, so a node whose new flows land on a few CPUs (one NIC queue)
/// would evict live flows long before the map is full.
#[btf_map(name = "dp_ct_tcp_v3")]
pub static CONNTRACK_TCP: LruHashMap<CtKey, CtEntry, { capacity::CONNTRACK_TCP as usize }> =
    LruHashMap::new();

/// UDP (every protocol but TCP): a table of its own, so that a burst of short flows (DNS)
/// evicts other short flows, never idle TCP connections.
#[btf_map(name = "dp_ct_any_v3")]
pub static CONNTRACK_ANY: LruHashMap<CtKey, CtEntry, { capacity::CONNTRACK_ANY as usize }> =
    LruHashMap::new();

/// Conntrack as one map for lookups and removals: each goes to the table of the key's
/// protocol. (A new flow inserts into the table `lb::open_flow` is given.)
pub struct Conntrack;

pub static CONNTRACK: Conntrack = Conntrack;

impl Conntrack {
    #[inline(always)]
    pub fn get_ptr(&self, key: &CtKey) -> Option<*const CtEntry> {
        if key.proto == IPPROTO_TCP {
            CONNTRACK_TCP.get_ptr(key)
        } else {
            CONNTRACK_ANY.get_ptr(key)
        }
    }

    #[inline(always)]
    pub fn get_ptr_mut(&self, key: &CtKey) -> Option<*mut CtEntry> {
        if key.proto == IPPROTO_TCP {
            CONNTRACK_TCP.get_ptr_mut(key)
        } else {
            CONNTRACK_ANY.get_ptr_mut(key)
        }
    }

    #[inline(always)]
    pub fn remove(&self, key: &CtKey) -> Result<(), i32> {
        if key.proto == IPPROTO_TCP {
            CONNTRACK_TCP.remove(key)
        } else {
            CONNTRACK_ANY.remove(key)
        }
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
