//! Seeded, length-bucketed batches: shuffle, sort by length within windows of a few batches (so rows of
//! a batch have similar lengths and little padding), cut into batches, shuffle the batch order.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Batches per sorting window.
const WINDOW_BATCHES: usize = 16;

/// The batches of one epoch, as indices into `lengths`; a pure function of its arguments.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(batch_size));
    for window in order.chunks_mut(batch_size * WINDOW_BATCHES) {
        window.sort_by_key(|&i| lengths[i]);
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_once_per_epoch_deterministic_and_length_grouped() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 200 + 5).collect();
        let a = epoch_batches(&lengths, 8, 1, 0);
        assert_eq!(a, epoch_batches(&lengths, 8, 1, 0));
        assert_ne!(a, epoch_batches(&lengths, 8, 1, 1));
        let mut seen: Vec<usize> = a.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        // Padding: bucketed batches waste far less than random ones would.
        let waste = |b: &Vec<usize>| {
            let max = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            b.iter().map(|&i| max - lengths[i]).sum::<usize>()
        };
        let total: usize = a.iter().map(waste).sum();
        assert!(total < 1000 * 30, "padding {total}");
    }
}
