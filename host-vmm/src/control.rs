//! The VMM process's control socket (`dstack-vmm-run --control-socket PATH`), through which the VM manager
//! acts on a running VM: one command per connection, a line in and a line out.
//!
//! - `power-button` → presses the ACPI fixed-feature power button (`OK`; `ERR …` without ACPI).
//!
//! Anything else is answered `ERR unknown command`. The socket is created 0600 (the manager runs as the
//! same user as the VMM).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use crate::devices::acpi_pm::PowerButton;

/// The power-button command.
pub const POWER_BUTTON: &str = "power-button";
/// Longest command line read.
const MAX_LINE: u64 = 256;

/// The reply to one command line.
pub fn handle(line: &str, button: Option<&PowerButton>) -> String {
    match (line.trim(), button) {
        (POWER_BUTTON, Some(b)) => {
            b.press();
            "OK".into()
        }
        (POWER_BUTTON, None) => "ERR no ACPI power button (the VM runs without --acpi)".into(),
        _ => "ERR unknown command".into(),
    }
}

/// Binds `path` (replacing a stale socket) and serves it on a background thread for the process lifetime.
pub fn serve(path: &Path, button: Option<PowerButton>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new().name("vmm-control".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let mut reader = BufReader::new((&conn).take(MAX_LINE));
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let reply = handle(&line, button.as_ref());
            let _ = (&conn).write_all(format!("{reply}\n").as_bytes());
        }
    })?;
    Ok(())
}

/// Sends `command` to the control socket at `path` and returns the reply line (`OK`, `ERR …`).
pub fn send(path: &Path, command: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s.take(MAX_LINE)).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;
    use crate::devices::acpi_pm::{PWRBTN, Pm1};
    use std::sync::{Arc, Mutex};

    #[test]
    fn power_button_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let pm1 = Arc::new(Mutex::new(Pm1::new(None)));
        serve(&path, Some(PowerButton(pm1.clone()))).unwrap();
        assert_eq!(
            send(&path, "bogus", Duration::from_secs(5)).unwrap(),
            "ERR unknown command"
        );
        assert_eq!(send(&path, POWER_BUTTON, Duration::from_secs(5)).unwrap(), "OK");
        let mut sts = [0u8; 2];
        pm1.lock().unwrap().read(0, &mut sts);
        assert_eq!(u16::from_le_bytes(sts) & PWRBTN, PWRBTN);
        assert!(handle(POWER_BUTTON, None).starts_with("ERR no ACPI"));
    }
}
