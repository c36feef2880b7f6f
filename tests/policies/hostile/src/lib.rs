//! A hostile policy module for tests. The grant's task text picks the misbehaviour, so
//! one module exercises every limit: `loop`, `bomb`, `recurse`, `trap`, `garbage`.
//! `count` returns how many calls this instance has seen (as a TTL cap), to show that
//! no state survives between decisions. Any other task is allowed, so the same module
//! also shows the host keeps serving.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

use airlock_policy_sdk::*;

struct Hostile;

static CALLS: AtomicU32 = AtomicU32::new(0);

fn misbehave(task: &str) -> Option<Verdict> {
    match task {
        "loop" => {
            let mut n = 0u64;
            loop {
                n = black_box(n.wrapping_add(1));
            }
        }
        "bomb" => {
            // Reserve without touching: the memory cap, not the deadline, must stop it.
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(Vec::with_capacity(16 << 20));
                black_box(&hoard);
            }
        }
        "recurse" => Some(allow_with(Some(recurse(black_box(u32::MAX)) as u32), false)),
        "trap" => panic!("hostile module panics on purpose"),
        "count" => Some(allow_with(
            Some(CALLS.fetch_add(1, Ordering::Relaxed) + 1),
            false,
        )),
        "garbage" => Some(Verdict::Deny(Denial {
            reason: String::new(),
            hint: None,
        })),
        _ => None,
    }
}

fn recurse(depth: u32) -> u64 {
    if depth == 0 {
        0
    } else {
        black_box(recurse(black_box(depth - 1))) + 1
    }
}

impl Policy for Hostile {
    fn authorize(request: GrantRequest) -> Verdict {
        misbehave(&request.task).unwrap_or_else(allow)
    }

    fn check(context: GrantContext, _action: Action) -> Verdict {
        misbehave(&context.task).unwrap_or_else(allow)
    }

    fn mask(context: GrantContext, payload: Payload) -> Payload {
        match (context.task.as_str(), payload) {
            ("garbage", Payload::Rows(mut rows)) => {
                // One row too many: a masking module must keep the shape.
                let extra = rows.values.first().cloned().unwrap_or_default();
                rows.values.push(extra);
                Payload::Rows(rows)
            }
            (task, payload) => {
                misbehave(task);
                payload
            }
        }
    }
}

export_policy!(Hostile);
