//! Process-wide totals of the all-reduces this process took part in, for
//! the worker's `/metrics`: a scraper divides bus bytes by seconds for the
//! bus bandwidth, and the seconds are the time training waited on rings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static ALL_REDUCES: AtomicU64 = AtomicU64::new(0);
static BUS_BYTES: AtomicU64 = AtomicU64::new(0);
static NANOS: AtomicU64 = AtomicU64::new(0);

/// What all-reduces have moved and cost so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllReduceTotals {
    pub operations: u64,
    /// Bus bytes: 2(world−1)/world of each buffer, what every rank sends
    /// and receives (the figure NCCL's tests report).
    pub bus_bytes: u64,
    pub time: Duration,
}

/// Adds one all-reduce of `bytes` over `world` ranks that took `time`.
pub fn record_all_reduce(bytes: u64, world: usize, time: Duration) {
    let world = world.max(1) as u64;
    let bus = u128::from(bytes) * 2 * u128::from(world - 1) / u128::from(world);
    ALL_REDUCES.fetch_add(1, Ordering::Relaxed);
    BUS_BYTES.fetch_add(u64::try_from(bus).unwrap_or(u64::MAX), Ordering::Relaxed);
    NANOS.fetch_add(
        u64::try_from(time.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

pub fn all_reduce_totals() -> AllReduceTotals {
    AllReduceTotals {
        operations: ALL_REDUCES.load(Ordering::Relaxed),
        bus_bytes: BUS_BYTES.load(Ordering::Relaxed),
        time: Duration::from_nanos(NANOS.load(Ordering::Relaxed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_bytes_follow_the_ring_formula() {
        let before = all_reduce_totals();
        record_all_reduce(1000, 4, Duration::from_millis(2));
        let after = all_reduce_totals();
        // Other tests may add to the totals concurrently: at least ours.
        assert!(after.operations > before.operations);
        assert!(after.bus_bytes - before.bus_bytes >= 1500);
        assert!(after.time - before.time >= Duration::from_millis(2));
    }
}
