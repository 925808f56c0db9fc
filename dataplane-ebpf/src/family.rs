//! The two address families. Load balancing — frontend lookup, backend choice, affinity,
//! conntrack, NAT — is written once (`lb`), generic over a family; what differs between IPv4
//! and IPv6 (the maps of each, and for packets how an address enters the checksums, the FIB
//! lookup, a router's answers) is here. Every call is resolved at compile time.
//!
//! `Family` is what the socket hooks and the backend choice need; `PacketFamily` what the tc
//! packet path needs. Both are implemented for both families. IPv6's tuples keep four times
//! the registers live, so its packet path runs in frames of its own with its working state in
//! per-CPU scratch maps (`OWN_FRAMES`, see `lb::handle`): inlined like IPv4's, it would not
//! fit the verifier's 512-byte stack budget for a call chain.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use dataplane_common::{
    AffinityKeyOf, AffinityValue, BackendOf, CtEntryOf, CtKeyOf, HAIRPIN_SNAT_ADDR, Ipv4, Ipv6,
    ServiceKeyOf, ServiceValue, SourceRangeKey, SourceRangeKey6, capacity,
};

use crate::{forward, lb::FlowScratch, maps, nat::Rewrite, packet::Packet, refuse};

/// The operations conntrack needs of a hash map, whichever kind and size it is.
pub trait KvMap<K, V> {
    fn get_ptr_mut(&self, key: &K) -> Option<*mut V>;
    fn insert(&self, key: &K, value: &V, flags: u64) -> Result<(), i32>;
    fn remove(&self, key: &K) -> Result<(), i32>;
}

macro_rules! kv_map {
    ($map:ident) => {
        impl<K, V, const M: usize, const F: usize> KvMap<K, V> for $map<K, V, M, F> {
            #[inline(always)]
            fn get_ptr_mut(&self, key: &K) -> Option<*mut V> {
                $map::get_ptr_mut(self, key)
            }
            #[inline(always)]
            fn insert(&self, key: &K, value: &V, flags: u64) -> Result<(), i32> {
                $map::insert(self, key, value, flags)
            }
            #[inline(always)]
            fn remove(&self, key: &K) -> Result<(), i32> {
                $map::remove(self, key)
            }
        }
    };
}
kv_map!(HashMap);
kv_map!(LruHashMap);

pub type Services<A> = HashMap<ServiceKeyOf<A>, ServiceValue, { capacity::SERVICES as usize }>;
pub type Backends<A> = Array<BackendOf<A>, { capacity::BACKENDS as usize }>;
pub type Affinity<A> = LruHashMap<AffinityKeyOf<A>, AffinityValue, { capacity::AFFINITY as usize }>;
pub type HostFlows<A> = LruHashMap<CtKeyOf<A>, u64, { capacity::HOST_FLOWS as usize }>;

/// An address family, as the socket hooks and the backend choice see it: its service,
/// backend and affinity maps.
pub trait Family: 'static {
    type Addr: dataplane_common::Address;

    fn services() -> &'static Services<Self::Addr>;
    fn backends() -> &'static Backends<Self::Addr>;
    fn affinity() -> &'static Affinity<Self::Addr>;
}

/// A family the tc programs translate packets of: its conntrack tables and the packet
/// operations that depend on its headers.
pub trait PacketFamily: Family {
    type CtTcp: KvMap<CtKeyOf<Self::Addr>, CtEntryOf<Self::Addr>> + 'static;
    type CtOverflow: KvMap<CtKeyOf<Self::Addr>, CtEntryOf<Self::Addr>> + 'static;
    type CtAny: KvMap<CtKeyOf<Self::Addr>, CtEntryOf<Self::Addr>> + 'static;

    /// The source a pod reaching itself through a service is given (see `HAIRPIN_SNAT_ADDR`).
    const HAIRPIN_ADDR: Self::Addr;
    /// Known and new flows in frames of their own (see `lb::handle`).
    const OWN_FRAMES: bool;

    fn host_flows() -> &'static HostFlows<Self::Addr>;
    fn ct_tcp() -> &'static Self::CtTcp;
    fn ct_overflow() -> &'static Self::CtOverflow;
    fn ct_overflow_in_use() -> &'static Array<u32, 1>;
    fn ct_any() -> &'static Self::CtAny;
    /// Working memory for opening a flow (`lb::open_flow`).
    fn flow_scratch() -> &'static PerCpuArray<FlowScratch<Self::Addr>, 1>;

    /// Is `saddr` inside one of the frontend's loadBalancerSourceRanges?
    fn source_allowed(rev_nat_id: u32, saddr: Self::Addr) -> bool;
    /// The node's address of this family, the source of SNATed flows.
    fn snat_addr() -> Option<Self::Addr>;
    /// A first fragment's ports, for the datagram's later fragments.
    fn remember_fragment_ports(pkt: &Packet<Self::Addr>, now: u64);

    /// Rewrites the packet and sends it on (see `forward::translate_and_forward`).
    fn translate_and_forward<const L2: usize>(
        ctx: &TcContext,
        pkt: &Packet<Self::Addr>,
        rewrite: Rewrite<Self::Addr>,
    ) -> i32;
    /// Answers a connection to a frontend without endpoints (TCP reset, ICMP unreachable).
    fn refuse<const L2: usize>(ctx: &TcContext, pkt: &Packet<Self::Addr>) -> i32;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = Ipv4;

    #[inline(always)]
    fn services() -> &'static Services<Ipv4> {
        &maps::SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static Backends<Ipv4> {
        &maps::BACKENDS
    }
    #[inline(always)]
    fn affinity() -> &'static Affinity<Ipv4> {
        &maps::AFFINITY
    }
}

impl PacketFamily for V4 {
    type CtTcp = HashMap<CtKeyOf<Ipv4>, CtEntryOf<Ipv4>, { capacity::CONNTRACK_TCP as usize }>;
    type CtOverflow =
        LruHashMap<CtKeyOf<Ipv4>, CtEntryOf<Ipv4>, { capacity::CONNTRACK_TCP_OVERFLOW as usize }>;
    type CtAny = LruHashMap<CtKeyOf<Ipv4>, CtEntryOf<Ipv4>, { capacity::CONNTRACK_ANY as usize }>;

    const HAIRPIN_ADDR: Ipv4 = HAIRPIN_SNAT_ADDR;
    const OWN_FRAMES: bool = false;

    #[inline(always)]
    fn host_flows() -> &'static HostFlows<Ipv4> {
        &maps::HOST_FLOWS
    }
    #[inline(always)]
    fn ct_tcp() -> &'static Self::CtTcp {
        &maps::CONNTRACK_TCP
    }
    #[inline(always)]
    fn ct_overflow() -> &'static Self::CtOverflow {
        &maps::CONNTRACK_TCP_OVERFLOW
    }
    #[inline(always)]
    fn ct_overflow_in_use() -> &'static Array<u32, 1> {
        &maps::CONNTRACK_OVERFLOW_IN_USE
    }
    #[inline(always)]
    fn ct_any() -> &'static Self::CtAny {
        &maps::CONNTRACK_ANY
    }
    #[inline(always)]
    fn flow_scratch() -> &'static PerCpuArray<FlowScratch<Ipv4>, 1> {
        &maps::FLOW_SCRATCH
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: u32, saddr: Ipv4) -> bool {
        let key = Key::new(
            64,
            SourceRangeKey {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr: saddr,
            },
        );
        maps::SOURCE_RANGES.get(&key).is_some()
    }

    #[inline(always)]
    fn snat_addr() -> Option<Ipv4> {
        maps::CONFIG.get(0).map(|c| c.snat_addr)
    }

    #[inline(always)]
    fn remember_fragment_ports(pkt: &Packet<Ipv4>, now: u64) {
        pkt.remember_fragment_ports(now)
    }

    #[inline(always)]
    fn translate_and_forward<const L2: usize>(
        ctx: &TcContext,
        pkt: &Packet<Ipv4>,
        rewrite: Rewrite<Ipv4>,
    ) -> i32 {
        forward::translate_and_forward::<Ipv4, L2>(ctx, pkt, rewrite)
    }

    #[inline(always)]
    fn refuse<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv4>) -> i32 {
        refuse::connection::<L2>(ctx, pkt)
    }
}

impl Family for V6 {
    type Addr = Ipv6;

    #[inline(always)]
    fn services() -> &'static Services<Ipv6> {
        &maps::SERVICES6
    }
    #[inline(always)]
    fn backends() -> &'static Backends<Ipv6> {
        &maps::BACKENDS6
    }
    #[inline(always)]
    fn affinity() -> &'static Affinity<Ipv6> {
        &maps::AFFINITY6
    }
}

impl PacketFamily for V6 {
    type CtTcp = HashMap<CtKeyOf<Ipv6>, CtEntryOf<Ipv6>, { capacity::CONNTRACK6_TCP as usize }>;
    type CtOverflow =
        LruHashMap<CtKeyOf<Ipv6>, CtEntryOf<Ipv6>, { capacity::CONNTRACK6_TCP_OVERFLOW as usize }>;
    type CtAny = LruHashMap<CtKeyOf<Ipv6>, CtEntryOf<Ipv6>, { capacity::CONNTRACK6_ANY as usize }>;

    const HAIRPIN_ADDR: Ipv6 = dataplane_common::HAIRPIN_SNAT_ADDR6;
    const OWN_FRAMES: bool = true;

    #[inline(always)]
    fn host_flows() -> &'static HostFlows<Ipv6> {
        &maps::HOST_FLOWS6
    }
    #[inline(always)]
    fn ct_tcp() -> &'static Self::CtTcp {
        &maps::CONNTRACK6_TCP
    }
    #[inline(always)]
    fn ct_overflow() -> &'static Self::CtOverflow {
        &maps::CONNTRACK6_TCP_OVERFLOW
    }
    #[inline(always)]
    fn ct_overflow_in_use() -> &'static Array<u32, 1> {
        &maps::CONNTRACK6_OVERFLOW_IN_USE
    }
    #[inline(always)]
    fn ct_any() -> &'static Self::CtAny {
        &maps::CONNTRACK6_ANY
    }
    #[inline(always)]
    fn flow_scratch() -> &'static PerCpuArray<FlowScratch<Ipv6>, 1> {
        &maps::FLOW_SCRATCH6
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: u32, saddr: Ipv6) -> bool {
        let key = Key::new(
            32 + 128,
            SourceRangeKey6 {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr: saddr,
            },
        );
        maps::SOURCE_RANGES6.get(&key).is_some()
    }

    #[inline(always)]
    fn snat_addr() -> Option<Ipv6> {
        maps::CONFIG6.get(0).map(|c| c.snat_addr)
    }

    #[inline(always)]
    fn remember_fragment_ports(pkt: &Packet<Ipv6>, now: u64) {
        pkt.remember_fragment_ports6(now)
    }

    #[inline(always)]
    fn translate_and_forward<const L2: usize>(
        ctx: &TcContext,
        pkt: &Packet<Ipv6>,
        rewrite: Rewrite<Ipv6>,
    ) -> i32 {
        translate_and_forward6::<L2>(ctx, pkt, &rewrite)
    }

    #[inline(always)]
    fn refuse<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv6>) -> i32 {
        refuse::connection6::<L2>(ctx, pkt)
    }
}

/// IPv6's forwarding in a frame of its own: its addresses make every structure on the way
/// four times larger, and the verifier caps the stack of the whole call chain.
#[inline(never)]
fn translate_and_forward6<const L2: usize>(
    ctx: &TcContext,
    pkt: &Packet<Ipv6>,
    rewrite: &Rewrite<Ipv6>,
) -> i32 {
    let rewrite = Rewrite {
        saddr: rewrite.saddr,
        sport: rewrite.sport,
        daddr: rewrite.daddr,
        dport: rewrite.dport,
    };
    forward::translate_and_forward::<Ipv6, L2>(ctx, pkt, rewrite)
}
