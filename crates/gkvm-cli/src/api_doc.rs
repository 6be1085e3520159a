//! The API reference (`docs/API.md`), generated from the API's schema
//! (`hv_kvm::api_schema`) with one example per operation, each checked to
//! parse as the request it shows.

use serde_json::Value;

/// One example per operation: the smallest request that does something
/// real (fields with defaults left out).
const EXAMPLES: &[&str] = &[
    r#"{"op": "start", "spec": {"name": "web1", "memory": 512, "vcpus": 2, "disks": [{"path": "/dev/vg/web1"}], "nics": [{"mac": "52:54:00:12:34:56", "link": "br0"}], "hvparams": {"kernel_path": ""}}, "mode": "running"}"#,
    r#"{"op": "stop", "instance": "web1", "mode": {"kind": "acpi", "timeout_secs": 120}}"#,
    r#"{"op": "reboot", "instance": "web1", "config": null}"#,
    r#"{"op": "resume", "instance": "web1"}"#,
    r#"{"op": "balloon", "instance": "web1", "mib": 384}"#,
    r#"{"op": "nic_add", "instance": "web1", "nic": {"mac": "52:54:00:12:34:57", "link": "br1"}}"#,
    r#"{"op": "nic_modify", "instance": "web1", "id": "1", "nic": {"mac": "52:54:00:12:34:57", "link": "br2"}, "keep_mac": true}"#,
    r#"{"op": "nic_remove", "instance": "web1", "id": "1"}"#,
    r#"{"op": "disk_add", "instance": "web1", "disk": {"path": "/dev/vg/web1-data"}}"#,
    r#"{"op": "disk_remove", "instance": "web1", "id": "1"}"#,
    r#"{"op": "disk_grow", "instance": "web1", "id": "0", "bytes": 21474836480}"#,
    r#"{"op": "set_limits", "instance": "web1", "limits": {"cgroup_cpu_quota": 150, "cgroup_memory_max": 4608}}"#,
    r#"{"op": "set_io_limits", "instance": "web1", "group": "db", "limits": {"bps-read": 10485760, "iops-total": 500}}"#,
    r#"{"op": "hotplug_supported", "instance": "web1"}"#,
    r#"{"op": "cleanup", "instance": "web1"}"#,
    r#"{"op": "release_to_ganeti", "instance": "web1"}"#,
    r#"{"op": "remove_state", "instance": "web1"}"#,
    r#"{"op": "list"}"#,
    r#"{"op": "overview", "all": true}"#,
    r#"{"op": "info", "instances": ["web1"]}"#,
    r#"{"op": "node_info"}"#,
    r#"{"op": "stats", "instances": [], "pss": false}"#,
    r#"{"op": "powercycle_node", "dry_run": true}"#,
    r#"{"op": "console", "instance": "web1"}"#,
    r#"{"op": "verify"}"#,
    r#"{"op": "validate_params", "hvparams": {"kvm_path": "/usr/bin/qemu-system-x86_64", "vnc_bind_address": "0.0.0.0"}}"#,
    r#"{"op": "plan", "spec": {"name": "web1", "memory": 512}}"#,
    r#"{"op": "capabilities", "kvm_path": "/usr/bin/qemu-system-x86_64"}"#,
    r#"{"op": "migration_info", "instance": "web1", "for_ganeti": false}"#,
    r#"{"op": "receive", "info": "<migration_info's answer>", "address": "192.0.2.2", "port": null, "timeout_secs": 600, "config": {"hvparams": {}, "disks": [{"path": "/dev/vg/web1"}]}}"#,
    r#"{"op": "migrate", "instance": "web1", "target": "192.0.2.2", "port": null, "mode": "live"}"#,
    r#"{"op": "save", "instance": "web1", "file": "/var/lib/gkvm/saved/web1.save"}"#,
    r#"{"op": "restore", "file": "/var/lib/gkvm/saved/web1.save"}"#,
    r#"{"op": "plan_hotplug", "instance": "web1", "device": {"disk": {"path": "/dev/vg/web1-data"}}}"#,
    r#"{"op": "define", "spec": {"name": "web1", "memory": 512, "disks": [{"path": "/dev/vg/web1"}]}, "autostart": true}"#,
    r#"{"op": "undefine", "instance": "web1", "remove_state": false}"#,
    r#"{"op": "set_autostart", "instance": "web1", "enabled": false}"#,
    r#"{"op": "definitions"}"#,
    r#"{"op": "start_defined", "instance": "web1", "mode": "running"}"#,
    r#"{"op": "start_guests"}"#,
    r#"{"op": "shutdown_guests", "action": "save", "timeout_secs": 300}"#,
    r#"{"op": "migration_status", "instance": "web1"}"#,
    r#"{"op": "cancel_migration", "instance": "web1"}"#,
    r#"{"op": "await_migration", "info": "<migration_info's answer>", "address": "192.0.2.2", "port": 8102, "config": null}"#,
    r#"{"op": "migrate_unfinalized", "instance": "web1", "target": "192.0.2.2", "port": 8102, "mode": "offline"}"#,
    r#"{"op": "finalize_destination", "instance": "web1", "outcome": "completed"}"#,
    r#"{"op": "finalize_source", "instance": "web1", "outcome": "completed"}"#,
];

/// Rustdoc links (`[`KvmHypervisor::stop`]`) as plain code.
fn plain(text: &str) -> String {
    text.replace("[`", "`").replace("`]", "`")
}

/// A property's type in a few words.
fn type_of(p: &Value) -> String {
    if let Some(r) = p.get("$ref").and_then(Value::as_str) {
        return r.rsplit('/').next().unwrap_or(r).to_owned();
    }
    if let Some(any) = p.get("anyOf").and_then(Value::as_array) {
        let parts: Vec<String> = any.iter().map(type_of).collect();
        return parts.join(" or ");
    }
    match p.get("type") {
        Some(Value::String(t)) if t == "array" => {
            format!("array of {}", p.get("items").map_or("any".into(), type_of))
        }
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".into(),
    }
}

/// The reference as Markdown; an error names an operation without a
/// (valid) example.
pub(crate) fn reference() -> Result<String, String> {
    let schema = hv_kvm::api_schema();
    let defs = &schema["$defs"];
    let mut out = String::from(
        "# gkvm API reference (v1)\n\n\
         Generated by `gkvm api --reference` from the API's JSON Schema\n\
         (`schemas/v1/api.json`, itself generated from `hv_kvm::Request` and\n\
         `hv_kvm::Reply`); do not edit. A request is one JSON object, given to\n\
         `gkvm api` on stdin (or as a file) or sent to `gkvm serve` as\n\
         `{\"request\": {...}}` on one line; the answer is JSON Lines: any\n\
         number of `{\"progress\": ...}` (a migration's), then one\n\
         `{\"response\": {\"answer\": ..., \"value\": ...}}` or `{\"error\":\n\
         {\"kind\": ..., \"instance\": ..., \"message\": ...}}`. Decide by\n\
         `answer` and by the error's `kind`, never by messages. Fields not\n\
         listed as required take their defaults; unknown fields are refused.\n\n\
         ## Operations\n\n",
    );
    let ops = defs["Request"]["oneOf"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for op in &ops {
        let name = op["properties"]["op"]["const"].as_str().unwrap_or("?");
        out.push_str(&format!("### `{name}`\n\n"));
        if let Some(d) = op["description"].as_str() {
            out.push_str(&plain(d));
            out.push_str("\n\n");
        }
        let required: Vec<&str> = op["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let props = op["properties"].as_object().cloned().unwrap_or_default();
        let fields: Vec<_> = props.iter().filter(|(k, _)| *k != "op").collect();
        if !fields.is_empty() {
            out.push_str("| field | type | required | meaning |\n|---|---|---|---|\n");
            for (k, p) in fields {
                let meaning = plain(p["description"].as_str().unwrap_or("")).replace('\n', " ");
                let req = if required.contains(&k.as_str()) {
                    "yes"
                } else {
                    "no"
                };
                out.push_str(&format!("| `{k}` | {} | {req} | {meaning} |\n", type_of(p)));
            }
            out.push('\n');
        }
        let example = EXAMPLES
            .iter()
            .find(|e| e.contains(&format!("\"op\": \"{name}\"")))
            .ok_or_else(|| format!("no example of {name}"))?;
        hv_kvm::Request::from_json(example)
            .map_err(|e| format!("the example of {name} does not parse: {e}"))?;
        out.push_str(&format!("```json\n{example}\n```\n\n"));
    }
    out.push_str("## Answers\n\n| answer | value |\n|---|---|\n");
    for answer in defs["Response"]["oneOf"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let name = answer["properties"]["answer"]["const"]
            .as_str()
            .unwrap_or("?");
        let value = answer["properties"]
            .get("value")
            .map_or_else(|| "none".to_owned(), type_of);
        let meaning = plain(answer["description"].as_str().unwrap_or(""));
        out.push_str(&format!("| `{name}` | {value}: {meaning} |\n"));
    }
    out.push_str(
        "\nThe types named above (`InstanceSpec`, `StopMode`, ...) are defined in\n\
         `schemas/v1/api.json` under `$defs`.\n",
    );
    Ok(out)
}
