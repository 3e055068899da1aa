//! CLIP's byte-level BPE tokenizer (the diffusers `tokenizer/` folder: `vocab.json` + `merges.txt`).
//!
//! Our own implementation, matching HF transformers' slow `CLIPTokenizer` (without ftfy):
//! 1. clean the text: drop control characters, put spaces around CJK ideographs, lowercase, collapse
//!    runs of whitespace (no Unicode NFC normalisation: give composed text);
//! 2. split it with CLIP's pattern `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|
//!    [\p{N}]|[^\s\p{L}\p{N}]+`;
//! 3. map each piece's UTF-8 bytes to CLIP's printable byte alphabet, append `</w>` to its last symbol,
//!    and merge adjacent symbol pairs by merge rank (lowest first) until no ranked pair is left;
//! 4. look the symbols up in the vocabulary (unknown ones become `<|endoftext|>`, as in HF).
//!
//! [`ClipTokenizer::encode`] returns `[bos] + tokens + [eos]` truncated to `max_len` (eos kept last)
//! and padded with `pad_id`: SD 2.1 pads with `"!"` (id 0), SD 1.x with `<|endoftext|>`.
//!
//! [`ClipTokenizer::hashed`] is a word-level stand-in for the randomly initialised `tiny` text
//! encoder, which has no vocabulary files.

use std::collections::HashMap;
use std::path::Path;

use regex::Regex;

use crate::error::{Error, Result};

/// CLIP's pre-tokenisation pattern (applied to cleaned, lowercased text).
const PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The start-of-text token.
const BOS: &str = "<|startoftext|>";
/// The end-of-text token (also the unknown token).
const EOS: &str = "<|endoftext|>";
/// HF reads at most this many merges (`49152 - 256 - 2`).
const MAX_MERGES: usize = 48894;

/// How pieces become ids.
#[derive(Debug, Clone)]
enum Mode {
    /// Byte-level BPE with a vocabulary and merge ranks.
    Bpe {
        encoder: HashMap<String, u32>,
        /// Rank of the merge `"first second"`.
        ranks: HashMap<String, usize>,
        byte_encoder: Vec<char>,
    },
    /// One id per piece from a stable hash (random tiny models only).
    Hashed { vocab_size: usize },
}

/// A CLIP tokenizer: BPE from vocabulary files, or the hashed stand-in for random tiny models.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    mode: Mode,
    pattern: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_len: usize,
}

/// CLIP's byte -> printable-character table (`bytes_to_unicode`): printable Latin-1 bytes map to
/// themselves, the others to U+0100 onwards, in byte order.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut out = Vec::with_capacity(256);
    let mut n = 0u32;
    for b in 0u32..256 {
        let c = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        // Every value is below 512, a valid scalar value; the fallback is unreachable.
        out.push(char::from_u32(c).unwrap_or('?'));
    }
    out
}

/// CJK ideograph blocks (as BERT's BasicTokenizer, which HF's CLIPTokenizer uses without ftfy).
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// Step 1: drop control characters, space out CJK ideographs, lowercase, collapse whitespace.
fn clean(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\u{0}' || c == '\u{fffd}' || (c.is_control() && !c.is_whitespace()) {
            continue;
        }
        if is_cjk(c) {
            s.push(' ');
            s.push(c);
            s.push(' ');
        } else {
            s.push(c);
        }
    }
    s.split_whitespace().map(|w| w.to_lowercase()).collect::<Vec<_>>().join(" ")
}

/// FNV-1a, 64 bit: a hash that is stable across runs and platforms.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn compile_pattern() -> Result<Regex> {
    Regex::new(PATTERN).map_err(|e| Error::Config(format!("CLIP tokenizer pattern: {e}")))
}

impl ClipTokenizer {
    /// Reads a CLIP vocabulary (`vocab.json`, token -> id) and merge list (`merges.txt`, one
    /// `first second` pair per line by rank, after an optional `#version` line). Missing, unreadable
    /// or malformed files are [`Error::Weights`] naming the file; the vocabulary must hold
    /// `<|startoftext|>` and `<|endoftext|>`. `max_len` is 77; `pad_id` is the id of `"!"` when the
    /// vocabulary has it (SD 2.x), else `<|endoftext|>` (see [`Self::with_pad_id`]).
    pub fn from_files(vocab_json: &Path, merges_txt: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(vocab_json)
            .map_err(|e| Error::weights(vocab_json, format!("cannot read it ({e}); expected CLIP's vocab.json (token -> id)")))?;
        let encoder: HashMap<String, u32> = serde_json::from_str(&text).map_err(|e| {
            Error::weights(vocab_json, format!("not a JSON object of token -> id ({e}); expected CLIP's vocab.json"))
        })?;
        let special = |name: &str| {
            encoder.get(name).copied().ok_or_else(|| Error::weights(vocab_json, format!("the vocabulary has no {name} token")))
        };
        let (bos_id, eos_id) = (special(BOS)?, special(EOS)?);
        let pad_id = encoder.get("!").copied().unwrap_or(eos_id);

        let text = std::fs::read_to_string(merges_txt).map_err(|e| {
            Error::weights(merges_txt, format!("cannot read it ({e}); expected CLIP's merges.txt (one `a b` pair a line)"))
        })?;
        let mut lines = text.trim().lines().peekable();
        if lines.peek().is_some_and(|l| l.starts_with('#')) {
            lines.next();
        }
        let mut ranks = HashMap::new();
        for (rank, line) in lines.take(MAX_MERGES).enumerate() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() != 2 {
                return Err(Error::weights(
                    merges_txt,
                    format!("merge {} is {line:?}: expected two symbols separated by a space", rank + 1),
                ));
            }
            ranks.entry(format!("{} {}", parts[0], parts[1])).or_insert(rank);
        }
        Ok(Self {
            mode: Mode::Bpe { encoder, ranks, byte_encoder: bytes_to_unicode() },
            pattern: compile_pattern()?,
            bos_id,
            eos_id,
            pad_id,
            max_len: 77,
        })
    }

    /// [`Self::from_files`] on `dir/vocab.json` and `dir/merges.txt` (diffusers' `tokenizer/`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))
    }

    /// A deterministic word-level tokenizer that exists only for the randomly initialised
    /// [`crate::models::clip_text::ClipTextConfig::tiny`] text encoder, which has no vocabulary
    /// files: every piece of CLIP's pre-tokenisation becomes `1 + fnv1a(piece) % (vocab_size - 3)`;
    /// bos = `vocab_size - 2`, eos = pad = `vocab_size - 1`. Needs `vocab_size >= 4` and
    /// `max_len >= 2` ([`Error::InvalidInput`] otherwise).
    pub fn hashed(vocab_size: usize, max_len: usize) -> Result<Self> {
        if vocab_size < 4 || vocab_size > u32::MAX as usize || max_len < 2 {
            return Err(Error::InvalidInput(format!(
                "hashed tokenizer with vocabulary {vocab_size} and max_len {max_len} (need >= 4 and >= 2)"
            )));
        }
        let eos_id = (vocab_size - 1) as u32;
        Ok(Self {
            mode: Mode::Hashed { vocab_size },
            pattern: compile_pattern()?,
            bos_id: (vocab_size - 2) as u32,
            eos_id,
            pad_id: eos_id,
            max_len,
        })
    }

    /// Sets the padding id (SD 1.x pads with `<|endoftext|>`: `with_pad_id(t.eos_id())`).
    pub fn with_pad_id(mut self, pad_id: u32) -> Self {
        self.pad_id = pad_id;
        self
    }

    /// Sets the encoded length (77 for Stable Diffusion). Must be at least 2 (bos and eos).
    pub fn with_max_len(mut self, max_len: usize) -> Result<Self> {
        if max_len < 2 {
            return Err(Error::InvalidInput(format!("tokenizer max_len {max_len} < 2")));
        }
        self.max_len = max_len;
        Ok(self)
    }

    /// The `<|startoftext|>` id.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The `<|endoftext|>` id (also used for unknown symbols).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The encoded length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The id of a vocabulary token (BPE mode, e.g. `"sks</w>"`); `None` when absent or hashed.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.mode {
            Mode::Bpe { encoder, .. } => encoder.get(token).copied(),
            Mode::Hashed { .. } => None,
        }
    }

    /// Cleans `text` and returns each pre-tokenised piece with its ids.
    fn pieces(&self, text: &str) -> Vec<(String, Vec<u32>)> {
        let cleaned = clean(text);
        self.pattern
            .find_iter(&cleaned)
            .map(|m| {
                let piece = m.as_str().to_string();
                let ids = self.piece_ids(&piece);
                (piece, ids)
            })
            .collect()
    }

    fn piece_ids(&self, piece: &str) -> Vec<u32> {
        match &self.mode {
            Mode::Hashed { vocab_size } => {
                if piece == BOS {
                    return vec![self.bos_id];
                }
                if piece == EOS {
                    return vec![self.eos_id];
                }
                vec![1 + (fnv1a(piece) % (*vocab_size as u64 - 3)) as u32]
            }
            Mode::Bpe { encoder, ranks, byte_encoder } => {
                if piece == BOS || piece == EOS {
                    return vec![encoder.get(piece).copied().unwrap_or(self.eos_id)];
                }
                let mapped: Vec<String> =
                    piece.bytes().map(|b| byte_encoder.get(b as usize).copied().unwrap_or('?').to_string()).collect();
                bpe(mapped, ranks).iter().map(|s| encoder.get(s).copied().unwrap_or(self.eos_id)).collect()
            }
        }
    }

    /// `[bos] + tokens + [eos]`, neither truncated nor padded.
    pub fn encode_unpadded(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos_id];
        for (_, p) in self.pieces(text) {
            ids.extend(p);
        }
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// `[bos] + tokens + [eos]`, truncated to `max_len` (the last kept slot holds eos) and padded to
    /// `max_len` with `pad_id`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_unpadded(text)?;
        ids.pop();
        ids.truncate(self.max_len - 1);
        ids.push(self.eos_id);
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }

    /// Positions in [`Self::encode`]'s sequence of the tokens of `word` (cleaned and split as the
    /// text is; e.g. the placeholder `"sks"` of textual inversion), over every occurrence of it as
    /// a whole sequence of pieces. [`Error::InvalidInput`] when `word` is empty or does not occur in
    /// the (truncated) encoding.
    pub fn token_positions(&self, text: &str, word: &str) -> Result<Vec<usize>> {
        let target: Vec<String> = self.pieces(word).into_iter().map(|(p, _)| p).collect();
        if target.is_empty() {
            return Err(Error::InvalidInput(format!("no token in the word {word:?}")));
        }
        let pieces = self.pieces(text);
        let mut starts = Vec::with_capacity(pieces.len());
        let mut pos = 1; // after bos
        for (_, ids) in &pieces {
            starts.push(pos);
            pos += ids.len();
        }
        let last_kept = self.max_len - 1; // eos slot; tokens occupy 1..last_kept
        let mut out = Vec::new();
        for i in 0..pieces.len().saturating_sub(target.len() - 1) {
            if pieces[i..i + target.len()].iter().zip(&target).all(|((p, _), t)| p == t) {
                for (j, (_, ids)) in pieces[i..i + target.len()].iter().enumerate() {
                    let s = starts[i + j];
                    out.extend((s..s + ids.len()).filter(|&q| q < last_kept));
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        if out.is_empty() {
            return Err(Error::InvalidInput(format!(
                "the word {word:?} does not occur in {text:?} (within {} tokens)",
                self.max_len
            )));
        }
        Ok(out)
    }
}

/// Byte-level BPE of one piece (already mapped to CLIP's byte alphabet, one symbol per byte).
fn bpe(mut word: Vec<String>, ranks: &HashMap<String, usize>) -> Vec<String> {
    match word.last_mut() {
        Some(last) => last.push_str("</w>"),
        None => return word,
    }
    loop {
        let best = word
            .windows(2)
            .filter_map(|w| ranks.get(&format!("{} {}", w[0], w[1])).map(|&r| (r, w[0].clone(), w[1].clone())))
            .min_by_key(|(r, _, _)| *r);
        let Some((_, first, second)) = best else { break };
        let mut merged = Vec::with_capacity(word.len());
        let mut i = 0;
        while i < word.len() {
            if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                merged.push(format!("{first}{second}"));
                i += 2;
            } else {
                merged.push(std::mem::take(&mut word[i]));
                i += 1;
            }
        }
        word = merged;
        if word.len() == 1 {
            break;
        }
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_clips() {
        let t = bytes_to_unicode();
        assert_eq!(t.len(), 256);
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], '\u{120}'); // 'Ġ'
        assert_eq!(t[0], '\u{100}');
        let mut sorted = t.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "the table is a bijection");
    }

    #[test]
    fn cleaning_lowercases_and_collapses_whitespace() {
        assert_eq!(clean("  A\tPhoto\n\nOF  sks\u{7} "), "a photo of sks");
        assert_eq!(clean("猫犬"), "猫 犬");
    }

    #[test]
    fn bpe_merges_by_rank() {
        let mut ranks = HashMap::new();
        ranks.insert("a b".to_string(), 1);
        ranks.insert("b c</w>".to_string(), 0);
        ranks.insert("a bc</w>".to_string(), 2);
        let w = |s: &str| s.chars().map(|c| c.to_string()).collect::<Vec<_>>();
        // "b c</w>" has the lower rank, so "a b" never forms.
        assert_eq!(bpe(w("abc"), &ranks), vec!["abc</w>"]);
        assert_eq!(bpe(w("ab"), &ranks), vec!["a", "b</w>"], "`a b` is not `a b</w>`");
        assert_eq!(bpe(w("abab"), &ranks), vec!["ab", "a", "b</w>"]);
        assert_eq!(bpe(w("ababa"), &ranks), vec!["ab", "ab", "a</w>"], "every occurrence merges");
        assert_eq!(bpe(w("x"), &ranks), vec!["x</w>"]);
    }

    #[test]
    fn hashed_is_deterministic_in_range_with_special_ids() {
        let t = ClipTokenizer::hashed(1000, 77).unwrap();
        let a = t.encode("a photo of sks object").unwrap();
        let b = ClipTokenizer::hashed(1000, 77).unwrap().encode("A  photo of SKS object").unwrap();
        assert_eq!(a, b, "same words, same ids");
        assert_eq!(a.len(), 77);
        assert_eq!((a[0], a[6]), (998, 999), "bos, eos");
        assert!(a[7..].iter().all(|&i| i == 999), "padded with eos");
        assert_eq!(t.pad_id(), 999);
        assert!(a[1..6].iter().all(|&i| (1..=997).contains(&i)), "{a:?}");
        assert_ne!(a[2], a[4], "different words, different ids here");
        // A fixed value, so that the hash cannot change silently between versions.
        assert_eq!(a[4], 1 + (fnv1a("sks") % 997) as u32);
        assert_eq!(fnv1a(""), 0xcbf29ce484222325);
        assert_eq!(fnv1a("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(t.token_positions("a photo of sks object", "sks").unwrap(), vec![4]);
        let short = ClipTokenizer::hashed(10, 4).unwrap().encode("one two three four").unwrap();
        assert_eq!(short.len(), 4);
        assert_eq!(short[3], 9, "truncation keeps eos last");
        assert!(ClipTokenizer::hashed(3, 77).is_err());
        assert!(ClipTokenizer::hashed(10, 1).is_err());
    }
}
