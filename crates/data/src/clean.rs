//! Text cleaning as the original study did it: trim and collapse whitespace. Placeholders such as
//! `{{Order Number}}` are ordinary text and stay intact.

/// Trims and collapses every run of whitespace (including line breaks) to one space.
/// Used for customer messages, which are single-line requests.
pub fn clean_message(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Trims, collapses runs of spaces/tabs within each line, and keeps single line breaks (at most one
/// blank line in a row). Used for responses, whose numbered steps and paragraphs carry meaning.
pub fn clean_response(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0usize;
    for line in text.trim().lines() {
        let line = clean_message(line);
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&line);
    }
    out
}

/// The key that decides whether two messages are "the same instruction": lower-case, whitespace
/// collapsed. Every copy of a key goes to the same split.
pub fn dedupe_key(text: &str) -> String {
    clean_message(text).to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_trimmed_and_collapsed_keeping_placeholders() {
        assert_eq!(
            clean_message("  cancel   order\t{{Order Number}}\n now "),
            "cancel order {{Order Number}} now"
        );
    }

    #[test]
    fn responses_keep_line_structure() {
        assert_eq!(
            clean_response("  Hi  there \n\n\n1.  Go to {{Account Settings}}\n2. Save  "),
            "Hi there\n\n1. Go to {{Account Settings}}\n2. Save"
        );
    }

    #[test]
    fn dedupe_key_ignores_case_and_spacing() {
        assert_eq!(
            dedupe_key("Cancel  MY order "),
            dedupe_key("cancel my order")
        );
    }
}
