//! Where, in a JSON object's bytes, does the value of one of its own (top-level) fields
//! start? Found by skipping strings and counting brackets, not by parsing: a chat
//! completion's `usage` is read this way for a fraction of what deserializing the body around
//! it costs (its content, skipped a character at a time, is most of the body).

/// The bytes of `json` from the value of its top-level field `key` on, when `json` is one
/// object whose brackets balance and that has exactly one field named `key` (spelled without
/// escapes); `None` otherwise, so that the caller can fall back to a full parse. Values are
/// not checked: the caller parses the one it wants.
pub fn top_level_field<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let start = json.iter().position(|b| !b.is_ascii_whitespace())?;
    if json[start] != b'{' {
        return None;
    }
    let mut depth = 0u32;
    let mut found = None;
    // The content of the last string closed directly inside the top-level object, while
    // only whitespace has followed it: a key when a colon comes next.
    let mut pending_key: Option<&[u8]> = None;
    let mut i = start;
    while i < json.len() {
        let byte = json[i];
        match byte {
            b'"' => {
                let end = string_end(json, i + 1)?;
                pending_key = (depth == 1).then(|| &json[i + 1..end]);
                i = end + 1;
                continue;
            }
            // (The key is forgotten below, as after any byte but whitespace.)
            b':' if pending_key == Some(key) => {
                if found.is_some() {
                    return None;
                }
                found = Some(i + 1);
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    let rest = &json[i + 1..];
                    return if rest.iter().all(u8::is_ascii_whitespace) {
                        found.map(|at| &json[at..])
                    } else {
                        None
                    };
                }
            }
            _ => {}
        }
        if !byte.is_ascii_whitespace() {
            pending_key = None;
        }
        i += 1;
    }
    None
}

/// The index of the quote that closes the JSON string whose content starts at `from`;
/// `None` when `json` ends first.
pub(super) fn string_end(json: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from + memchr::memchr2(b'"', b'\\', json.get(from..)?)?;
        if json[at] == b'"' {
            return Some(at);
        }
        // An escape: the next byte is never the string's end.
        from = at + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
        top_level_field(json.as_bytes(), key.as_bytes()).map(|v| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn finds_a_top_level_field_and_not_a_nested_one_of_the_same_name() {
        let json = r#"{"choices":[{"usage":1,"message":{"usage":2}}],"usage":{"prompt_tokens":3}}"#;
        assert_eq!(field(json, "usage"), Some(r#"{"prompt_tokens":3}}"#));
        assert_eq!(field(json, "choices").map(|v| &v[..2]), Some("[{"));
        assert_eq!(field(json, "message"), None, "only nested");
    }

    #[test]
    fn the_name_inside_a_string_value_or_escaped_is_not_a_field() {
        let json = r#"{"content":"say \"usage\": {\"prompt_tokens\": 9}", "note": "usage", "x":1}"#;
        assert_eq!(field(json, "usage"), None);
        let escaped_key = r#"{"\u0075sage":{"prompt_tokens":1}}"#;
        assert_eq!(field(escaped_key, "usage"), None, "left to the full parse");
        let backslash_at_end = r#"{"content":"a\\","usage":null}"#;
        assert_eq!(field(backslash_at_end, "usage"), Some("null}"));
    }

    #[test]
    fn whitespace_anywhere_json_allows_it() {
        let json = " \n{ \"usage\" \t:\n {\"prompt_tokens\": 1} } \n";
        assert_eq!(field(json, "usage"), Some("\n {\"prompt_tokens\": 1} } \n"));
    }

    #[test]
    fn anything_but_one_balanced_object_with_one_such_field_is_none() {
        for json in [
            "",
            "[]",
            r#"["usage",{"usage":1}]"#,
            r#"{"usage":1"#,
            r#"{"usage":1}}"#,
            r#"{"usage":1} trailing"#,
            r#"{"usage":1,"usage":2}"#,
            r#"{"usage":"unterminated}"#,
            r#"{"a":"\"#,
            r#"{"usage" "x":1}"#,
        ] {
            assert_eq!(field(json, "usage"), None, "{json}");
        }
    }
}
