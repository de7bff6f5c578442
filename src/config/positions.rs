//! Where each key path (`routes[1].upstream`) sits in the file.
//!
//! serde_yaml keeps no positions once a value is deserialized, so checks that
//! run afterwards (cross-references, file existence) read the same text once
//! more with yaml-rust2's event parser, which reports a marker per event.
//! Paths are spelled the way `serde_path_to_error` spells them. Also finds
//! duplicate keys, which serde_yaml would silently resolve to the last one.
//! Owns no policy: it only answers "where is this path".

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// A key that appears twice in one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    pub path: String,
    pub at: Position,
    pub first: Position,
}

/// Key path -> position of its value, and of its key where it has one.
#[derive(Debug, Default)]
pub struct PositionIndex {
    values: HashMap<String, Position>,
    keys: HashMap<String, Position>,
    /// Parent path -> its entries (key position for mappings, item position
    /// for sequences), in file order.
    children: HashMap<String, Vec<(String, Position)>>,
    /// Paths whose value is a mapping or a sequence.
    collections: std::collections::HashSet<String>,
    /// Anchors or aliases tie parts of the file together.
    pub has_anchors: bool,
    pub duplicates: Vec<DuplicateKey>,
}

enum Frame {
    Mapping {
        path: String,
        /// The key whose value comes next; `None` while waiting for a key.
        pending_key: Option<String>,
        seen: HashMap<String, Position>,
    },
    Sequence {
        path: String,
        next_index: usize,
    },
}

/// What the node being read is, within its parent.
enum Role {
    Key,
    Value(String),
}

impl PositionIndex {
    /// Indexes `text`. A document yaml-rust2 cannot read gives an empty index:
    /// errors then carry no position rather than a wrong one.
    pub fn build(text: &str) -> Self {
        let mut index = PositionIndex::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        loop {
            let (event, marker) = match parser.next_token() {
                Ok(next) => next,
                Err(_) => return PositionIndex::default(),
            };
            let at = Position {
                line: marker.line(),
                // yaml-rust2 counts columns from 0.
                column: marker.col() + 1,
            };
            match event {
                Event::StreamEnd => break,
                // Only the first document is configuration.
                Event::DocumentEnd => break,
                Event::Scalar(ref text, _, anchor, _) if anchor > 0 => {
                    index.has_anchors = true;
                    if let Role::Value(path) = index.role(&mut stack, at, Some(text)) {
                        index.values.insert(path, at);
                    }
                }
                Event::Scalar(text, ..) => match index.role(&mut stack, at, Some(&text)) {
                    Role::Key => {}
                    Role::Value(path) => {
                        // An empty value (`token:`) is marked where the next
                        // token starts, often the next line; its key is the
                        // place the operator looks at.
                        let at = match index.keys.get(&path) {
                            Some(key_at) if text.is_empty() => *key_at,
                            _ => at,
                        };
                        index.values.insert(path, at);
                    }
                },
                Event::Alias(_) => {
                    index.has_anchors = true;
                    if let Role::Value(path) = index.role(&mut stack, at, None) {
                        index.values.insert(path, at);
                    }
                }
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    if matches!(event, Event::MappingStart(a, _) | Event::SequenceStart(a, _) if a > 0)
                    {
                        index.has_anchors = true;
                    }
                    let path = match index.role(&mut stack, at, None) {
                        Role::Value(path) => path,
                        // A mapping or sequence used as a key: index its
                        // insides under a path nothing will look up.
                        Role::Key => "?".to_string(),
                    };
                    index.values.insert(path.clone(), at);
                    index.collections.insert(path.clone());
                    stack.push(if matches!(event, Event::MappingStart(..)) {
                        Frame::Mapping {
                            path,
                            pending_key: None,
                            seen: HashMap::new(),
                        }
                    } else {
                        Frame::Sequence {
                            path,
                            next_index: 0,
                        }
                    });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                Event::Nothing | Event::StreamStart | Event::DocumentStart => {}
            }
        }
        index
    }

    /// Decides whether the node at `at` is a key or a value, and advances the parent.
    fn role(&mut self, stack: &mut [Frame], at: Position, scalar: Option<&str>) -> Role {
        let Some(parent) = stack.last_mut() else {
            return Role::Value(String::new());
        };
        match parent {
            Frame::Sequence { path, next_index } => {
                let child = format!("{path}[{next_index}]");
                *next_index += 1;
                self.children
                    .entry(path.clone())
                    .or_default()
                    .push((child.clone(), at));
                Role::Value(child)
            }
            Frame::Mapping {
                path,
                pending_key,
                seen,
            } => match pending_key.take() {
                Some(key) => Role::Value(join(path, &key)),
                None => {
                    let key = scalar.unwrap_or("?").to_string();
                    let child = join(path, &key);
                    if let Some(first) = seen.get(&key) {
                        // `<<` merge keys may repeat by design.
                        if key != "<<" {
                            self.duplicates.push(DuplicateKey {
                                path: child.clone(),
                                at,
                                first: *first,
                            });
                        }
                    } else {
                        seen.insert(key.clone(), at);
                    }
                    self.children
                        .entry(path.clone())
                        .or_default()
                        .push((child.clone(), at));
                    self.keys.entry(child).or_insert(at);
                    // yaml-rust2 marks a block mapping's start at its first
                    // key's `:`; the key itself is where the operator looks.
                    if let Some(start) = self.values.get_mut(path.as_str())
                        && at < *start
                    {
                        *start = at;
                    }
                    *pending_key = Some(key);
                    Role::Key
                }
            },
        }
    }

    /// Where the value at `path` starts; for a path that is not in the file
    /// (a default, a missing key), where its nearest written ancestor is.
    pub fn locate(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(at) = self.locate_exact(path) {
                return Some(at);
            }
            if path.is_empty() {
                return None;
            }
            path = parent(path);
        }
    }

    /// The entries of the mapping or sequence at `path` (`""` is the
    /// document), each with the place its key or item starts, in file order.
    pub fn children(&self, path: &str) -> &[(String, Position)] {
        self.children.get(path).map_or(&[], Vec::as_slice)
    }

    /// Where the value at exactly `path` starts, if it is written.
    ///
    /// A scalar is placed at its value (`upstream: apii` at `apii`); a
    /// mapping or sequence with a key at its key (`hello:`), where the
    /// operator looks for "this entry".
    pub fn locate_exact(&self, path: &str) -> Option<Position> {
        if self.collections.contains(path)
            && let Some(key) = self.keys.get(path)
        {
            return Some(*key);
        }
        self.values.get(path).copied()
    }

    /// Whether `path` is written in the file (even with an empty value).
    pub fn contains(&self, path: &str) -> bool {
        self.keys.contains_key(path) || self.values.contains_key(path)
    }

    /// The deepest path whose value starts on `line` at or before `column`:
    /// the key an `${ENV}` reference at that place belongs to.
    pub fn path_at(&self, line: usize, column: usize) -> Option<&str> {
        self.values
            .iter()
            .chain(self.keys.iter())
            .filter(|(_, at)| at.line == line && at.column <= column)
            .max_by_key(|(path, at)| (at.column, path.len()))
            .map(|(path, _)| path.as_str())
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `routes[1].upstream` -> `routes[1]` -> `routes` -> ``.
fn parent(path: &str) -> &str {
    if let Some(stripped) = path.strip_suffix(']')
        && let Some(open) = stripped.rfind('[')
    {
        return &path[..open];
    }
    match path.rfind('.') {
        Some(dot) => &path[..dot],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
listen: 0.0.0.0:8080
upstreams:
  api:
    servers: [\"http://a\", \"http://b\"]
routes:
  - match: { path_prefix: /v1/ }
    upstream: api
  - upstream: apii
    plugins:
      - cors
";

    fn at(line: usize, column: usize) -> Option<Position> {
        Some(Position { line, column })
    }

    #[test]
    fn values_are_found_by_serde_style_paths() {
        let index = PositionIndex::build(TEXT);
        assert_eq!(index.locate("listen"), at(1, 9));
        assert_eq!(index.locate("upstreams.api.servers[1]"), at(4, 27));
        assert_eq!(index.locate("routes[0].match.path_prefix"), at(6, 27));
        assert_eq!(index.locate("routes[1].upstream"), at(8, 15));
        assert_eq!(index.locate("routes[1].plugins[0]"), at(10, 9));
        assert!(index.contains("routes[1].upstream"));
    }

    #[test]
    fn a_block_mapping_starts_at_its_first_key() {
        let index = PositionIndex::build(TEXT);
        assert_eq!(index.locate("routes[1]"), at(8, 5));
    }

    #[test]
    fn an_entry_with_a_name_is_placed_at_its_name() {
        let index = PositionIndex::build(TEXT);
        assert_eq!(index.locate("upstreams.api"), at(3, 3));
        assert_eq!(index.locate("routes[0].match"), at(6, 5));
        assert_eq!(index.locate("upstreams.api.servers"), at(4, 5));
    }

    #[test]
    fn missing_paths_fall_back_to_their_nearest_ancestor() {
        let index = PositionIndex::build(TEXT);
        assert_eq!(index.locate("routes[1].source"), index.locate("routes[1]"));
        assert_eq!(index.locate("cache.max_size"), index.locate(""));
    }

    #[test]
    fn duplicate_keys_are_reported_with_both_places() {
        let index = PositionIndex::build("a: 1\nb: 2\na: 3\n");
        assert_eq!(
            index.duplicates,
            vec![DuplicateKey {
                path: "a".into(),
                at: Position { line: 3, column: 1 },
                first: Position { line: 1, column: 1 },
            }]
        );
    }

    #[test]
    fn path_at_finds_the_key_on_a_line() {
        let index = PositionIndex::build(TEXT);
        assert_eq!(index.path_at(8, 20), Some("routes[1].upstream"));
        assert_eq!(index.path_at(1, 12), Some("listen"));
    }

    #[test]
    fn parent_walks_up_one_segment() {
        assert_eq!(parent("routes[1].upstream"), "routes[1]");
        assert_eq!(parent("routes[1]"), "routes");
        assert_eq!(parent("routes"), "");
    }
}
