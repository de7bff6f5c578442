//! Finding more than the first serde error.
//!
//! serde stops at the first wrong type or unknown key. To report the others
//! in the same run, the file is read again once per part (each top-level
//! section; each entry of `upstreams`, `routes`, `plugins` and `sources`) with
//! every other part blanked out. Blanking keeps each line where it was, so
//! the errors of a partial read carry the file's own line numbers; other
//! route items are replaced by `- {}` so that item indexes stay right too.
//!
//! Best effort by design: files that use anchors or aliases, or parts written
//! in flow style on their parent's line, are not split, since blanking could
//! then invent errors. Owns only text slicing; deserializing stays in `mod.rs`.

use super::positions::PositionIndex;

/// Sections whose entries are read one at a time.
const SPLIT_SECTIONS: [&str; 4] = ["upstreams", "routes", "plugins", "sources"];

/// One copy of `text` per part, each with only that part left in.
pub fn variants(text: &str, index: &PositionIndex) -> Vec<String> {
    if index.has_anchors {
        return Vec::new();
    }
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let sections = spans(index.children(""), 0, lines.len());
    let Some(first_section) = sections.first() else {
        return Vec::new();
    };
    let preamble = 0..first_section.1.start;
    let mut out = Vec::new();
    for (path, span) in &sections {
        let entries = spans(index.children(path), span.start, span.end);
        let can_split = SPLIT_SECTIONS.contains(&path.as_str())
            && entries.len() > 1
            && entries.iter().all(|(_, entry)| entry.start > span.start);
        if !can_split {
            out.push(keep_only(&lines, &[preamble.clone(), span.clone()], &[]));
            continue;
        }
        let is_sequence = entries.iter().all(|(child, _)| child.ends_with(']'));
        if is_sequence
            && !entries
                .iter()
                .all(|(_, entry)| lines.get(entry.start).is_some_and(|l| starts_an_item(l)))
        {
            out.push(keep_only(&lines, &[preamble.clone(), span.clone()], &[]));
            continue;
        }
        let header = span.start..entries[0].1.start;
        for (i, (_, entry)) in entries.iter().enumerate() {
            let placeholders: Vec<usize> = if is_sequence {
                entries
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, (_, other))| other.start)
                    .collect()
            } else {
                Vec::new()
            };
            out.push(keep_only(
                &lines,
                &[preamble.clone(), header.clone(), entry.clone()],
                &placeholders,
            ));
        }
    }
    out
}

type LineSpan = std::ops::Range<usize>;

/// Each child's 0-based line range: from its first line to the next child's,
/// the last one running to `end`.
fn spans(
    children: &[(String, super::positions::Position)],
    start: usize,
    end: usize,
) -> Vec<(String, LineSpan)> {
    let starts: Vec<usize> = children
        .iter()
        .map(|(_, at)| at.line.saturating_sub(1).max(start))
        .collect();
    children
        .iter()
        .enumerate()
        .map(|(i, (path, _))| {
            let next = starts.get(i + 1).copied().unwrap_or(end);
            (path.clone(), starts[i]..next.max(starts[i]))
        })
        .collect()
}

/// A block sequence item's first line: `- ...` after indentation.
fn starts_an_item(line: &str) -> bool {
    let trimmed = line.trim_start();
    trimmed == "-"
        || trimmed.starts_with("- ")
        || trimmed.starts_with("-\n")
        || trimmed.starts_with("-\r")
}

/// `lines` with everything outside `keep` blanked (line endings stay), and
/// each line in `placeholders` turned into an empty sequence item.
fn keep_only(lines: &[&str], keep: &[LineSpan], placeholders: &[usize]) -> String {
    let mut out = String::new();
    for (number, line) in lines.iter().enumerate() {
        let ending = if line.ends_with("\r\n") {
            "\r\n"
        } else if line.ends_with('\n') {
            "\n"
        } else {
            ""
        };
        if keep.iter().any(|span| span.contains(&number)) {
            out.push_str(line);
        } else if placeholders.contains(&number) {
            let indent = line.len() - line.trim_start().len();
            out.push_str(&line[..indent]);
            out.push_str("- {}");
            out.push_str(ending);
        } else {
            out.push_str(ending);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# preamble
listen: 0.0.0.0:8080
routes:
  - upstream: a
    plugins: [x]
  - upstream: b
upstreams:
  a: { servers: [] }
  b:
    servers: []
";

    #[test]
    fn each_part_keeps_its_lines_and_blanks_the_rest() {
        let index = PositionIndex::build(TEXT);
        let variants = variants(TEXT, &index);
        assert_eq!(
            variants,
            vec![
                "# preamble\nlisten: 0.0.0.0:8080\n\n\n\n\n\n\n\n\n",
                "# preamble\n\nroutes:\n  - upstream: a\n    plugins: [x]\n  - {}\n\n\n\n\n",
                "# preamble\n\nroutes:\n  - {}\n\n  - upstream: b\n\n\n\n\n",
                "# preamble\n\n\n\n\n\nupstreams:\n  a: { servers: [] }\n\n\n",
                "# preamble\n\n\n\n\n\nupstreams:\n\n  b:\n    servers: []\n",
            ]
        );
        for variant in &variants {
            assert_eq!(variant.lines().count(), TEXT.lines().count());
        }
    }

    #[test]
    fn an_empty_last_item_does_not_break_splitting() {
        for text in [
            "routes:\n  - a: 1\n  -\n",
            "routes:\n  - a: 1\n  -",
            "routes:\n  - a\n  - \n",
        ] {
            let index = PositionIndex::build(text);
            for variant in variants(text, &index) {
                assert_eq!(variant.lines().count(), text.lines().count(), "{text:?}");
            }
        }
    }

    #[test]
    fn files_with_anchors_are_not_split() {
        let text = "upstreams:\n  a: &s { servers: [] }\n  b: *s\n";
        assert!(variants(text, &PositionIndex::build(text)).is_empty());
    }

    #[test]
    fn flow_sections_are_kept_whole() {
        let text = "routes: [{ upstream: a }, { upstream: b }]\nlisten: x\n";
        let variants = variants(text, &PositionIndex::build(text));
        assert_eq!(
            variants,
            vec![
                "routes: [{ upstream: a }, { upstream: b }]\n\n",
                "\nlisten: x\n"
            ]
        );
    }
}
