//! In-place counter updates: atomic adds on looked-up values, never a map update per packet.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use dataplane_common::{CtEntryOf, TrafficStats};

use crate::maps::{
    BACKEND_STATS, DROPS, SERVICE_STATS, SOCKET_BACKEND_STATS, SOCKET_SERVICE_STATS,
};

#[inline(always)]
fn add(counter: *mut u64, n: u64) {
    // SAFETY: `counter` points into a map value the kernel keeps alive for this run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

#[inline(always)]
pub fn count_flow_packet<A>(entry: *mut CtEntryOf<A>, bytes: u64, now: u64) {
    // SAFETY: `entry` came from a conntrack lookup in this run.
    unsafe {
        add(&raw mut (*entry).packets, 1);
        add(&raw mut (*entry).bytes, bytes);
        (*entry).last_seen_ns = now;
    }
}

/// Per-CPU values: only this CPU writes them while the program runs, so plain adds do.
#[inline(always)]
fn count_traffic(stats: Option<*mut TrafficStats>, bytes: u64, new_connection: bool) {
    if let Some(stats) = stats {
        // SAFETY: this CPU's copy of an array value, alive as long as the map.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += bytes;
            if new_connection {
                (*stats).connections += 1;
            }
        }
    }
}

/// Per-frontend and per-backend packets/bytes, and connections when the flow is new.
#[inline(always)]
pub fn count_service_packet(rev_nat_id: u32, backend_id: u32, bytes: u64, new_connection: bool) {
    count_traffic(SERVICE_STATS.get_ptr_mut(rev_nat_id), bytes, new_connection);
    count_traffic(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_connection);
}

#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        add(counter, 1);
    }
}

/// A connection translated at the socket, for its frontend and backend. Atomic although
/// per-CPU: a socket hook runs in a task, which another task on the same CPU may preempt.
#[inline(always)]
pub fn count_socket_connection(rev_nat_id: u32, backend_id: u32) {
    if let Some(counter) = SOCKET_SERVICE_STATS.get_ptr_mut(rev_nat_id) {
        add(counter, 1);
    }
    if let Some(counter) = SOCKET_BACKEND_STATS.get_ptr_mut(backend_id) {
        add(counter, 1);
    }
}
