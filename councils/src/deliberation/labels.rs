//! Proposals as peers see them: labelled "Proposal A", "Proposal B", …, and a review split
//! back into its per-proposal sections.

use crate::prompts::RANKING_MARKER;

/// "A", "B", … "Z", "AA", …
pub(super) fn label(i: usize) -> String {
    let mut i = i;
    let mut out = Vec::new();
    loop {
        out.push(b'A' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Splits a reply into the sections headed `Proposal X` for each label (text up to the next
/// heading or the ranking line). `None` for a label without a section.
pub(super) fn split_sections(reply: &str, labels: &[String]) -> Vec<Option<String>> {
    let mut sections: Vec<Option<String>> = vec![None; labels.len()];
    let mut current: Option<usize> = None;
    for line in reply.lines() {
        let bare = line
            .trim()
            .trim_matches(|c: char| matches!(c, '#' | '*' | '-' | ' ' | '_'));
        if bare.to_ascii_uppercase().starts_with(RANKING_MARKER) {
            current = None;
            continue;
        }
        if let Some(rest) = bare
            .strip_prefix("Proposal ")
            .or_else(|| bare.strip_prefix("proposal "))
        {
            let head: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            let tail = &rest[head.len()..];
            let is_heading = tail.is_empty() || tail.starts_with([':', ')', ' ', '*', '.', '-']);
            if let Some(idx) = labels
                .iter()
                .position(|l| *l == head)
                .filter(|_| is_heading)
            {
                current = Some(idx);
                let after = tail.trim_start_matches([':', ')', '*', '.', '-', ' ']);
                let entry = sections[idx].get_or_insert_with(String::new);
                if !after.is_empty() {
                    entry.push_str(after);
                    entry.push('\n');
                }
                continue;
            }
        }
        if let Some(idx) = current
            && let Some(entry) = sections[idx].as_mut()
        {
            entry.push_str(line);
            entry.push('\n');
        }
    }
    sections
        .into_iter()
        .map(|s| s.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_go_past_z() {
        assert_eq!(label(0), "A");
        assert_eq!(label(25), "Z");
        assert_eq!(label(26), "AA");
        assert_eq!(label(27), "AB");
    }

    #[test]
    fn sections_are_split_by_proposal_headings() {
        let labels = vec!["A".to_owned(), "B".to_owned()];
        let reply = "Intro.\n**Proposal B:** too slow\nmore on B\n## Proposal A\nmissing tests\nFINAL RANKING: Proposal A > Proposal B";
        let s = split_sections(reply, &labels);
        assert_eq!(s[0].as_deref(), Some("missing tests"));
        assert_eq!(s[1].as_deref(), Some("too slow\nmore on B"));
        assert_eq!(split_sections("nothing here", &labels), vec![None, None]);
    }
}
