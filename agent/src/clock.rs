//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to wall-clock nanoseconds.
use std::time::{SystemTime, UNIX_EPOCH};

/// Offset between CLOCK_REALTIME and CLOCK_MONOTONIC, sampled so that the error is bounded by
/// the time between two adjacent clock reads. Refresh it now and then: NTP slews the wall clock.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    offset_ns: i128,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl BootClock {
    pub fn sample() -> Self {
        // Bracket the wall-clock read with two monotonic reads and keep the tightest pair.
        let mut best: Option<(u64, i128)> = None;
        for _ in 0..5 {
            let m1 = monotonic_ns();
            let wall = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0);
            let m2 = monotonic_ns();
            let width = m2 - m1;
            let offset = wall - (m1 as i128 + width as i128 / 2);
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, offset));
            }
        }
        BootClock {
            offset_ns: best.map(|b| b.1).unwrap_or(0),
        }
    }

    /// Fixed offset, for tests and replays.
    pub fn with_offset(offset_ns: i128) -> Self {
        BootClock { offset_ns }
    }

    pub fn to_unix_ns(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).max(0) as u64
    }

    pub fn now_monotonic_ns() -> u64 {
        monotonic_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_now_to_now() {
        let c = BootClock::sample();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let conv = c.to_unix_ns(monotonic_ns()) as i128;
        assert!((wall - conv).abs() < 50_000_000, "{wall} vs {conv}");
    }
}
