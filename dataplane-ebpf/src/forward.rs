//! Forwarding a translated packet the way Cilium's BPF host routing does: a FIB lookup for its
//! new destination, then straight into the pod when the FIB names one of this node's pod
//! veths (`bpf_redirect_peer`; the agent lists them in `dp_podif_v1`), or out of the interface
//! the FIB names otherwise (`bpf_redirect_neigh`, which resolves the next hop's link
//! address). The packet skips the node's second routing pass and netfilter: the kernel's
//! connection tracking never sees a half-translated flow (the forward direction translated
//! before it, the reply after), so rules such as kube-proxy's `--ctstate INVALID -j DROP` or a
//! strict `rp_filter` cannot drop it.
//!
//! What the FIB does not forward (the node itself, blackholes, a disabled forwarding) goes to
//! the stack as before. The lookup happens before the rewrite, so that a packet this hop
//! cannot forward (TTL exhausted, too big with don't-fragment set) is answered with an ICMP
//! error quoting it as the client sent it.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_OK, TC_ACT_SHOT, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
        bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{
        bpf_check_mtu, bpf_fib_lookup, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_change_head,
    },
    programs::TcContext,
};
use dataplane_common::{Address, Ipv4, Ipv6, drop_reason};

use crate::{
    counters::count_drop,
    maps::{CONFIG, CONFIG6, POD_INTERFACES},
    nat,
    packet::{ETH_HLEN, IP_CSUM_OFF, IP_TTL_OFF, Packet},
    refuse,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6's hop limit, in its header.
const IPV6_HOP_LIMIT_OFF: usize = 7;

/// What forwarding needs of an address family: how its addresses enter a FIB lookup and a
/// neighbour redirect, how a hop is counted, and what a router answers when it cannot
/// forward.
pub trait Forwarding: Address {
    const AF: u8;
    const ETH_P: u16;
    fn set_fib_addresses(params: &mut bpf_fib_lookup, saddr: Self, daddr: Self);
    fn fib_next_hop(params: &bpf_fib_lookup) -> Self;
    fn neighbour(next_hop: Self) -> bpf_redir_neigh;
    /// The family's NAT (`nat::rewrite`, `nat::rewrite6`).
    fn rewrite<const L2: usize>(
        ctx: &TcContext,
        pkt: &Packet<Self>,
        r: nat::Rewrite<Self>,
    ) -> Result<(), i64>;
    /// TTL or hop limit minus one, as the stack's forwarding would.
    fn count_hop<const L2: usize>(ctx: &TcContext) -> Option<()>;
    /// A packet whose TTL ends here: answered as a router, about the packet as it arrived.
    fn time_exceeded<const L2: usize>(ctx: &TcContext, pkt: &Packet<Self>) -> i32;
    /// A packet too big for the next hop that may not be fragmented: answered, or `None` to
    /// send it on (the stack fragments it).
    fn too_big<const L2: usize>(ctx: &TcContext, pkt: &Packet<Self>, mtu: u16) -> Option<i32>;
}

impl Forwarding for Ipv4 {
    const AF: u8 = AF_INET;
    const ETH_P: u16 = ETH_P_IP;

    #[inline(always)]
    fn set_fib_addresses(params: &mut bpf_fib_lookup, saddr: Ipv4, daddr: Ipv4) {
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    }

    #[inline(always)]
    fn fib_next_hop(params: &bpf_fib_lookup) -> Ipv4 {
        // SAFETY: unions of integers, written by the helper.
        unsafe { params.__bindgen_anon_4.ipv4_dst }.to_ne_bytes()
    }

    #[inline(always)]
    fn neighbour(next_hop: Ipv4) -> bpf_redir_neigh {
        bpf_redir_neigh {
            nh_family: AF_INET as u32,
            __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                ipv4_nh: u32::from_ne_bytes(next_hop),
            },
        }
    }

    #[inline(always)]
    fn rewrite<const L2: usize>(ctx: &TcContext, pkt: &Packet, r: nat::Rewrite) -> Result<(), i64> {
        nat::rewrite::<L2>(ctx, pkt, r)
    }

    /// TTL minus one, with the header checksum updated as the kernel's `ip_decrease_ttl`
    /// does.
    #[inline(always)]
    fn count_hop<const L2: usize>(ctx: &TcContext) -> Option<()> {
        let start = ctx.data();
        if start + L2 + IP_CSUM_OFF + 2 > ctx.data_end() {
            return None;
        }
        // SAFETY: bounds checked above; the program may write packet data.
        unsafe {
            let ttl = (start + L2 + IP_TTL_OFF) as *mut u8;
            let check = (start + L2 + IP_CSUM_OFF) as *mut u16;
            let sum = *check as u32 + 0x0100u16.to_be() as u32;
            *check = (sum + (sum >= 0xffff) as u32) as u16;
            *ttl -= 1;
        }
        Some(())
    }

    #[inline(always)]
    fn time_exceeded<const L2: usize>(ctx: &TcContext, pkt: &Packet) -> i32 {
        refuse::time_exceeded::<L2>(ctx, pkt, node_address(pkt))
    }

    #[inline(always)]
    fn too_big<const L2: usize>(ctx: &TcContext, pkt: &Packet, mtu: u16) -> Option<i32> {
        pkt.dont_fragment
            .then(|| refuse::fragmentation_needed::<L2>(ctx, pkt, mtu, node_address(pkt)))
    }
}

impl Forwarding for Ipv6 {
    const AF: u8 = AF_INET6;
    const ETH_P: u16 = ETH_P_IPV6;

    #[inline(always)]
    fn set_fib_addresses(params: &mut bpf_fib_lookup, saddr: Ipv6, daddr: Ipv6) {
        params.__bindgen_anon_3.ipv6_src = saddr.words();
        params.__bindgen_anon_4.ipv6_dst = daddr.words();
    }

    #[inline(always)]
    fn fib_next_hop(params: &bpf_fib_lookup) -> Ipv6 {
        // SAFETY: unions of integers, written by the helper.
        let [a, b, c, d] = unsafe { params.__bindgen_anon_4.ipv6_dst }.map(u32::to_ne_bytes);
        Ipv6::new([
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ])
    }

    #[inline(always)]
    fn neighbour(next_hop: Ipv6) -> bpf_redir_neigh {
        bpf_redir_neigh {
            nh_family: AF_INET6 as u32,
            __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                ipv6_nh: next_hop.words(),
            },
        }
    }

    #[inline(always)]
    fn rewrite<const L2: usize>(
        ctx: &TcContext,
        pkt: &Packet<Ipv6>,
        r: nat::Rewrite<Ipv6>,
    ) -> Result<(), i64> {
        nat::rewrite6::<L2>(ctx, pkt, r)
    }

    /// The hop limit minus one (IPv6 has no header checksum).
    #[inline(always)]
    fn count_hop<const L2: usize>(ctx: &TcContext) -> Option<()> {
        let start = ctx.data();
        if start + L2 + IPV6_HOP_LIMIT_OFF + 1 > ctx.data_end() {
            return None;
        }
        // SAFETY: bounds checked above; the program may write packet data.
        unsafe { *((start + L2 + IPV6_HOP_LIMIT_OFF) as *mut u8) -= 1 };
        Some(())
    }

    #[inline(always)]
    fn time_exceeded<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv6>) -> i32 {
        refuse::time_exceeded6::<L2>(ctx, pkt, node_address6(pkt))
    }

    /// IPv6 is never fragmented on the way: always answered.
    #[inline(always)]
    fn too_big<const L2: usize>(ctx: &TcContext, pkt: &Packet<Ipv6>, mtu: u16) -> Option<i32> {
        Some(refuse::packet_too_big6::<L2>(
            ctx,
            pkt,
            mtu,
            node_address6(pkt),
        ))
    }
}

/// Where the FIB sends a packet.
#[derive(Clone, Copy)]
pub enum Route<A> {
    /// Into the pod behind this interface (the host end of its veth), straight into the
    /// pod's namespace, with this link header (destination and source address).
    Pod { ifindex: u32, link_header: [u8; 12] },
    /// Out of this interface, towards this next hop.
    Interface { ifindex: u32, next_hop: A },
    /// Too big for the interface the FIB names, whose MTU this is.
    TooBig { mtu: u16 },
    /// Local delivery, or nothing the FIB forwards: the stack decides.
    Stack,
}

/// The route for a packet of `proto` from `saddr:sport` to `daddr:dport` (host order)
/// entering on this interface. A frame of its own: the lookup structure is large, and the
/// verifier caps the stack of the whole call chain (entry point + new flow + this).
///
/// A packet for a pod of this node goes straight into the pod's namespace, as Cilium's host
/// routing sends it: with the link header the neighbour output would give it, through
/// `bpf_redirect_peer`, which skips the host end's transmit and the receive queue between
/// the two ends.
#[inline(never)]
fn route<A: Forwarding, const L2: usize>(
    ctx: &TcContext,
    proto: u8,
    (saddr, sport): (A, u16),
    (daddr, dport): (A, u16),
) -> Route<A> {
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = A::AF;
    params.l4_protocol = proto;
    params.sport = sport.to_be();
    params.dport = dport.to_be();
    A::set_fib_addresses(&mut params, saddr, daddr);
    // SAFETY: reads the program's own context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // tot_len stays 0: the kernel checks the skb itself against the MTU, GSO-aware.
    // SAFETY: params is a valid, fully initialised lookup structure on this stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // SAFETY: unions of integers, written by the helper.
    let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => {
            // The kernel checks the skb against the interface's MTU only when the lookup
            // succeeds (the next hop's neighbour known), and a GSO packet passes that check
            // whatever its segment size (a pod with a larger MTU than the next hop sends
            // segments that would be dropped there): the rest is checked here.
            // SAFETY: reads the program's own context.
            let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
            if gso || rc as u32 == BPF_FIB_LKUP_RET_NO_NEIGH {
                let mut checked_mtu = 0u32;
                let flags = if gso { BPF_MTU_CHK_SEGS as u64 } else { 0 };
                // SAFETY: checks the program's own skb against the interface's MTU.
                let fits = unsafe {
                    bpf_check_mtu(
                        ctx.skb.skb as *mut _,
                        params.ifindex,
                        &mut checked_mtu,
                        0,
                        flags,
                    )
                };
                if fits != BPF_MTU_CHK_RET_SUCCESS as i64 {
                    return Route::TooBig {
                        mtu: checked_mtu as u16,
                    };
                }
            }
            // A pod's veth, its neighbour known (the link addresses in `params`): into the
            // pod. A packet from a Layer-3 device has no link header to give it.
            if rc as u32 == BPF_FIB_LKUP_RET_SUCCESS
                && L2 == ETH_HLEN
                && POD_INTERFACES.get_ptr(&params.ifindex).is_some()
            {
                let mut link_header = [0u8; 12];
                link_header[..6].copy_from_slice(&params.dmac);
                link_header[6..].copy_from_slice(&params.smac);
                return Route::Pod {
                    ifindex: params.ifindex,
                    link_header,
                };
            }
            Route::Interface {
                ifindex: params.ifindex,
                next_hop: A::fib_next_hop(&params),
            }
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig { mtu },
        _ => Route::Stack,
    }
}

/// The node's IPv6 address, as the source of the ICMPv6 errors it sends as a router.
#[inline(always)]
fn node_address6(pkt: &Packet<Ipv6>) -> Ipv6 {
    match CONFIG6.get(0) {
        Some(config) if !config.snat_addr.is_unspecified() => config.snat_addr,
        _ => pkt.daddr,
    }
}

/// The node's address, as the source of the ICMP errors it sends as a router.
#[inline(always)]
fn node_address(pkt: &Packet) -> Ipv4 {
    match CONFIG.get(0) {
        Some(config) if config.snat_addr != [0; 4] => config.snat_addr,
        _ => pkt.daddr,
    }
}

/// Rewrites the packet and sends it on: out of the interface the FIB names, or to the stack.
/// A packet this hop cannot forward is answered as a router would, about the packet as it
/// arrived.
#[inline(always)]
pub fn translate_and_forward<A: Forwarding, const L2: usize>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    translation: nat::Rewrite<A>,
) -> i32 {
    let route = route::<A, L2>(
        ctx,
        pkt.proto,
        (translation.saddr, translation.sport),
        (translation.daddr, translation.dport),
    );
    let forwarded = !matches!(route, Route::Stack);
    if forwarded && pkt.ttl <= 1 {
        return A::time_exceeded::<L2>(ctx, pkt);
    }
    if let Route::TooBig { mtu } = route
        && let Some(answer) = A::too_big::<L2>(ctx, pkt, mtu)
    {
        return answer;
    }
    if A::rewrite::<L2>(ctx, pkt, translation).is_err() {
        count_drop(drop_reason::REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    match route {
        Route::Pod {
            ifindex,
            link_header,
        } => redirect_to_pod::<A>(ctx, ifindex, link_header),
        Route::Interface { ifindex, next_hop } => redirect::<A, L2>(ctx, ifindex, next_hop),
        // Too big without don't-fragment: the stack fragments it on its way out.
        Route::TooBig { .. } | Route::Stack => TC_ACT_OK,
    }
}

/// Forwards an ICMP error already translated in place (from `saddr` to `daddr`, with this
/// `ttl`) the same way, without answering for it: no ICMP error is ever sent about an ICMP
/// error; what this hop cannot forward goes to the stack.
#[inline(always)]
pub fn forward_icmp_error<A: Forwarding, const L2: usize>(
    ctx: &TcContext,
    icmp: u8,
    saddr: A,
    daddr: A,
    ttl: u8,
) -> i32 {
    match route::<A, L2>(ctx, icmp, (saddr, 0), (daddr, 0)) {
        Route::Pod {
            ifindex,
            link_header,
        } if ttl > 1 => redirect_to_pod::<A>(ctx, ifindex, link_header),
        Route::Interface { ifindex, next_hop } if ttl > 1 => {
            redirect::<A, L2>(ctx, ifindex, next_hop)
        }
        _ => TC_ACT_OK,
    }
}

/// Decrements the TTL (as the stack's forwarding would), writes the link header the
/// neighbour output would write, and hands the packet to the pod behind the interface, in
/// the pod's namespace. Ethernet packets only (see `route`).
#[inline(always)]
fn redirect_to_pod<A: Forwarding>(ctx: &TcContext, ifindex: u32, link_header: [u8; 12]) -> i32 {
    if A::count_hop::<ETH_HLEN>(ctx).is_none() {
        return TC_ACT_SHOT;
    }
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return TC_ACT_SHOT;
    }
    // SAFETY: bounds checked above; the program may write packet data.
    unsafe { core::ptr::write_unaligned(start as *mut [u8; 12], link_header) };
    // SAFETY: a helper call on the program's own context.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}

/// Decrements the TTL (as the stack's forwarding would) and hands the packet to the
/// interface's neighbour output, which fills in the link header.
#[inline(always)]
fn redirect<A: Forwarding, const L2: usize>(ctx: &TcContext, ifindex: u32, next_hop: A) -> i32 {
    if A::count_hop::<L2>(ctx).is_none() {
        return TC_ACT_SHOT;
    }
    if L2 == 0 {
        // The neighbour output takes an Ethernet frame (it replaces the header): a packet
        // from a Layer-3 device gets a placeholder one.
        // SAFETY: the skb is the program's own context.
        if unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) } != 0 {
            return TC_ACT_SHOT;
        }
        // Written in place (a helper store would need the value on this frame's stack,
        // which the verifier's cap on the call chain cannot spare).
        let start = ctx.data();
        if start + ETH_HLEN > ctx.data_end() {
            return TC_ACT_SHOT;
        }
        // SAFETY: bounds checked above; the program may write packet data.
        unsafe { *((start + 12) as *mut u16) = A::ETH_P.to_be() };
    }
    let mut next = A::neighbour(next_hop);
    // SAFETY: `next` is a valid structure on this stack.
    unsafe {
        bpf_redirect_neigh(
            ifindex,
            &mut next,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}
