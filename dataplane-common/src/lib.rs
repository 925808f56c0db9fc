//! Map layouts shared by the BPF programs (`dataplane-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so kernel and user space agree byte for
//! byte, and so `bpftool map dump` (through the BTF the programs carry) prints named fields.
//! Addresses are kept as `[u8; 4]` in network order (bpftool prints them as four octets);
//! ports are host-order `u16` so they read as numbers.
//!
//! Map names carry a layout version (`_v1`): a change to any type here must bump the name of
//! every map that uses it, so an upgraded agent never reinterprets an old pinned map.
#![no_std]

/// IPv4 address, network byte order.
pub type Ipv4 = [u8; 4];
/// IPv6 address, network byte order. A struct aligned to 4 bytes rather than a bare
/// `[u8; 16]`: BPF code copies a byte array one byte at a time (each byte a stack slot),
/// which no IPv6 path would fit in the verifier's stack budget; aligned, it moves as words.
/// Every layout holding one keeps it at a 4-byte offset.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6 {
    pub octets: [u8; 16],
}

impl Ipv6 {
    pub const fn new(octets: [u8; 16]) -> Self {
        Self { octets }
    }

    /// The four 32-bit words as they sit in memory (network order bytes).
    #[inline(always)]
    pub fn words(&self) -> [u32; 4] {
        let o = &self.octets;
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        [w(0), w(4), w(8), w(12)]
    }
}

impl From<[u8; 16]> for Ipv6 {
    fn from(octets: [u8; 16]) -> Self {
        Self { octets }
    }
}

impl From<core::net::Ipv6Addr> for Ipv6 {
    fn from(addr: core::net::Ipv6Addr) -> Self {
        Self {
            octets: addr.octets(),
        }
    }
}

impl From<Ipv6> for core::net::Ipv6Addr {
    fn from(addr: Ipv6) -> Self {
        addr.octets.into()
    }
}

/// What the datapath's code needs of an address, written once for both families.
pub trait Address: Copy + PartialEq + Default {
    /// The address as one 32-bit word for hashing (an IPv6 address folds its four words).
    fn hash_word(&self) -> u32;
    /// All zeroes: an unused slot, or "none".
    #[inline(always)]
    fn is_unspecified(&self) -> bool {
        *self == Self::default()
    }
}

impl Address for Ipv4 {
    #[inline(always)]
    fn hash_word(&self) -> u32 {
        u32::from_be_bytes(*self)
    }
}

impl Address for Ipv6 {
    #[inline(always)]
    fn hash_word(&self) -> u32 {
        let [a, b, c, d] = self.words();
        u32::from_be(a ^ b ^ c ^ d)
    }
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Names of the maps, as the BPF object declares them and as they are pinned under the
/// agent's `--bpffs-dir`. The kernel keeps 15 characters of a map name.
pub mod map_names {
    pub const SERVICES: &str = "dp_svc_v2";
    pub const BACKENDS: &str = "dp_backends_v2";
    /// Conntrack, TCP flows and the rest in separate tables (as Cilium keeps them), so a
    /// burst of short UDP flows (DNS) cannot evict idle TCP connections from the LRU.
    /// TCP: a preallocated hash (no LRU free-list refills on the new-connection path)...
    pub const CONNTRACK_TCP: &str = "dp_ct_tcp_v4";
    /// ...and an LRU hash its new flows go to only while the hash is full, so a full table
    /// never refuses a connection (the agent's collection, which empties it, may be down).
    pub const CONNTRACK_TCP_OVERFLOW: &str = "dp_ct_ovf_v4";
    /// One `u32`, non-zero while the overflow may hold flows: only then does a lookup that
    /// misses the hash look there too. Set by the datapath after each insert there, cleared
    /// by the agent once the overflow is empty.
    pub const CONNTRACK_OVERFLOW_IN_USE: &str = "dp_ct_ovfon_v1";
    pub const CONNTRACK_ANY: &str = "dp_ct_any_v3";
    /// Earlier layouts, moved into the current tables by an upgraded agent at start and
    /// removed: v3 kept TCP in an LRU hash alone, v2 held every protocol in one table, v1
    /// had a direction byte in its keys.
    pub const CONNTRACK_TCP_V3: &str = "dp_ct_tcp_v3";
    pub const CONNTRACK_V2: &str = "dp_ct_v2";
    pub const CONNTRACK_V1: &str = "dp_ct_v1";
    pub const SERVICE_STATS: &str = "dp_svc_stats_v2";
    pub const BACKEND_STATS: &str = "dp_be_stats_v2";
    pub const DROPS: &str = "dp_drops_v1";
    pub const AFFINITY: &str = "dp_affinity_v1";
    pub const SOURCE_RANGES: &str = "dp_srcrange_v1";
    pub const MAGLEV: &str = "dp_maglev_v1";
    pub const CONFIG: &str = "dp_config_v1";
    pub const NAMES: &str = "dp_names_v1";
    pub const FRAGMENTS: &str = "dp_frag_v1";
    pub const HOST_FLOWS: &str = "dp_hostflow_v1";
    /// Socket-level load balancing: what each translated socket was translated from.
    pub const SOCKETS: &str = "dp_sock_v1";
    /// Socket-level load balancing: which sockets it translates (one entry).
    pub const SOCKET_CONFIG: &str = "dp_sockcfg_v1";
    /// Connections translated at the socket, per frontend id and per backend id.
    pub const SOCKET_SERVICE_STATS: &str = "dp_svc_sock_v1";
    pub const SOCKET_BACKEND_STATS: &str = "dp_be_sock_v1";
    /// The host ends of the pods' veths (by ifindex, written by the agent): a translated
    /// packet for a pod behind one goes straight into the pod's namespace.
    pub const POD_INTERFACES: &str = "dp_podif_v1";

    // IPv6: a map per family wherever a key or value holds an address (as Cilium keeps
    // them), with the same roles as the IPv4 maps above. Frontend and backend ids are one
    // space for both families, so the stats arrays, names, Maglev tables and socket counters
    // serve both.
    pub const SERVICES6: &str = "dp_svc6_v1";
    pub const BACKENDS6: &str = "dp_be6_v1";
    pub const CONNTRACK6_TCP: &str = "dp_ct6_tcp_v1";
    pub const CONNTRACK6_TCP_OVERFLOW: &str = "dp_ct6_ovf_v1";
    pub const CONNTRACK6_OVERFLOW_IN_USE: &str = "dp_ct6_ovfon_v1";
    pub const CONNTRACK6_ANY: &str = "dp_ct6_any_v1";
    pub const AFFINITY6: &str = "dp_aff6_v1";
    pub const SOURCE_RANGES6: &str = "dp_srcrange6_v1";
    pub const CONFIG6: &str = "dp_config6_v1";
    pub const FRAGMENTS6: &str = "dp_frag6_v1";
    pub const HOST_FLOWS6: &str = "dp_hostflow6_v1";
    pub const SOCKETS6: &str = "dp_sock6_v1";

    /// Every map, in the order `cleanup` and the inspection tools walk them.
    pub const ALL: [&str; 33] = [
        SERVICES,
        BACKENDS,
        CONNTRACK_TCP,
        CONNTRACK_TCP_OVERFLOW,
        CONNTRACK_OVERFLOW_IN_USE,
        CONNTRACK_ANY,
        SERVICE_STATS,
        BACKEND_STATS,
        DROPS,
        AFFINITY,
        SOURCE_RANGES,
        MAGLEV,
        CONFIG,
        NAMES,
        FRAGMENTS,
        HOST_FLOWS,
        SOCKETS,
        SOCKET_CONFIG,
        SOCKET_SERVICE_STATS,
        SOCKET_BACKEND_STATS,
        POD_INTERFACES,
        SERVICES6,
        BACKENDS6,
        CONNTRACK6_TCP,
        CONNTRACK6_TCP_OVERFLOW,
        CONNTRACK6_OVERFLOW_IN_USE,
        CONNTRACK6_ANY,
        AFFINITY6,
        SOURCE_RANGES6,
        CONFIG6,
        FRAGMENTS6,
        HOST_FLOWS6,
        SOCKETS6,
    ];
    /// Maps earlier agents pinned that no datapath reads any more: unpinned at load and by
    /// `cleanup`. (`dp_revnat_v1` held each frontend's address by frontend id; replies are
    /// restored from conntrack, which records the frontend itself.)
    pub const RETIRED: [&str; 1] = ["dp_revnat_v1"];
}

/// Default capacities. The BPF object declares these; the agent may override them at load.
pub mod capacity {
    /// Frontend entries plus one entry per backend slot.
    pub const SERVICES: u32 = 262_144;
    /// Backend ids are indices into the backend stats array, so ids stay below this.
    pub const BACKENDS: u32 = 131_072;
    /// Frontend ids index the service stats array, so ids stay below this.
    pub const FRONTENDS: u32 = 65_536;
    /// Two entries per connection (forward and reply).
    /// Cilium's defaults: 512k TCP, 256k other flows.
    pub const CONNTRACK_TCP: u32 = 524_288;
    /// TCP flows opened while the TCP table is full, until the agent moves them back.
    pub const CONNTRACK_TCP_OVERFLOW: u32 = 65_536;
    pub const CONNTRACK_ANY: u32 = 262_144;
    pub const DROP_REASONS: u32 = 16;
    /// (service port, client address) pairs remembered for session affinity.
    pub const AFFINITY: u32 = 65_536;
    /// CIDRs of all `loadBalancerSourceRanges` together.
    pub const SOURCE_RANGES: u32 = 16_384;
    /// Frontends using Maglev (each has a table of `MAGLEV_TABLE_SIZE` backend ids).
    pub const MAGLEV_SERVICES: u32 = 4_096;
    /// Datagrams in flight as fragments at once (first fragment seen, last not yet).
    pub const FRAGMENTS: u32 = 8_192;
    /// The node's own flows seen leaving on a frontend's address and port.
    pub const HOST_FLOWS: u32 = 65_536;
    /// Sockets translated at `connect()`/`sendmsg()` (entries are removed when the socket is
    /// released; an LRU, so sockets that never say which backend they talk to age out).
    pub const SOCKETS: u32 = 262_144;
    /// Pod-facing veths on the node.
    pub const POD_INTERFACES: u32 = 16_384;
    /// IPv6 conntrack: a quarter of IPv4's, as most clusters carry far less IPv6 (a v6 TCP
    /// entry pair takes twice the memory of a v4 one); `--map-size` raises them.
    pub const CONNTRACK6_TCP: u32 = 131_072;
    pub const CONNTRACK6_TCP_OVERFLOW: u32 = 16_384;
    pub const CONNTRACK6_ANY: u32 = 65_536;
    /// The other IPv6 maps hold as many entries as their IPv4 peers.
    pub const SERVICES6: u32 = SERVICES;
    pub const AFFINITY6: u32 = AFFINITY;
    pub const SOURCE_RANGES6: u32 = SOURCE_RANGES;
    pub const FRAGMENTS6: u32 = FRAGMENTS;
    pub const HOST_FLOWS6: u32 = HOST_FLOWS;
    pub const SOCKETS6: u32 = SOCKETS;
}

/// The flow hash Maglev indexes with: fixed-seed (murmur3's finalizer per word), so every node
/// maps a flow to the same slot. Addresses as big-endian numbers, ports host order. One
/// definition for the datapath and for `trace`, which shows the slot the kernel used.
#[inline(always)]
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    #[inline(always)]
    fn mix(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
    let mut h = 0x9e37_79b9u32;
    h = mix(h ^ saddr);
    h = mix(h ^ daddr);
    h = mix(h ^ (((sport as u32) << 16) | dport as u32));
    mix(h ^ proto as u32)
}

/// `flow_hash` of a flow tuple of either family (an IPv4 tuple hashes exactly as
/// `flow_hash` of its words).
#[inline(always)]
pub fn flow_hash_of<A: Address>(flow: &CtKeyOf<A>) -> u32 {
    flow_hash(
        flow.saddr.hash_word(),
        flow.daddr.hash_word(),
        flow.sport,
        flow.dport,
        flow.proto,
    )
}

/// The Maglev slot of a flow hash: multiply-shift range reduction (as even as a modulo, and
/// bounded in a way the verifier can follow).
#[inline(always)]
pub fn maglev_slot(hash: u32) -> usize {
    ((hash as u64 * MAGLEV_TABLE_SIZE as u64) >> 32) as usize
}

/// Entries of a Maglev lookup table: a prime, so every backend's permutation covers it, and
/// large against the backend count, so removing one of N backends moves close to 1/N of the
/// entries (Katran uses 65537; 4093 keeps a table at 16 KiB — the agent's tests measure the
/// spread and the disruption).
pub const MAGLEV_TABLE_SIZE: usize = 4093;

/// Names of the tc programs, as pinned under the bpffs directory.
pub const PROG_POD_INGRESS: &str = "pod_ingress";
pub const PROG_EXTERNAL_INGRESS: &str = "external_ingress";
/// `external_ingress` built for Layer-3 devices (no link header: WireGuard, IPIP, TUN).
pub const PROG_EXTERNAL_INGRESS_L3: &str = "external_ingress_l3";
/// At egress of external interfaces: notes the node's own flows from frontends.
pub const PROG_EXTERNAL_EGRESS: &str = "external_egress";
pub const PROG_EXTERNAL_EGRESS_L3: &str = "external_egress_l3";
/// The tc programs the agent loads and pins.
pub const PROGRAMS: [&str; 5] = [
    PROG_POD_INGRESS,
    PROG_EXTERNAL_INGRESS,
    PROG_EXTERNAL_INGRESS_L3,
    PROG_EXTERNAL_EGRESS,
    PROG_EXTERNAL_EGRESS_L3,
];

/// Socket-level load balancing: cgroup programs, each pinned and attached (through a pinned
/// link) at the agent's `--cgroup-root` under the name here.
pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "sock_getpeername4";
pub const PROG_SOCK_RELEASE: &str = "sock_release";
/// IPv6 sockets: to IPv6 frontends, and to IPv4-mapped ones (`::ffff:10.96.0.10`).
pub const PROG_SOCK_CONNECT6: &str = "sock_connect6";
pub const PROG_SOCK_SENDMSG6: &str = "sock_sendmsg6";
pub const PROG_SOCK_RECVMSG6: &str = "sock_recvmsg6";
pub const PROG_SOCK_GETPEERNAME6: &str = "sock_getpeername6";
pub const SOCKET_PROGRAMS: [&str; 9] = [
    PROG_SOCK_CONNECT4,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_GETPEERNAME4,
    PROG_SOCK_RELEASE,
    PROG_SOCK_CONNECT6,
    PROG_SOCK_SENDMSG6,
    PROG_SOCK_RECVMSG6,
    PROG_SOCK_GETPEERNAME6,
];

/// Source address used when a pod reaches itself through a service (hairpin). The pod would
/// drop a packet carrying its own address as source, so the datapath replaces it with this
/// link-local address (as kube-proxy masquerades that case); replies to it are routed back
/// through the node and restored by conntrack.
pub const HAIRPIN_SNAT_ADDR: Ipv4 = [169, 254, 42, 1];
/// The IPv6 hairpin source: `100::a9fe:2a01`, in the discard-only prefix (RFC 6666), so it
/// belongs to nobody and a router drops anything sent to it, with the IPv4 address in its low
/// bits. Not link-local: the pod routes its replies to it through its default route, the
/// node, where conntrack restores them.
pub const HAIRPIN_SNAT_ADDR6: Ipv6 =
    Ipv6::new([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 169, 254, 42, 1]);

/// `ServiceKey::scope`: the entry every packet looks up first.
pub const SCOPE_DEFAULT: u8 = 0;
/// `ServiceKey::scope`: a second entry for traffic from pods, for frontends whose external
/// traffic policy is Local (pods reaching a node port or load-balancer IP use every endpoint
/// in the cluster, as kube-proxy's short circuit does).
pub const SCOPE_INTERNAL: u8 = 1;

/// Key of the service map. `backend_slot == 0` is the frontend itself; slots `1..=count`
/// name the backends that new connections may pick (Cilium's layout: one map, no per-service
/// inner maps, and a service is switched to a new backend set by rewriting slot 0 last).
///
/// Generic over the address (`Ipv4` or `Ipv6`): one layout, one set of rules, for both
/// families' maps (`dp_svc_v2`, `dp_svc6_v1`); neither has implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKeyOf<A> {
    pub addr: A,
    pub port: u16,
    pub backend_slot: u16,
    pub proto: u8,
    /// `SCOPE_DEFAULT`, or `SCOPE_INTERNAL` for the pods' view of a two-scope frontend.
    pub scope: u8,
    pub _pad: [u8; 2],
}

pub type ServiceKey = ServiceKeyOf<Ipv4>;
/// An IPv6 frontend or backend slot (`dp_svc6_v1`, whose values are `ServiceValue`s).
pub type ServiceKey6 = ServiceKeyOf<Ipv6>;

/// Value of the service map. In slot 0 the other fields describe the frontend; in a backend
/// slot only `backend_id` is used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    pub backend_id: u32,
    /// Frontend id: indexes the service stats array and keys the frontend's Maglev table
    /// and source ranges; conntrack records it for the flows to the frontend.
    pub rev_nat_id: u32,
    /// Number of backend slots; 0 means "no endpoints": connections are refused.
    pub count: u16,
    /// `SVC_FLAG_*`.
    pub flags: u16,
    /// Session affinity: seconds a client keeps its backend (with `SVC_FLAG_AFFINITY`).
    pub affinity_timeout: u32,
    /// Service-port id shared by every frontend of one service port: keys session affinity
    /// (the smallest frontend id of the service port), so a client gets the same backend on
    /// every frontend of the service port.
    pub service_port_id: u32,
}

/// Service flag: with no backends here, drop instead of refusing, because usable endpoints
/// exist on other nodes but policy (internal/external traffic policy Local) keeps this node
/// from using them. kube-proxy drops this traffic too; a refusal would claim the service is
/// down when it is not.
pub const SVC_FLAG_DROP_WHEN_EMPTY: u16 = 1;
/// A frontend for traffic from outside the cluster (NodePort, LoadBalancer, external IP).
/// Arriving on an external interface, its traffic is SNATed to the node's address (so replies
/// return through this node) unless `SVC_FLAG_EXTERNAL_LOCAL` is set.
pub const SVC_FLAG_EXTERNAL: u16 = 2;
/// externalTrafficPolicy Local: only this node's endpoints, client source preserved.
pub const SVC_FLAG_EXTERNAL_LOCAL: u16 = 4;
/// A `SCOPE_INTERNAL` entry exists for this frontend; traffic from pods uses it.
pub const SVC_FLAG_TWO_SCOPES: u16 = 8;
/// sessionAffinity ClientIP.
pub const SVC_FLAG_AFFINITY: u16 = 16;
/// loadBalancerSourceRanges: sources outside `dp_srcrange_v1` entries for this frontend are
/// dropped.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 32;
/// New flows pick their backend from the frontend's Maglev table (consistent hashing);
/// without it, at random.
pub const SVC_FLAG_MAGLEV: u16 = 64;

/// `Backend::state`: the only state a programmed backend has (endpoints that take no new
/// connection are in no slot; the field is kept for the layout).
pub const BACKEND_STATE_ACTIVE: u8 = 0;

/// Value of the backend array, indexed by backend id (never 0); an unused id holds zeroes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendOf<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub state: u8,
}

pub type Backend = BackendOf<Ipv4>;
/// An IPv6 backend (`dp_be6_v1`, indexed by the same backend ids: an id is in use in exactly
/// one of the two arrays).
pub type Backend6 = BackendOf<Ipv6>;

/// Conntrack key: the tuple as the packet carries it when it reaches the program.
/// Forward entries are keyed client -> frontend, reply entries backend -> client; the two
/// never share a tuple (that would be one packet meaning two flows), so one lookup on a
/// packet's own tuple finds either, and the entry's `CT_FLAG_REPLY` tells which.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKeyOf<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Two fields, not `[u8; 3]`: zeroing an odd-sized array compiles to a memset call the
    // verifier rejects.
    pub _pad0: u8,
    pub _pad1: u16,
}

pub type CtKey = CtKeyOf<Ipv4>;
pub type CtKey6 = CtKeyOf<Ipv6>;

impl<A: Copy> CtKeyOf<A> {
    #[inline(always)]
    pub const fn new(saddr: A, daddr: A, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The tuple of a flow's replies, for its forward entry `forward` under this key:
    /// from the backend to whoever the backend saw as the client (the client itself,
    /// the node's SNAT address and port, or the hairpin address with the client's
    /// port). The one place this rule is written: the datapath, the agent's conntrack
    /// collection and the tools all use it.
    #[inline(always)]
    pub fn reply_of(&self, forward: &CtEntryOf<A>) -> Self {
        let (client, client_port) = if forward.flags & CT_FLAG_SNAT != 0 {
            (forward.peer_addr, forward.peer_port)
        } else if forward.flags & CT_FLAG_HAIRPIN != 0 {
            (forward.peer_addr, self.sport)
        } else {
            (self.saddr, self.sport)
        };
        Self::new(
            forward.nat_addr,
            client,
            forward.nat_port,
            client_port,
            self.proto,
        )
    }

    /// The forward tuple of a flow, for its reply entry `reply` under this key: from
    /// the client, as it sent it, to the frontend. The inverse of `reply_of`.
    #[inline(always)]
    pub fn forward_of(&self, reply: &CtEntryOf<A>) -> Self {
        let client = if reply.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN) != 0 {
            reply.peer_addr
        } else {
            self.daddr
        };
        let client_port = if reply.flags & CT_FLAG_SNAT != 0 {
            reply.peer_port
        } else {
            self.dport
        };
        Self::new(
            client,
            reply.nat_addr,
            client_port,
            reply.nat_port,
            self.proto,
        )
    }
}

/// The flow went to the client's own pod: its source was replaced by `HAIRPIN_SNAT_ADDR`.
pub const CT_FLAG_HAIRPIN: u16 = 1;
/// External traffic whose source was replaced by the node's address and `peer_port`.
pub const CT_FLAG_SNAT: u16 = 2;
/// A reply entry (backend -> client); without it, a forward entry (client -> frontend).
pub const CT_FLAG_REPLY: u16 = 4;
/// The TCP connection sent a FIN or RST: the flow is forgotten after the close-wait timeout
/// (a reset one sooner), and a new SYN on its tuple starts a new flow instead of reusing it.
pub const CT_FLAG_CLOSING: u16 = 8;
/// The TCP connection was reset (RST): it goes sooner than one closed with FIN, which may be
/// half-closed and still carry data.
pub const CT_FLAG_RESET: u16 = 16;
/// This entry's direction sent a FIN. With the other direction's too the connection is
/// closed both ways and goes soon; with one only it is half-closed and may still carry data
/// the other way, so it stays for the close-wait timeout.
pub const CT_FLAG_FIN: u16 = 32;

/// Conntrack value. Counters are added to in place (atomically) by the datapath; each entry
/// counts the packets travelling in its own direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntryOf<A> {
    pub packets: u64,
    /// IP-layer bytes (IP header included).
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns` at creation and at the last packet (CLOCK_MONOTONIC_COARSE:
    /// a jiffy's resolution is plenty for ages and idle times, and it costs less per packet).
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// Forward: the backend the flow is sent to. Reply: the frontend replies come from.
    pub nat_addr: A,
    pub nat_port: u16,
    pub flags: u16,
    /// Hairpin and SNAT. Forward: the substituted source; reply: the client's real address.
    pub peer_addr: A,
    /// SNAT. Forward: the substituted source port; reply: the client's real port.
    pub peer_port: u16,
    pub _pad: [u8; 2],
}

pub type CtEntry = CtEntryOf<Ipv4>;
pub type CtEntry6 = CtEntryOf<Ipv6>;

/// Key of the session affinity map (LRU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKeyOf<A> {
    pub service_port_id: u32,
    pub client: A,
}

pub type AffinityKey = AffinityKeyOf<Ipv4>;
pub type AffinityKey6 = AffinityKeyOf<Ipv6>;

/// Value of the session affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: [u8; 4],
}

/// Data of the source-range LPM trie key (the trie prepends its own prefix length, which
/// counts the 32 bits of the frontend id plus the CIDR's prefix). The value is unused:
/// presence allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKeyOf<A> {
    /// Big-endian, so the trie's prefix order is frontend first, then address.
    pub rev_nat_id_be: u32,
    pub addr: A,
}

pub type SourceRangeKey = SourceRangeKeyOf<Ipv4>;
/// IPv6 CIDRs (`dp_srcrange6_v1`: 32 bits of frontend id, then up to 128 of address).
pub type SourceRangeKey6 = SourceRangeKeyOf<Ipv6>;

/// A frontend's Maglev table (keyed by frontend id): backend ids, indexed by flow hash
/// modulo its length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevTable {
    pub backend_ids: [u32; MAGLEV_TABLE_SIZE],
}

/// What a frontend is, for people: written by the agent beside the datapath's maps (the
/// programs never read it), so the inspection tools can name services while the agent is
/// stopped. Strings are NUL-padded UTF-8, cut to fit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendName {
    /// `namespace/name`.
    pub service: [u8; 96],
    /// The service port's name.
    pub port: [u8; 24],
    /// `FRONTEND_KIND_*`.
    pub kind: u8,
    pub _pad: [u8; 7],
}

pub const FRONTEND_KIND_CLUSTER_IP: u8 = 0;
pub const FRONTEND_KIND_NODE_PORT: u8 = 1;
pub const FRONTEND_KIND_LOAD_BALANCER: u8 = 2;
pub const FRONTEND_KIND_EXTERNAL_IP: u8 = 3;

/// Node-wide settings the agent writes into `dp_config_v1` (one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// Source address for SNATed external traffic: the node's own address.
    pub snat_addr: Ipv4,
    /// The source ports SNATed flows take (`--snat-port-range`, inclusive, host order): a
    /// range neither the node's ephemeral ports nor node ports use, so a SNATed flow never
    /// shares a tuple with a connection of the node's own. (These two fields were `_pad` in
    /// the first layout: the size is unchanged, so the map keeps its name.)
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

/// Node-wide IPv6 settings (`dp_config6_v1`, one entry); the SNAT ports are IPv4's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig6 {
    /// Source address for SNATed external IPv6 traffic: the node's own IPv6 address.
    pub snat_addr: Ipv6,
}

/// The SNAT source ports when `--snat-port-range` is not given: below the default node port
/// range (30000-32767), itself below Linux's default ephemeral range (32768-60999), and above
/// the privileged ports. 29k ports per backend, as many as the ephemeral range offered (the
/// 4.5k above it ran out under a few hundred new connections a second, since a closed flow
/// holds its port for a few seconds).
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1_024, 29_999);

/// A datagram's fragments as IPv4 groups them (RFC 791: source, destination, protocol and
/// identification), as they arrive on the interface, before any translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub saddr: Ipv4,
    pub daddr: Ipv4,
    /// The IP header's identification field, network order as in the packet.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// A datagram's fragments as IPv6 groups them (RFC 8200: source, destination and the
/// fragment header's 32-bit identification; the protocol is the fragment header's next
/// header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey6 {
    pub saddr: Ipv6,
    pub daddr: Ipv6,
    /// Network order, as in the packet.
    pub id: u32,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// The L4 ports of a fragmented datagram, read from its first fragment (host order): the
/// later fragments carry no L4 header, and are looked up and translated with these.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentPorts {
    pub sport: u16,
    pub dport: u16,
    pub _pad: [u8; 4],
    /// When the first fragment was seen; stale entries are ignored (`FRAGMENT_TIMEOUT_NS`).
    pub first_seen_ns: u64,
}

/// Linux's own reassembly timeout (`net.ipv4.ipfrag_time`, 30 s).
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

/// A flow the node itself sends out of an external interface from the address and port of a
/// frontend (its own connection, or a pod's connection the node SNATed there), keyed by the
/// tuple its replies arrive with. Such replies are the node's, not new connections to the
/// frontend. The value is when the node last sent on it (ns since boot).
pub type HostFlowKey = CtKey;

/// `HostFlowKey` for IPv6 (`dp_hostflow6_v1`).
pub type HostFlowKey6 = CtKey6;

/// How long a host flow keeps its replies away from the frontend after the node last sent on
/// it: Linux's `nf_conntrack_udp_timeout_stream` (the longest of its UDP timeouts); a TCP
/// reply is never a SYN, so TCP needs no entry at all.
pub const HOST_FLOW_TIMEOUT_NS: u64 = 120_000_000_000;

/// Packets, bytes (IP layer, both directions) and new connections of a frontend or backend,
/// in per-CPU arrays (each CPU adds to its own copy without atomics; readers sum them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

/// Key of the socket map (`dp_sock_v1`): a socket (by its cookie) and an address it talks
/// to. `SOCK_REVERSE` entries are keyed by the backend the socket was sent to and name the
/// frontend it asked for (`getpeername()`, `recvmsg()` answer with it); `SOCK_FORWARD`
/// entries, for unconnected UDP, are keyed by the frontend and name the backend its
/// datagrams keep going to while it stays.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub addr: Ipv4,
    pub port: u16,
    pub proto: u8,
    /// `SOCK_REVERSE` or `SOCK_FORWARD`.
    pub kind: u8,
}

pub const SOCK_REVERSE: u8 = 0;
pub const SOCK_FORWARD: u8 = 1;

/// Value of the socket map: the other side of the translation (the frontend of a reverse
/// entry, the backend of a forward one), the ids involved, and when it was made.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockEntry {
    pub addr: Ipv4,
    pub port: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub created_ns: u64,
}

/// `SockKey` for IPv6 sockets (`dp_sock6_v1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey6 {
    pub cookie: u64,
    pub addr: Ipv6,
    pub port: u16,
    pub proto: u8,
    pub kind: u8,
    pub _pad: u32,
}

/// `SockEntry` for IPv6 sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockEntry6 {
    pub created_ns: u64,
    pub addr: Ipv6,
    pub port: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub _pad1: u32,
}

/// Which sockets the cgroup programs translate (`dp_sockcfg_v1`, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketLbConfig {
    /// `SOCKET_LB_*`. Zero (an unwritten map) translates nothing.
    pub mode: u32,
    pub _pad: u32,
    /// `SOCKET_LB_HOST`: the network namespace (its cookie) whose sockets are translated:
    /// the agent's, the node's own.
    pub netns_cookie: u64,
}

pub const SOCKET_LB_OFF: u32 = 0;
pub const SOCKET_LB_HOST: u32 = 1;
pub const SOCKET_LB_ALL: u32 = 2;

/// Why the datapath refused or dropped a packet; index into the drops array.
pub mod drop_reason {
    /// The service has no endpoints: the client got a TCP reset or ICMP port unreachable.
    pub const NO_ENDPOINTS: u32 = 1;
    /// Earlier datapaths reset a TCP flow whose backend was gone; TCP now keeps its backend
    /// (kube-proxy's semantics), so nothing counts here. Kept so the index and its metric
    /// label keep their meaning.
    pub const BACKEND_GONE: u32 = 2;
    /// Conntrack could not take the new flow (map update failed).
    pub const CT_INSERT_FAILED: u32 = 3;
    /// The service map named a backend slot or backend that does not exist.
    pub const BACKEND_MISSING: u32 = 4;
    /// A packet rewrite helper failed.
    pub const REWRITE_FAILED: u32 = 5;
    /// No endpoint this node may use under the service's traffic policy (others exist).
    pub const NO_LOCAL_ENDPOINTS: u32 = 6;
    /// The source is outside the frontend's loadBalancerSourceRanges.
    pub const SOURCE_RANGE: u32 = 7;
    /// No free source port for SNAT.
    pub const SNAT_PORTS_EXHAUSTED: u32 = 8;

    pub fn name(reason: u32) -> &'static str {
        match reason {
            NO_ENDPOINTS => "no_endpoints",
            BACKEND_GONE => "backend_gone",
            CT_INSERT_FAILED => "conntrack_insert_failed",
            BACKEND_MISSING => "backend_missing",
            REWRITE_FAILED => "rewrite_failed",
            NO_LOCAL_ENDPOINTS => "no_local_endpoints",
            SOURCE_RANGE => "source_range",
            SNAT_PORTS_EXHAUSTED => "snat_ports_exhausted",
            _ => "unknown",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    macro_rules! user_space_pod {
        ($($ty:ty),+ $(,)?) => {$(
            // SAFETY: repr(C), Copy, only integer fields, and no implicit padding (the layout
            // tests below pin every size and offset).
            unsafe impl aya::Pod for $ty {}
            unsafe impl bytemuck::Zeroable for $ty {}
            unsafe impl bytemuck::Pod for $ty {}
        )+};
    }
    user_space_pod!(
        ServiceKey,
        ServiceValue,
        Backend,
        CtKey,
        CtEntry,
        TrafficStats,
        AffinityKey,
        AffinityValue,
        SourceRangeKey,
        MaglevTable,
        DatapathConfig,
        FrontendName,
        FragmentKey,
        FragmentPorts,
        SockKey,
        SockEntry,
        SocketLbConfig,
        ServiceKey6,
        Backend6,
        CtKey6,
        CtEntry6,
        AffinityKey6,
        SourceRangeKey6,
        DatapathConfig6,
        FragmentKey6,
        SockKey6,
        SockEntry6,
    );
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn service_map_layout() {
        assert_eq!(size_of::<ServiceKey>(), 12);
        assert_eq!(align_of::<ServiceKey>(), 2);
        assert_eq!(offset_of!(ServiceKey, addr), 0);
        assert_eq!(offset_of!(ServiceKey, port), 4);
        assert_eq!(offset_of!(ServiceKey, backend_slot), 6);
        assert_eq!(offset_of!(ServiceKey, proto), 8);
        assert_eq!(offset_of!(ServiceKey, scope), 9);
        assert_eq!(size_of::<ServiceValue>(), 20);
        assert_eq!(offset_of!(ServiceValue, backend_id), 0);
        assert_eq!(offset_of!(ServiceValue, rev_nat_id), 4);
        assert_eq!(offset_of!(ServiceValue, count), 8);
        assert_eq!(offset_of!(ServiceValue, flags), 10);
        assert_eq!(offset_of!(ServiceValue, affinity_timeout), 12);
        assert_eq!(offset_of!(ServiceValue, service_port_id), 16);
    }

    #[test]
    fn backend_layout() {
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(offset_of!(Backend, port), 4);
        assert_eq!(offset_of!(Backend, proto), 6);
        assert_eq!(offset_of!(Backend, state), 7);
    }

    #[test]
    fn conntrack_layout() {
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(offset_of!(CtKey, daddr), 4);
        assert_eq!(offset_of!(CtKey, sport), 8);
        assert_eq!(offset_of!(CtKey, dport), 10);
        assert_eq!(offset_of!(CtKey, proto), 12);
        assert_eq!(size_of::<CtEntry>(), 56);
        assert_eq!(align_of::<CtEntry>(), 8);
        assert_eq!(offset_of!(CtEntry, bytes), 8);
        assert_eq!(offset_of!(CtEntry, created_ns), 16);
        assert_eq!(offset_of!(CtEntry, last_seen_ns), 24);
        assert_eq!(offset_of!(CtEntry, backend_id), 32);
        assert_eq!(offset_of!(CtEntry, rev_nat_id), 36);
        assert_eq!(offset_of!(CtEntry, nat_addr), 40);
        assert_eq!(offset_of!(CtEntry, nat_port), 44);
        assert_eq!(offset_of!(CtEntry, flags), 46);
        assert_eq!(offset_of!(CtEntry, peer_addr), 48);
        assert_eq!(offset_of!(CtEntry, peer_port), 52);
    }

    #[test]
    fn affinity_source_range_maglev_and_config_layouts() {
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(offset_of!(AffinityKey, client), 4);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(offset_of!(AffinityValue, backend_id), 8);
        assert_eq!(size_of::<SourceRangeKey>(), 8);
        assert_eq!(offset_of!(SourceRangeKey, addr), 4);
        assert_eq!(size_of::<MaglevTable>(), 4 * MAGLEV_TABLE_SIZE);
        assert_eq!(size_of::<DatapathConfig>(), 8);
        assert_eq!(offset_of!(DatapathConfig, snat_port_min), 4);
        assert_eq!(offset_of!(DatapathConfig, snat_port_max), 6);
        assert_eq!(size_of::<FragmentKey>(), 12);
        assert_eq!(offset_of!(FragmentKey, id), 8);
        assert_eq!(offset_of!(FragmentKey, proto), 10);
        assert_eq!(size_of::<FragmentPorts>(), 16);
        assert_eq!(offset_of!(FragmentPorts, first_seen_ns), 8);
        assert_eq!(size_of::<FrontendName>(), 128);
        assert_eq!(offset_of!(FrontendName, port), 96);
        assert_eq!(offset_of!(FrontendName, kind), 120);
    }

    #[test]
    fn socket_layouts() {
        assert_eq!(size_of::<SockKey>(), 16);
        assert_eq!(offset_of!(SockKey, addr), 8);
        assert_eq!(offset_of!(SockKey, port), 12);
        assert_eq!(offset_of!(SockKey, proto), 14);
        assert_eq!(offset_of!(SockKey, kind), 15);
        assert_eq!(size_of::<SockEntry>(), 24);
        assert_eq!(offset_of!(SockEntry, backend_id), 8);
        assert_eq!(offset_of!(SockEntry, rev_nat_id), 12);
        assert_eq!(offset_of!(SockEntry, created_ns), 16);
        assert_eq!(size_of::<SocketLbConfig>(), 16);
        assert_eq!(offset_of!(SocketLbConfig, netns_cookie), 8);
    }

    #[test]
    fn ipv6_layouts() {
        assert_eq!(size_of::<ServiceKey6>(), 24);
        assert_eq!(offset_of!(ServiceKey6, port), 16);
        assert_eq!(offset_of!(ServiceKey6, backend_slot), 18);
        assert_eq!(offset_of!(ServiceKey6, proto), 20);
        assert_eq!(offset_of!(ServiceKey6, scope), 21);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(offset_of!(Backend6, port), 16);
        assert_eq!(size_of::<CtKey6>(), 40);
        assert_eq!(offset_of!(CtKey6, daddr), 16);
        assert_eq!(offset_of!(CtKey6, sport), 32);
        assert_eq!(offset_of!(CtKey6, proto), 36);
        assert_eq!(size_of::<CtEntry6>(), 80);
        assert_eq!(offset_of!(CtEntry6, backend_id), 32);
        assert_eq!(offset_of!(CtEntry6, nat_addr), 40);
        assert_eq!(offset_of!(CtEntry6, nat_port), 56);
        assert_eq!(offset_of!(CtEntry6, flags), 58);
        assert_eq!(offset_of!(CtEntry6, peer_addr), 60);
        assert_eq!(offset_of!(CtEntry6, peer_port), 76);
        assert_eq!(size_of::<AffinityKey6>(), 20);
        assert_eq!(size_of::<SourceRangeKey6>(), 20);
        assert_eq!(size_of::<DatapathConfig6>(), 16);
        assert_eq!(size_of::<FragmentKey6>(), 40);
        assert_eq!(offset_of!(FragmentKey6, id), 32);
        assert_eq!(size_of::<SockKey6>(), 32);
        assert_eq!(offset_of!(SockKey6, port), 24);
        assert_eq!(size_of::<SockEntry6>(), 40);
        assert_eq!(offset_of!(SockEntry6, addr), 8);
        assert_eq!(offset_of!(SockEntry6, backend_id), 28);
    }

    #[test]
    fn ipv6_hashes_fold_its_words() {
        let v6 = Ipv6::new([0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 8]);
        assert_eq!(v6.hash_word(), 15);
        assert_eq!([10u8, 96, 0, 1].hash_word(), 0x0a60_0001);
        let std: core::net::Ipv6Addr = v6.into();
        assert_eq!(Ipv6::from(std), v6);
    }

    #[test]
    fn flow_tuples_agree_across_families() {
        let a = |byte: u8| Ipv6::new([byte; 16]);
        let forward = CtEntry6 {
            nat_addr: a(0xfd),
            nat_port: 8080,
            flags: CT_FLAG_SNAT,
            peer_addr: a(0xfe),
            peer_port: 2000,
            ..Default::default()
        };
        let key = CtKey6::new(a(1), a(2), 40000, 80, IPPROTO_TCP);
        let reply = key.reply_of(&forward);
        assert_eq!(
            reply,
            CtKey6::new(a(0xfd), a(0xfe), 8080, 2000, IPPROTO_TCP)
        );
        let back = CtEntry6 {
            nat_addr: a(2),
            nat_port: 80,
            flags: CT_FLAG_SNAT | CT_FLAG_REPLY,
            peer_addr: a(1),
            peer_port: 40000,
            ..Default::default()
        };
        assert_eq!(reply.forward_of(&back), key);
    }

    #[test]
    fn stats_layout() {
        assert_eq!(size_of::<TrafficStats>(), 24);
        assert_eq!(offset_of!(TrafficStats, bytes), 8);
        assert_eq!(offset_of!(TrafficStats, connections), 16);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in map_names::ALL {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
            assert!(name.contains("_v"), "{name} carries no layout version");
        }
    }
}
