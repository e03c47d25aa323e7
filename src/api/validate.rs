//! Input validation shared by every API: sizes and characters.
//!
//! Every caller-controlled string passes through here before it reaches the
//! limiter. Stores still escape or hash these values in keys; validation is
//! about clear errors and bounded work, not key safety.

use crate::error::InvalidField;

/// Longest scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 128;
/// Longest identity, in bytes.
pub const MAX_IDENTITY_LEN: usize = 256;
/// Longest operation, in bytes.
pub const MAX_OPERATION_LEN: usize = 256;
/// Most attributes per request.
pub const MAX_ATTRIBUTES: usize = 16;
/// Longest attribute name, in bytes.
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 64;
/// Longest attribute value, in bytes.
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 256;
// The most requests in one batch and descriptors in one Envoy request are
// configured: `grpc.max_batch` and `grpc.max_envoy_descriptors`.
/// Most entries in one Envoy descriptor.
pub const MAX_DESCRIPTOR_ENTRIES: usize = 16;
/// Longest Envoy descriptor entry key, in bytes.
pub const MAX_DESCRIPTOR_KEY_LEN: usize = 128;
/// Longest Envoy descriptor entry value, in bytes.
pub const MAX_DESCRIPTOR_VALUE_LEN: usize = 256;

/// Checks one string field: at most `max` bytes, no control characters, and
/// not empty when `required`.
pub fn text(field: &str, value: &str, max: usize, required: bool) -> Result<(), InvalidField> {
    if required && value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(
            field,
            format!("is {} bytes; the most allowed is {max}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|&c| c.is_control() || is_invisible(c)) {
        return Err(invalid(
            field,
            format!(
                "must not contain control characters, bidi controls or invisible characters (found U+{:04X})",
                c as u32
            ),
        ));
    }
    Ok(())
}

/// Characters that change how text reads without being seen: bidi controls
/// (U+202E turns `alice` into what looks like another name in a log),
/// zero-width characters (two identities that print the same), and line and
/// paragraph separators (a forged second log line). Unicode's format
/// characters, with the separators, by the ranges they occupy.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// Checks an attribute map.
pub fn attributes<'a>(
    field: &str,
    attrs: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), InvalidField> {
    if attrs.len() > MAX_ATTRIBUTES {
        return Err(invalid(
            field,
            format!(
                "has {} entries; the most allowed is {MAX_ATTRIBUTES}",
                attrs.len()
            ),
        ));
    }
    for (k, v) in attrs {
        let key_field = format!("{field}[{:?}]", truncate(k));
        text(&key_field, k, MAX_ATTRIBUTE_KEY_LEN, true).map_err(|mut e| {
            e.problem = format!("name {}", e.problem);
            e
        })?;
        text(&key_field, v, MAX_ATTRIBUTE_VALUE_LEN, false)?;
    }
    Ok(())
}

/// Builds an error for `field`.
pub fn invalid(field: &str, problem: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.to_owned(),
        problem: problem.into(),
    }
}

/// Echoing a hostile 1 MB key back in an error helps nobody: cut it short.
fn truncate(s: &str) -> String {
    const SHOW: usize = 32;
    if s.len() <= SHOW {
        return s.to_owned();
    }
    let mut end = SHOW;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_named() {
        let e = text("identity", "a\nb", 10, false).unwrap_err();
        assert_eq!(e.field, "identity");
        assert!(e.problem.contains("U+000A"), "{e}");
    }

    #[test]
    fn bidi_zero_width_and_separators_are_refused() {
        for c in ['\u{202E}', '\u{200B}', '\u{2028}', '\u{2066}', '\u{FEFF}'] {
            let e = text("identity", &format!("ali{c}ce"), 64, false).unwrap_err();
            assert!(e.problem.contains(&format!("U+{:04X}", c as u32)), "{e}");
        }
        // Letters from any script stay welcome.
        assert!(text("identity", "ålice-名前-αλίκη", 64, false).is_ok());
    }

    #[test]
    fn long_attribute_names_are_cut_in_the_message() {
        let k = "k".repeat(100);
        let map = std::collections::HashMap::from([(k, "v".to_owned())]);
        let e = attributes("attributes", map.iter()).unwrap_err();
        assert!(e.to_string().len() < 120, "{e}");
        assert!(e.to_string().starts_with("attributes[\"kkkk"), "{e}");
    }
}
