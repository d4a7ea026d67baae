//! What is a text's simulated embedding? One that still behaves like an embedding.
//!
//! A semantic cache needs vectors where similar texts land close together, so these are not
//! random: lowercased word unigrams and character trigrams are feature-hashed into signed
//! buckets and the vector is L2-normalised. Texts sharing words and spellings get a high
//! cosine similarity, unrelated texts a low one, and one text always gets one vector.
//!
//! OpenAI's `dimensions` shortens a vector by keeping its first components. Plain feature
//! hashing would leave a short prefix nearly empty, so each feature is hashed at several
//! resolutions: into all `dim` buckets, into the first `dim/2`, the first `dim/4`, and so on.
//! Every prefix then holds a complete, smaller hashing of the text (Matryoshka-style), and
//! the coarser resolutions weigh less so they add little noise to the full vector.

use base64::Engine as _;

/// Trigrams carry spelling, words carry meaning; words weigh more so that two texts with
/// the same words in them outrank two texts that merely share letters.
const WORD_WEIGHT: f32 = 1.0;
const TRIGRAM_WEIGHT: f32 = 0.5;

/// The embedding of `text`, `dim` floats long, of unit length.
///
/// A text with no features at all (empty or only whitespace) maps to the first basis
/// vector, so the result is always a unit vector.
pub fn embed(text: &str, dim: usize) -> Vec<f32> {
    let mut vector = vec![0f32; dim];
    if dim == 0 {
        return vector;
    }
    let lower = text.to_lowercase();
    let levels = resolutions(dim);
    let mut add = |kind: u8, feature: &str, weight: f32| {
        let hash = feature_hash(kind, feature);
        for (level, &(buckets, scale)) in levels.iter().enumerate() {
            // A different hash per resolution, so features colliding in one do not collide
            // in all.
            let hash = mix(hash ^ (level as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let bucket = (hash % buckets as u64) as usize;
            let sign = if hash >> 63 == 0 { 1.0 } else { -1.0 };
            vector[bucket] += sign * weight * scale;
        }
    };

    for word in lower.split(|c: char| !c.is_alphanumeric()) {
        if !word.is_empty() {
            add(b'w', word, WORD_WEIGHT);
        }
    }
    let mut padded = String::new();
    for chunk in lower.split_whitespace() {
        // Padding lets the trigrams see where a word starts and ends, and gives even
        // one-letter words a feature.
        padded.clear();
        padded.push(' ');
        padded.push_str(chunk);
        padded.push(' ');
        let chars: Vec<(usize, char)> = padded.char_indices().collect();
        for window in chars.windows(3) {
            let start = window[0].0;
            let end = window[2].0 + window[2].1.len_utf8();
            add(b't', &padded[start..end], TRIGRAM_WEIGHT);
        }
    }

    normalise(&mut vector);
    vector
}

/// The resolutions a feature is hashed at: `(buckets, weight)` for `dim`, `dim/2`, ... 1.
/// A resolution's weight is the square root of its share of `dim`, so the finest one
/// dominates the full vector while each prefix is dominated by the finest one it contains.
fn resolutions(dim: usize) -> Vec<(usize, f32)> {
    let mut levels = Vec::new();
    let mut buckets = dim;
    while buckets >= 1 {
        levels.push((buckets, (buckets as f32 / dim as f32).sqrt()));
        buckets /= 2;
    }
    levels
}

/// OpenAI's `dimensions`: keep the first `dims` components and renormalise, the way
/// Matryoshka-trained models are shortened.
pub fn truncate(mut vector: Vec<f32>, dims: usize) -> Vec<f32> {
    vector.truncate(dims);
    normalise(&mut vector);
    vector
}

/// The `encoding_format: "base64"` form: little-endian f32 bytes, standard base64.
pub fn to_base64(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    } else if let Some(first) = vector.first_mut() {
        *first = 1.0;
    }
}

/// FNV-1a with a final mix: stable across builds and platforms (unlike std's hasher),
/// which the promise "one text, one vector" needs.
fn feature_hash(kind: u8, feature: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in std::iter::once(kind).chain(feature.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(hash)
}

/// MurmurHash3's finaliser: spreads every input bit over the whole word.
fn mix(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn norm(v: &[f32]) -> f32 {
        v.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    #[test]
    fn vectors_are_unit_length_and_deterministic() {
        for text in ["hello world", "", "   ", "a", "Ünïcödé ✓"] {
            let v = embed(text, 384);
            assert_eq!(v.len(), 384);
            assert!((norm(&v) - 1.0).abs() < 1e-5, "{text:?}");
            assert_eq!(v, embed(text, 384));
        }
    }

    #[test]
    fn similar_texts_are_closer_than_unrelated_ones() {
        let a = embed("How do I reset my password?", 384);
        let b = embed("how can I reset my password", 384);
        let c = embed("Quarterly revenue grew twelve percent in Europe", 384);
        assert!(cosine(&a, &b) > 0.7, "{}", cosine(&a, &b));
        assert!(cosine(&a, &b) > cosine(&a, &c) + 0.3);
    }

    #[test]
    fn truncated_vectors_are_unit_length_and_still_tell_texts_apart() {
        let short = |text| truncate(embed(text, 384), 64);
        let v = short("the quick brown fox");
        assert_eq!(v.len(), 64);
        assert!((norm(&v) - 1.0).abs() < 1e-5);
        let a = short("How do I reset my password?");
        let b = short("how can I reset my password");
        let c = short("Quarterly revenue grew twelve percent in Europe");
        assert!(cosine(&a, &b) > cosine(&a, &c) + 0.3);
        assert_ne!(
            truncate(embed("hello", 384), 4),
            truncate(embed("bye", 384), 4)
        );
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(to_base64(&[1.0]), "AACAPw==");
    }
}
