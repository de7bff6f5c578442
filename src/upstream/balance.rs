//! Which server of an upstream takes a request: smooth weighted round robin,
//! least requests by the power of two choices, or weighted rendezvous
//! hashing on the request's host, path and query.
//!
//! Pure: it is told which servers may be used, their weights and loads, a
//! turn number and an affinity hash, and answers an index. Must not look at
//! health, clocks or connections: `UpstreamClient::pick` decides which
//! servers are eligible (healthy first, then any: fail open).

use crate::config::Balance;

/// A round of smooth weighted round robin (nginx's): each server appears as
/// often as its weight, spread out rather than in runs (weights 5, 1, 1 give
/// a a b a c a a). Its length is the weights' sum.
pub fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (current, &weight) in current.iter_mut().zip(weights) {
            *current += i64::from(weight);
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|&(index, &value)| (value, std::cmp::Reverse(index)))
        else {
            break;
        };
        current[best] -= total;
        schedule.push(best);
    }
    schedule
}

/// What one pick may consider.
pub struct Candidates<'a> {
    /// Whether each server may take this request.
    pub eligible: &'a dyn Fn(usize) -> bool,
    pub weights: &'a [u32],
    /// Requests in flight per server (least requests).
    pub in_flight: &'a dyn Fn(usize) -> usize,
    /// Each server's identity hash (consistent hash).
    pub ids: &'a [u64],
    /// The round-robin schedule (round robin).
    pub schedule: &'a [usize],
}

/// The server for turn `turn` (a counter that moves on every pick) and
/// affinity `affinity`; `None` when no server is eligible.
pub fn choose(
    policy: Balance,
    candidates: &Candidates<'_>,
    turn: usize,
    affinity: u64,
) -> Option<usize> {
    match policy {
        Balance::RoundRobin => round_robin(candidates, turn),
        Balance::LeastRequests => least_requests(candidates, turn),
        Balance::ConsistentHash => rendezvous(candidates, affinity),
    }
}

fn round_robin(candidates: &Candidates<'_>, turn: usize) -> Option<usize> {
    let schedule = candidates.schedule;
    (0..schedule.len())
        .map(|offset| schedule[turn.wrapping_add(offset) % schedule.len()])
        .find(|&index| (candidates.eligible)(index))
}

/// Two eligible servers drawn at random (from the turn number), the one
/// with fewer requests in flight per unit of weight wins.
fn least_requests(candidates: &Candidates<'_>, turn: usize) -> Option<usize> {
    let eligible = || (0..candidates.weights.len()).filter(|&index| (candidates.eligible)(index));
    let nth = |n: usize| eligible().nth(n);
    match eligible().count() {
        0 => None,
        1 => nth(0),
        count => {
            let random = mix(turn as u64);
            let first = (random % count as u64) as usize;
            let step = 1 + ((random >> 32) % (count as u64 - 1)) as usize;
            let (a, b) = (nth(first)?, nth((first + step) % count)?);
            let load = |index: usize| {
                (
                    (candidates.in_flight)(index) as u64 + 1,
                    candidates.weights[index],
                )
            };
            let ((load_a, weight_a), (load_b, weight_b)) = (load(a), load(b));
            // load_a / weight_a <= load_b / weight_b, without division.
            Some(
                if load_a * u64::from(weight_b) <= load_b * u64::from(weight_a) {
                    a
                } else {
                    b
                },
            )
        }
    }
}

/// Weighted rendezvous (highest random weight) hashing: each server scores
/// `weight / -ln(u)` for a uniform `u` drawn from its id and the affinity;
/// the highest score wins. A key moves only to a server that was added, or
/// off one that left.
fn rendezvous(candidates: &Candidates<'_>, affinity: u64) -> Option<usize> {
    (0..candidates.weights.len())
        .filter(|&index| (candidates.eligible)(index))
        .map(|index| {
            let hash = mix(affinity ^ candidates.ids[index]);
            // 53 random bits as a float in (0, 1).
            let uniform = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = f64::from(candidates.weights[index]) / -uniform.ln();
            (index, score)
        })
        .max_by(|(_, a), (_, b)| a.total_cmp(b))
        .map(|(index, _)| index)
}

/// FNV-1a, 64 bits: a stable hash of bytes (the same in every Larder and
/// version, so a tier of instances agrees on where a key goes).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in *part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// splitmix64's finaliser: spreads a counter or a combination of hashes
/// over all 64 bits.
fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_smooth_schedule_spreads_each_server_by_its_weight() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(smooth_schedule(&[1, 3]), [1, 0, 1, 1]);
    }

    fn ids(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| fnv1a(&[format!("10.0.0.{i}:80").as_bytes()]))
            .collect()
    }

    #[test]
    fn rendezvous_keeps_a_key_on_its_server_when_another_is_added() {
        let all = |_: usize| true;
        let none_in_flight = |_: usize| 0;
        let pick = |ids: &[u64], weights: &[u32], key: u64| {
            let candidates = Candidates {
                eligible: &all,
                weights,
                in_flight: &none_in_flight,
                ids,
                schedule: &[],
            };
            choose(Balance::ConsistentHash, &candidates, 0, key).expect("a server")
        };
        let (three, four) = (ids(3), ids(4));
        let mut per_server = [0usize; 4];
        let mut moved = 0;
        for key in 0..3000u64 {
            let key = fnv1a(&[format!("/object/{key}").as_bytes()]);
            let before = pick(&three, &[1, 1, 1], key);
            let after = pick(&four, &[1, 1, 1, 1], key);
            assert!(
                after == before || after == 3,
                "a key moved between old servers"
            );
            moved += usize::from(after == 3);
            per_server[after] += 1;
        }
        assert!(
            (600..900).contains(&moved),
            "about a quarter moved: {moved}"
        );
        assert!(
            per_server.iter().all(|&n| (600..900).contains(&n)),
            "{per_server:?}"
        );
    }
}
