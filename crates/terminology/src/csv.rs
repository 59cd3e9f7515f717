//! Minimal CSV line parsing (RFC 4180 quoting) and encoding detection.

/// Decodes a published master file: UTF-8 (with or without BOM) when valid,
/// otherwise Shift_JIS (as `encoding_rs`/WHATWG decode it, i.e. CP932).
/// Returns the text and the encoding name used.
pub fn decode(bytes: &[u8]) -> (String, &'static str) {
    let b = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(b) {
        Ok(s) => (s.to_string(), "UTF-8"),
        Err(_) => {
            let (s, _, _) = encoding_rs::SHIFT_JIS.decode(b);
            (s.into_owned(), "Shift_JIS")
        }
    }
}

/// Splits one CSV record. Returns `Err` for an unterminated quoted field.
pub fn split(line: &str) -> Result<Vec<String>, String> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut in_q = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        if in_q {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    cur.push('"');
                    chars.next();
                } else {
                    in_q = false;
                }
            } else {
                cur.push(c);
            }
        } else {
            match c {
                '"' if cur.is_empty() && !was_quoted => {
                    in_q = true;
                    was_quoted = true;
                }
                ',' => {
                    out.push(std::mem::take(&mut cur));
                    was_quoted = false;
                }
                _ => cur.push(c),
            }
        }
    }
    if in_q {
        return Err("unterminated quoted field".into());
    }
    out.push(cur);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits() {
        assert_eq!(
            split(r#""a","b,c","d""e""#).unwrap(),
            vec!["a", "b,c", "d\"e"]
        );
        assert_eq!(split("a,,b\r").unwrap(), vec!["a", "", "b"]);
        assert!(split("\"a").is_err());
    }

    #[test]
    fn decodes_shift_jis() {
        let (sjis, _, _) = encoding_rs::SHIFT_JIS.encode("高血圧症");
        let (s, enc) = decode(&sjis);
        assert_eq!(s, "高血圧症");
        assert_eq!(enc, "Shift_JIS");
    }
}
