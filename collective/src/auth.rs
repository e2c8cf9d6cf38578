//! Who may join a ring: the per-attempt ring secret and the proof a rank
//! sends its successor.
//!
//! The leader makes 32 random bytes for every attempt and hands them, with
//! the plan, to the ranks it assigned (`Assignment.ring_secret`), and to no
//! one else. A rank that dials its successor sends, in the stream's
//! metadata ([`RING_PROOF_METADATA_KEY`]), an HMAC-SHA256 keyed by that
//! secret over a fixed label, the generation, its own rank and the
//! successor's rank:
//!
//! ```text
//!   proof = hex(HMAC-SHA256(secret, "ringleader/ring-proof/v1\0"
//!                                    ‖ generation ‖ sender ‖ receiver))
//!                                    (each a big-endian u64)
//! ```
//!
//! The successor recomputes it with the secret of the ring it registered
//! and compares in constant time before it hands the stream to the ring or
//! reads a single frame. The secret itself never crosses the network; a
//! proof is only good for one link (generation, sender → receiver).

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{CollectiveError, Result};

/// Metadata key of the proof a rank sends on its stream to its successor.
pub const RING_PROOF_METADATA_KEY: &str = "ringleader-ring-proof";

/// Shortest secret accepted (the leader makes 32 bytes).
pub const MIN_SECRET_BYTES: usize = 16;

/// Length of a secret [`RingSecret::generate`] makes.
pub const GENERATED_SECRET_BYTES: usize = 32;

/// Longest secret accepted (HMAC would hash a longer key down anyway; this
/// only bounds what a file or a message can make us hold).
pub const MAX_SECRET_BYTES: usize = 1024;

/// What the MAC covers before the numbers: names the purpose and version,
/// so a MAC made with the same key for anything else is never a proof.
const PROOF_LABEL: &[u8] = b"ringleader/ring-proof/v1\0";

/// Length of a proof in hex digits (SHA-256 output, 32 bytes).
pub const PROOF_HEX_LEN: usize = 64;

type HmacSha256 = Hmac<Sha256>;

/// A ring's shared secret: at least [`MIN_SECRET_BYTES`] bytes, never
/// printed (its `Debug` shows only the length).
#[derive(Clone, PartialEq, Eq)]
pub struct RingSecret(Arc<[u8]>);

impl fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RingSecret(<{} bytes, redacted>)", self.0.len())
    }
}

/// Why a ring stream's proof was not accepted. Names what was wrong, never
/// any secret material.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProofError {
    /// No [`RING_PROOF_METADATA_KEY`] metadata on the stream.
    Missing,
    /// Not [`PROOF_HEX_LEN`] hex digits.
    Malformed,
    /// Well-formed, but not made with this ring's secret for this link.
    Wrong,
}

impl fmt::Display for ProofError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProofError::Missing => write!(f, "missing (no {RING_PROOF_METADATA_KEY} metadata)"),
            ProofError::Malformed => write!(
                f,
                "malformed ({RING_PROOF_METADATA_KEY} must be {PROOF_HEX_LEN} hex digits)"
            ),
            ProofError::Wrong => {
                f.write_str("wrong (not made with this ring's secret for this generation and link)")
            }
        }
    }
}

impl RingSecret {
    /// Takes `bytes` as a secret; refuses fewer than [`MIN_SECRET_BYTES`]
    /// (an empty one is what an Assignment without a secret carries).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(CollectiveError::InvalidSecret(format!(
                "a ring secret needs at least {MIN_SECRET_BYTES} bytes; this one has {}",
                bytes.len()
            )));
        }
        if bytes.len() > MAX_SECRET_BYTES {
            return Err(CollectiveError::InvalidSecret(format!(
                "a ring secret has at most {MAX_SECRET_BYTES} bytes; this one has {}",
                bytes.len()
            )));
        }
        Ok(Self(bytes.into()))
    }

    /// [`GENERATED_SECRET_BYTES`] fresh random bytes (from the thread's
    /// CSPRNG, seeded by the operating system).
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = vec![0u8; GENERATED_SECRET_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes.into())
    }

    /// A secret written as hex (surrounding whitespace ignored), as in a
    /// `--ring-secret-file`.
    pub fn from_hex(text: &str) -> Result<Self> {
        let bytes = decode_hex(text.trim()).ok_or_else(|| {
            CollectiveError::InvalidSecret(
                "a ring secret in text must be hex digits (an even number of 0-9a-f)".into(),
            )
        })?;
        Self::new(bytes)
    }

    /// The secret as hex, for writing a `--ring-secret-file`. Handle the
    /// result like the secret itself.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// The raw bytes, for putting into an `Assignment`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a secret has at least [`MIN_SECRET_BYTES`].
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn mac(&self, generation: u64, sender: usize, receiver: usize) -> HmacSha256 {
        // HMAC takes a key of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(PROOF_LABEL);
        mac.update(&generation.to_be_bytes());
        mac.update(&(sender as u64).to_be_bytes());
        mac.update(&(receiver as u64).to_be_bytes());
        mac
    }

    /// The proof rank `sender` sends rank `receiver` in `generation`
    /// ([`PROOF_HEX_LEN`] lowercase hex digits).
    pub fn proof(&self, generation: u64, sender: usize, receiver: usize) -> String {
        encode_hex(
            &self
                .mac(generation, sender, receiver)
                .finalize()
                .into_bytes(),
        )
    }

    /// Checks `proof` (the metadata value, if any) in constant time.
    pub fn verify(
        &self,
        generation: u64,
        sender: usize,
        receiver: usize,
        proof: Option<&str>,
    ) -> Result<(), ProofError> {
        let proof = proof.ok_or(ProofError::Missing)?;
        let tag = parse_proof(proof)?;
        self.mac(generation, sender, receiver)
            .verify_slice(&tag)
            .map_err(|_| ProofError::Wrong)
    }
}

/// Checks a proof's form without a secret (so a stream with none or a
/// garbled one is refused before it may wait for its ring).
pub fn parse_proof(proof: &str) -> Result<Vec<u8>, ProofError> {
    if proof.len() != PROOF_HEX_LEN {
        return Err(ProofError::Malformed);
    }
    decode_hex(proof).ok_or(ProofError::Malformed)
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        text.push(DIGITS[usize::from(b >> 4)] as char);
        text.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    text
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> RingSecret {
        RingSecret::new(vec![byte; 32]).unwrap()
    }

    #[test]
    fn short_and_huge_secrets_are_refused() {
        for len in [0, 1, 15] {
            let error = RingSecret::new(vec![1u8; len]).unwrap_err();
            assert!(error.to_string().contains("at least 16 bytes"), "{error}");
        }
        assert!(RingSecret::new(vec![1u8; 16]).is_ok());
        assert!(RingSecret::new(vec![1u8; MAX_SECRET_BYTES + 1]).is_err());
    }

    #[test]
    fn debug_never_shows_the_bytes() {
        let secret = RingSecret::new(b"0123456789abcdefSECRET".to_vec()).unwrap();
        let shown = format!("{secret:?} {:?}", Some(secret.clone()));
        assert!(
            !shown.contains("SECRET") && !shown.contains("0123"),
            "{shown}"
        );
        assert!(!shown.contains(&secret.to_hex()), "{shown}");
        assert!(shown.contains("22 bytes"), "{shown}");
    }

    #[test]
    fn generated_secrets_are_long_and_differ() {
        let (a, b) = (RingSecret::generate(), RingSecret::generate());
        assert_eq!(a.len(), GENERATED_SECRET_BYTES);
        assert_ne!(a, b);
    }

    #[test]
    fn hex_round_trips() {
        let secret = RingSecret::generate();
        let again = RingSecret::from_hex(&format!("  {}\n", secret.to_hex().to_uppercase()));
        assert_eq!(again.unwrap(), secret);
        assert!(RingSecret::from_hex("abc").is_err());
        assert!(RingSecret::from_hex(&"zz".repeat(32)).is_err());
        assert!(RingSecret::from_hex("00ff").is_err()); // too short
    }

    #[test]
    fn a_proof_holds_only_for_its_secret_generation_and_link() {
        let key = secret(7);
        let proof = key.proof(5, 1, 2);
        assert_eq!(proof.len(), PROOF_HEX_LEN);
        assert_eq!(key.verify(5, 1, 2, Some(&proof)), Ok(()));
        assert_eq!(key.verify(5, 1, 2, None), Err(ProofError::Missing));
        assert_eq!(
            key.verify(5, 1, 2, Some("not hex")),
            Err(ProofError::Malformed)
        );
        assert_eq!(
            key.verify(5, 1, 2, Some(&"x".repeat(PROOF_HEX_LEN))),
            Err(ProofError::Malformed)
        );
        assert_eq!(
            secret(8).verify(5, 1, 2, Some(&proof)),
            Err(ProofError::Wrong)
        );
        for (generation, sender, receiver) in [(6, 1, 2), (5, 0, 2), (5, 1, 0), (5, 2, 1)] {
            assert_eq!(
                key.verify(generation, sender, receiver, Some(&proof)),
                Err(ProofError::Wrong),
                "{generation} {sender} {receiver}"
            );
        }
        // Uppercase hex is the same proof.
        assert_eq!(key.verify(5, 1, 2, Some(&proof.to_uppercase())), Ok(()));
    }

    #[test]
    fn refusals_name_the_problem_not_the_secret() {
        let key = secret(0x42);
        for error in [
            ProofError::Missing,
            ProofError::Malformed,
            ProofError::Wrong,
        ] {
            let text = error.to_string();
            assert!(!text.contains(&key.to_hex()), "{text}");
            assert!(!text.contains(&key.proof(1, 0, 1)), "{text}");
        }
    }
}
