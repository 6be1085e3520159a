//! Instance names, checked once before they reach a path or an argv.

use crate::Error;

/// Longest instance name accepted (a fully qualified host name fits).
pub const MAX_NAME_LEN: usize = 128;

/// Checks that `name` is safe as a file name and as a QEMU argument:
/// ASCII letters, digits, `.`, `_`, `-` and `+`; not empty; at most
/// [`MAX_NAME_LEN`] bytes; no leading `-` or `.`; no `..`.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 bytes");
    }
    if name.starts_with('-') {
        return bad("starts with '-' (would read as an option)");
    }
    if name.starts_with('.') {
        return bad("starts with '.'");
    }
    if name.contains("..") {
        return bad("contains '..'");
    }
    if name.contains('/') {
        return bad("contains '/'");
    }
    if name.bytes().any(|b| b.is_ascii_control()) {
        return bad("contains a control character");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
    {
        return bad("only ASCII letters, digits and . _ - + are allowed");
    }
    Ok(())
}
