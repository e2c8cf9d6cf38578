//! What each fuzz target checks, shared by the targets in `fuzz_targets/`
//! (nightly, libFuzzer) and by the replay test
//! `tests/tests/fuzz_corpora.rs` (stable), which includes this file as a
//! module. The data set readers' checks are in `dataset.rs`: they link
//! libtorch, which that test binary cannot load. One function per target; each takes the raw input and panics
//! only when the code under test breaks a promise: a panic inside it, or a
//! property below that does not hold. Rejecting an input with an error is
//! always fine.
//!
//! Keep this file free of crate-level attributes and of anything that needs
//! libFuzzer: it is compiled as a plain module of the test crate too.

use std::fmt::Debug;
use std::path::Path;

use ringleader_collective::auth::{
    parse_proof, ProofError, RingSecret, MAX_SECRET_BYTES, MIN_SECRET_BYTES, PROOF_HEX_LEN,
};
use ringleader_coordinator::client_config::ClientConfig;
use ringleader_coordinator::sweep::driver::Driver;
use ringleader_coordinator::sweep::{SweepKind, SweepRecord, Template, TrialRecord};
use ringleader_security::Token;
use ringleader_spec::sweep::SweepSpec;
use ringleader_spec::JobSpec;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A target's check: panics when the code under test breaks a promise.
pub type Check = fn(&[u8]);

/// Every target that does not link libtorch, by the name of its directory under `fuzz/corpus/` and
/// `fuzz/regressions/`, and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("job_spec", job_spec),
    ("sweep_spec", sweep_spec),
    ("records", records),
    ("ring_frame", ring_frame),
    ("credentials", credentials),
];

/// Targets whose checks link libtorch (the worker's data set readers): in
/// [`dataset.rs`](dataset.rs), replayed by a test binary that finds
/// libtorch (see docs/FUZZING.md).
pub const LIBTORCH_TARGETS: &[&str] = &[
    "dataset_idx",
    "dataset_csv",
    "dataset_npy",
    "dataset_safetensors",
];

/// The file name errors quote; any name will do.
const ORIGIN: &str = "fuzz.toml";

/// Trials of an accepted sweep that are turned into jobs, as the leader
/// does when it starts them.
const TRIALS_TRIED: usize = 3;

/// `JobSpec::parse` on the input as text (invalid UTF-8 replaced). An error
/// must render (errors point at line and column); an accepted job must give
/// the leader a driver for its one trial.
pub fn job_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match JobSpec::parse(&text, ORIGIN) {
        Ok(_) => {
            let template = Template::parse(SweepKind::Job, &text, ORIGIN)
                .expect("Template::parse(Job) rejects a spec JobSpec::parse accepts");
            drive(&template);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// `SweepSpec::parse` on the input as text (invalid UTF-8 replaced). An
/// accepted sweep must survive what the leader does with it next: store it
/// (its JSON form parses back to the same sweep), turn it into a driver
/// (`Template::driver_config`, `Driver::new`) and make the first trials'
/// jobs.
pub fn sweep_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let spec = match SweepSpec::parse(&text, ORIGIN) {
        Ok(spec) => spec,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let stored = serde_json::to_vec(&spec).expect("an accepted sweep serialises");
    let again: SweepSpec = serde_json::from_slice(&stored).unwrap_or_else(|e| {
        panic!("a stored sweep does not load again: {e}");
    });
    assert_eq!(
        format!("{spec:?}"),
        format!("{again:?}"),
        "a stored sweep loads as a different sweep"
    );
    let template = Template::parse(SweepKind::Sweep, &text, ORIGIN)
        .expect("Template::parse(Sweep) rejects a spec SweepSpec::parse accepts");
    drive(&template);
}

/// What the leader does with an accepted template: a driver, and the jobs
/// of the first few trials it proposes.
fn drive(template: &Template) {
    let config = template.driver_config("fuzz");
    let Ok(mut driver) = Driver::new(config) else {
        return;
    };
    for _ in 0..TRIALS_TRIED {
        let Some(work) = driver.next_work() else {
            break;
        };
        let trial = driver
            .trial(work.trial)
            .expect("next_work names a trial the driver holds");
        if let Err(e) = template.job(&trial.config) {
            // The spec was checked at every end of every domain, so a
            // trial's job should be valid; an error is still an answer,
            // not a crash, so it is only rendered.
            let _ = e.to_string();
        }
    }
}

/// The etcd record decoders: the input as a `SweepRecord` and as a
/// `TrialRecord`. Whatever decodes must round-trip: encode, decode, encode
/// again gives the same bytes. A decoded trial is then given non-finite
/// numbers (what a diverging trial reports) and must round-trip too.
pub fn records(data: &[u8]) {
    if let Ok(record) = serde_json::from_slice::<SweepRecord>(data) {
        round_trip(&record);
    }
    if let Ok(mut record) = serde_json::from_slice::<TrialRecord>(data) {
        round_trip(&record);
        if record.objective.is_some() {
            record.objective = Some(f64::NAN);
        }
        if let Some(first) = record.rung_results.first_mut() {
            *first = f64::INFINITY;
        }
        for epoch in &mut record.metrics {
            if let Some(value) = epoch.metrics.values_mut().next() {
                *value = f64::NEG_INFINITY;
            }
        }
        round_trip(&record);
    }
}

fn round_trip<T: Serialize + DeserializeOwned + Debug>(record: &T) {
    let bytes = serde_json::to_vec(record)
        .unwrap_or_else(|e| panic!("a record does not encode: {e}: {record:?}"));
    let again: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "an encoded record does not decode: {e}: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    let bytes_again = serde_json::to_vec(&again).expect("a decoded record encodes");
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        String::from_utf8_lossy(&bytes_again),
        "a record changes in a round trip"
    );
}

/// A ring frame as it arrives from a peer, validated against the fixed
/// expectation `ringleader_collective::frame::FUZZ_CHECK`: any bytes get an
/// answer, never a panic.
pub fn ring_frame(data: &[u8]) {
    if let Err(e) = ringleader_collective::validate_frame_bytes(data) {
        let _ = e.to_string();
    }
}

/// The decoders of credentials from outside: a bearer token from the
/// `authorization` metadata, a ring proof from a ring stream's metadata
/// (and a ring secret in hex, from a `--ring-secret-file`), a client config
/// file. The first byte picks the decoder by its value mod 3 (`c` → the
/// client config, `p` → the ring proof, `t` → the token); the rest is its
/// input.
pub fn credentials(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 3 {
        0 => client_config(&text),
        1 => ring_proof(&text),
        _ => token(&text),
    }
}

/// `Token::parse`: accepts exactly `rlt_`, 12 lowercase hex digits, `_`
/// and 64 lowercase hex digits, surrounding whitespace trimmed; an
/// accepted token reveals as the trimmed text and parses back to itself,
/// and its `Debug` hides the secret; a refusal is always the same words,
/// whatever the text (it may be a mistyped secret).
fn token(text: &str) {
    let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let trimmed = text.trim();
    let bytes = trimmed.as_bytes();
    let well_formed = bytes.len() == 4 + 12 + 1 + 64
        && trimmed.is_ascii()
        && trimmed.starts_with("rlt_")
        && lower_hex(&trimmed[4..16])
        && bytes[16] == b'_'
        && lower_hex(&trimmed[17..]);
    match Token::parse(text) {
        Ok(token) => {
            assert!(well_formed, "a malformed token is accepted: {text:?}");
            assert_eq!(token.id, trimmed[4..16], "the token's id");
            let revealed = token.reveal();
            assert_eq!(revealed, trimmed, "a token reveals as other text");
            let again = Token::parse(&revealed).expect("a revealed token parses");
            assert!(again == token, "a revealed token parses as another token");
            let shown = format!("{token:?}");
            assert!(
                !shown.contains(&trimmed[17..]),
                "a token's Debug shows its secret: {shown}"
            );
        }
        Err(e) => {
            assert!(
                !well_formed,
                "a well-formed token is refused: {text:?}: {e}"
            );
            let fixed = Token::parse("").expect_err("an empty token").to_string();
            assert_eq!(
                e.to_string(),
                fixed,
                "a refusal depends on the text (it may quote a secret)"
            );
        }
    }
}

/// The secret the ring proof check uses when the input names none.
const FUZZ_RING_SECRET: &[u8; 32] = b"ringleader-fuzz-ring-secret-0001";

/// A ring proof as a ring stream's metadata carries it, checked by the
/// receiving rank. The text is `[<generation> <sender> <receiver>
/// [<secret hex>]]\n<proof>` (numbers that do not parse are 0; without a
/// secret that `RingSecret::from_hex` takes, [`FUZZ_RING_SECRET`]; without
/// a newline the whole text is the proof). `parse_proof` accepts exactly
/// 64 hex digits; `verify` accepts a proof only if it is the one
/// `RingSecret::proof` makes for that secret, generation and link (hex
/// case aside), refuses a malformed one as malformed, and accepts the real
/// one but not another link's.
fn ring_proof(text: &str) {
    let (header, proof) = text.split_once('\n').unwrap_or(("", text));
    let mut fields = header.split_whitespace();
    let generation: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    let sender: usize = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    let receiver: usize = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    let secret = fields.next().and_then(ring_secret).unwrap_or_else(|| {
        RingSecret::new(FUZZ_RING_SECRET.to_vec()).expect("the fuzz ring secret")
    });
    // The proof text as a secret file too: any text, an answer.
    let _ = ring_secret(proof);

    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let well_formed = proof.len() == PROOF_HEX_LEN && hex(proof);
    match parse_proof(proof) {
        Ok(tag) => {
            assert!(well_formed, "a malformed proof parses: {proof:?}");
            assert_eq!(tag.len(), PROOF_HEX_LEN / 2, "a proof's length");
            let lower: String = tag.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(lower, proof.to_ascii_lowercase(), "a proof decodes wrongly");
        }
        Err(e) => {
            assert!(!well_formed, "a well-formed proof is refused: {proof:?}");
            assert_eq!(e, ProofError::Malformed, "parse_proof's refusal");
        }
    }

    let expected = secret.proof(generation, sender, receiver);
    assert_eq!(expected.len(), PROOF_HEX_LEN, "a made proof's length");
    match secret.verify(generation, sender, receiver, Some(proof)) {
        Ok(()) => assert!(
            proof.eq_ignore_ascii_case(&expected),
            "a proof that is not the link's verifies: {proof:?}"
        ),
        Err(ProofError::Malformed) => assert!(!well_formed, "a well-formed proof is malformed"),
        Err(ProofError::Wrong) => {
            assert!(well_formed, "a malformed proof is only wrong");
            assert!(
                !proof.eq_ignore_ascii_case(&expected),
                "the link's own proof is refused"
            );
        }
        Err(ProofError::Missing) => panic!("a proof that is there is missing"),
    }
    assert_eq!(
        secret.verify(generation, sender, receiver, Some(&expected)),
        Ok(()),
        "the link's own proof is refused"
    );
    assert_eq!(
        secret.verify(generation, sender, receiver, None),
        Err(ProofError::Missing)
    );
    let other = receiver.wrapping_add(1);
    assert_eq!(
        secret.verify(generation, sender, other, Some(&expected)),
        Err(ProofError::Wrong),
        "a proof holds for another link"
    );
}

/// `RingSecret::from_hex`: accepts exactly an even number of hex digits
/// (surrounding whitespace trimmed) making 16 to 1024 bytes, which write
/// back as the same digits in lowercase; a refusal never quotes the text.
fn ring_secret(text: &str) -> Option<RingSecret> {
    let digits = text.trim();
    let well_formed = digits.len().is_multiple_of(2)
        && (2 * MIN_SECRET_BYTES..=2 * MAX_SECRET_BYTES).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_hexdigit());
    match RingSecret::from_hex(text) {
        Ok(secret) => {
            assert!(well_formed, "a malformed ring secret is accepted: {text:?}");
            assert_eq!(secret.to_hex(), digits.to_ascii_lowercase(), "to_hex");
            assert_eq!(secret.len(), digits.len() / 2, "a ring secret's length");
            let shown = format!("{secret:?}");
            assert!(
                !shown.contains(&secret.to_hex()),
                "a ring secret's Debug shows it"
            );
            Some(secret)
        }
        Err(e) => {
            assert!(!well_formed, "a well-formed ring secret is refused: {e}");
            // The refusal of any text of the same kind and length: the
            // words may depend on those, never on the digits themselves.
            let hex_digits =
                digits.len().is_multiple_of(2) && digits.bytes().all(|b| b.is_ascii_hexdigit());
            let same_kind = if hex_digits {
                "0".repeat(digits.len())
            } else {
                "x".into()
            };
            let fixed = RingSecret::from_hex(&same_kind).expect_err("refused like the text");
            assert_eq!(
                e.to_string(),
                fixed.to_string(),
                "a ring secret's refusal depends on its digits (it may quote them)"
            );
            None
        }
    }
}

/// Where the client config check says its text came from.
const CLIENT_CONFIG_ORIGIN: &str = "/fuzz/client config/client.toml";

/// `ClientConfig::parse`, what `ClientConfig::load` does with a file's
/// text. A refusal names the file; an accepted config has only absolute
/// paths (relative ones are made relative to the file's directory) and
/// survives `ClientConfig::write` and `load` unchanged.
fn client_config(text: &str) {
    let origin = Path::new(CLIENT_CONFIG_ORIGIN);
    let config = match ClientConfig::parse(text, origin) {
        Ok(config) => config,
        Err(e) => {
            let shown = e.to_string();
            assert!(
                shown.contains(CLIENT_CONFIG_ORIGIN),
                "a client config error does not name the file: {shown}"
            );
            return;
        }
    };
    for path in [&config.tls_dir, &config.token_file].into_iter().flatten() {
        assert!(
            path.is_absolute(),
            "a path in a config at {CLIENT_CONFIG_ORIGIN} stays relative: {path:?}"
        );
    }
    // Written and read back, as `ringleader local` writes a config and a
    // client loads it.
    let file = std::env::temp_dir().join(format!(
        "ringleader-fuzz-client-config-{}-{:?}.toml",
        std::process::id(),
        std::thread::current().id()
    ));
    let written = config.write(&file);
    let loaded = written.and_then(|()| ClientConfig::load(&file));
    let _ = std::fs::remove_file(&file);
    match loaded {
        Ok(loaded) => assert_eq!(loaded, config, "a written config loads differently"),
        Err(e) => panic!("a written config does not load again: {e}"),
    }
}
