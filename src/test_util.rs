//! Helpers shared by the unit tests: a seeded generator and the shared evaluation data. The
//! integration tests' counterpart is `tests/common`, which finds the data by the same rule.

use std::path::PathBuf;

use nalgebra::Vector3;

use crate::models::random::splitmix;

/// A deterministic SplitMix64 stream ([`splitmix`]) whose state is the seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        splitmix(&mut self.0)
    }

    /// Uniform in `[lo, hi)`.
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A vector with coordinates uniform in `[-r, r)`.
    pub(crate) fn vec3(&mut self, r: f64) -> Vector3<f64> {
        Vector3::new(self.uniform(-r, r), self.uniform(-r, r), self.uniform(-r, r))
    }
}

/// The folder of the shared evaluation collections: `$CONGEAL_DATA_DIR/collections` when that is
/// set, else `../shared/data/collections` beside the repository. Panics, saying how to fix it, when
/// the folder is missing.
pub(crate) fn collections_dir() -> PathBuf {
    let dir = match std::env::var_os("CONGEAL_DATA_DIR") {
        Some(d) => PathBuf::from(d).join("collections"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/collections"),
    };
    assert!(dir.is_dir(), "{} not found; set CONGEAL_DATA_DIR to the folder holding collections/", dir.display());
    dir
}

/// The shared collection `name` (e.g. `duck`).
pub(crate) fn collection_dir(name: &str) -> PathBuf {
    collections_dir().join(name)
}
