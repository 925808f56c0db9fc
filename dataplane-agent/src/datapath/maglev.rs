//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size in
//! which every backend owns an almost equal share of entries, built from fixed-seed hashes of
//! the backends' addresses so every node builds the same table for the same backend set, and
//! so removing one of N backends moves only about 1/N of the entries.
use std::net::SocketAddr;

pub use dataplane_common::MAGLEV_TABLE_SIZE;

/// FNV-1a (64-bit) from a given basis: fixed, so tables agree across nodes and builds.
fn fnv1a(basis: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(basis, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The table: for each entry, an index into `backends` (which need not be sorted; the result
/// depends only on the set). Empty when there are no backends.
pub fn table(backends: &[SocketAddr], size: usize) -> Vec<usize> {
    if backends.is_empty() {
        return vec![];
    }
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    let m = size as u64;
    let permutations: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let name = backends[i].to_string();
            let offset = fnv1a(0xcbf2_9ce4_8422_2325, name.as_bytes()) % m;
            let skip = fnv1a(0x8422_2325_cbf2_9ce4, name.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut entries = vec![usize::MAX; size];
    let mut next = vec![0u64; order.len()];
    let mut filled = 0;
    'fill: loop {
        for (k, &backend) in order.iter().enumerate() {
            let (offset, skip) = permutations[k];
            let mut slot = ((offset + next[k] * skip) % m) as usize;
            while entries[slot] != usize::MAX {
                next[k] += 1;
                slot = ((offset + next[k] * skip) % m) as usize;
            }
            entries[slot] = backend;
            next[k] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| format!("10.0.{}.{i}:8080", i / 100).parse().unwrap())
            .collect()
    }

    #[test]
    fn the_table_depends_on_the_backend_set_only() {
        let mut shuffled = backends(7);
        shuffled.reverse();
        let a: Vec<SocketAddr> = table(&backends(7), MAGLEV_TABLE_SIZE)
            .iter()
            .map(|&i| backends(7)[i])
            .collect();
        let b: Vec<SocketAddr> = table(&shuffled, MAGLEV_TABLE_SIZE)
            .iter()
            .map(|&i| shuffled[i])
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn every_backend_owns_an_almost_equal_share() {
        for n in [1u8, 2, 3, 10, 50] {
            let t = table(&backends(n), MAGLEV_TABLE_SIZE);
            let mut counts = vec![0usize; n as usize];
            t.iter().for_each(|&i| counts[i] += 1);
            let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
            assert!(
                max - min <= 1 + MAGLEV_TABLE_SIZE / (n as usize) / 20,
                "n={n}: {min}..{max}"
            );
        }
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_entries() {
        for n in [5u8, 10, 20] {
            let all = backends(n);
            let before: Vec<SocketAddr> = table(&all, MAGLEV_TABLE_SIZE)
                .iter()
                .map(|&i| all[i])
                .collect();
            let fewer: Vec<SocketAddr> = all[1..].to_vec();
            let after: Vec<SocketAddr> = table(&fewer, MAGLEV_TABLE_SIZE)
                .iter()
                .map(|&i| fewer[i])
                .collect();
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let fraction = moved as f64 / MAGLEV_TABLE_SIZE as f64;
            // The removed backend's share must move; Maglev moves little else.
            assert!(fraction >= 1.0 / n as f64 * 0.9, "n={n}: moved {fraction}");
            assert!(
                fraction <= 1.0 / n as f64 * 1.5,
                "n={n}: moved {fraction}, expected about {}",
                1.0 / n as f64
            );
            eprintln!(
                "n={n}: removing one backend moved {:.3} of entries (1/n = {:.3})",
                fraction,
                1.0 / n as f64
            );
        }
    }
}
