//! What the training tests share.

use supportlm_data::{Category, Intent, Record};

/// `n` records of three categories with short messages and replies, ids from `offset`.
pub fn records(n: usize, offset: usize) -> Vec<Record> {
    let pairs = [
        (Category::Refund, Intent::GetRefund, "refund"),
        (Category::Order, Intent::CancelOrder, "cancel"),
        (Category::Payment, Intent::CheckPaymentMethods, "pay"),
    ];
    (0..n)
        .map(|i| {
            let (category, intent, word) = pairs[i % 3];
            Record {
                id: offset + i,
                flags: None,
                instruction: format!("{word} {word} please {}", i % 5),
                category,
                intent,
                response: Some(format!("ok {word}")),
            }
        })
        .collect()
}
