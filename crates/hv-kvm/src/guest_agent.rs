//! The guest agent (`use_guest_agent`): qemu-ga's JSON protocol on the
//! instance's `ctrl/NAME.qga` socket. A `guest-sync` with a fresh id first
//! skips whatever an earlier client left unread, as qemu-ga's protocol
//! asks; then the command.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Connects and synchronizes; the stream is ready for a command.
async fn synced(path: &Path) -> Result<BufReader<UnixStream>, String> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut conn = BufReader::new(stream);
    let id = u64::from(std::process::id()) << 20 | u64::from(rand_low());
    send(
        &mut conn,
        &serde_json::json!({"execute": "guest-sync", "arguments": {"id": id}}),
    )
    .await?;
    loop {
        let v = read(&mut conn).await?;
        if v.get("return").and_then(Value::as_u64) == Some(id) {
            return Ok(conn);
        }
    }
}

fn rand_low() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xfffff)
        .unwrap_or(0)
}

async fn send(conn: &mut BufReader<UnixStream>, v: &Value) -> Result<(), String> {
    let mut line = v.to_string();
    line.push('\n');
    conn.get_mut()
        .write_all(line.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))
}

/// The next JSON object the agent sends (lines that are not are skipped;
/// at most 64 KiB per line).
async fn read(conn: &mut BufReader<UnixStream>) -> Result<Value, String> {
    loop {
        let mut line = String::new();
        let n = (&mut *conn)
            .take(64 << 10)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the agent's channel closed".into());
        }
        if let Ok(v @ Value::Object(_)) = serde_json::from_str(line.trim()) {
            return Ok(v);
        }
    }
}

/// Whether the agent answers `guest-ping` within `timeout`.
pub(crate) async fn ping(path: &Path, timeout: Duration) -> bool {
    let exchange = async {
        let mut conn = synced(path).await?;
        send(&mut conn, &serde_json::json!({"execute": "guest-ping"})).await?;
        let v = read(&mut conn).await?;
        if v.get("return").is_some() {
            Ok(())
        } else {
            Err(format!("{v}"))
        }
    };
    matches!(tokio::time::timeout(timeout, exchange).await, Ok(Ok(())))
}
