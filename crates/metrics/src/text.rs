//! Overlap metrics for generated responses, with the conventions of rouge-score (ROUGE-1/2/L/Lsum) and
//! sacrebleu (BLEU with the 13a tokenizer and exponential smoothing; chrF with character order 6,
//! beta 2, no word n-grams).

use std::collections::HashMap;

use serde::Serialize;

/// Precision, recall and F-measure of one ROUGE variant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Prf {
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F-measure.
    pub f: f64,
}

fn prf(hits: f64, hyp: f64, reference: f64) -> Prf {
    let precision = if hyp > 0.0 { hits / hyp } else { 0.0 };
    let recall = if reference > 0.0 {
        hits / reference
    } else {
        0.0
    };
    let f = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Prf {
        precision,
        recall,
        f,
    }
}

/// ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum of a hypothesis against a reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Rouge {
    /// Unigram overlap.
    pub rouge1: Prf,
    /// Bigram overlap.
    pub rouge2: Prf,
    /// Longest common subsequence over the whole text.
    pub rouge_l: Prf,
    /// Union LCS over sentences (split at newlines), as rouge-score's `rougeLsum`.
    pub rouge_lsum: Prf,
}

/// rouge-score's tokenizer without stemming: lowercase, every run of characters other than `a-z0-9`
/// becomes a separator.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// rouge-score's tokenizer with `use_stemmer=True`: [`rouge_tokens`], then the Porter stemmer (NLTK)
/// on tokens longer than three characters.
pub fn rouge_tokens_stemmed(text: &str) -> Vec<String> {
    rouge_tokens(text)
        .into_iter()
        .map(|t| {
            if t.chars().count() > 3 {
                crate::porter::stem(&t)
            } else {
                t
            }
        })
        .collect()
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

fn rouge_n(hyp: &[String], reference: &[String], n: usize) -> Prf {
    let h = ngram_counts(hyp, n);
    let r = ngram_counts(reference, n);
    let hits: usize = r
        .iter()
        .map(|(g, &c)| c.min(h.get(g).copied().unwrap_or(0)))
        .sum();
    prf(
        hits as f64,
        h.values().sum::<usize>() as f64,
        r.values().sum::<usize>() as f64,
    )
}

fn lcs_table(a: &[String], b: &[String]) -> Vec<Vec<usize>> {
    let mut t = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            t[i][j] = if a[i - 1] == b[j - 1] {
                t[i - 1][j - 1] + 1
            } else {
                t[i - 1][j].max(t[i][j - 1])
            };
        }
    }
    t
}

/// Indices into `reference` of one LCS with `candidate` (rouge-score's backtracking order).
fn lcs_indices(reference: &[String], candidate: &[String]) -> Vec<usize> {
    let t = lcs_table(reference, candidate);
    let (mut i, mut j) = (reference.len(), candidate.len());
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if reference[i - 1] == candidate[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i][j - 1] > t[i - 1][j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out.reverse();
    out
}

/// Summary-level LCS over newline-separated sentences (ROUGE-Lsum).
fn rouge_lsum(hyp: &str, reference: &str, tokenize: fn(&str) -> Vec<String>) -> Prf {
    let sents = |t: &str| -> Vec<Vec<String>> {
        t.split('\n')
            .filter(|s| !s.is_empty())
            .map(tokenize)
            .collect()
    };
    let (r, c) = (sents(reference), sents(hyp));
    let m: usize = r.iter().map(Vec::len).sum();
    let n: usize = c.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return Prf::default();
    }
    let mut count_r: HashMap<&String, usize> = HashMap::new();
    let mut count_c: HashMap<&String, usize> = HashMap::new();
    r.iter()
        .flatten()
        .for_each(|t| *count_r.entry(t).or_insert(0) += 1);
    c.iter()
        .flatten()
        .for_each(|t| *count_c.entry(t).or_insert(0) += 1);
    let mut hits = 0usize;
    for sent in &r {
        let mut union: Vec<usize> = c.iter().flat_map(|cs| lcs_indices(sent, cs)).collect();
        union.sort_unstable();
        union.dedup();
        for i in union {
            let t = &sent[i];
            let (cc, cr) = (
                count_c.get(t).copied().unwrap_or(0),
                count_r.get(t).copied().unwrap_or(0),
            );
            if cc > 0 && cr > 0 {
                hits += 1;
                count_c.insert(t, cc - 1);
                count_r.insert(t, cr - 1);
            }
        }
    }
    prf(hits as f64, n as f64, m as f64)
}

/// ROUGE scores of `hypothesis` against `reference` (rouge-score, `use_stemmer=False`).
pub fn rouge(hypothesis: &str, reference: &str) -> Rouge {
    rouge_with(hypothesis, reference, rouge_tokens)
}

/// ROUGE scores with Porter stemming (rouge-score, `use_stemmer=True`).
pub fn rouge_stemmed(hypothesis: &str, reference: &str) -> Rouge {
    rouge_with(hypothesis, reference, rouge_tokens_stemmed)
}

fn rouge_with(hypothesis: &str, reference: &str, tokenize: fn(&str) -> Vec<String>) -> Rouge {
    let (h, r) = (tokenize(hypothesis), tokenize(reference));
    let lcs = lcs_table(&r, &h)[r.len()][h.len()];
    Rouge {
        rouge1: rouge_n(&h, &r, 1),
        rouge2: rouge_n(&h, &r, 2),
        rouge_l: prf(lcs as f64, h.len() as f64, r.len() as f64),
        rouge_lsum: rouge_lsum(hypothesis, reference, tokenize),
    }
}

/// sacrebleu's `13a` tokenizer (mteval-v13a), returning the tokens.
pub fn tokenize_13a(line: &str) -> Vec<String> {
    let mut s = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let chars: Vec<char> = format!(" {s} ").chars().collect();
    // Symbols and punctuation other than period, comma and dash get spaces around them.
    let symbol =
        |c: char| matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
    let mut a = Vec::with_capacity(chars.len() * 2);
    for c in chars {
        if symbol(c) {
            a.extend([' ', c, ' ']);
        } else {
            a.push(c);
        }
    }
    let digit = |c: char| c.is_ascii_digit();
    let period_comma = |c: char| c == '.' || c == ',';
    // Each rule is one left-to-right pass of non-overlapping two-character matches, as re.sub does.
    let pass = |v: Vec<char>,
                matches: &dyn Fn(char, char) -> bool,
                emit: &dyn Fn(char, char, &mut Vec<char>)| {
        let mut out = Vec::with_capacity(v.len() * 2);
        let mut i = 0;
        while i < v.len() {
            if i + 1 < v.len() && matches(v[i], v[i + 1]) {
                emit(v[i], v[i + 1], &mut out);
                i += 2;
            } else {
                out.push(v[i]);
                i += 1;
            }
        }
        out
    };
    let b = pass(a, &|x, y| !digit(x) && period_comma(y), &|x, y, o| {
        o.extend([x, ' ', y, ' '])
    });
    let c = pass(b, &|x, y| period_comma(x) && !digit(y), &|x, y, o| {
        o.extend([' ', x, ' ', y])
    });
    let d = pass(c, &|x, y| digit(x) && y == '-', &|x, y, o| {
        o.extend([x, ' ', y, ' '])
    });
    d.iter()
        .collect::<String>()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Sufficient statistics of BLEU for one or more sentences.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BleuStats {
    /// Clipped n-gram matches, n = 1..4.
    pub correct: [usize; 4],
    /// Hypothesis n-grams, n = 1..4.
    pub total: [usize; 4],
    /// Hypothesis length in tokens.
    pub hyp_len: usize,
    /// Reference length in tokens.
    pub ref_len: usize,
}

impl BleuStats {
    /// The statistics of one sentence pair (sacrebleu's 13a tokenization).
    pub fn of(hypothesis: &str, reference: &str) -> Self {
        let (h, r) = (tokenize_13a(hypothesis), tokenize_13a(reference));
        let mut s = BleuStats {
            hyp_len: h.len(),
            ref_len: r.len(),
            ..Default::default()
        };
        for n in 1..=4 {
            let (hc, rc) = (ngram_counts(&h, n), ngram_counts(&r, n));
            s.correct[n - 1] = hc
                .iter()
                .map(|(g, &c)| c.min(rc.get(g).copied().unwrap_or(0)))
                .sum();
            s.total[n - 1] = h.len().saturating_sub(n - 1);
        }
        s
    }

    /// Adds another sentence's statistics (corpus BLEU sums them).
    pub fn add(&mut self, o: &BleuStats) {
        for n in 0..4 {
            self.correct[n] += o.correct[n];
            self.total[n] += o.total[n];
        }
        self.hyp_len += o.hyp_len;
        self.ref_len += o.ref_len;
    }

    /// BLEU (0–100) with exponential smoothing; `effective_order` as sentence BLEU uses it.
    pub fn score(&self, effective_order: bool) -> f64 {
        // sacrebleu stops early with 0 when no unigram matches.
        if self.correct[0] == 0 {
            return 0.0;
        }
        let mut precisions = [0f64; 4];
        let mut smooth = 1f64;
        let mut order = 4;
        for (n, p) in precisions.iter_mut().enumerate() {
            let (correct, total) = (self.correct[n], self.total[n]);
            if total == 0 {
                break;
            }
            if effective_order {
                order = n + 1;
            }
            if correct == 0 {
                smooth *= 2.0;
                *p = 100.0 / (smooth * total as f64);
            } else {
                *p = 100.0 * correct as f64 / total as f64;
            }
        }
        let bp = if self.hyp_len < self.ref_len {
            if self.hyp_len > 0 {
                (1.0 - self.ref_len as f64 / self.hyp_len as f64).exp()
            } else {
                0.0
            }
        } else {
            1.0
        };
        let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
        bp * (precisions[..order].iter().map(|&p| log(p)).sum::<f64>() / order as f64).exp()
    }
}

/// Sentence BLEU (sacrebleu `sentence_bleu`: 13a, exp smoothing, effective order).
pub fn sentence_bleu(hypothesis: &str, reference: &str) -> f64 {
    BleuStats::of(hypothesis, reference).score(true)
}

/// Corpus BLEU over aligned hypotheses and references (one reference each).
pub fn corpus_bleu<S: AsRef<str>>(hypotheses: &[S], references: &[S]) -> f64 {
    let mut total = BleuStats::default();
    for (h, r) in hypotheses.iter().zip(references) {
        total.add(&BleuStats::of(h.as_ref(), r.as_ref()));
    }
    total.score(false)
}

const CHRF_ORDER: usize = 6;
const CHRF_BETA: f64 = 2.0;

/// Per character order: (hypothesis n-grams, reference n-grams, matches).
fn chrf_stats(hypothesis: &str, reference: &str) -> [[usize; 3]; CHRF_ORDER] {
    let strip = |s: &str| {
        s.split_whitespace()
            .collect::<String>()
            .chars()
            .collect::<Vec<char>>()
    };
    let (h, r) = (strip(hypothesis), strip(reference));
    let mut out = [[0usize; 3]; CHRF_ORDER];
    for (n, o) in (1..=CHRF_ORDER).zip(out.iter_mut()) {
        fn count(v: &[char], n: usize) -> HashMap<&[char], usize> {
            let mut m: HashMap<&[char], usize> = HashMap::new();
            if v.len() >= n {
                for w in v.windows(n) {
                    *m.entry(w).or_insert(0) += 1;
                }
            }
            m
        }
        let (hc, rc) = (count(&h, n), count(&r, n));
        o[0] = hc.values().sum();
        o[1] = rc.values().sum();
        o[2] = hc
            .iter()
            .map(|(g, &c)| c.min(rc.get(g).copied().unwrap_or(0)))
            .sum();
    }
    out
}

fn chrf_score(stats: &[[usize; 3]; CHRF_ORDER]) -> f64 {
    let eps = 1e-16;
    let factor = CHRF_BETA * CHRF_BETA;
    let (mut avg_p, mut avg_r, mut effective) = (0.0, 0.0, 0usize);
    for &[n_hyp, n_ref, n_match] in stats {
        let p = if n_hyp > 0 {
            n_match as f64 / n_hyp as f64
        } else {
            eps
        };
        let r = if n_ref > 0 {
            n_match as f64 / n_ref as f64
        } else {
            eps
        };
        if n_hyp > 0 && n_ref > 0 {
            effective += 1;
        }
        avg_p += p;
        avg_r += r;
    }
    if effective == 0 {
        return 0.0;
    }
    avg_p /= effective as f64;
    avg_r /= effective as f64;
    if avg_p + avg_r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * avg_p * avg_r / (factor * avg_p + avg_r)
}

/// Sentence chrF (sacrebleu defaults: character order 6, beta 2, whitespace ignored).
pub fn sentence_chrf(hypothesis: &str, reference: &str) -> f64 {
    chrf_score(&chrf_stats(hypothesis, reference))
}

/// Corpus chrF: statistics summed over all pairs, then one score.
pub fn corpus_chrf<S: AsRef<str>>(hypotheses: &[S], references: &[S]) -> f64 {
    let mut total = [[0usize; 3]; CHRF_ORDER];
    for (h, r) in hypotheses.iter().zip(references) {
        for (t, s) in total.iter_mut().zip(chrf_stats(h.as_ref(), r.as_ref())) {
            for k in 0..3 {
                t[k] += s[k];
            }
        }
    }
    chrf_score(&total)
}
