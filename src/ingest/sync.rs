//! Approximate-time matching of an image stream with an optional mask stream and an optional
//! camera-info stream, by header stamp (r2r has no message_filters).
//!
//! Policy: an image is matched with the mask whose stamp is nearest within `slop`, and with the camera
//! info whose stamp is nearest within `slop`. When masks are expected, images wait (in a bounded
//! queue) for their mask; an image whose mask can no longer arrive (a newer mask beyond its slop has
//! been seen) is dropped and counted. While camera info is live (its latest stamp is within
//! [`LIVE_INFO_NS`] of the image), an image also waits for its own camera info, so an info that
//! arrives just after its image is not replaced by the previous frame's; once a newer info beyond the
//! slop has been seen (its own was lost), or the waiting queue is full, the image goes on with the
//! nearest earlier info. A static or latched camera_info (old stamp) is used as it is, without waiting.
//! All queues are bounded and drop their oldest entries, counting what they drop.

use std::collections::VecDeque;

/// Camera info counts as live (images wait for their own) while its latest stamp is within this of
/// the image's stamp, nanoseconds.
pub const LIVE_INFO_NS: i64 = 1_000_000_000;
/// An image stops waiting for its camera info once an image this much newer has arrived,
/// nanoseconds (a camera_info publisher that stopped must not hold the images up).
pub const MAX_INFO_WAIT_NS: i64 = 500_000_000;

/// A message with its header stamp in nanoseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Stamped<T> {
    /// Header stamp, nanoseconds since the epoch of the clock.
    pub stamp_ns: i64,
    /// The message.
    pub value: T,
}

/// Matching settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyncConfig {
    /// Largest stamp difference for a match, nanoseconds.
    pub slop_ns: i64,
    /// Capacity of each queue.
    pub queue: usize,
    /// Wait for a mask for every image (a mask topic is in use).
    pub wait_for_mask: bool,
}

/// One matched input.
#[derive(Clone, Debug, PartialEq)]
pub struct Matched<I, M, C> {
    /// The image.
    pub image: Stamped<I>,
    /// Its mask, if masks are expected and one matched.
    pub mask: Option<M>,
    /// Camera info, if any has been seen.
    pub info: Option<C>,
}

/// Counters of dropped messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Images dropped because the queue was full.
    pub images_overflow: u64,
    /// Images dropped because no mask matched them.
    pub images_unmatched: u64,
    /// Masks dropped (queue full or never matched).
    pub masks: u64,
    /// Images released without their own camera info (lost, or the waiting queue was full).
    pub infos_missing: u64,
}

/// The synchroniser.
#[derive(Debug)]
pub struct ApproxTimeSync<I, M, C> {
    cfg: SyncConfig,
    images: VecDeque<Stamped<I>>,
    masks: VecDeque<Stamped<M>>,
    infos: VecDeque<Stamped<C>>,
    /// Images with their mask (if any), waiting for their camera info.
    ready: VecDeque<(Stamped<I>, Option<M>)>,
    /// Stamp of the newest image seen.
    newest_image_ns: Option<i64>,
    dropped: Dropped,
}

impl<I, M: Clone, C: Clone> ApproxTimeSync<I, M, C> {
    /// A synchroniser with empty queues.
    pub fn new(cfg: SyncConfig) -> Self {
        let cfg = SyncConfig { queue: cfg.queue.max(1), slop_ns: cfg.slop_ns.max(0), ..cfg };
        Self {
            cfg,
            images: VecDeque::new(),
            masks: VecDeque::new(),
            infos: VecDeque::new(),
            ready: VecDeque::new(),
            newest_image_ns: None,
            dropped: Dropped::default(),
        }
    }

    /// What has been dropped so far.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    /// Images waiting for a mask or for their camera info.
    pub fn pending_images(&self) -> usize {
        self.images.len() + self.ready.len()
    }

    /// Changes whether images wait for masks (e.g. when a mask publisher appears or disappears).
    pub fn set_wait_for_mask(&mut self, wait: bool) -> Vec<Matched<I, M, C>> {
        self.cfg.wait_for_mask = wait;
        self.drain()
    }

    /// Adds camera info; returns whatever is now matched (images that waited for it).
    pub fn push_info(&mut self, info: Stamped<C>) -> Vec<Matched<I, M, C>> {
        if self.infos.len() == self.cfg.queue {
            self.infos.pop_front();
        }
        self.infos.push_back(info);
        self.drain()
    }

    /// Adds an image; returns whatever is now matched.
    pub fn push_image(&mut self, image: Stamped<I>) -> Vec<Matched<I, M, C>> {
        if self.images.len() == self.cfg.queue {
            self.images.pop_front();
            self.dropped.images_overflow += 1;
        }
        self.newest_image_ns = Some(self.newest_image_ns.map_or(image.stamp_ns, |n| n.max(image.stamp_ns)));
        self.images.push_back(image);
        self.drain()
    }

    /// Adds a mask; returns whatever is now matched.
    pub fn push_mask(&mut self, mask: Stamped<M>) -> Vec<Matched<I, M, C>> {
        if self.masks.len() == self.cfg.queue {
            self.masks.pop_front();
            self.dropped.masks += 1;
        }
        self.masks.push_back(mask);
        self.drain()
    }

    /// The info within slop of `stamp`, nearest first.
    fn own_info(&self, stamp: i64) -> Option<&Stamped<C>> {
        self.infos.iter().filter(|i| (i.stamp_ns - stamp).abs() <= self.cfg.slop_ns).min_by_key(|i| (i.stamp_ns - stamp).abs())
    }

    /// Fallback when an image's own info is missing: the latest one not newer than the image, else
    /// the latest.
    fn fallback_info(&self, stamp: i64) -> Option<C> {
        self.infos.iter().rev().find(|i| i.stamp_ns <= stamp).or_else(|| self.infos.back()).map(|i| i.value.clone())
    }

    /// Whether an image at `stamp` should wait for its own camera info.
    fn info_pending(&self, stamp: i64) -> bool {
        let waited_enough = self.newest_image_ns.is_some_and(|n| n - stamp > MAX_INFO_WAIT_NS);
        match self.infos.back() {
            // Live: recent, and nothing newer than the image's slop yet (that would mean it was lost).
            Some(latest) => {
                latest.stamp_ns <= stamp + self.cfg.slop_ns && stamp - latest.stamp_ns <= LIVE_INFO_NS && !waited_enough
            }
            None => false,
        }
    }

    /// Releases images whose camera info is decided (in arrival order).
    fn release(&mut self, out: &mut Vec<Matched<I, M, C>>) {
        while let Some((image, _)) = self.ready.front() {
            let stamp = image.stamp_ns;
            let info = if let Some(own) = self.own_info(stamp) {
                Some(own.value.clone())
            } else if self.info_pending(stamp) && self.ready.len() <= self.cfg.queue {
                break;
            } else {
                if !self.infos.is_empty() {
                    self.dropped.infos_missing += 1;
                }
                self.fallback_info(stamp)
            };
            let Some((image, mask)) = self.ready.pop_front() else { break };
            out.push(Matched { image, mask, info });
        }
    }

    fn drain(&mut self) -> Vec<Matched<I, M, C>> {
        let mut out = Vec::new();
        self.pair_masks();
        self.release(&mut out);
        out
    }

    /// Moves images that have their mask (or need none) to the queue waiting for camera info.
    fn pair_masks(&mut self) {
        if !self.cfg.wait_for_mask {
            while let Some(image) = self.images.pop_front() {
                self.ready.push_back((image, None));
            }
            return;
        }
        let slop = self.cfg.slop_ns;
        let mut kept = VecDeque::with_capacity(self.images.len());
        while let Some(image) = self.images.pop_front() {
            let best = self
                .masks
                .iter()
                .enumerate()
                .filter(|(_, m)| (m.stamp_ns - image.stamp_ns).abs() <= slop)
                .min_by_key(|(_, m)| (m.stamp_ns - image.stamp_ns).abs())
                .map(|(k, _)| k);
            if let Some(k) = best {
                let mask = self.masks.remove(k).map(|m| m.value);
                self.ready.push_back((image, mask));
            } else if self.masks.iter().any(|m| m.stamp_ns > image.stamp_ns + slop) {
                // Masks arrive in stamp order: a newer one beyond the slop means this image's mask
                // was lost.
                self.dropped.images_unmatched += 1;
            } else {
                kept.push_back(image);
            }
        }
        self.images = kept;
        // Masks older than every waiting image (minus slop) can never match.
        if let Some(oldest) = self.images.front().map(|i| i.stamp_ns) {
            let before = self.masks.len();
            self.masks.retain(|m| m.stamp_ns >= oldest - slop);
            self.dropped.masks += (before - self.masks.len()) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s<T>(stamp_ns: i64, value: T) -> Stamped<T> {
        Stamped { stamp_ns, value }
    }

    fn cfg(wait: bool) -> SyncConfig {
        SyncConfig { slop_ns: 10, queue: 4, wait_for_mask: wait }
    }

    #[test]
    fn images_without_masks_pass_through_with_their_info() {
        let mut sync: ApproxTimeSync<u32, u32, &str> = ApproxTimeSync::new(cfg(false));
        assert_eq!(sync.push_image(s(0, 1)).len(), 1, "no camera_info seen yet: no waiting");
        sync.push_info(s(100, "k1"));
        assert!(sync.push_image(s(500, 2)).is_empty(), "live camera info: waits for its own");
        let m = sync.push_info(s(503, "k2"));
        assert_eq!((m[0].image.value, m[0].info), (2, Some("k2")), "the info that arrived just after it");
        sync.push_info(s(600, "k3"));
        sync.push_info(s(1000, "k4"));
        assert_eq!(sync.push_image(s(605, 3))[0].info, Some("k3"), "nearest within slop, already there");
    }

    #[test]
    fn lost_camera_info_falls_back_to_the_previous_one() {
        let mut sync: ApproxTimeSync<u32, u32, &str> = ApproxTimeSync::new(cfg(false));
        sync.push_info(s(100, "k1"));
        assert!(sync.push_image(s(200, 1)).is_empty());
        // The next frame's info: the image's own was lost; it goes on with the latest earlier one.
        let m = sync.push_info(s(300, "k3"));
        assert_eq!((m[0].image.value, m[0].info), (1, Some("k1")));
        assert_eq!(sync.dropped().infos_missing, 1);
        // A latched info with an old stamp is not live: no waiting.
        let m = sync.push_image(s(300 + 2 * LIVE_INFO_NS, 2));
        assert_eq!((m.len(), m[0].info), (1, Some("k3")));
    }

    #[test]
    fn a_stopped_camera_info_publisher_does_not_hold_images_up() {
        let mut sync: ApproxTimeSync<u32, u32, &str> = ApproxTimeSync::new(cfg(false));
        sync.push_info(s(0, "k0"));
        assert!(sync.push_image(s(100, 1)).is_empty(), "waits for its own info");
        // No more camera_info: a much newer image releases the waiting one with the last info.
        let m = sync.push_image(s(100 + MAX_INFO_WAIT_NS + 1, 2));
        assert_eq!(m.iter().map(|m| (m.image.value, m.info)).collect::<Vec<_>>(), vec![(1, Some("k0"))]);
        // Once camera_info is no longer live (older than LIVE_INFO_NS), images pass without waiting.
        let m = sync.push_image(s(100 + MAX_INFO_WAIT_NS + LIVE_INFO_NS + 2, 3));
        assert_eq!(m.iter().map(|m| m.image.value).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn camera_info_of_mixed_sizes_goes_to_its_own_frame() {
        // Frames alternate between two cameras/sizes; each info arrives after its image and mask.
        let mut sync: ApproxTimeSync<u32, u32, u32> = ApproxTimeSync::new(cfg(true));
        sync.push_info(s(900, 99)); // an earlier frame's
        let mut got = Vec::new();
        for f in 0..6u32 {
            let t = 1000 + f as i64 * 100;
            got.extend(sync.push_image(s(t, f)));
            got.extend(sync.push_mask(s(t, f)));
            got.extend(sync.push_info(s(t, 100 + f)));
        }
        assert_eq!(got.len(), 6);
        for m in &got {
            assert_eq!(m.info, Some(100 + m.image.value), "frame {} got another frame's camera_info", m.image.value);
        }
    }

    #[test]
    fn images_waiting_for_info_stay_bounded() {
        let mut sync: ApproxTimeSync<u32, u32, &str> = ApproxTimeSync::new(cfg(false));
        sync.push_info(s(0, "k0"));
        let mut released = 0;
        for i in 0..20 {
            released += sync.push_image(s(1 + i, i as u32)).len();
            assert!(sync.pending_images() <= 5);
        }
        assert!(released >= 15, "a full queue releases its oldest image with the fallback info");
    }

    #[test]
    fn images_match_nearest_mask_within_slop_in_either_order() {
        let mut sync: ApproxTimeSync<u32, u32, ()> = ApproxTimeSync::new(cfg(true));
        assert!(sync.push_image(s(100, 1)).is_empty(), "waits for its mask");
        let m = sync.push_mask(s(104, 11));
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].image.value, m[0].mask), (1, Some(11)));
        assert!(sync.push_mask(s(203, 12)).is_empty(), "mask first");
        let m = sync.push_image(s(200, 2));
        assert_eq!((m[0].image.value, m[0].mask), (2, Some(12)));
        // Two masks in range: the nearest wins.
        sync.push_mask(s(292, 13));
        sync.push_mask(s(299, 14));
        let m = sync.push_image(s(300, 3));
        assert_eq!(m[0].mask, Some(14));
    }

    #[test]
    fn lost_masks_and_overflow_are_counted_and_bounded() {
        let mut sync: ApproxTimeSync<u32, u32, ()> = ApproxTimeSync::new(cfg(true));
        sync.push_image(s(100, 1));
        // A mask far newer than the image: the image's own mask was lost.
        assert!(sync.push_mask(s(200, 9)).is_empty());
        assert_eq!(sync.dropped().images_unmatched, 1);
        assert_eq!(sync.pending_images(), 0);
        // Flood of images with no masks: queue stays bounded, oldest dropped.
        for i in 0..100 {
            sync.push_image(s(1000 + i * 100, i as u32));
        }
        assert!(sync.pending_images() <= 4);
        assert_eq!(sync.dropped().images_overflow, 96);
        // The newest images still match.
        let m = sync.push_mask(s(1000 + 99 * 100 + 3, 7));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].image.value, 99);
    }

    #[test]
    fn turning_mask_waiting_off_releases_waiting_images() {
        let mut sync: ApproxTimeSync<u32, u32, ()> = ApproxTimeSync::new(cfg(true));
        sync.push_image(s(1, 1));
        sync.push_image(s(2, 2));
        let out = sync.set_wait_for_mask(false);
        assert_eq!(out.iter().map(|m| m.image.value).collect::<Vec<_>>(), vec![1, 2]);
    }
}
