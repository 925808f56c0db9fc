//! The datapath's two address families. The shared layouts are generic over the address
//! (`ServiceKeyOf<A>`, `BackendOf<A>`, ...), with `A` = `Ipv4` (`[u8; 4]`) or `Ipv6` (16
//! octets, 4-aligned); [`Family`] is what the agent needs to know of `A`: how an [`IpAddr`]
//! becomes one, and which of the two sets of maps (and of their contents) holds its entries. Code that
//! writes or reads entries is written once, generic over `A`, and `by_family!` picks `A`
//! from an address.
use std::{
    fmt::Debug,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::Pod;
use dataplane_common::{BackendOf, Ipv4, Ipv6};

use super::{
    maps::{FamilyMapNames, FamilyMaps, MAP_NAMES_V4, MAP_NAMES_V6, PinnedMaps},
    translate::{FamilyContents, MapContents},
};

pub trait Family: Copy + Default + Eq + Ord + Hash + Debug + Send + Sync + 'static {
    /// Address bits: the longest CIDR prefix.
    const BITS: u8;
    /// The names of the family's maps.
    const MAP_NAMES: FamilyMapNames;
    /// The address in network order, `None` for an address of the other family.
    fn of(ip: IpAddr) -> Option<Self>;
    fn ip(self) -> IpAddr;
    fn contents(c: &MapContents) -> &FamilyContents<Self>;
    fn contents_mut(c: &mut MapContents) -> &mut FamilyContents<Self>;
    // The shared crate implements `Pod` for each layout of both families, but Rust cannot
    // see that for a generic `A` (a trait's where-clauses do not reach its users), so code
    // over the pinned maps names the layouts it needs as bounds, as these do.
    fn maps(m: &PinnedMaps) -> &FamilyMaps<Self>
    where
        BackendOf<Self>: Pod;
    fn maps_mut(m: &mut PinnedMaps) -> &mut FamilyMaps<Self>
    where
        BackendOf<Self>: Pod;

    /// The address of `ip`, which the caller has dispatched on (with `by_family!`): an
    /// address of the other family would read as zeroes, an address no frontend or backend
    /// has.
    fn octets(ip: IpAddr) -> Self {
        debug_assert!(
            Self::of(ip).is_some(),
            "{ip} dispatched to the wrong family"
        );
        Self::of(ip).unwrap_or_default()
    }

    /// Zeroes: an unused backend id, no address.
    fn is_unspecified(self) -> bool {
        self == Self::default()
    }
}

impl Family for Ipv4 {
    const BITS: u8 = 32;
    const MAP_NAMES: FamilyMapNames = MAP_NAMES_V4;
    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        }
    }
    fn ip(self) -> IpAddr {
        Ipv4Addr::from(self).into()
    }
    fn contents(c: &MapContents) -> &FamilyContents<Self> {
        &c.v4
    }
    fn contents_mut(c: &mut MapContents) -> &mut FamilyContents<Self> {
        &mut c.v4
    }
    fn maps(m: &PinnedMaps) -> &FamilyMaps<Self> {
        &m.v4
    }
    fn maps_mut(m: &mut PinnedMaps) -> &mut FamilyMaps<Self> {
        &mut m.v4
    }
}

impl Family for Ipv6 {
    const BITS: u8 = 128;
    const MAP_NAMES: FamilyMapNames = MAP_NAMES_V6;
    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a.into()),
            IpAddr::V4(_) => None,
        }
    }
    fn ip(self) -> IpAddr {
        Ipv6Addr::from(self).into()
    }
    fn contents(c: &MapContents) -> &FamilyContents<Self> {
        &c.v6
    }
    fn contents_mut(c: &mut MapContents) -> &mut FamilyContents<Self> {
        &mut c.v6
    }
    fn maps(m: &PinnedMaps) -> &FamilyMaps<Self> {
        &m.v6
    }
    fn maps_mut(m: &mut PinnedMaps) -> &mut FamilyMaps<Self> {
        &mut m.v6
    }
}

/// Evaluates `$body` with the type `$A` naming the family of the address `$ip`:
/// `by_family!(addr.ip(), A => write::<A>(...))`.
macro_rules! by_family {
    ($ip:expr, $A:ident => $body:expr) => {
        match $ip {
            std::net::IpAddr::V4(_) => {
                type $A = dataplane_common::Ipv4;
                $body
            }
            std::net::IpAddr::V6(_) => {
                type $A = dataplane_common::Ipv6;
                $body
            }
        }
    };
}
pub(crate) use by_family;
