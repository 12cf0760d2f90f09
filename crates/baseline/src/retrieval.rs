//! Task 2's classical baseline: answer a message with the reply of the most similar training message
//! (cosine of their TF-IDF rows), among the training messages of the message's category, as the
//! language model is given the category. What a support desk with a searchable archive would send.

use std::collections::HashMap;

use crate::{BaselineError, Result, TfIdf};

/// Training texts as TF-IDF rows, searchable by cosine similarity.
#[derive(Debug, Clone)]
pub struct Nearest {
    tfidf: TfIdf,
    /// Per term: (text, weight) of the training texts that hold it.
    postings: Vec<Vec<(usize, f32)>>,
    texts: usize,
}

impl Nearest {
    /// Indexes `texts` (terms in at least `min_df` of them, at most `max_features`).
    pub fn fit(texts: &[&str], min_df: usize, max_features: usize) -> Result<Self> {
        if texts.is_empty() {
            return Err(BaselineError::Input("no texts to search".into()));
        }
        let tfidf = TfIdf::fit(texts, min_df, max_features);
        let mut postings = vec![Vec::new(); tfidf.features()];
        for (i, t) in texts.iter().enumerate() {
            for (j, v) in tfidf.sparse_row(t) {
                postings[j].push((i, v));
            }
        }
        Ok(Nearest {
            tfidf,
            postings,
            texts: texts.len(),
        })
    }

    /// The training text most similar to `query` among those `allowed` keeps, with its cosine;
    /// ties go to the earlier text. `None` when no allowed text shares a term with the query (or
    /// none is allowed): then the caller decides, e.g. [`Nearest::first`].
    pub fn nearest(&self, query: &str, allowed: impl Fn(usize) -> bool) -> Option<(usize, f32)> {
        let mut scores: HashMap<usize, f32> = HashMap::new();
        for (j, q) in self.tfidf.sparse_row(query) {
            for &(i, v) in &self.postings[j] {
                *scores.entry(i).or_insert(0.0) += q * v;
            }
        }
        scores
            .into_iter()
            .filter(|&(i, s)| s > 0.0 && allowed(i))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
    }

    /// The first allowed text (cosine 0): the answer when nothing matches.
    pub fn first(&self, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        (0..self.texts).find(|&i| allowed(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXTS: [&str; 5] = [
        "i want a refund for my order",
        "cancel my order now",
        "change my shipping address",
        "cancel my order now",
        "where is my refund",
    ];

    #[test]
    fn the_most_similar_allowed_text_wins_and_ties_go_to_the_earlier() {
        let n = Nearest::fit(&TEXTS, 1, 100).unwrap();
        let any = |_| true;
        // A text finds itself with cosine 1; its duplicate (index 3) loses the tie to index 1.
        let (i, cos) = n.nearest("cancel my order now", any).unwrap();
        assert_eq!(i, 1);
        assert!((cos - 1.0).abs() < 1e-6, "{cos}");
        assert_eq!(
            n.nearest("please change the shipping address", any)
                .unwrap()
                .0,
            2
        );
        // Restricted to other texts: the best of those.
        let (i, cos) = n
            .nearest("cancel my order now", |i| i != 1 && i != 3)
            .unwrap();
        assert_eq!(i, 0, "shares \"my order\" with text 0 only");
        assert!(cos > 0.0 && cos < 1.0);
        // Nothing in common, or nothing allowed: no match; `first` is the fallback.
        assert!(n.nearest("hello there", any).is_none());
        assert!(n.nearest("cancel my order now", |_| false).is_none());
        assert_eq!(n.first(|i| i >= 2), Some(2));
        assert!(Nearest::fit(&[], 1, 100).is_err());
    }

    #[test]
    fn cosine_by_hand() {
        // Vocabulary {a, b, c, "a b", "a c"} with min_df 1; idf(a) = ln(3/3) + 1 = 1, the others
        // ln(3/2) + 1. The query "a b" against "a b": 1; against "a c": only "a" is shared.
        let n = Nearest::fit(&["a b", "a c"], 1, 100).unwrap();
        let r = 1.0 + (1.5f32).ln();
        let norm2 = 1.0 + 2.0 * r * r;
        let (i, cos) = n.nearest("a b", |i| i == 1).unwrap();
        assert_eq!(i, 1);
        assert!((cos - 1.0 / norm2).abs() < 1e-6, "{cos} vs {}", 1.0 / norm2);
    }
}
