//! Find the line of a key path (`models[1].deployments[0].provider`) in a block-style
//! YAML document, so that validation errors (found after parsing, when spans are
//! gone) can still name a line. Falls back to the deepest ancestor that was found.

#[derive(Debug, PartialEq, Eq)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(stripped) = rest.strip_prefix('[') {
            let end = stripped.find(']').unwrap_or(stripped.len());
            if let Ok(i) = stripped[..end].parse() {
                out.push(Segment::Index(i));
            }
            rest = stripped.get(end + 1..).unwrap_or("");
        }
    }
    out
}

struct Line<'a> {
    number: usize,
    indent: usize,
    item: bool,
    content: &'a str,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" {
            continue;
        }
        let mut indent = raw.len() - trimmed.len();
        let mut content = trimmed;
        // "- key: value" is an item marker and, two columns in, a key of that item.
        while let Some(rest) =
            content
                .strip_prefix("- ")
                .or_else(|| if content == "-" { Some("") } else { None })
        {
            out.push(Line {
                number: i + 1,
                indent,
                item: true,
                content: "",
            });
            let inner = rest.trim_start();
            indent += content.len() - inner.len();
            content = inner;
        }
        if !content.is_empty() {
            out.push(Line {
                number: i + 1,
                indent,
                item: false,
                content,
            });
        }
    }
    out
}

fn key_matches(content: &str, key: &str) -> bool {
    for quoted in [
        format!("{key}:"),
        format!("\"{key}\":"),
        format!("'{key}':"),
    ] {
        if let Some(rest) = content.strip_prefix(quoted.as_str()) {
            if rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t') {
                return true;
            }
        }
    }
    false
}

/// The 1-based line of `path` in `text`, or of its deepest ancestor found.
pub fn locate(text: &str, path: &str) -> Option<usize> {
    let lines = lines(text);
    let mut start = 0usize;
    let mut parent_indent: isize = -1;
    let mut found: Option<usize> = None;
    for seg in segments(path) {
        // The child block: lines after `start` indented deeper than the parent.
        let is_index = matches!(seg, Segment::Index(_));
        let block_end = lines[start..]
            .iter()
            .position(|l| {
                let indent = l.indent as isize;
                indent < parent_indent || (indent == parent_indent && !(is_index && l.item))
            })
            .map(|p| start + p)
            .unwrap_or(lines.len());
        let block = &lines[start..block_end];
        let Some(child_indent) = block.first().map(|l| l.indent) else {
            return found;
        };
        let hit = match seg {
            Segment::Key(key) => block
                .iter()
                .position(|l| !l.item && l.indent == child_indent && key_matches(l.content, key)),
            Segment::Index(i) => block
                .iter()
                .enumerate()
                .filter(|(_, l)| l.item && l.indent == child_indent)
                .nth(i)
                .map(|(p, _)| p),
        };
        let Some(p) = hit else { return found };
        let line = &block[p];
        found = Some(line.number);
        parent_indent = line.indent as isize;
        start = start + p + 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# models
models:
  - name: a
    deployments:
      - provider: p1
        weight: 2
  - name: b
    deployments:
      - provider: p2
      - provider: p3
        model: upstream-b
routes:
  auto:
    model: a
";

    #[test]
    fn finds_nested_keys_and_items() {
        assert_eq!(locate(DOC, "models"), Some(2));
        assert_eq!(locate(DOC, "models[0].name"), Some(3));
        assert_eq!(locate(DOC, "models[0].deployments[0].weight"), Some(6));
        assert_eq!(locate(DOC, "models[1].name"), Some(7));
        assert_eq!(locate(DOC, "models[1].deployments[1].provider"), Some(10));
        assert_eq!(locate(DOC, "models[1].deployments[1].model"), Some(11));
        assert_eq!(locate(DOC, "routes.auto.model"), Some(14));
    }

    #[test]
    fn items_at_parent_indent() {
        let doc = "models:\n- name: a\n- name: b\n  owned_by: x\n";
        assert_eq!(locate(doc, "models[1].owned_by"), Some(4));
    }

    #[test]
    fn falls_back_to_ancestor() {
        assert_eq!(locate(DOC, "routes.auto.missing"), Some(13));
        assert_eq!(locate(DOC, "models[7]"), Some(2));
        assert_eq!(locate(DOC, "nothing"), None);
    }
}
