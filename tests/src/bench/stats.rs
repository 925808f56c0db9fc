//! Medians, percentiles and paired ratios.

/// The median (mean of the middle two for an even count); `NaN` for no values.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of the ratios `values[i] / baselines[i]` of rounds measured side by side: a
/// machine-wide slow spell slows both members of a round, so it cancels here, where it only
/// shifts one side's median in a ratio of medians. `NaN` for no rounds.
pub fn median_paired_ratio(values: &[f64], baselines: &[f64]) -> f64 {
    let ratios: Vec<f64> = values
        .iter()
        .zip(baselines)
        .map(|(value, baseline)| value / baseline)
        .collect();
    median(&ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
    }

    #[test]
    fn paired_ratio_cancels_what_slows_a_whole_round() {
        // Every round 2% slower than its baseline, however slow the round itself.
        let baselines = [10.0, 50.0, 20.0, 100.0];
        let values: Vec<f64> = baselines.iter().map(|b| b * 1.02).collect();
        assert!((median_paired_ratio(&values, &baselines) - 1.02).abs() < 1e-9);
        assert!(median_paired_ratio(&[], &[]).is_nan());
    }
}
