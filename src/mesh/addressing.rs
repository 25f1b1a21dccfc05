//! Deterministic subnets (DESIGN "Addressing").
//!
//! Every node owns one /24 of the mesh range, its *slot*. Candidate `k` of a node is
//! `H(mesh id || WireGuard key || k) mod slots`; a node claims the first candidate not held by a
//! live member and keeps that claim (the index `k`) for life. When two claims collide (two
//! simultaneous joins through different seeds, or a healed partition), the claim with the earlier
//! certificate `issued_at` wins, ties broken by the lower node id (a hash of the identity key),
//! and the loser moves on to its next free candidate. [`resolve`] is that rule as a pure
//! function: every node runs it over the same gossiped claims and gets the same answer.

use crate::id::{Key32, MeshId, MeshRange, NodeId};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};

/// Candidates `0..HASHED_CANDIDATES` are independent hashes; after that a node probes linearly
/// from its last hashed candidate, so a free slot is always found if one exists.
pub const HASHED_CANDIDATES: u32 = 32;

/// A /24 within the mesh range, for display.
pub fn subnet_string(range: &MeshRange, slot: u32) -> String {
    format!("{}/24", range.subnet(slot))
}

/// Candidate `k` of a node.
pub fn candidate(mesh: &MeshId, wg: &Key32, k: u32, slots: u32) -> u32 {
    fn hashed(mesh: &MeshId, wg: &Key32, k: u32, slots: u32) -> u32 {
        let mut h = Sha256::new();
        h.update(b"meshd/slot/v1");
        h.update(mesh.0);
        h.update(wg);
        h.update(k.to_le_bytes());
        let d = h.finalize();
        let v = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
        (v % slots as u64) as u32
    }
    if k < HASHED_CANDIDATES {
        hashed(mesh, wg, k, slots)
    } else {
        let last = hashed(mesh, wg, HASHED_CANDIDATES - 1, slots);
        ((last as u64 + (k - HASHED_CANDIDATES + 1) as u64) % slots as u64) as u32
    }
}

/// A node's claim on a slot, as gossiped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotClaim {
    pub node: NodeId,
    pub wg: Key32,
    pub issued_at: u64,
    /// The candidate index the node claims.
    pub k: u32,
}

/// Where a node ends up: the candidate index it holds and the slot that index names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub k: u32,
    pub slot: u32,
}

/// Resolve all claims at once. Claims are taken in priority order (earlier `issued_at`, then
/// lower node id); each takes the first of its candidates, starting at its claimed index, that
/// no higher-priority claim took. A node whose claim stands keeps it; a loser moves forward.
/// Nodes that find no free slot (a full mesh) get no assignment.
pub fn resolve(
    mesh: &MeshId,
    range: &MeshRange,
    claims: &[SlotClaim],
) -> BTreeMap<NodeId, Assignment> {
    let slots = range.slots();
    let mut order: Vec<&SlotClaim> = claims.iter().collect();
    order.sort_by_key(|a| (a.issued_at, a.node));
    let mut taken = HashSet::new();
    let mut out = BTreeMap::new();
    for c in order {
        if out.contains_key(&c.node) {
            continue; // duplicate claim for one node: the first (highest priority) stands
        }
        if let Some(a) = first_free_from(mesh, &c.wg, c.k, slots, &taken) {
            taken.insert(a.slot);
            out.insert(c.node, a);
        }
    }
    out
}

/// The first candidate at or after `start` whose slot is not in `taken`.
pub fn first_free_from(
    mesh: &MeshId,
    wg: &Key32,
    start: u32,
    slots: u32,
    taken: &HashSet<u32>,
) -> Option<Assignment> {
    // Past HASHED_CANDIDATES + slots every slot has been probed once.
    let end = start.max(HASHED_CANDIDATES).saturating_add(slots);
    (start..end).find_map(|k| {
        let slot = candidate(mesh, wg, k, slots);
        (!taken.contains(&slot)).then_some(Assignment { k, slot })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mesh() -> MeshId {
        MeshId([9; 32])
    }

    fn claim(i: u8, issued_at: u64, k: u32) -> SlotClaim {
        let mut wg = [0u8; 32];
        wg[0] = i;
        wg[1] = 0xa5;
        let mut id = [0u8; 32];
        id[0] = i;
        SlotClaim {
            node: NodeId::of_identity(&id),
            wg,
            issued_at,
            k,
        }
    }

    /// What a seed does for a joiner: first free candidate from 0 given its view.
    fn join(view: &[SlotClaim], i: u8, issued_at: u64, range: &MeshRange) -> SlotClaim {
        let taken: HashSet<u32> = resolve(&mesh(), range, view)
            .values()
            .map(|a| a.slot)
            .collect();
        let mut c = claim(i, issued_at, 0);
        c.k = first_free_from(&mesh(), &c.wg, 0, range.slots(), &taken)
            .unwrap()
            .k;
        c
    }

    #[test]
    fn linear_probe_visits_every_slot() {
        let r: MeshRange = "10.0.0.0/20".parse().unwrap(); // 16 slots
        let wg = [3u8; 32];
        let seen: HashSet<u32> = (HASHED_CANDIDATES..HASHED_CANDIDATES + 16)
            .map(|k| candidate(&mesh(), &wg, k, r.slots()))
            .collect();
        assert_eq!(seen.len(), 16);
    }

    #[test]
    fn simultaneous_joins_collide_and_the_earlier_certificate_wins() {
        // A tiny range makes collisions certain to be found quickly.
        let r: MeshRange = "10.0.0.0/22".parse().unwrap(); // 4 slots
        let founder = join(&[], 1, 100, &r);
        // Two joiners, admitted by two different seeds that had not heard of each other.
        // Search for a pair whose first free candidates collide.
        let (a, b) = (2u8..=255)
            .flat_map(|i| (2u8..=255).map(move |j| (i, j)))
            .filter(|(i, j)| i != j)
            .map(|(i, j)| {
                (
                    join(std::slice::from_ref(&founder), i, 200, &r),
                    join(std::slice::from_ref(&founder), j, 201, &r),
                )
            })
            .find(|(a, b)| candidate(&mesh(), &a.wg, a.k, 4) == candidate(&mesh(), &b.wg, b.k, 4))
            .expect("some pair collides in 4 slots");
        let all = [founder.clone(), a.clone(), b.clone()];
        // Every node sees the claims in its own order; all compute the same answer.
        let views = [
            vec![all[0].clone(), all[1].clone(), all[2].clone()],
            vec![all[2].clone(), all[0].clone(), all[1].clone()],
            vec![all[1].clone(), all[2].clone(), all[0].clone()],
        ];
        let answers: Vec<_> = views.iter().map(|v| resolve(&mesh(), &r, v)).collect();
        assert!(answers.windows(2).all(|w| w[0] == w[1]));
        let res = &answers[0];
        // The earlier certificate keeps its claim, the later one moved on.
        assert_eq!(res[&a.node].k, a.k);
        assert!(res[&b.node].k > b.k);
        assert_ne!(res[&a.node].slot, res[&b.node].slot);
        assert_eq!(res[&founder.node].k, founder.k);
    }

    #[test]
    fn healed_partition_converges_on_every_node() {
        let r: MeshRange = "10.0.0.0/21".parse().unwrap(); // 8 slots
        let founder = join(&[], 1, 10, &r);
        let mut left = vec![founder.clone()];
        let mut right = vec![founder.clone()];
        // Each side admits three nodes while cut off from the other.
        for (n, i) in (20u8..23).enumerate() {
            let c = join(&left, i, 100 + n as u64, &r);
            left.push(c);
        }
        for (n, i) in (40u8..43).enumerate() {
            let c = join(&right, i, 100 + n as u64, &r);
            right.push(c);
        }
        let mut merged: Vec<SlotClaim> = left.clone();
        merged.extend(right[1..].iter().cloned());
        let from_left = resolve(&mesh(), &r, &merged);
        let mut other_order = merged.clone();
        other_order.reverse();
        let from_right = resolve(&mesh(), &r, &other_order);
        assert_eq!(from_left, from_right);
        let slots: HashSet<u32> = from_left.values().map(|a| a.slot).collect();
        assert_eq!(slots.len(), merged.len(), "no two nodes share a slot");
        // Losers then republish their moved claim; resolving again changes nothing.
        let republished: Vec<SlotClaim> = merged
            .iter()
            .map(|c| SlotClaim {
                k: from_left[&c.node].k,
                ..c.clone()
            })
            .collect();
        assert_eq!(resolve(&mesh(), &r, &republished), from_left);
    }

    #[test]
    fn a_full_mesh_leaves_the_extra_node_without_a_slot() {
        let r: MeshRange = "10.0.0.0/23".parse().unwrap(); // 2 slots
        let a = join(&[], 1, 1, &r);
        let b = join(std::slice::from_ref(&a), 2, 2, &r);
        let c = claim(3, 3, 0);
        let res = resolve(&mesh(), &r, &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(res.len(), 2);
        assert!(!res.contains_key(&c.node));
    }

    proptest! {
        #[test]
        fn resolution_is_order_independent_collision_free_and_stable(
            n in 1usize..40,
            seed in any::<u64>(),
            leave in any::<prop::sample::Index>(),
        ) {
            let r: MeshRange = "10.0.0.0/18".parse().unwrap(); // 64 slots
            let mut claims = Vec::new();
            for i in 0..n {
                let c = join(&claims, i as u8, seed % 1000 + i as u64, &r);
                claims.push(c);
            }
            let res = resolve(&mesh(), &r, &claims);
            // Joined one at a time, nobody ever has to move.
            for c in &claims {
                prop_assert_eq!(res[&c.node].k, c.k);
            }
            let slots: HashSet<u32> = res.values().map(|a| a.slot).collect();
            prop_assert_eq!(slots.len(), claims.len());
            // Any order gives the same answer.
            let mut shuffled = claims.clone();
            let len = shuffled.len();
            shuffled.rotate_left((seed as usize) % len);
            prop_assert_eq!(&resolve(&mesh(), &r, &shuffled), &res);
            // A node leaving frees its slot and moves nobody else.
            let gone = leave.index(claims.len());
            let mut after = claims.clone();
            let left = after.remove(gone);
            let res2 = resolve(&mesh(), &r, &after);
            prop_assert!(!res2.contains_key(&left.node));
            for c in &after {
                prop_assert_eq!(res2[&c.node], res[&c.node]);
            }
        }
    }
}
