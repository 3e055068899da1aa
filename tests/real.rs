//! The real-photograph sets as they are (../shared/data/real; skipped with a message when absent):
//! the calibrated DTU collection loads (no NOCS, extra fields, real K), the border contact the
//! pipeline detects agrees with the set's own `mask_touches_border`, and the plain dog folder with
//! its keypoint pairs (extra fields) can be scored.

mod common;

use congeal::collection::{mask_bbox, BorderContact, Collection};
use congeal::congeal::transfer::{Transfer2d, TransferPair};
use congeal::eval::pairs::pck_report;

#[test]
fn dtu_house_loads_and_its_border_contact_is_detected() {
    let Some(root) = common::shared_real("dtu-house") else { return };
    let collection = Collection::load(&root).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("collection.json")).unwrap()).unwrap();
    let flags = json["images"].as_array().unwrap();
    assert_eq!(collection.images.len(), flags.len());
    for (i, entry) in collection.images.iter().enumerate() {
        let k = entry.intrinsics.expect("dtu-house has K");
        assert!((k.fx / k.fy - 1.0).abs() > 1e-4, "fx and fy differ in real calibrations");
        let image = collection.load_image(i).unwrap();
        let bbox = mask_bbox(&image.mask).unwrap();
        let contact = BorderContact::of(&bbox, image.mask.width(), image.mask.height());
        assert_eq!(contact.any(), flags[i]["mask_touches_border"].as_bool().unwrap(), "image {i}");
    }
}

#[test]
fn dog_pairs_with_extra_fields_are_read_and_scored() {
    let Some(root) = common::shared_real("dogs-dev") else { return };
    let collection = Collection::load(&root).unwrap();
    let pairs: Vec<TransferPair> = serde_json::from_str(&std::fs::read_to_string(root.join("pairs.json")).unwrap()).unwrap();
    assert!(pairs.len() >= 100 && pairs.iter().all(|p| p.gt.as_ref().is_some_and(|g| g.len() == p.points.len())));
    // The bbox guess needs no features: predictions from the masks alone, scored as PCK@0.1 with
    // the target mask bbox as the scale (the set's `thresh` convention).
    let features = congeal::config::FeaturesConfig::default();
    let Ok(extractor) = congeal::congeal::features::FeatureExtractor::load(&features, &candle_core::Device::Cpu) else {
        eprintln!("skipped: DINOv2 weights missing (scripts/setup_weights.sh)");
        return;
    };
    let mut matcher = Transfer2d::new(&collection, &extractor, 0.05);
    let mut scored = pairs.clone();
    for p in scored.iter_mut() {
        p.pred = Some(matcher.transfer_bbox(&p.src, &p.dst, &p.points).unwrap());
    }
    // Annotated points a few pixels off a tight mask (paw tips, ears: 86 of 1620) snap onto it, so
    // (almost) every point gets an answer.
    let unanswered = scored.iter().flat_map(|p| p.pred.iter().flatten()).filter(|q| q.is_none()).count();
    let total: usize = scored.iter().map(|p| p.points.len()).sum();
    assert!(unanswered * 100 <= total, "{unanswered} of {total} points got no prediction");
    let report = pck_report(&collection, &scored, 0.1).unwrap();
    let pck = report.pck.unwrap();
    eprintln!("dogs-dev bbox guess PCK@0.1 {pck:.3} over {} points", report.points);
    assert_eq!(report.pairs, pairs.len());
    // A floor, far from perfect: the guess lands on the right spot for some points only.
    assert!(pck > 0.05 && pck < 0.4, "bbox guess PCK {pck}");
    // Perfect predictions score 1: the threshold and the ground truth agree with the set's.
    for p in scored.iter_mut() {
        p.pred = p.gt.clone();
    }
    assert_eq!(pck_report(&collection, &scored, 0.1).unwrap().pck, Some(1.0));
}
