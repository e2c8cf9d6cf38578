//! Bounds both ends of a connection to the leader must agree on (the rest
//! are the coordinator's, in `ringleader_coordinator::limits`;
//! docs/LIMITS.md lists them all).

/// A trial's lineage (docs/MODELS.md): data files it lists, the bytes of
/// all their paths together (each path is also at most 4,096 bytes), and
/// the length of the worker's version and commit strings. A worker lists
/// files up to these limits and counts the rest; a report beyond them
/// fails the attempt.
pub const MAX_LINEAGE_FILES: usize = 128;
pub const MAX_LINEAGE_PATHS_BYTES: usize = 64 * 1024;
pub const MAX_LINEAGE_VERSION_BYTES: usize = 128;

/// Largest response a client decodes: a `GetSweep` page (at most 8 MiB of
/// records) plus one record, with room.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
