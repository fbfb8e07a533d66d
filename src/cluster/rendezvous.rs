//! Rendezvous (highest random weight) hashing: every replica ranks the
//! replicas for a key the same way, without talking to each other, and
//! removing one replica moves only the keys it owned.

use sha2::{Digest as _, Sha256};

/// `members` ordered by their weight for `key`, highest (the owner) first.
pub fn rank<'a, T: AsRef<str>>(members: &'a [T], key: &[u8]) -> Vec<&'a T> {
    let mut weighted: Vec<(u64, &T)> = members
        .iter()
        .map(|member| (weight(member.as_ref(), key), member))
        .collect();
    // Ties (never in practice) broken by name, so every replica agrees.
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.as_ref().cmp(b.1.as_ref())));
    weighted.into_iter().map(|(_, member)| member).collect()
}

fn weight(member: &str, key: &[u8]) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(member.as_bytes());
    hasher.update([0]);
    hasher.update(key);
    let hash = hasher.finalize();
    u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_agrees_and_removing_one_moves_only_its_keys() {
        let three = ["http://a:5000", "http://b:5000", "http://c:5000"];
        let two = ["http://a:5000", "http://c:5000"];
        let mut owned = [0usize; 3];
        for i in 0..3000u32 {
            let key = i.to_be_bytes();
            let owner = rank(&three, &key)[0];
            owned[three.iter().position(|m| m == owner).unwrap()] += 1;
            // The order of the list does not matter.
            let reversed: Vec<_> = three.iter().rev().collect();
            assert_eq!(*rank(&reversed, &key)[0], owner);
            // Without b, b's keys go to their second choice; others stay.
            let without_b = rank(&two, &key)[0];
            if *owner == "http://b:5000" {
                assert_eq!(without_b, rank(&three, &key)[1]);
            } else {
                assert_eq!(without_b, owner);
            }
        }
        for count in owned {
            assert!((800..1200).contains(&count), "uneven spread: {owned:?}");
        }
    }
}
