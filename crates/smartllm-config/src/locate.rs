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

/// The keys of `segs` (all of them keys) joined with dots again: a name
/// that holds dots (`gpt-4.1`) was split into several segments.
fn joined(segs: &[Segment<'_>]) -> String {
    let keys: Vec<&str> = segs
        .iter()
        .filter_map(|s| match s {
            Segment::Key(k) => Some(*k),
            Segment::Index(_) => None,
        })
        .collect();
    keys.join(".")
}

/// The 1-based line of `path` in `text`, or of its deepest ancestor found.
/// A key may hold dots (model, provider and route names such as `gpt-4.1`):
/// at each level the longest run of the following keys that names a key
/// there wins, so `routes.gpt-4.1.x` finds `gpt-4.1:`, not `gpt-4:`.
pub fn locate(text: &str, path: &str) -> Option<usize> {
    let lines = lines(text);
    let segs = segments(path);
    let mut start = 0usize;
    let mut parent_indent: isize = -1;
    let mut found: Option<usize> = None;
    let mut i = 0usize;
    while i < segs.len() {
        // The child block: lines after `start` indented deeper than the parent.
        let is_index = matches!(segs[i], Segment::Index(_));
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
        // The position in `block` and the index of the next segment.
        let hit = match segs[i] {
            Segment::Key(_) => {
                let keys = segs[i..]
                    .iter()
                    .take_while(|s| matches!(s, Segment::Key(_)))
                    .count();
                (1..=keys).rev().find_map(|n| {
                    let key = joined(&segs[i..i + n]);
                    block
                        .iter()
                        .position(|l| {
                            !l.item && l.indent == child_indent && key_matches(l.content, &key)
                        })
                        .map(|p| (p, i + n))
                })
            }
            Segment::Index(k) => block
                .iter()
                .enumerate()
                .filter(|(_, l)| l.item && l.indent == child_indent)
                .nth(k)
                .map(|(p, _)| (p, i + 1)),
        };
        let Some((p, next)) = hit else { return found };
        let line = &block[p];
        found = Some(line.number);
        parent_indent = line.indent as isize;
        start = start + p + 1;
        i = next;
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

    /// Names may hold dots: `gpt-4.1` is one key, found even after a
    /// sibling `gpt-4` (which a split on every dot would pick).
    #[test]
    fn keys_with_dots() {
        let doc = "\
cache:
  routes:
    gpt-4:
      similarity_threshold: 0.9
    gpt-4.1:
      similarity_threshold: 2
    'v1.2.3':
      models:
        - name: a
";
        assert_eq!(
            locate(doc, "cache.routes.gpt-4.similarity_threshold"),
            Some(4)
        );
        assert_eq!(
            locate(doc, "cache.routes.gpt-4.1.similarity_threshold"),
            Some(6)
        );
        assert_eq!(locate(doc, "cache.routes.gpt-4.1"), Some(5));
        assert_eq!(locate(doc, "cache.routes.gpt-4.1.missing"), Some(5));
        assert_eq!(locate(doc, "cache.routes.v1.2.3.models[0].name"), Some(9));
        // No such entry: the parent, not a sibling.
        assert_eq!(locate(doc, "cache.routes.gpt-5.1.x"), Some(2));
    }

    #[test]
    fn falls_back_to_ancestor() {
        assert_eq!(locate(DOC, "routes.auto.missing"), Some(13));
        assert_eq!(locate(DOC, "models[7]"), Some(2));
        assert_eq!(locate(DOC, "nothing"), None);
    }
}
