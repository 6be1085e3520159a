//! Putting user values into QEMU's option syntax safely.

use std::path::Path;

use crate::Error;

fn reject_control(field: &str, value: &str) -> Result<(), Error> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Error::Unexpressible {
            field: field.to_owned(),
            value: value.to_owned(),
            reason: format!("contains the control character {c:?}"),
        });
    }
    Ok(())
}

/// A value inside a `key=value,...` option: commas doubled (QEMU's
/// escape), control characters (newline, NUL, ...) refused.
pub fn opt_value(field: &str, value: &str) -> Result<String, Error> {
    reject_control(field, value)?;
    Ok(value.replace(',', ",,"))
}

/// A path inside a `key=value,...` option.
pub fn opt_path(field: &str, path: &Path) -> Result<String, Error> {
    opt_value(field, path_str(field, path)?)
}

/// A value that is a whole argument (`-append TEXT`, `-cpu MODEL`):
/// nothing to escape, but control characters are still refused.
pub fn whole_arg(field: &str, value: &str) -> Result<String, Error> {
    reject_control(field, value)?;
    Ok(value.to_owned())
}

/// A path as UTF-8 (argv is built as strings).
pub fn path_str<'a>(field: &str, path: &'a Path) -> Result<&'a str, Error> {
    path.to_str().ok_or_else(|| Error::Unexpressible {
        field: field.to_owned(),
        value: path.to_string_lossy().into_owned(),
        reason: "is not valid UTF-8".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_doubled_control_refused() {
        assert_eq!(opt_value("f", "/a,b,,c").unwrap(), "/a,,b,,,,c");
        for bad in ["a\nb", "a\0b", "a\rb", "\u{7f}"] {
            assert!(
                matches!(opt_value("f", bad), Err(Error::Unexpressible { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(whole_arg("kernel_args", "a,b c").unwrap(), "a,b c");
    }
}
