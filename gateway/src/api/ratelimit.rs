//! A token bucket per agent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub(crate) struct RateLimiter {
    per_minute: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub(crate) fn new(per_minute: u32) -> Self {
        RateLimiter {
            per_minute: f64::from(per_minute),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `agent`'s bucket; `false` if it is empty.
    pub(crate) fn allow(&self, agent: &str) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap();
        let (tokens, last) = buckets
            .entry(agent.to_string())
            .or_insert((self.per_minute, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.per_minute / 60.0;
        *tokens = (*tokens + refill).min(self.per_minute);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// At most so many entries per caller a minute, counting those left out: refusals are
/// recorded without letting a flood of them fill the record.
pub struct RecordCap {
    limiter: RateLimiter,
    left_out: AtomicU64,
}

impl RecordCap {
    pub fn per_minute(entries: u32) -> Self {
        RecordCap {
            limiter: RateLimiter::new(entries),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(how many were left out since the last one recorded)` if this one from
    /// `caller` is to be recorded; `None` if it is left out.
    pub fn admit(&self, caller: &str) -> Option<u64> {
        if self.limiter.allow(caller) {
            Some(self.left_out.swap(0, Ordering::Relaxed))
        } else {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}
