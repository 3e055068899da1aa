//! Foreground masks against ground truth (`congeal masks --eval`): per-image IoU and its summary.

use image::GrayImage;

use crate::error::Result;
use crate::eval::error_stats;

/// IoU of two masks (foreground = value >= 128), pixel by pixel in row-major order; a missing
/// prediction (`None`) counts as all background. Two empty masks have IoU 0.
pub fn mask_iou(pred: Option<&GrayImage>, gt: &GrayImage) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    let blank = GrayImage::new(gt.width(), gt.height());
    for (a, b) in pred.unwrap_or(&blank).as_raw().iter().zip(gt.as_raw()) {
        inter += (*a >= 128 && *b >= 128) as usize;
        union += (*a >= 128 || *b >= 128) as usize;
    }
    inter as f64 / union.max(1) as f64
}

/// Summary of the IoUs of a set of named masks.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskIouSummary {
    /// Median IoU (mean of the two middle values for an even count).
    pub median: f64,
    /// Mean IoU.
    pub mean: f64,
    /// Lowest IoU.
    pub min: f64,
    /// The three lowest, `(name, IoU)`, lowest first.
    pub worst: Vec<(String, f64)>,
}

/// Median, mean, minimum and the three worst of `(IoU, name)` pairs; `None` when there are none.
pub fn summarise_ious(ious: &[(f64, String)]) -> Result<Option<MaskIouSummary>> {
    if ious.is_empty() {
        return Ok(None);
    }
    let mut sorted = ious.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let values: Vec<f64> = sorted.iter().map(|x| x.0).collect();
    let stats = error_stats(&values)?;
    Ok(Some(MaskIouSummary {
        median: stats.median,
        mean: stats.mean,
        min: sorted[0].0,
        worst: sorted.iter().take(3).map(|(v, name)| (name.clone(), *v)).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_and_summary_of_known_masks() {
        let mut gt = GrayImage::new(4, 1);
        gt.as_mut().copy_from_slice(&[255, 255, 0, 0]);
        let mut pred = GrayImage::new(4, 1);
        pred.as_mut().copy_from_slice(&[255, 0, 200, 0]);
        assert!((mask_iou(Some(&pred), &gt) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(mask_iou(None, &gt), 0.0);
        assert_eq!(mask_iou(Some(&gt), &gt), 1.0);
        let s = summarise_ious(&[(0.9, "a".into()), (0.5, "b".into()), (0.7, "c".into()), (0.8, "d".into())]).unwrap().unwrap();
        assert!((s.median - 0.75).abs() < 1e-12 && (s.mean - 0.725).abs() < 1e-12 && s.min == 0.5);
        assert_eq!(s.worst, vec![("b".to_string(), 0.5), ("c".to_string(), 0.7), ("d".to_string(), 0.8)]);
        assert_eq!(summarise_ious(&[]).unwrap(), None);
    }
}
