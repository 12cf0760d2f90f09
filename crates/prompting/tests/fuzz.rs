//! Fuzzing the judge's reply parser: whatever a model or an endpoint writes back, `parse_verdict` gives
//! scores in range or says why not; never a panic or a hang. Bounded by `SUPPORTLM_FUZZ_ITERATIONS`.

use supportlm_fuzzing::{CappedAlloc, Fuzz, Mutation, Verdict};
use supportlm_prompting::judge::parse_verdict;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

#[test]
fn fuzz_judge_replies() {
    let seeds: Vec<Vec<u8>> = [
        "{\"relevance\": 4, \"politeness\": 3, \"actionable\": 1, \"rationale\": \"Asks for the order number.\"}",
        "Here is my rating:\n```json\n{\"Relevance\": 5.0, \"Politeness\": \"2\", \"Actionable guidance\": 2}\n```",
        "Relevance: 3/5\n- Politeness = 2\n**Actionable**: 0\nRationale: vague about refunds.",
        "The reply is good.",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    Fuzz::new("judge-reply", Mutation::Text)
        .scaled(2, 1)
        .run(&seeds, |bytes| {
            let text = String::from_utf8_lossy(bytes);
            match parse_verdict(&text) {
                Ok((s, _)) => {
                    assert!(
                        s.relevance <= 5 && s.politeness <= 5 && s.actionable <= 5,
                        "{s:?}"
                    );
                    Verdict::Loaded
                }
                Err(_) => Verdict::Refused,
            }
        });
}
