//! `gkvm-hvparams(7)`: every hypervisor parameter with its type, default,
//! what it does and whether Ganeti 3.1 has it — generated from the API
//! schema (itself generated from `HvParams`), so it cannot drift.

use serde_json::Value;

/// Text for roff: backslashes escaped, no line starting with a control
/// character, rustdoc's links and code marks turned to words.
pub(crate) fn roff(text: &str) -> String {
    let plain = text
        .replace("[`", "")
        .replace("`]", "")
        .replace('`', "")
        .replace('\\', "\\e");
    plain
        .lines()
        .map(|l| {
            let l = l.trim();
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What values a parameter takes, from its schema.
fn kind(prop: &Value, defs: &Value) -> String {
    if let Some(r) = prop.get("$ref").and_then(Value::as_str) {
        let def = &defs[r.rsplit('/').next().unwrap_or("")];
        // The strings an `enum` lists, of the type and of each of its
        // alternatives (a `const` each, or an `enum` of several).
        let strings = |v: &Value| -> Vec<String> {
            let listed = v
                .get("enum")
                .and_then(Value::as_array)
                .into_iter()
                .flatten();
            v.get("const")
                .into_iter()
                .chain(listed)
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        };
        let mut values = strings(def);
        for alt in def
            .get("oneOf")
            .or_else(|| def.get("anyOf"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            values.extend(strings(alt));
        }
        return if values.is_empty() {
            "text".into()
        } else {
            format!("one of {}", values.join(", "))
        };
    }
    let types: Vec<&str> = match prop.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if types.contains(&"boolean") {
        "boolean (true, false)".into()
    } else if types.contains(&"integer") {
        "whole number".into()
    } else if types.contains(&"null") {
        "text (empty: none)".into()
    } else {
        "text".into()
    }
}

fn default_text(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => "empty".into(),
        Value::String(s) => s.clone(),
        Value::Null => "none".into(),
        other => other.to_string(),
    }
}

/// The page, in roff.
pub(crate) fn page(version: &str) -> String {
    let schema = hv_kvm::api_schema();
    let defs = &schema["$defs"];
    let props = defs["HvParams"]["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let gkvm_only = hv_kvm::GKVM_HVPARAMS;
    let mut out = format!(
        ".TH GKVM-HVPARAMS 7 \"\" \"gkvm {version}\" \"gkvm manual\"\n\
         .SH NAME\n\
         gkvm-hvparams \\- the hypervisor parameters of a gkvm instance\n\
         .SH DESCRIPTION\n\
         An instance's hypervisor parameters are Ganeti 3.1's KVM parameters, with the \
         same names, values and defaults, and gkvm's own beyond them. They are given as \
         \\fB-H\\fR \\fIKEY\\fR=\\fIVALUE\\fR to \\fBgkvm start\\fR and \\fBgkvm verify\\fR \
         (Ganeti's \\fB-H kvm:\\fR\\fIKEY\\fR=\\fIVALUE\\fR is taken too), as the \
         \\fBhvparams\\fR object of an instance definition (JSON), and by Ganeti through \
         its KVM hypervisor when gkvm's plugin is installed. gkvm's own parameters are \
         registered with Ganeti by the plugin; a cluster without it cannot set them, and \
         they take their defaults.\n\
         .PP\n\
         This page is generated from gkvm's code: every parameter it has is here, \
         {} in all ({} of Ganeti 3.1, {} of gkvm's own).\n\
         .SH PARAMETERS\n",
        props.len(),
        props.len() - gkvm_only.len(),
        gkvm_only.len()
    );
    for (key, prop) in &props {
        let origin = if gkvm_only.contains(&key.as_str()) {
            "gkvm's own (Ganeti 3.1 has none)"
        } else {
            "Ganeti 3.1's, same name"
        };
        let description = prop
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("(undocumented)");
        out.push_str(&format!(
            ".TP\n.B {key}\n{}; default: {}. {origin}.\n.br\n{}\n",
            roff(&kind(prop, defs)),
            roff(&default_text(prop.get("default").unwrap_or(&Value::Null))),
            roff(description)
        ));
    }
    out.push_str(
        ".SH SEE ALSO\n\
         \\fBgkvm\\fR(1), \\fBgkvm-start\\fR(1), \\fBgkvm-verify\\fR(1), \
         \\fBgkvm-set-limits\\fR(1), \\fBgnt-instance\\fR(8)\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_is_on_the_page_with_its_default() {
        let page = page("0.0.0");
        let keys = hv_kvm::HvParams::keys();
        assert!(keys.len() >= 79, "{}", keys.len());
        for key in &keys {
            assert!(page.contains(&format!(".B {key}\n")), "{key} missing");
        }
        assert!(page
            .contains(".B firmware\none of bios, uefi, uefi-secboot; default: bios. gkvm's own"));
        assert!(page.contains(".B acpi\nboolean (true, false); default: true. Ganeti 3.1's"));
        assert!(page.contains(".B migration_port\nwhole number; default: 8102."));
        // No line a roff reader would take for a request it does not know.
        for line in page.lines() {
            assert!(!line.starts_with('\''), "{line}");
            if let Some(rest) = line.strip_prefix('.') {
                let req = rest.split_whitespace().next().unwrap_or("");
                assert!(["TH", "SH", "PP", "TP", "B", "br"].contains(&req), "{line}");
            }
        }
    }
}
