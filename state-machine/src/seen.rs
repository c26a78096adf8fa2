//! The machine's memory of the events it handled (P9: Microsoft retries one webhook up to
//! 500 times over 8 hours; the queue redelivers too): a ring of the last
//! [`SEEN_KEYS_CAPACITY`] event keys, each kept as a 64-bit fingerprint (the first 8 bytes
//! of the SHA-256 of [`Event::key`](crate::Event::key)'s text).
//!
//! Why fingerprints: the ring is part of every saved machine, and every decision saves the
//! machine. Kept as text, a key such as `webhook:<operation id>:ChangeQuantity` took about
//! 60 bytes of JSON, so the ring was half of a machine after ten seat changes (1.4 of
//! 2.7 kB) and grew to about 30 kB on a subscription that had lived long enough to fill it —
//! rewritten, compressed and logged by PostgreSQL three times per change. A fingerprint
//! takes about 20 bytes. Two different keys share one with a probability of 2⁻⁶⁴ per pair,
//! so a ring of 512 mistakes a new event for a handled one about once in 3·10¹⁶ events.
//!
//! Machines saved before hold the keys' text; [`Deserialize`] reads either form and
//! fingerprints text, so an old ring keeps recognising the events it held.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How many event keys we remember for deduplication. Microsoft retries one webhook up
/// to 500 times over 8 hours (P9); the queue's own redeliveries are far fewer.
pub const SEEN_KEYS_CAPACITY: usize = 512;

/// The ring of handled event keys, oldest first, as fingerprints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct SeenKeys(VecDeque<u64>);

impl SeenKeys {
    /// Whether the event with this key was handled (and is still in the ring).
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.0.contains(&fingerprint(key))
    }

    /// Remembers `key`, forgetting the oldest key when the ring is full; a key already
    /// remembered keeps its place.
    pub(crate) fn remember(&mut self, key: &str) {
        let print = fingerprint(key);
        if self.0.contains(&print) {
            return;
        }
        if self.0.len() >= SEEN_KEYS_CAPACITY {
            self.0.pop_front();
        }
        self.0.push_back(print);
    }
}

/// The first 8 bytes of the key's SHA-256, little-endian: the same on every platform and in
/// every version, since saved machines keep it.
fn fingerprint(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

impl<'de> Deserialize<'de> for SeenKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// One entry of a saved ring: a fingerprint, or a key's text (machines saved before
        /// fingerprints).
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Saved {
            Fingerprint(u64),
            Key(String),
        }
        let saved = Vec::<Saved>::deserialize(deserializer)?;
        let prints = saved.into_iter().map(|entry| match entry {
            Saved::Fingerprint(print) => print,
            Saved::Key(key) => fingerprint(&key),
        });
        Ok(SeenKeys(prints.collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_never_changes() {
        // Saved machines hold these: a change of the function would forget every key.
        // SHA-256("") starts e3 b0 c4 42 98 fc 1c 14.
        assert_eq!(fingerprint(""), 0x141c_fc98_42c4_b0e3);
        assert_eq!(
            fingerprint("webhook:a8274f00-83ef-4e4f-a41e-1421cbfc12f1:ChangeQuantity"),
            14_628_108_719_600_749_404
        );
        assert_ne!(fingerprint("observed:1"), fingerprint("observed:2"));
    }

    #[test]
    fn the_ring_forgets_the_oldest_key_first() {
        let mut seen = SeenKeys::default();
        for n in 0..SEEN_KEYS_CAPACITY + 1 {
            seen.remember(&format!("observed:{n}"));
        }
        assert!(!seen.contains("observed:0"));
        assert!(seen.contains("observed:1"));
        assert!(seen.contains(&format!("observed:{SEEN_KEYS_CAPACITY}")));
        seen.remember("observed:1");
        assert_eq!(seen.0.len(), SEEN_KEYS_CAPACITY, "a repeat takes no place");
    }

    #[test]
    fn a_ring_saved_as_text_reads_as_fingerprints_and_saves_as_numbers() {
        let old = r#"["webhook:a8274f00-83ef-4e4f-a41e-1421cbfc12f1:ChangeQuantity", 42]"#;
        let seen: SeenKeys = serde_json::from_str(old).unwrap();
        assert!(seen.contains("webhook:a8274f00-83ef-4e4f-a41e-1421cbfc12f1:ChangeQuantity"));
        let saved = serde_json::to_string(&seen).unwrap();
        assert!(!saved.contains("webhook"), "{saved}");
        assert_eq!(serde_json::from_str::<SeenKeys>(&saved).unwrap(), seen);
    }
}
