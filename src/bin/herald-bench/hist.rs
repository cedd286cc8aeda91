//! A log-linear latency histogram in the spirit of HdrHistogram: values below 256 are exact,
//! above that every power of two is split into 128 linear buckets, so any recorded value is
//! known to within 0.8%. Recording is an index computation and an increment; histograms from
//! several threads merge by adding counts.

/// Values below this are counted exactly, one bucket each.
const EXACT: u64 = 256;
/// Linear buckets per power of two above [`EXACT`].
const HALF: u64 = EXACT / 2;
/// Enough buckets for every `u64`.
const BUCKETS: usize = (EXACT + 57 * HALF) as usize;

/// Counts of recorded values (nanoseconds here) in log-linear buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    min: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
            min: u64::MAX,
            sum: 0,
        }
    }

    /// The bucket a value falls in.
    #[inline]
    fn index(value: u64) -> usize {
        if value < EXACT {
            return value as usize;
        }
        // Keep the top 8 significant bits: value >> shift lies in [128, 256).
        let shift = 63 - value.leading_zeros() as u64 - 7;
        (EXACT + (shift - 1) * HALF + ((value >> shift) - HALF)) as usize
    }

    /// The highest value that falls in bucket `index`.
    fn upper(index: usize) -> u64 {
        let index = index as u64;
        if index < EXACT {
            return index;
        }
        let shift = (index - EXACT) / HALF + 1;
        let mantissa = (index - EXACT) % HALF + HALF;
        ((mantissa + 1) << shift).saturating_sub(1)
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, value: u64) {
        self.counts[Self::index(value)] += 1;
        self.total += 1;
        self.max = self.max.max(value);
        self.min = self.min.min(value);
        self.sum += u128::from(value);
    }

    /// Adds every count of `other` to this histogram.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.min = self.min.min(other.min);
        self.sum += other.sum;
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest recorded value (exact), 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The mean of the recorded values, 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1): the upper edge of the bucket holding it, capped at
    /// the exact maximum; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::upper(index).min(self.max).max(self.min);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_the_error() {
        for value in [
            0,
            1,
            255,
            256,
            257,
            1000,
            123_456,
            9_999_999_999,
            u64::MAX / 3,
        ] {
            let upper = Histogram::upper(Histogram::index(value));
            assert!(upper >= value, "{value} -> {upper}");
            assert!(
                (upper - value) as f64 <= value as f64 / 128.0 + 1.0,
                "{value} -> {upper}"
            );
        }
    }

    #[test]
    fn quantiles_of_a_uniform_range() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 / 50_000_000.0 - 1.0).abs() < 0.01, "{p50}");
        assert_eq!(h.quantile(1.0), 100_000_000);
        assert_eq!(h.count(), 100_000);
    }
}
