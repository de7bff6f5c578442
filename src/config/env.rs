//! `${NAME}` interpolation of environment variables into the config text.
//!
//! Substitution happens in the text before YAML parsing, line by line, so a
//! line number in any later error is still the operator's line number. To keep
//! that true and to keep a value from changing the YAML structure around it,
//! a value is escaped for where it lands:
//! - inside `"..."`: backslash-escaped (a newline becomes `\n`);
//! - inside `'...'`: `'` doubled; newlines refused;
//! - in a block scalar (`|`, `>`): inserted as is; newlines refused;
//! - in a plain scalar: inserted as is, but a value YAML would read as syntax
//!   there (`#`, `: `, brackets, quotes, a newline, ...) is refused with a hint
//!   to quote the reference.
//!
//! Comments are left alone, and `$${NAME}` is a literal `${NAME}`.
//! Owns only text substitution; must not read files or parse YAML.

/// A reference that could not be substituted, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    Plain,
    SingleQuoted,
    DoubleQuoted,
    Block,
}

/// Replaces every `${NAME}` in `text` using `lookup`; returns every problem.
pub fn interpolate(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<EnvError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    // Indentation of the line that opened a block scalar, while inside one.
    let mut block_indent: Option<usize> = None;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let is_blank = line.trim().is_empty();
        if let Some(opener) = block_indent
            && (is_blank || indent > opener)
        {
            substitute_line(line, number + 1, true, lookup, &mut out, &mut errors);
            continue;
        }
        block_indent = None;
        let code = substitute_line(line, number + 1, false, lookup, &mut out, &mut errors);
        if opens_block_scalar(code) {
            // Content must be indented past the key, which in `- body: |`
            // sits after the dash; erring high only means stricter rules.
            block_indent = Some(line.len() - line.trim_start_matches([' ', '-']).len());
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Substitutes one line into `out`; returns the line's text before any comment.
fn substitute_line<'a>(
    line: &'a str,
    number: usize,
    in_block: bool,
    lookup: &dyn Fn(&str) -> Option<String>,
    out: &mut String,
    errors: &mut Vec<EnvError>,
) -> &'a str {
    let bytes = line.as_bytes();
    let mut context = if in_block {
        Context::Block
    } else {
        Context::Plain
    };
    let mut i = 0;
    let mut copied_up_to = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        match (context, byte) {
            (Context::Plain, b'#') if i == 0 || bytes[i - 1].is_ascii_whitespace() => {
                out.push_str(&line[copied_up_to..]);
                return &line[..i];
            }
            (Context::Plain, b'\'' | b'"') if starts_a_scalar(&line[..i]) => {
                context = if byte == b'\'' {
                    Context::SingleQuoted
                } else {
                    Context::DoubleQuoted
                };
            }
            (Context::SingleQuoted, b'\'') => {
                // `''` is an escaped quote and leaves the string open.
                if bytes.get(i + 1) == Some(&b'\'') {
                    i += 1;
                } else {
                    context = Context::Plain;
                }
            }
            (Context::DoubleQuoted, b'\\') => i += 1,
            (Context::DoubleQuoted, b'"') => context = Context::Plain,
            (_, b'$') if line[i..].starts_with("$${") => {
                // `$${` -> literal `${`: drop one `$` and skip past the brace.
                out.push_str(&line[copied_up_to..i]);
                out.push_str("${");
                i += 3;
                copied_up_to = i;
                continue;
            }
            (_, b'$') if line[i..].starts_with("${") => {
                out.push_str(&line[copied_up_to..i]);
                let column = line[..i].chars().count() + 1;
                let at_scalar_start = context == Context::Plain && starts_a_scalar(&line[..i]);
                match line[i + 2..].find('}') {
                    Some(len) => {
                        let name = &line[i + 2..i + 2 + len];
                        match resolve(name, lookup, context, at_scalar_start) {
                            Ok(value) => out.push_str(&value),
                            Err(message) => errors.push(EnvError {
                                line: number,
                                column,
                                message,
                            }),
                        }
                        i += 2 + len + 1;
                    }
                    None => {
                        errors.push(EnvError {
                            line: number,
                            column,
                            message: "unclosed \"${\" (write $${ for a literal ${)".to_string(),
                        });
                        i = bytes.len();
                    }
                }
                copied_up_to = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out.push_str(&line[copied_up_to..]);
    line
}

/// Whether a quote after `before` opens a quoted scalar (rather than being an
/// apostrophe inside a plain one, as in `don't`).
fn starts_a_scalar(before: &str) -> bool {
    let trimmed = before.trim_end();
    if trimmed.len() == before.len() && !trimmed.is_empty() {
        // Glued to the previous character: only flow indicators open a scalar there.
        return trimmed.ends_with(['[', '{', ',']);
    }
    trimmed.is_empty() || trimmed.ends_with([':', '-', '[', '{', ',', '?'])
}

/// A line like `body: >`, `- |-` or `script: |2` opens a block scalar.
fn opens_block_scalar(code: &str) -> bool {
    let code = code.trim_end();
    let Some(last_space) = code.rfind(char::is_whitespace) else {
        return code.starts_with(['|', '>']) && is_block_header(code);
    };
    let header = &code[last_space + 1..];
    let before = code[..last_space].trim_end();
    is_block_header(header) && (before.is_empty() || before.ends_with(':') || before.ends_with('-'))
}

fn is_block_header(word: &str) -> bool {
    let mut chars = word.chars();
    matches!(chars.next(), Some('|' | '>'))
        && chars.all(|c| matches!(c, '-' | '+') || c.is_ascii_digit())
}

fn resolve(
    name: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    context: Context,
    at_scalar_start: bool,
) -> Result<String, String> {
    let is_valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !is_valid_name {
        return Err(format!(
            "invalid environment variable reference \"${{{name}}}\": a name is letters, digits and _ (write $${{ for a literal ${{)"
        ));
    }
    let Some(value) = lookup(name) else {
        return Err(format!("environment variable {name} is not set"));
    };
    escape_for(&value, context, at_scalar_start)
        .map_err(|why| format!("environment variable {name} {why}"))
}

fn escape_for(value: &str, context: Context, at_scalar_start: bool) -> Result<String, String> {
    let has_newline = value.contains(['\n', '\r']);
    match context {
        Context::DoubleQuoted => Ok(value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .replace('\r', "\\r")
            .replace('\t', "\\t")),
        Context::SingleQuoted if has_newline => {
            Err("holds a newline; use the reference inside \"double quotes\"".to_string())
        }
        Context::SingleQuoted => Ok(value.replace('\'', "''")),
        Context::Block if has_newline => {
            Err("holds a newline, which would break this block's lines".to_string())
        }
        Context::Block => Ok(value.to_string()),
        Context::Plain => {
            let breaks_plain_scalar = has_newline
                || value.contains(['#', '[', ']', '{', '}', ',', '\'', '"', '\t'])
                || value.contains(": ")
                || value.ends_with(':')
                || value.starts_with(' ')
                || value.ends_with(' ')
                || (at_scalar_start
                    && value.starts_with(['-', '?', ':', '&', '*', '!', '|', '>', '%', '@', '`']));
            if breaks_plain_scalar {
                Err("holds characters YAML would read as syntax here; put the reference in quotes, e.g. \"${NAME}\"".to_string())
            } else {
                Ok(value.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("api.internal".into()),
            "TOKEN" => Some("s3cr\"et'#1".into()),
            "MULTI" => Some("a\nb".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn run(text: &str) -> Result<String, Vec<EnvError>> {
        interpolate(text, &env)
    }

    #[test]
    fn substitutes_in_plain_and_quoted_values() {
        assert_eq!(
            run("endpoint: http://${HOST}:8123\n").unwrap(),
            "endpoint: http://api.internal:8123\n"
        );
        assert_eq!(run("t: '${TOKEN}'\n").unwrap(), "t: 's3cr\"et''#1'\n");
        assert_eq!(run("t: \"${TOKEN}\"\n").unwrap(), "t: \"s3cr\\\"et'#1\"\n");
        assert_eq!(run("t: \"${MULTI}\"\n").unwrap(), "t: \"a\\nb\"\n");
    }

    #[test]
    fn leaves_comments_and_escapes_alone() {
        assert_eq!(run("a: 1 # ${NOPE}\n").unwrap(), "a: 1 # ${NOPE}\n");
        assert_eq!(run("# ${NOPE}\n").unwrap(), "# ${NOPE}\n");
        assert_eq!(run("a: $${NOPE}\n").unwrap(), "a: ${NOPE}\n");
        assert_eq!(
            run("a: 'x # ${HOST}'\n").unwrap(),
            "a: 'x # api.internal'\n"
        );
    }

    #[test]
    fn reports_every_missing_variable_with_its_place() {
        let errors = run("a: ${ONE}\nb:\n  c: x-${TWO}\n").unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!((errors[0].line, errors[0].column), (1, 4));
        assert!(errors[0].message.contains("ONE is not set"));
        assert_eq!((errors[1].line, errors[1].column), (3, 8));
    }

    #[test]
    fn refuses_values_that_would_change_the_structure() {
        assert!(run("t: ${TOKEN}\n").is_err());
        assert!(run("t: ${MULTI}\n").is_err());
        assert!(run("t: '${MULTI}'\n").is_err());
        assert!(run("t: ${EMPTY}\n").is_ok());
    }

    #[test]
    fn block_scalars_take_values_verbatim() {
        let text = "body: >\n  SELECT '${TOKEN}' # not a comment\nnext: ${HOST}\n";
        assert_eq!(
            run(text).unwrap(),
            "body: >\n  SELECT 's3cr\"et'#1' # not a comment\nnext: api.internal\n"
        );
    }

    #[test]
    fn a_block_in_a_list_item_ends_at_the_next_key() {
        let text = "  - body: |\n      ${TOKEN}\n    next: ${TOKEN}\n";
        let errors = run(text).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 3, "the sibling key is plain again");
    }

    #[test]
    fn apostrophes_in_plain_scalars_do_not_open_quotes() {
        assert_eq!(
            run("a: don't ${HOST}\n").unwrap(),
            "a: don't api.internal\n"
        );
    }

    #[test]
    fn rejects_malformed_references() {
        assert!(run("a: ${1X}\n").is_err());
        assert!(run("a: ${X\n").is_err());
    }
}
