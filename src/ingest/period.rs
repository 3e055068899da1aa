//! Thinning a stream of frames by stamp: at most one frame kept per period (the node's
//! `collect_period`, `congeal bag extract --period`).

use std::collections::HashMap;

/// Keeps at most one stored frame per `period_ns` of stamps for each key (a category): a frame is due
/// when its stamp is at least the period after (or, for a replayed bag that starts over, before) the
/// last frame stored. A frame that fails to store (an empty mask, say) does not use up the period.
#[derive(Debug, Default)]
pub struct PeriodGate {
    period_ns: i64,
    last: HashMap<String, i64>,
    /// Frames held back so far.
    pub skipped: u64,
}

impl PeriodGate {
    /// A gate for `period_ns` (0 or less: every frame is due).
    pub fn new(period_ns: i64) -> Self {
        Self { period_ns, ..Default::default() }
    }

    /// Whether the frame of `category` stamped `t_ns` should be stored (counted as skipped if not).
    pub fn due(&mut self, category: &str, t_ns: i64) -> bool {
        let due = self.period_ns <= 0 || self.last.get(category).is_none_or(|last| (t_ns - last).abs() >= self.period_ns);
        if !due {
            self.skipped += 1;
        }
        due
    }

    /// The frame of `category` stamped `t_ns` was stored.
    pub fn kept(&mut self, category: &str, t_ns: i64) {
        self.last.insert(category.to_string(), t_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One frame per period of stamps, per category; a frame that fails to store leaves the next one
    /// due; a bag that starts over is collected again.
    #[test]
    fn period_gate_keeps_one_frame_per_period() {
        let s = 1_000_000_000;
        let mut gate = PeriodGate::new(s);
        let store = |gate: &mut PeriodGate, t: i64, ok: bool| {
            let due = gate.due("a", t);
            if due && ok {
                gate.kept("a", t);
            }
            due && ok
        };
        let kept: Vec<i64> = (0..=10).map(|k| k * s / 5).filter(|t| store(&mut gate, *t, true)).collect();
        assert_eq!(kept, vec![0, s, 2 * s], "frames every 0.2 s, period 1 s");
        assert_eq!(gate.skipped, 8);
        assert!(!store(&mut gate, 3 * s, false), "a frame that fails to store...");
        assert!(store(&mut gate, 3 * s + s / 5, true), "...leaves the next one due");
        assert!(gate.due("b", s / 2), "another category has its own clock");
        assert!(store(&mut gate, 0, true), "stamps that jump back (a replay) by a period are kept");
        assert!(!gate.due("a", s / 2));
        let mut all = PeriodGate::new(0);
        assert!((0..5).all(|_| all.due("a", 7)), "period 0 keeps every frame, even equal stamps");
    }
}
